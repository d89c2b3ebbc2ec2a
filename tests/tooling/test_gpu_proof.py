"""bench/gpu_proof.py, the one-call GPU proof: its plan fits the device lease (one command of at most
~9 minutes, at most 8 files), timeouts come from one deadline, a step that hangs is cut and the rest
still runs, the commit stamp works without .git, and the CPU dry run goes end to end."""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_proof.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_proof", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_proof"] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


gp = _load()


def test_plan_fits_one_device_call():
    steps = gp.make_steps()
    assert [s.name for s in steps] == [
        "build",
        "info",
        "cuda-tests",
        "triton-tests",
        "check",
        "ops",
        "models",
        "old-kernels",
        "hf-models",
        "flex",
    ]
    # run on what is left, in order
    assert [s.name for s in steps if not s.required] == ["old-kernels", "hf-models", "flex"]
    assert gp.DEFAULT_DEADLINE <= 560  # inside a 570-s timeout_s, itself under the 600-s command limit
    required = [s for s in steps if s.required]
    assert sum(s.floor for s in required) + 10 < gp.DEFAULT_DEADLINE  # every required step can start
    assert sum(s.estimate for s in required) + 10 <= gp.DEFAULT_DEADLINE
    assert all(s.floor <= s.estimate <= s.cap < gp.DEFAULT_DEADLINE for s in steps)
    # at most 8 files come back: one slot spare for a results file caught mid-write (its .tmp)
    assert len(gp.PLANNED_FILES) <= gp.MAX_FILES - 1
    for f in gp._cuda_test_files() + list(gp.TRITON_TEST_FILES):
        assert os.path.isfile(os.path.join(ROOT, f)), f
    assert gp._cuda_test_files() and not any(f in gp.CUDA_TEST_SKIP for f in gp._cuda_test_files())
    text = gp.plan_text()
    assert "--precision amp" in text and "--one-config" in text and "-m gpu" in text and "--dtype bf16" in text
    # the HF rows go into the models results file (no file of their own: the 8-file limit)
    hf = next(line for line in text.splitlines() if line.startswith("hf-models"))
    assert "--impl hf-eager,hf-sdpa,hf+patch_hf" in hf and "-proof-models.json" in hf and "--append" in hf
    assert all(m in hf for m in ("swin_tiny_patch4_window7_224", "segformer_b2", "timesformer_base_patch16_224"))
    assert "--dry-run" in gp.plan_text(dry=True)
    # the previous kernels, selected by their switches, append to the ops file as vitkernels-old
    old = next(line for line in text.splitlines() if line.startswith("old-kernels"))
    assert "--as-impl vitkernels-old" in old and "-proof-ops.json" in old and "--append" in old
    assert all(env in old for env in gp.OLD_KERNEL_ENV)


def test_bench_cases_of_the_plan_exist():
    from vitkernels.bench import cases
    from vitkernels.models import list_models

    picked = cases.select_cases(cases.all_cases(), list(gp.OPS), None, representative=True)
    assert {c.op for c in picked} == set(gp.OPS)
    assert len(picked) <= 12  # the ops step's time estimate (150 s) counts on about a dozen cases
    assert set(gp.MODELS) <= set(list_models()) and set(gp.HF_MODELS) <= set(list_models())


def test_timeouts_come_from_one_deadline():
    steps = {s.name: s for s in gp.make_steps()}
    later = [steps["ops"], steps["models"], steps["flex"]]  # flex is optional: its floor is not kept free
    assert gp.allot(steps["check"], later, left=500) == steps["check"].cap
    t = gp.allot(steps["check"], later, left=150)
    assert t == 150 - steps["ops"].floor - steps["models"].floor - 5 < steps["check"].cap
    assert gp.allot(steps["check"], later, left=120) < steps["check"].floor  # the caller skips it
    assert gp.allot(steps["flex"], [], left=30) == 25


def test_commit_without_git(tmp_path, monkeypatch):
    monkeypatch.delenv("GIT_DIR", raising=False)
    monkeypatch.delenv("VITKERNELS_COMMIT_FILE", raising=False)
    monkeypatch.delenv("VITKERNELS_COMMIT", raising=False)
    assert gp.find_commit(str(tmp_path))[0] == "unknown"
    (tmp_path / ".vitkernels-commit").write_text("A" * 40 + "\n")
    assert gp.find_commit(str(tmp_path)) == ("a" * 40, str(tmp_path / ".vitkernels-commit"))
    monkeypatch.setenv("VITKERNELS_COMMIT", "b" * 40)
    assert gp.find_commit(str(tmp_path)) == ("b" * 40, "VITKERNELS_COMMIT")
    monkeypatch.setenv("VITKERNELS_COMMIT", "not-a-sha")
    assert gp.find_commit(str(tmp_path))[0] == "a" * 40


def test_tree_fingerprint(tmp_path):
    pkg = tmp_path / "vitkernels"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    first = gp.tree_fingerprint(str(tmp_path))
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.pyc").write_bytes(b"\0")
    (pkg / "_C.so").write_bytes(b"\0")
    assert gp.tree_fingerprint(str(tmp_path)) == first  # caches and builds do not count
    (pkg / "a.py").write_text("x = 2\n")
    assert gp.tree_fingerprint(str(tmp_path)) != first


