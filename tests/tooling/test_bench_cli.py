"""The benchmark CLI on CPU: help of every subcommand, `check --quick`, a tiny `ops` run with JSON/CSV
output validated against the results schema, `models`, `report`, and the baselines' math."""

import csv
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from vitkernels.bench import baselines, cases, cli, results
from vitkernels.bench.harness import _rel_err


def _main(argv):
    return cli.main(argv)


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("sub", [[], ["ops"], ["models"], ["check"], ["report"]])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        _main(sub + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: vitkernels-bench" in out
    if sub == ["ops"]:
        for flag in ("--op", "--dtype", "--batch", "--json", "--csv", "--plot", "--impl", "--backend", "--budget"):
            assert flag in out


def test_console_script_and_module_help():
    out = subprocess.run(
        [sys.executable, "-m", "vitkernels.bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ops" in out.stdout and "models" in out.stdout and "check" in out.stdout
    exe = shutil.which("vitkernels-bench")
    if exe is None:
        pytest.skip("console script not on PATH (package not pip-installed)")
    out = subprocess.run([exe, "ops", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--json" in out.stdout


def test_bad_arguments_exit_cleanly():
    with pytest.raises(SystemExit, match="unknown op"):
        _main(["ops", "--op", "nope", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown dtype"):
        _main(["ops", "--dtype", "int8", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown impl"):
        _main(["ops", "--impl", "magic", "--device", "cpu"])


# ----------------------------------------------------------------------------- overhead


def test_overhead_every_op_with_the_kernels_stubbed(tmp_path, capsys):
    from vitkernels import backends
    from vitkernels.ops import _spec

    before = {op: dict(backends.kernels(op)) for op in backends.ops()}
    path = tmp_path / "overhead.json"
    assert _main(["overhead", "--calls", "3", "--repeats", "1", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["kind"] == "overhead" and doc["goal_us"] == 10.0
    got = {r["op"]: r for r in doc["records"]}
    assert set(_spec.names()) | {"F.scaled_dot_product_attention", "torch.empty"} == set(got)
    assert all(r["fast_us"] > 0 and r["dispatcher_us"] > 0 for r in got.values())
    assert "fast path" in capsys.readouterr().out
    # the real kernels are back
    assert {op: dict(backends.kernels(op)) for op in backends.ops()} == before
    with pytest.raises(SystemExit, match="unknown op"):
        _main(["overhead", "--op", "nope"])


def test_allocation_only_kernels_return_the_real_shapes():
    import vitkernels as vk
    from vitkernels._samples import samples
    from vitkernels.bench import overhead

    for name, args in samples(batch=1).items():
        with torch.no_grad():
            want = getattr(vk, name)(*args)
            with overhead.allocation_only(name, args):
                getattr(vk, name)(*args)  # the real run that records the shapes
                got = getattr(vk, name)(*args)
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        assert [t.shape for t in got] == [t.shape for t in want], name


# ----------------------------------------------------------------------------- check


def test_check_quick(capsys):
    assert _main(["check", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "check: all passed" in out
    for op in cases.OPS:
        assert op in out


# ----------------------------------------------------------------------------- ops


def test_ops_tiny_run_json_csv(tmp_path, capsys):
    jpath, cpath = tmp_path / "ops.json", tmp_path / "ops.csv"
    rc = _main(
        [
            "ops",
            "--op",
            "self_attention",
            "--op",
            "window_attention",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--cpu-reps",
            "2",
            "--json",
            str(jpath),
            "--csv",
            str(cpath),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "CPU timing" in out and "== self_attention" in out and "== window_attention" in out

    doc = json.loads(jpath.read_text())
    assert results.validate(doc) == []
    assert doc["gpu"] == "cpu" and doc["cuda"] and doc["torch"] == torch.__version__
    recs = doc["records"]
    got = {(r["name"], r["mode"], r["impl"]) for r in recs}
    for op in ("self_attention", "window_attention"):
        for mode in ("fwd", "fwd+bwd"):
            for impl in ("vitkernels", "eager", "sdpa"):
                assert (op, mode, impl) in got
    for r in recs:
        assert r["kind"] == "op" and r["dtype"] == "float32" and r["timing"] == "CPU timing"
        assert r["ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0
        if r["impl"] == "vitkernels":
            assert r["backend"] == "reference"  # what actually ran on CPU
        else:
            assert r["verify_err"] is not None and r["verify_err"] < 1e-4, r  # same math as the op
            assert r["vk_speedup"] > 0
    with open(cpath) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(recs)
    assert set(results.CSV_FIELDS) <= set(rows[0])


def test_ops_list(capsys):
    assert _main(["ops", "--list", "--device", "cpu", "--full", "--op", "sr_attention"]) == 0
    out = capsys.readouterr().out
    assert "pvt_v2_b2|segformer_b2 s1@512" in out and "reference" in out


def test_ops_plot(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            _main(["ops", "--op", "xca", "--device", "cpu", "--plot", str(tmp_path / "p.png")])
        return
    assert (
        _main(
            [
                "ops",
                "--op",
                "xca",
                "--device",
                "cpu",
                "--cpu-reps",
                "1",
                "--no-progress",
                "--plot",
                str(tmp_path / "p.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "p.png").stat().st_size > 0


# ----------------------------------------------------------------------------- results schema


def _doc(**over):
    rec = {
        "kind": "op",
        "name": "self_attention",
        "mode": "fwd",
        "dtype": "bfloat16",
        "shape": {"B": 1},
        "impl": "vitkernels",
        "ms": 0.5,
        "tflops": 1.0,
        "gbps": None,
    }
    doc = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "commit": "a" * 40,
        "timestamp": "2026-11-21T09:00:00+00:00",
        "torch": "2.11.0",
        "triton": "3.6.0",
        "cuda": "13.0",
        "records": [rec],
    }
    doc.update(over)
    return doc


def test_validator():
    assert results.validate(_doc()) == []
    assert any("missing key 'gpu'" in e for e in results.validate({k: v for k, v in _doc().items() if k != "gpu"}))
    assert results.validate(_doc(commit="1a3bc22"))  # short sha is not allowed
    assert results.validate(_doc(timestamp="yesterday"))
    bad = _doc()
    bad["records"][0].update(mode="train")  # a model mode on an op record
    assert any("mode" in e for e in results.validate(bad))
    bad = _doc()
    bad["records"][0].update(ms=-1.0, tflops="fast")
    errs = results.validate(bad)
    assert any(".ms" in e for e in errs) and any(".tflops" in e for e in errs)
    bad = _doc()
    del bad["records"][0]["gbps"]
    assert any("misses ['gbps']" in e for e in results.validate(bad))
    model = _doc()
    model["records"][0].update(kind="model", name="vit_tiny_patch16_224", mode="inference", tflops=None)
    assert results.validate(model) == []
    with pytest.raises(ValueError):
        results.check({"records": "no"})


def test_standard_name():
    assert results.standard_name(_doc()) == "nvidia-h100-80gb-hbm3-2026-11-21-aaaaaaa.json"
    assert results.standard_name(_doc(), "ops").endswith("-aaaaaaa-ops.json")


def test_report_merges_parts_and_writes_markdown(tmp_path, capsys):
    part1 = _doc()
    part2 = _doc(timestamp="2026-11-21T10:00:00+00:00")
    part2["records"] = [dict(part1["records"][0], impl="eager", ms=1.5, tflops=None)]
    p1, p2 = tmp_path / "a-ops.json", tmp_path / "a-compile.json"
    p1.write_text(json.dumps(part1))
    p2.write_text(json.dumps(part2))
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nhand-written intro\n\n" + results.BEGIN + "\nold\n" + results.END + "\ntail\n")
    out_dir = tmp_path / "results"
    assert _main(["report", str(p1), str(p2), "--merge", str(out_dir), "--markdown", str(md)]) == 0
    merged_path = out_dir / "nvidia-h100-80gb-hbm3-2026-11-21-aaaaaaa.json"
    merged = json.loads(merged_path.read_text())
    assert results.validate(merged) == [] and len(merged["records"]) == 2
    eager = next(r for r in merged["records"] if r["impl"] == "eager")
    assert eager["vk_speedup"] == pytest.approx(3.0)  # recomputed across parts
    text = md.read_text()
    assert "hand-written intro" in text and "tail" in text and "old" not in text
    assert "### NVIDIA H100 80GB HBM3" in text and "3.00×" in text


def test_report_without_gpu_results(tmp_path):
    cpu = _doc(gpu="cpu")
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps(cpu))
    assert results.report([str(p)]) == results.NO_RESULTS


# ----------------------------------------------------------------------------- cases and baselines


def test_case_costs_match_the_docs():
    by = {(c.op, c.label): c for c in cases.all_cases()}
    sa = by[("self_attention", "vit_b16@224")]
    assert sa.flops == pytest.approx(7.63e9, rel=1e-3)
    assert sa.flops_for("fwd+bwd") == pytest.approx(3.5 * sa.flops)
    assert by[("sr_attention", "pvt_v2_b2|segformer_b2 s1@224")].flops == pytest.approx(2.52e9, rel=2e-3)
    mix = by[("mix_ffn", "segformer_b2 s1@512")]
    assert mix.flops == pytest.approx(9.19e9, rel=2e-3)
    assert mix.bytes_for("fwd", 2) == pytest.approx(33.6e6, rel=2e-3)  # fully fused floor in docs/mix_ffn.md
    swin = by[("window_attention", "swin_t s4@224")]
    assert swin.shape["shift"] == 0 and swin.shape["window"] == 7
    v2 = by[("window_attention", "swinv2_t s1@256")]
    assert v2.args["shift_first"] and "logit_scale" in v2.tensors and v2.shape["shift"] == 4
    assert by[("window_attention", "swinv2_t s4@256")].shape["shift"] == 0
    assert by[("window_attention", "swin_t s1@256 shift-first")].args["shift_first"]
    assert {c.op for c in cases.all_cases(tiny=True)} == set(cases.OPS)
    assert all(c.batch == 1 for c in cases.all_cases(tiny=True))
    assert cases.all_cases(batch=3)[0].batch == 3


@pytest.mark.parametrize(
    "case",
    [
        cases.window_attention_case("padded", "test", 2, 10, 9, 32, 2, 7, 3),  # pad + shift + mask
        cases.window_attention_case("one window", "test", 1, 5, 6, 16, 2, 7, 0),
        cases.window_attention_case("shift first", "test", 2, 10, 9, 32, 2, 4, 2, shift_first=True),  # timm's order
        cases.window_attention_case("swin v2", "test", 2, 10, 9, 32, 2, 4, 2, shift_first=True, cosine=True),
        cases.window_attention_case("swin v2 pad first", "test", 1, 9, 9, 16, 2, 4, 2, cosine=True),
        cases.space_time_case("vivit ts space", "test", 2, 6, 3, 32, 2, "space", True, layout="ts"),
        cases.space_time_case("vivit ts time", "test", 2, 6, 3, 32, 2, "time", False, layout="ts"),
        cases.mix_ffn_case("relu", "test", 2, 5, 4, 8, 16, extra_relu=True),
        cases.attention_case("bias", "test", 2, 2, 9, 8, True),
    ],
    ids=lambda c: f"{c.op}-{c.label}",
)
def test_baselines_compute_the_op(case):
    """eager and sdpa compositions give the op's result and gradients (float64 on CPU)."""
    import vitkernels

    g = torch.Generator().manual_seed(0)
    t = cases.make_inputs(case, torch.float64, "cpu", g, requires_grad=True)
    want = getattr(vitkernels, case.op)(**t, **case.args)
    want = want if isinstance(want, tuple) else (want,)
    cot = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    leaves = [x for n, x in t.items() if case.tensors[n].diff]
    want_grads = torch.autograd.grad(want, leaves, cot, allow_unused=True)
    for impl in ("eager", "sdpa"):
        if baselines.applies(impl, case.op):
            continue
        fn = baselines.build(impl, case, torch.float64, "cpu").fn
        got = fn(t)
        got = got if isinstance(got, tuple) else (got,)
        assert _rel_err(got, want) < 1e-10, impl
        grads = torch.autograd.grad(got, leaves, cot, allow_unused=True)
        grads = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads)]
        assert _rel_err(grads, want_grads) < 1e-10, impl


def test_baselines_that_do_not_apply():
    assert baselines.applies("flex", "xca")
    assert baselines.applies("sdpa", "dwconv")
    assert baselines.applies("compile", "dwconv") is None
    case = cases.all_cases(tiny=True)[0]
    with pytest.raises(baselines.Unsupported, match="CUDA"):
        baselines.build("flex", case, torch.float32, "cpu")
    with pytest.raises(baselines.Unsupported, match="CUDA"):
        baselines.build("sdpa-flash", case, torch.float32, "cpu")


# ----------------------------------------------------------------------------- models


def test_models_skip_without_zoo(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vitkernels.models", None)  # import fails
    assert _main(["models", "--device", "cpu"]) == 0
    assert "skipped" in capsys.readouterr().out


def _zoo():
    from vitkernels.bench.models import load_zoo

    zoo, why = load_zoo()
    if zoo is None:
        pytest.skip(why)
    if "vit_tiny_patch16_224" not in zoo.list_models():
        pytest.skip("vitkernels.models has no vit_tiny_patch16_224")
    return zoo


def test_models_tiny(tmp_path, monkeypatch):
    zoo = _zoo()
    # timm is usually absent on CPU CI; a stand-in built from the vitkernels model exercises the
    # eager path, the strict weight copy and the output comparison.
    fake = types.ModuleType("timm")
    fake.create_model = lambda name, pretrained=False, **kw: zoo.create_model(name, **kw)
    monkeypatch.setitem(sys.modules, "timm", fake)
    jpath = tmp_path / "models.json"
    rc = _main(
        [
            "models",
            "--device",
            "cpu",
            "--model",
            "vit_tiny_patch16_224",
            "--batch",
            "1",
            "--cpu-reps",
            "1",
            "--impl",
            "vitkernels,eager",
            "--json",
            str(jpath),
            "--no-progress",
        ]
    )
    assert rc == 0
    doc = json.loads(jpath.read_text())
    assert results.validate(doc) == []
    got = {(r["mode"], r["impl"]) for r in doc["records"]}
    assert got == {("inference", "vitkernels"), ("inference", "eager"), ("train", "vitkernels"), ("train", "eager")}
    for r in doc["records"]:
        assert r["kind"] == "model" and r["unit"] == "images/s" and r["throughput"] > 0
        assert r["shape"] == {"batch": 1, "input": [3, 224, 224]}
        if r["impl"] == "eager":
            assert r["verify_err"] is not None and r["verify_err"] < 1e-4


def test_models_amp_by_default_and_pure_on_request(tmp_path, monkeypatch, capsys):
    """Every row says its precision (JSON, CSV, stdout): amp keeps float32 weights and runs the forward
    under torch.autocast; pure casts the weights. (bf16 on CPU: the vitkernels ops under autocast.)"""
    zoo = _zoo()
    fake = types.ModuleType("timm")
    fake.create_model = lambda name, pretrained=False, **kw: zoo.create_model(name, **kw)
    monkeypatch.setitem(sys.modules, "timm", fake)
    jpath, cpath = tmp_path / "models.json", tmp_path / "models.csv"
    rc = _main(
        [
            "models",
            "--device",
            "cpu",
            "--model",
            "vit_tiny_patch16_224",
            "--batch",
            "1",
            "--cpu-reps",
            "1",
            "--dtype",
            "bf16",
            "--precision",
            "amp,pure",
            "--mode",
            "train",
            "--impl",
            "vitkernels,eager",
            "--json",
            str(jpath),
            "--csv",
            str(cpath),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "precision" in out.splitlines()[2] and " amp " in out and " pure " in out
    doc = json.loads(jpath.read_text())
    assert results.validate(doc) == [] and doc["precision"] == ["amp", "pure"]
    got = {(r["precision"], r["impl"]): r for r in doc["records"]}
    assert set(got) == {("amp", "vitkernels"), ("amp", "eager"), ("pure", "vitkernels"), ("pure", "eager")}
    for (precision, impl), r in got.items():
        assert r["mode"] == "train" and r["dtype"] == "bfloat16"
        assert r["weights"] == ("float32" if precision == "amp" else "bfloat16")
        assert r["autocast"] == ("bfloat16" if precision == "amp" else None)
        if impl == "eager":  # speedups within one precision
            assert r["vk_speedup"] == pytest.approx(r["ms"] / got[(precision, "vitkernels")]["ms"])
    with open(cpath) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["precision"] for r in rows) == ["amp", "amp", "pure", "pure"]
    with pytest.raises(SystemExit, match="unknown precision"):
        _main(["models", "--device", "cpu", "--precision", "fp8"])


def test_amp_training_step_keeps_float32_weights():
    from vitkernels.bench.models import _step, autocast_for, effective_precision, grad_scaler

    assert effective_precision(torch.float32, "amp") == "pure"  # no autocast in float32
    assert grad_scaler("cpu", torch.bfloat16, "amp") is None and grad_scaler("cpu", torch.float16, "pure") is None
    for dtype in (torch.bfloat16, torch.float16):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        before = [p.detach().clone() for p in model.parameters()]
        seen = []
        model.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        scaler = grad_scaler("cpu", dtype, "amp")
        assert (scaler is not None) == (dtype == torch.float16)
        step = _step(model, [torch.randn(4, 8)], "train", autocast=autocast_for("cpu", dtype, "amp"), scaler=scaler)
        step()
        assert seen == [dtype]  # the forward ran in the autocast dtype
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the optimizer stepped
        assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none)
        with torch.no_grad():
            assert (
                _step(model, [torch.randn(2, 8)], "inference", autocast=autocast_for("cpu", dtype, "amp"))().dtype
                == dtype
            )


def test_report_keeps_precisions_apart():
    base = {
        "kind": "model",
        "name": "vit_base_patch16_224",
        "mode": "train",
        "dtype": "bfloat16",
        "shape": {"batch": 64, "input": [3, 224, 224]},
        "tflops": None,
        "gbps": None,
        "unit": "images/s",
    }
    recs = [
        dict(base, impl=i, precision=p, ms=ms, throughput=64 / ms * 1e3)
        for i, p, ms in (
            ("vitkernels", "amp", 100.0),
            ("eager", "amp", 150.0),
            ("vitkernels", "pure", 80.0),
            ("eager", "pure", 160.0),
        )
    ]
    results.add_speedups(recs)
    assert [r["vk_speedup"] for r in recs] == [None, pytest.approx(1.5), None, pytest.approx(2.0)]
    merged = results.merge([_doc(records=recs)])
    assert len(merged["records"]) == 4  # amp and pure rows are different records
    text = results.markdown(merged)
    assert "| precision |" in text
    assert "| vit_base_patch16_224 | train | bfloat16 | amp | 64 |" in text and "(1.50×)" in text
    assert "| vit_base_patch16_224 | train | bfloat16 | pure | 64 |" in text and "(2.00×)" in text


def test_models_default_batch_is_the_speed_targets_batch():
    from vitkernels.bench.models import default_batch, input_shape

    # Issues' targets: Swin-T and PVTv2-b2 at batch 64 (224 px), SegFormer-B2 at batch 8 (512 px).
    for name, b in [
        ("swin_tiny_patch4_window7_224", 64),
        ("pvt_v2_b2", 64),
        ("segformer_b2", 8),
        ("swin_base_patch4_window12_384", 32),
        ("timesformer_base_patch16_224", 8),
    ]:
        for mode in ("inference", "train"):
            assert default_batch(input_shape(name), mode, cpu=False) == b, (name, mode)
            assert default_batch(input_shape(name), mode, cpu=True) == 1


def _small_segformer_zoo():
    from vitkernels.models import create_model

    return types.SimpleNamespace(create_model=lambda name: create_model(name, depths=(1, 1, 1, 1), num_classes=7))


def test_models_segformer_baseline_without_transformers(monkeypatch):
    from vitkernels.bench.models import run_models

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    monkeypatch.setitem(sys.modules, "timm", None)
    records, skipped = run_models(
        ["segformer_b0"],
        _small_segformer_zoo(),
        device="cpu",
        dtypes=[torch.float32],
        modes=["inference"],
        impls=("vitkernels", "eager"),
        cpu_reps=1,
    )
    assert [r["impl"] for r in records] == ["vitkernels"]
    assert [s["impl"] for s in skipped] == ["eager"] and "transformers" in skipped[0]["reason"]


def test_models_segformer_baseline_is_hugging_face():
    pytest.importorskip("transformers")
    from vitkernels.bench.models import run_models

    records, skipped = run_models(
        ["segformer_b0"],
        _small_segformer_zoo(),
        device="cpu",
        dtypes=[torch.float32],
        modes=["inference"],
        impls=("vitkernels", "eager", "hf-eager"),
        cpu_reps=1,
    )
    assert skipped == []
    eager = [r for r in records if r["impl"] == "eager"]
    assert len(eager) == 1 and "transformers" in eager[0]["note"]
    assert eager[0]["verify_err"] is not None and eager[0]["verify_err"] < 1e-4  # HF weights converted
    # the hf-eager row shares those weights (converted by convert_hf_segformer): same outputs
    hf = next(r for r in records if r["impl"] == "hf-eager")
    assert hf["hf_class"] == "SegformerForSemanticSegmentation" and hf["hf_attn"] == "eager"
    assert hf["verify_err"] is not None and hf["verify_err"] < 1e-4 and "speed only" not in hf["note"]


@pytest.mark.skipif(os.environ.get("VITKERNELS_BENCH_SLOW") != "1", reason="set VITKERNELS_BENCH_SLOW=1")
def test_ops_every_tiny_case(tmp_path):
    assert (
        _main(["ops", "--device", "cpu", "--cpu-reps", "1", "--json", str(tmp_path / "all.json"), "--no-progress"]) == 0
    )


def test_check_writes_stamped_json_and_csv(tmp_path):
    import json

    from vitkernels.bench import cli

    rc = cli.main(
        ["check", "--quick", "--op", "attention", "--json", str(tmp_path / "c.json"), "--csv", str(tmp_path / "c.csv")]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["kind"] == "check" and doc["passed"] is True
    assert {"gpu", "commit", "timestamp", "torch", "triton"} <= set(doc)
    assert {r["backend"] for r in doc["checks"]} == {"triton", "cuda"}
    header, first = (tmp_path / "c.csv").read_text().splitlines()[:2]
    assert header == "op,backend,dtype,device,batch,status,worst,detail,gpu,commit,dirty,timestamp,torch,triton,cuda"
    assert doc["commit"] in first and doc["timestamp"] in first  # every row carries the stamp


def test_check_batch_plot_and_progress(tmp_path, capsys, monkeypatch):
    from vitkernels.bench import cli, results

    plotted = {}
    monkeypatch.setattr(cli, "_check_plot", lambda path: None)  # matplotlib may be missing here
    monkeypatch.setattr(results, "plot_check", lambda rows, path, title: plotted.update(rows=rows, path=path))
    rc = cli.main(["check", "--quick", "--op", "dwconv", "--batch", "3", "--plot", str(tmp_path / "c.png")])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "commit" in out.splitlines()[0]  # the stamp line heads the output
    assert "[1/2" in err and "dwconv triton" in err  # progress on stderr
    assert plotted["path"] == str(tmp_path / "c.png")
    rows = plotted["rows"]
    assert {r["batch"] for r in rows} == {3}
    assert [r["status"] for r in rows if r["backend"] == "triton"] == ["pass"]
    assert 0 <= [r["worst"] for r in rows if r["backend"] == "triton"][0] < 1
    with pytest.raises(SystemExit, match="unknown op"):
        cli.main(["check", "--op", "nope"])


def test_plot_check_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from vitkernels.bench import results

    rows = [
        {"op": "attention", "backend": "triton", "dtype": "float32", "status": "pass", "worst": 0.2},
        {"op": "xca", "backend": "cuda", "dtype": "float32", "status": "skip", "worst": None},
    ]
    results.plot_check(rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_config_only_runs_the_first_pruned_config():
    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    from vitkernels.bench.harness import first_config_only

    class Cfg:
        pre_hook = None

        def __init__(self, block):
            self.block = block

        def all_kwargs(self):
            return {"BLOCK": self.block}

    calls = []
    tuner = types.SimpleNamespace(
        arg_names=["x"],
        prune_configs=lambda kwargs: [Cfg(64), Cfg(128)],
        fn=types.SimpleNamespace(run=lambda *a, **kw: calls.append((a, kw)) or "ran"),
    )
    original = Autotuner.run
    with first_config_only():
        assert Autotuner.run(tuner, 1, grid=2) == "ran"  # no benchmarking of the other configs
    assert Autotuner.run is original
    assert calls == [((1,), {"grid": 2, "BLOCK": 64})] and tuner.best_config.block == 64


# ----------------------------------------------------------------------------- models: Hugging Face baselines

# Tiny versions of the models (the bench reads the transformers sizes off the built vitkernels model).
_HF_SMALL = {
    "vit_tiny_patch16_224": dict(depth=2),
    "pvt_v2_b0": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 1, 2)),
    "timesformer_base_patch16_224": dict(embed_dim=32, depth=1, num_heads=2, num_frames=2, num_classes=5),
    "vivit_b_16x2_kinetics400": dict(embed_dim=32, depth=1, num_heads=2, num_frames=4, num_classes=5),
    "vivit_base_factorized": dict(embed_dim=32, depth=1, num_heads=2, num_frames=4, num_classes=5),
    "xcit_tiny_12_p16_224": dict(depth=1),
}


def _hf_zoo():
    from vitkernels.models import create_model

    return types.SimpleNamespace(
        create_model=lambda name: create_model(name, **_HF_SMALL[name]), list_models=lambda: list(_HF_SMALL)
    )


class _OpCounter:
    """Counts the torch.ops.vitkernels.* calls inside the block (independently of the bench's own count)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts = counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ns, _, name = str(func.overloadpacket).partition(".")
                if ns == "vitkernels":
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_models_hf_impls_and_defaults():
    from vitkernels.bench import models

    assert set(models.IMPLS) >= {"hf-eager", "hf-sdpa", "hf+patch_hf", "hf+compile"}
    # GPU default: today's three plus the HF ones that need no compile; CPU default unchanged
    assert models.DEFAULT_IMPLS == ("vitkernels", "eager", "compile", "hf-eager", "hf-sdpa", "hf+patch_hf")
    assert models.CPU_DEFAULT_IMPLS == ("vitkernels", "eager")
    with pytest.raises(SystemExit, match="unknown impl"):
        _main(["models", "--device", "cpu", "--impl", "hf-magic"])
    with pytest.raises(SystemExit, match="--append needs --json"):
        _main(["models", "--device", "cpu", "--model", "vit_tiny_patch16_224", "--impl", "vitkernels", "--append"])


def test_hf_configs_have_the_vitkernels_sizes():
    """Every vitkernels model with a transformers counterpart maps to a config of exactly its sizes: the
    same parameter count (meta device), and the named sizes where they differ between models."""
    transformers = pytest.importorskip("transformers")
    from vitkernels.bench import hf
    from vitkernels.models import create_model, list_models

    specs = {}
    for name in list_models():
        with torch.device("meta"):
            vk = create_model(name)
        spec, why = hf.counterpart(vk)
        if name.startswith(("xcit", "vivit_base_factorized")):
            assert spec is None and why, name
            continue
        if name.startswith(("vit_", "swin_", "pvt_v2", "segformer", "timesformer", "vivit_b_16x2")):
            assert spec is not None, (name, why)
        elif spec is None:  # a family added later without a mapping: skipped with the reason
            assert why, name
            continue
        with torch.device("meta"):
            model = getattr(transformers, spec.model_cls)(getattr(transformers, spec.config_cls)(**spec.config))
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in vk.parameters()), name
        specs[name] = spec
    assert {s.model_cls for s in specs.values()} >= {
        "ViTForImageClassification",
        "SwinForImageClassification",
        "PvtV2ForImageClassification",
        "SegformerForSemanticSegmentation",
        "TimesformerForVideoClassification",
        "VivitForVideoClassification",
    }
    c = specs["vit_small_patch16_224"].config
    assert (c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["layer_norm_eps"]) == (
        384,
        6,
        1536,
        1e-6,
    )
    c = specs["swin_base_patch4_window12_384"].config
    assert (c["image_size"], c["window_size"], c["embed_dim"], c["depths"], c["num_heads"], c["drop_path_rate"]) == (
        384,
        12,
        128,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
        0.1,
    )
    c = specs["pvt_v2_b2_li"].config
    assert c["linear_attention"] and c["mlp_ratios"] == [8, 8, 4, 4] and c["sr_ratios"] == [8, 4, 2, 1]
    assert specs["pvt_v2_b5"].config["mlp_ratios"] == [4, 4, 4, 4]
    c = specs["segformer_b2"].config
    assert (c["depths"], c["decoder_hidden_size"], c["num_labels"]) == ([3, 4, 6, 3], 768, 150)
    c = specs["timesformer_base_patch16_224"].config
    assert (c["num_frames"], c["image_size"], c["attention_type"], c["num_labels"]) == (
        8,
        224,
        "divided_space_time",
        400,
    )
    c = specs["vivit_b_16x2_kinetics400"].config
    assert (c["num_frames"], c["tubelet_size"], c["hidden_act"]) == (32, [2, 16, 16], "gelu_fast")
    assert [n for n, s in specs.items() if s.convert is not None] == [
        n for n in specs if n.startswith(("segformer", "timesformer", "vivit"))
    ]
    assert all(s.video == n.startswith(("timesformer", "vivit")) for n, s in specs.items())


def test_models_hf_rows_cli_append(tmp_path, monkeypatch, capsys):
    """`--impl` selects the HF rows; they carry their labels (class, attention, note), hf+patch_hf runs
    fused modules and vitkernels ops, speedups are computed against each baseline, and --append merges
    a second run into the first file."""
    pytest.importorskip("transformers")
    from vitkernels.bench import models

    monkeypatch.setattr(models, "load_zoo", lambda: (_hf_zoo(), None))
    monkeypatch.setitem(sys.modules, "timm", None)
    jpath, cpath = tmp_path / "m.json", tmp_path / "m.csv"
    common = [
        "models",
        "--device",
        "cpu",
        "--model",
        "vit_tiny_patch16_224",
        "--mode",
        "inference",
        "--cpu-reps",
        "1",
        "--json",
        str(jpath),
        "--no-progress",
    ]
    assert _main(common + ["--impl", "vitkernels,hf-eager"]) == 0
    assert _main(common + ["--impl", "hf-sdpa,hf+patch_hf", "--append", "--csv", str(cpath)]) == 0
    out = capsys.readouterr().out
    assert "patch_hf speedup" in out  # the column of the stdout table
    doc = json.loads(jpath.read_text())
    assert results.validate(doc) == [] and len(doc["appended_to"]) == 1
    by = {r["impl"]: r for r in doc["records"]}
    assert set(by) == {"vitkernels", "hf-eager", "hf-sdpa", "hf+patch_hf"}
    for impl, attn in (("hf-eager", "eager"), ("hf-sdpa", "sdpa"), ("hf+patch_hf", "sdpa")):
        r = by[impl]
        assert r["hf_class"] == "ViTForImageClassification" and r["hf_attn"] == attn
        assert f"attn_implementation={attn!r}" in r["note"] and "speed only" in r["note"]  # no HF <-> timm map
        assert r["verify_err"] is None and r["shape"] == {"batch": 1, "input": [3, 224, 224]}
        assert r["vk_speedup"] == pytest.approx(r["ms"] / by["vitkernels"]["ms"])  # across the two runs
    patched = by["hf+patch_hf"]
    assert patched["fused"] == {"FusedViTAttention": 2} and patched["vk_ops"] == {"attention": 2}
    assert patched["patch_err"] < 1e-5 and patched["backend_choice"] == "auto"
    assert "patch_hf_speedup" not in patched or patched["patch_hf_speedup"] is None
    for impl in ("hf-eager", "hf-sdpa"):
        assert by[impl]["patch_hf_speedup"] == pytest.approx(by[impl]["ms"] / patched["ms"])
    with open(cpath) as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(by) and float(rows["hf-eager"]["patch_hf_speedup"]) > 0
    text = results.markdown(dict(doc, gpu="NVIDIA H100"))
    assert "| hf+patch_hf | hf-eager | hf-sdpa |" in text and "patch_hf " in text
    with pytest.raises(SystemExit, match="holds results of"):
        bad = dict(doc, gpu="NVIDIA H100")
        jpath.write_text(json.dumps(bad))
        _main(common + ["--impl", "hf-eager", "--append"])


def test_models_hf_patch_runs_vitkernels_ops(monkeypatch):
    """hf+patch_hf times the patched model: vitkernels ops run; hf-eager alone runs none."""
    pytest.importorskip("transformers")
    from vitkernels.bench.models import run_models

    monkeypatch.setitem(sys.modules, "timm", None)
    kw = dict(device="cpu", dtypes=[torch.float32], modes=["inference"], cpu_reps=1)
    with _OpCounter() as c:
        records, skipped = run_models(["vit_tiny_patch16_224"], _hf_zoo(), impls=("hf-eager",), **kw)
    assert [r["impl"] for r in records] == ["hf-eager"] and skipped == [] and c.counts == {}
    with _OpCounter() as c:
        records, skipped = run_models(["vit_tiny_patch16_224"], _hf_zoo(), impls=("hf+patch_hf",), **kw)
    assert [r["impl"] for r in records] == ["hf+patch_hf"] and skipped == []
    # verification forward (batch 2) + first call + 1 timed call, 2 layers each
    assert c.counts == {"attention": 2 * 3}


def test_models_hf_skips_give_reasons(monkeypatch):
    pytest.importorskip("transformers")
    from vitkernels.bench.models import run_models

    monkeypatch.setitem(sys.modules, "timm", None)
    kw = dict(device="cpu", dtypes=[torch.float32], modes=["inference"], cpu_reps=1)
    records, skipped = run_models(
        ["pvt_v2_b0", "xcit_tiny_12_p16_224", "vivit_base_factorized"], _hf_zoo(), impls=("hf-sdpa",), **kw
    )
    assert records == []
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert {s["impl"] for s in skipped} == {"hf-sdpa"} and len(skipped) == 3
    assert "PvtV2ForImageClassification" in reasons["pvt_v2_b0"] and "_supports_sdpa" in reasons["pvt_v2_b0"]
    assert reasons["xcit_tiny_12_p16_224"] == "transformers has no XCiT"
    assert "model 3" in reasons["vivit_base_factorized"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    records, skipped = run_models(
        ["vit_tiny_patch16_224"], _hf_zoo(), impls=("vitkernels", "hf-eager", "hf+patch_hf"), **kw
    )
    assert [r["impl"] for r in records] == ["vitkernels"]
    assert [s["impl"] for s in skipped] == ["hf-eager", "hf+patch_hf"]
    assert all("transformers is not importable" in s["reason"] for s in skipped)


def test_models_hf_video_input_and_amp(monkeypatch):
    """The video classes get pixel_values (B, T, 3, H, W): the bench's clips transposed; with the weights
    converted into the vitkernels model the outputs agree (bf16 AMP, as every impl runs)."""
    pytest.importorskip("transformers")
    from vitkernels.bench import hf
    from vitkernels.bench.models import run_models

    monkeypatch.setitem(sys.modules, "timm", None)
    seen = {}
    build = hf.build

    def recording_build(transformers, spec, attn, state_dict=None):
        model = build(transformers, spec, attn, state_dict)
        model.register_forward_pre_hook(
            lambda m, args: seen.setdefault(spec.model_cls, set()).add((tuple(args[0].shape), args[0].is_contiguous()))
        )
        return model

    monkeypatch.setattr(hf, "build", recording_build)
    records, skipped = run_models(
        ["timesformer_base_patch16_224", "vivit_b_16x2_kinetics400"],
        _hf_zoo(),
        device="cpu",
        dtypes=[torch.bfloat16],
        precisions=("amp",),
        modes=["inference", "train"],
        impls=("vitkernels", "hf-eager", "hf-sdpa", "hf+patch_hf"),
        cpu_reps=1,
    )
    # batch 2 (verification) and batch 1 (CPU default): frames second, then 3 channels; contiguous
    assert seen["TimesformerForVideoClassification"] == {((2, 2, 3, 224, 224), True), ((1, 2, 3, 224, 224), True)}
    assert seen["VivitForVideoClassification"] == {((2, 4, 3, 224, 224), True), ((1, 4, 3, 224, 224), True)}
    assert [(s["name"], s["impl"]) for s in skipped] == [("timesformer_base_patch16_224", "hf-sdpa")] * 2
    assert "_supports_sdpa" in skipped[0]["reason"]
    got = {(r["name"], r["mode"], r["impl"]): r for r in records}
    assert len(got) == 3 * 2 + 4 * 2  # TimeSformer: 3 impls x 2 modes (no sdpa), ViViT: 4 x 2
    for (_name, _mode, impl), r in got.items():
        assert r["unit"] == "clips/s" and r["precision"] == "amp" and r["autocast"] == "bfloat16"
        assert r["weights"] == "float32" and r["shape"]["input"][0] == 3  # the bench's (3, T, H, W)
        if impl.startswith("hf"):
            assert r["verify_err"] is not None and r["verify_err"] < 3e-2, r  # same weights (converters)
            assert "speed only" not in r["note"] and r["vk_speedup"] > 0
        if impl == "hf+patch_hf":
            assert r["patch_err"] < 3e-2 and r["vk_ops"]
    assert got[("timesformer_base_patch16_224", "train", "hf+patch_hf")]["vk_ops"] == {"space_time_attention": 2}
    assert got[("vivit_b_16x2_kinetics400", "train", "hf+patch_hf")]["vk_ops"] == {"attention": 1}