def _fake_steps(sleep_s):
    py = sys.executable

    def cmd(code):
        return lambda ctx, t: [py, "-c", code]

    write = "import os; open(os.path.join(os.environ['OUT'], 'check.json'), 'w').write('{\"passed\": true}')"
    return [
        gp.Step("info", "prints", cap=20, floor=1, estimate=1, gpu=cmd("print('hello')"), dry=cmd("print('hello')")),
        gp.Step(
            "cuda-tests",
            "hangs",
            cap=2,
            floor=1,
            estimate=1,
            gpu=cmd(f"import time; time.sleep({sleep_s})"),
            dry=cmd(f"import time; time.sleep({sleep_s})"),
            outcome=gp.pytest_outcome,
        ),
        gp.Step(
            "check",
            "fails",
            cap=20,
            floor=1,
            estimate=1,
            gpu=cmd(write + "; raise SystemExit(3)"),
            dry=cmd(write + "; raise SystemExit(3)"),
            outcome=gp.check_outcome,
        ),
        gp.Step(
            "ops",
            "needs more time than is left",
            cap=200,
            floor=100,
            estimate=100,
            gpu=cmd("print(1)"),
            dry=cmd("print(1)"),
            required=False,
        ),
    ]


def test_a_hanging_step_is_cut_and_the_rest_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gp, "PROBE", 'print("PROBE {\\"gpu_available\\": false, \\"torch\\": \\"x\\"}")')
    monkeypatch.setattr(gp, "make_steps", lambda: _fake_steps(60))
    monkeypatch.setenv("OUT", str(tmp_path))
    args = argparse.Namespace(out=None, dry_run=True, deadline=60.0, steps=None, skip=None, models=list(gp.MODELS))
    rc = gp.Proof(args).run()
    assert rc == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"env": "ok", "info": "ok", "cuda-tests": "timeout", "check": "failed", "ops": "skipped"}
    by = {s["name"]: s for s in summary["steps"]}
    assert by["cuda-tests"]["rc"] == 124 and by["cuda-tests"]["wall_s"] < 20
    assert by["check"]["rc"] == 3 and by["check"]["outcome"]["passed"] is True
    assert summary["complete"] is True and summary["ok"] is False
    assert summary["failed_steps"] == ["cuda-tests", "check"] and summary["skipped_steps"] == ["ops"]
    log = (tmp_path / "proof.log").read_text()
    assert "hello" in log and "===== cuda-tests: rc=124 status=timeout" in log
    assert sorted(os.listdir(tmp_path)) == ["check.json", "proof.log", "summary.json"]


def test_suite_hands_part_proof_over():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), "--part", "proof", "--plan"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "cuda-tests" in out.stdout and "deadline 540s" in out.stdout


def test_dry_run_end_to_end(tmp_path):
    """The CPU dry run of every step but the slow-to-start ones (pip, vitkernels.info, a second
    nested pytest): the files, the summary, and results that `vitkernels-bench report` accepts."""
    env = dict(os.environ, OUT=str(tmp_path))
    env.pop("VITKERNELS_COMMIT", None)
    out = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--skip", "build,info,triton-tests", "--deadline", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "== gpu proof summary (DRY RUN" in out.stdout
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= gp.MAX_FILES
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] and summary["dry_run"]
    assert [s["name"] for s in summary["steps"]] == [
        "env",
        "cuda-tests",
        "check",
        "ops",
        "models",
        "old-kernels",
        "hf-models",
        "flex",
    ]
    for s in summary["steps"]:
        assert s["status"] == "ok" and s["wall_s"] >= 0, s
    st = summary["stamp"]
    assert st["gpu"] == "cpu" and st["torch"] and len(st["tree_fingerprint"]) == 16
    by = {s["name"]: s for s in summary["steps"]}
    assert by["cuda-tests"]["outcome"]["counts"]["passed"] > 0
    assert by["check"]["outcome"]["passed"] is True
    try:
        import timm  # noqa: F401

        n_models = 4  # inference and train, vitkernels and timm eager
    except ImportError:
        n_models = 2  # no eager baseline without timm
    assert by["models"]["outcome"]["records"] == n_models
    try:
        import transformers  # noqa: F401

        n_hf = 3  # inference (the dry run's hf-models step): hf-eager, hf-sdpa, hf+patch_hf
    except ImportError:
        n_hf = 0  # skipped, with the reason
    assert by["hf-models"]["outcome"]["records"] == n_hf
    results = [f for f in files if f.endswith(("-proof-ops.json", "-proof-models.json", "-proof-flex.json"))]
    assert len(results) == 3
    from vitkernels.bench import results as res

    docs = res.load([str(tmp_path / f) for f in results])
    models = next(d for d in docs if d["command"] == "models")
    assert {r["precision"] for r in models["records"]} == {"amp"}
    assert {r["dtype"] for r in models["records"]} == {"bfloat16"}
    # the hf-models step appended its rows to the models file: speedups vs the models step's vitkernels rows
    assert len(models["records"]) == n_models + n_hf and len(models["appended_to"]) == 1
    for r in models["records"]:
        if r["impl"].startswith("hf"):
            assert r["vk_speedup"] > 0, r
    if n_hf:
        assert "patch_hf_speedup_geomean" in by["hf-models"]["outcome"]
    # the old-kernels step appended vitkernels-old rows to the ops file, timed against the new kernels
    ops_file = next(f for f in results if f.endswith("-proof-ops.json"))
    ops = json.loads((tmp_path / ops_file).read_text())
    old = [r for r in ops["records"] if r["impl"] == "vitkernels-old"]
    assert old and all(r["name"] == "sr_attention" and r["vk_speedup"] > 0 for r in old), old
    assert len(ops["appended_to"]) == 1
    assert (tmp_path / "proof.log").read_text().count("===== ") == 2 * 7  # start and end of each step
