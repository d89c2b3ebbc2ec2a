"""`vitkernels-bench models`: images/s (clips/s for video) of every model in `vitkernels.models`.

For each name of `vitkernels.models.list_models()` (or `--model`), inference and a training step
(forward, loss, backward, AdamW step, zero_grad) of

* ``vitkernels``          `vitkernels.models.create_model(name)` under the chosen backend;
* ``eager``               `timm.create_model(name)` in eager PyTorch (timm's default attention path,
                          which is SDPA where timm uses it), when timm is importable and knows the name;
                          for SegFormer (not in timm), Hugging Face transformers'
                          `SegformerForSemanticSegmentation` of the same size; for the video models (in
                          neither), the vitkernels model on the reference backend;
* ``compile``             `torch.compile` of that eager model;
* ``vitkernels+compile``  `torch.compile` of the vitkernels model (only when asked for with --impl);
* ``hf-eager``, ``hf-sdpa``, ``hf+patch_hf``, ``hf+compile``: Hugging Face transformers' counterpart
                          of the model with the same sizes (`hf.py`: ViT, Swin, Swin V2, PVTv2, SegFormer,
                          TimeSformer, ViViT model 1) with attn_implementation "eager" / "sdpa" (where
                          the class supports it), patched by `vitkernels.patch_hf` (under the
                          backend), or `torch.compile` of hf-sdpa. Rows of models without a
                          counterpart (XCiT, ViViT model 3) are skipped with the reason.

Default impls: vitkernels, eager, compile, hf-eager, hf-sdpa, hf+patch_hf on GPU (the HF ones cost a
model build each, no compile); vitkernels, eager on CPU; hf+compile and vitkernels+compile only on request.

When both exist, the eager model's weights are loaded into the vitkernels model (strict; SegFormer's
through `convert_hf_segformer`) and the inference outputs compared, so both run the same function.
The transformers models share weights with the vitkernels model where a converter exists (SegFormer,
TimeSformer, ViViT: `verify_err` on their rows); ViT, Swin and PVTv2 have no HF <-> timm key map, so
their HF rows compare speed only (a `note` says so). hf+patch_hf rows carry `patch_err` (vs the
unpatched hf-eager model, same weights), `fused` (the Fused classes) and `vk_ops` (the vitkernels ops
its verification forward ran), and hf-eager / hf-sdpa / hf+compile rows `patch_hf_speedup` (their ms /
hf+patch_hf's ms). Video models take (B, 3, T, H, W); transformers' video classes get the clips as
pixel_values (B, T, 3, H, W) (transposed and made contiguous once, outside the timed region).

Precision (`--precision`, recorded as "precision" in every row; the same for every implementation):

* ``amp`` (default) mixed precision as users train: float32 weights (the master copy the optimizer
  updates) and float32 inputs; forward and loss under `torch.autocast(device, dtype)`; for float16 a
  `torch.amp.GradScaler` scales the loss and unscales the grads before the optimizer step (bfloat16
  needs none). Inference runs under the same autocast, in `torch.inference_mode`.
* ``pure`` the weights and inputs cast to the dtype (`model.to(dtype)`), no autocast, no scaler.

With float32 the two coincide (no autocast): such rows read "pure".
"""

from __future__ import annotations

import contextlib
import itertools
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .harness import Progress, _rel_err, _short, dtype_name, time_cpu, time_cuda_calls
from .hf import HF_IMPLS
from .results import add_speedups

IMPLS = ("vitkernels", "eager", "compile", "vitkernels+compile") + HF_IMPLS
# GPU default: the HF baselines but hf+compile (each costs one model build and no compile).
DEFAULT_IMPLS = ("vitkernels", "eager", "compile", "hf-eager", "hf-sdpa", "hf+patch_hf")
CPU_DEFAULT_IMPLS = ("vitkernels", "eager")
MODES = ("inference", "train")
PRECISIONS = ("amp", "pure")


def effective_precision(dtype: torch.dtype, precision: str) -> str:
    """The precision a row runs in: "amp" or "pure"; float32 has no autocast, so it is always "pure"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return "pure" if dtype == torch.float32 else precision


def autocast_for(device_type: str, dtype: torch.dtype, precision: str):
    """A factory of the context a step's forward runs in: `torch.autocast(device_type, dtype)` for
    "amp" in a low-precision dtype, else a null context."""
    if effective_precision(dtype, precision) == "amp":
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)
    return contextlib.nullcontext


def load_zoo():
    """(vitkernels.models, None) or (None, why it cannot be used)."""
    try:
        import vitkernels.models as zoo
    except Exception as e:
        return None, f"vitkernels.models is not importable ({_short(e)})"
    if not callable(getattr(zoo, "list_models", None)) or not callable(getattr(zoo, "create_model", None)):
        return None, "vitkernels.models has no list_models()/create_model() yet"
    return zoo, None


def _timm():
    try:
        import timm

        return timm, None
    except Exception as e:
        return None, f"timm is not importable ({type(e).__name__})"


def is_video(name: str, model=None) -> bool:
    return any(k in name for k in ("timesformer", "vivit")) or (model is not None and hasattr(model, "num_frames"))


def input_shape(name: str, model=None) -> tuple:
    """(C, H, W) or (C, T, H, W): from the model's timm-style pretrained_cfg/default_cfg input_size when
    present, else from the name (…_384 → 384, segformer → 512, else 224; video: 8 frames)."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None) if model is not None else None
        if isinstance(cfg, dict) and cfg.get("input_size"):
            shape = tuple(int(s) for s in cfg["input_size"])
            if is_video(name, model) and len(shape) == 3:
                shape = (shape[0], int(getattr(model, "num_frames", 8)), shape[1], shape[2])
            return shape
    m = re.search(r"_(\d{3})(?:_|$)", name)
    res = int(m.group(1)) if m else (512 if "segformer" in name else 224)
    if is_video(name, model):
        return (3, int(getattr(model, "num_frames", 8) if model is not None else 8), res, res)
    return (3, res, res)


def default_batch(shape: tuple, mode: str, cpu: bool) -> int:
    """The batch sizes the speed targets name, for inference and training alike: 64 images at 224 px
    (Swin-T, PVTv2-b2), 32 at 384 px, 8 at 512 px (SegFormer-B2) and 8 clips for video; 1 on CPU."""
    if cpu:
        return 1
    res = shape[-1]
    return 8 if len(shape) == 4 else (64 if res <= 224 else 32 if res <= 384 else 8)


def hf_segformer(vk_model):
    """(Hugging Face `SegformerForSemanticSegmentation` with the sizes of the vitkernels SegFormer
    `vk_model` and transformers' default attention (sdpa in transformers 5), None) or (None, why not)."""
    from . import hf

    try:
        import transformers

        spec, why = hf.counterpart(vk_model)
        if spec is None:
            return None, why
        config = transformers.SegformerConfig(**spec.config)
        return transformers.SegformerForSemanticSegmentation(config), None
    except Exception as e:
        return None, f"transformers' SegformerForSemanticSegmentation is not available ({_short(e)})"


def _loss(out):
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    return out.float().mean()


def _first_tensor(out):
    if isinstance(out, dict):
        return out.get("logits", next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "logits", out)


def _step(model, inputs, mode, autocast=contextlib.nullcontext, scaler=None):
    """One inference or training step on the next input. Training: forward and loss under
    `autocast()`, backward, AdamW step (through `scaler`, a torch.amp.GradScaler, when given), zero_grad."""
    order = itertools.cycle(inputs)
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                return model(next(order))

        return step
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        with autocast():
            loss = _loss(model(next(order)))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def grad_scaler(device_type: str, dtype: torch.dtype, precision: str):
    """A `torch.amp.GradScaler` for float16 mixed precision (as users train it), else None."""
    if effective_precision(dtype, precision) == "amp" and dtype == torch.float16:
        return torch.amp.GradScaler(device_type)
    return None


def choose_models(zoo, wanted, cpu: bool) -> tuple:
    """(names to run, messages about names that do not exist)."""
    available = list(zoo.list_models())
    msgs = []
    if wanted:
        names = []
        for w in wanted:
            hits = [w] if w in available else [n for n in available if w in n]
            if not hits:
                msgs.append(f"no model {w!r} in vitkernels.models (have: {', '.join(available)})")
            names += [h for h in hits if h not in names]
        return names, msgs
    if cpu:  # the smallest model only: CPU timings are a smoke test
        small = sorted(
            (n for n in available if "tiny" in n or n.endswith("_b0")), key=lambda n: (not n.startswith("vit_"), n)
        )  # plain ViT is the fastest on CPU
        return (small[:1] or available[:1]), msgs
    return available, msgs


def run_models(
    names,
    zoo,
    *,
    device,
    dtypes,
    modes,
    impls,
    backend="auto",
    batch=None,
    reps=10,
    cpu_reps=3,
    budget_s=None,
    progress: Optional[Progress] = None,
    on_done=None,
    precisions=("amp",),
) -> tuple:
    """Time every model x dtype x precision x mode x impl. Returns (records, skipped); every record
    and skipped row carries "precision" ("amp" or "pure", see the module doc)."""
    records, skipped = [], []
    dev = torch.device(device)
    timm, timm_why = _timm()
    o = _Options(
        dev=dev,
        cpu=dev.type != "cuda",
        modes=tuple(modes),
        impls=tuple(impls),
        backend=backend,
        batch=batch,
        reps=reps,
        cpu_reps=cpu_reps,
        budget_s=budget_s,
        t0=time.time(),
        progress=progress,
        timm=timm,
        timm_why=timm_why,
    )
    for name in names:
        for dtype in dtypes:
            runs = []
            for p in precisions:
                eff = effective_precision(dtype, p)
                if eff not in runs:
                    runs.append(eff)
            for precision in runs:
                records.extend(_run_one(name, zoo, dtype, precision, o, skipped))
                if not o.cpu:
                    torch.cuda.empty_cache()
                if on_done:
                    on_done(records, skipped)
    return records, skipped


@dataclass
class _Options:
    dev: torch.device
    cpu: bool
    modes: tuple
    impls: tuple
    backend: str
    batch: Optional[int]
    reps: int
    cpu_reps: int
    budget_s: Optional[float]
    t0: float
    progress: Optional[Progress]
    timm: object
    timm_why: Optional[str]


def _run_one(name, zoo, dtype, precision, o: _Options, skipped: list) -> list:
    """One model in one dtype and precision: build the models, verify, time every mode x impl.
    Returns the records (with speedups); appends what did not run to `skipped`."""
    from .. import use_backend

    dev, cpu, impls, backend, timm = o.dev, o.cpu, o.impls, o.backend, o.timm
    # "amp": float32 master weights and inputs, autocast to `dtype`; "pure": everything in `dtype`.
    weight_dtype = torch.float32 if precision == "amp" else dtype
    autocast = autocast_for(dev.type, dtype, precision)
    group = []
    models, why = {}, {}
    try:
        vk = zoo.create_model(name).to(device=dev, dtype=weight_dtype)
        models["vitkernels"] = vk
    except Exception as e:
        why["vitkernels"] = f"create_model: {_short(e)}"
    ref, ref_note, ref_weights = None, None, None
    if any(i in impls for i in ("eager", "compile")):
        if timm is None:
            why["eager"] = why["compile"] = o.timm_why
        else:
            try:
                ref = timm.create_model(name, pretrained=False).to(device=dev, dtype=weight_dtype)
                models["eager"] = ref
            except Exception as e:
                why["eager"] = why["compile"] = f"timm has no {name!r} ({_short(e)})"
        if ref is None and "vitkernels" in models and name.startswith("segformer"):
            hf, hf_why = hf_segformer(models["vitkernels"])
            if hf is None:
                why["eager"] = why["compile"] = hf_why
            else:
                from ..models.segformer import convert_hf_segformer

                ref = models["eager"] = hf.to(device=dev, dtype=weight_dtype)
                ref_note = (
                    "timm has no SegFormer: the baseline is transformers' "
                    "SegformerForSemanticSegmentation (its default attention, "
                    f"{getattr(hf.config, '_attn_implementation', None)!r})"
                )
                ref_weights = convert_hf_segformer
    eager_backend = None
    if "eager" in impls and "eager" not in models and "vitkernels" in models and is_video(name, models["vitkernels"]):
        # timm has no video transformers: the eager baseline is the same model on the reference
        # backend (the official codes' eager rearranges + softmax attention, in one module).
        models["eager"], eager_backend = models["vitkernels"], "reference"
        why.pop("eager", None)
    shape = input_shape(name, models.get("vitkernels") or ref)
    video = len(shape) == 4
    verify = None
    if "vitkernels" in models and ref is not None:
        try:  # same weights: the checkpoint key names match timm's, or convert HF's (SPEC)
            sd = ref.state_dict()
            models["vitkernels"].load_state_dict(ref_weights(sd) if ref_weights else sd, strict=True)
            x = torch.randn(2, *shape, device=dev, dtype=weight_dtype)
            with torch.inference_mode(), autocast():
                models["vitkernels"].eval(), ref.eval()
                with use_backend(backend):
                    a = _first_tensor(models["vitkernels"](x))
                verify = _rel_err((a,), (_first_tensor(ref(x)),))
        except Exception as e:
            print(
                f"note: {name}: the baseline's weights not loaded into the vitkernels model ({_short(e)})",
                file=sys.stderr,
            )
    hf_run = _HFRun.setup(name, models, why, ref, shape, weight_dtype, autocast, o)
    for mode in o.modes:
        b = o.batch or default_batch(shape, mode, cpu)
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(b, *shape, generator=g).to(device=dev, dtype=weight_dtype) for _ in range(2)]
        hf_in = hf_run.inputs(inputs)
        for impl in impls:
            rec = {
                "kind": "model",
                "name": name,
                "mode": mode,
                "dtype": dtype_name(dtype),
                "precision": precision,
                "shape": {"batch": b, "input": list(shape)},
                "impl": impl,
            }
            if o.progress:
                o.progress.step(f"{name} {dtype_name(dtype)} {precision} {mode} {impl}")
            if o.budget_s is not None and time.time() - o.t0 > o.budget_s:
                skipped.append(dict(rec, reason="time budget exhausted"))
                continue
            extra = {}
            if impl in HF_IMPLS:
                if impl not in hf_run.models:
                    skipped.append(
                        dict(rec, reason=hf_run.why.get(impl, "not available"), **hf_run.fields.get(impl, {}))
                    )
                    continue
                model, step_inputs, extra = hf_run.models[impl], hf_in, dict(hf_run.fields.get(impl, {}))
                ctx = use_backend(backend) if impl == "hf+patch_hf" else contextlib.nullcontext()
                compiled = impl == "hf+compile"
            else:
                src = "vitkernels" if impl.startswith("vitkernels") else "eager"
                if src not in models:
                    skipped.append(dict(rec, reason=why.get(impl) or why.get(src, "not available")))
                    continue
                model, step_inputs, compiled = models[src], inputs, impl in ("compile", "vitkernels+compile")
                if src == "vitkernels":
                    ctx = use_backend(backend)
                elif eager_backend is not None:
                    ctx = use_backend(eager_backend)
                    extra["note"] = "eager = vitkernels model on the reference backend (not in timm)"
                else:
                    ctx = contextlib.nullcontext()
                    if ref_note:
                        extra["note"] = ref_note
                extra["verify_err"] = verify if impl == "eager" else None
            try:
                if compiled:
                    torch._dynamo.reset()
                    model = torch.compile(model)
                with ctx:
                    step = _step(
                        model,
                        step_inputs,
                        mode,
                        autocast=autocast,
                        scaler=grad_scaler(dev.type, dtype, precision) if mode == "train" else None,
                    )
                    step()  # compile, autotune, allocator warm-up
                    if cpu:
                        ms = time_cpu(step, reps=o.cpu_reps, warmup=0)
                    else:
                        torch.cuda.synchronize()
                        ms = time_cuda_calls(step, warmup=2, reps=o.reps)
            except Exception as e:
                skipped.append(dict(rec, reason=_short(e), **({"note": extra["note"]} if extra.get("note") else {})))
                if not cpu:
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                continue
            rec.update(
                ms=ms,
                tflops=None,
                gbps=None,
                throughput=b / (ms * 1e-3),
                unit="clips/s" if video else "images/s",
                batch=b,
                autocast=dtype_name(dtype) if precision == "amp" else None,
                weights=dtype_name(weight_dtype),
                backend_choice=backend if impl.startswith("vitkernels") or impl == "hf+patch_hf" else None,
                verify_err=None,
                timing="CPU timing" if cpu else "cuda-events",
            )
            rec.update(extra)
            group.append(rec)
        del inputs, hf_in
    add_speedups(group)
    return group


@dataclass
class _HFRun:
    """The transformers models of one model x dtype x precision: {impl: model}, {impl: why not},
    {impl: extra record fields}, and whether they take video."""

    models: dict
    why: dict
    fields: dict
    video: bool = False

    def inputs(self, inputs: list) -> list:
        if not self.models:
            return []
        from .hf import hf_inputs

        return hf_inputs(inputs, self.video)

    @classmethod
    def setup(cls, name, models, why, ref, shape, weight_dtype, autocast, o: _Options) -> _HFRun:
        """Build the HF implementations asked for (sharing one set of weights), load those weights into
        the vitkernels model where a converter exists, and verify outputs (docstring of this module)."""
        from . import hf as hfb

        run = cls({}, {}, {})
        wanted = [i for i in o.impls if i in HF_IMPLS]
        if not wanted:
            return run

        def fail(reason):
            for i in wanted:
                run.why.setdefault(i, reason)
            return run

        vk = models.get("vitkernels")
        if vk is None:
            return fail(
                f"the sizes of the transformers model come from the vitkernels model, which failed to "
                f"build ({why.get('vitkernels')})"
            )
        transformers, t_why = hfb.transformers_module()
        if transformers is None:
            return fail(t_why)
        spec, s_why = hfb.counterpart(vk)
        if spec is None:
            return fail(s_why)
        run.video = spec.video
        # SegFormer's "eager" baseline is already the transformers model: every HF row takes its weights.
        share = ref.state_dict() if ref is not None and type(ref).__name__ == spec.model_cls else None
        sdpa_why = hfb.supports_sdpa(transformers, spec)
        default_attn = "eager" if sdpa_why else "sdpa"
        note = f"transformers {spec.model_cls}"
        try:
            base = hfb.build(transformers, spec, "eager", share)
            base_sd = base.state_dict()
            built = {"eager": base}

            def variant(attn):
                if attn not in built:
                    built[attn] = hfb.build(transformers, spec, attn, base_sd)
                return built[attn]

            for impl in wanted:
                if impl == "hf-eager":
                    run.models[impl], attn = base, "eager"
                elif impl == "hf-sdpa":
                    if sdpa_why:
                        run.why[impl] = sdpa_why
                        continue
                    run.models[impl], attn = variant("sdpa"), "sdpa"
                elif impl == "hf+compile":
                    attn = default_attn
                    run.models[impl] = variant(attn)
                else:  # hf+patch_hf: a model of its own (patching is in place), with the default attention
                    attn = default_attn
                    m = hfb.build(transformers, spec, attn, base_sd)
                    fused = hfb.patch(m)
                    if not fused:
                        run.why[impl] = f"vitkernels.patch_hf fused no module of transformers' {spec.model_cls}"
                        continue
                    run.models[impl] = m
                    run.fields[impl] = {"fused": fused}
                run.fields.setdefault(impl, {}).update(hf_class=spec.model_cls, hf_attn=attn)
        except Exception as e:
            run.models.clear()
            return fail(f"building transformers' {spec.model_cls}: {_short(e)}")
        base_sd = None
        for impl, m in run.models.items():
            run.models[impl] = m.to(device=o.dev, dtype=weight_dtype)
        shared = False
        if spec.convert is not None:
            try:  # the HF weights into the vitkernels model (SegFormer's may be there already; same tensors)
                vk.load_state_dict(spec.convert(base.state_dict()), strict=True)
                shared = True
            except Exception as e:
                print(
                    f"note: {name}: transformers' weights not loaded into the vitkernels model ({_short(e)})",
                    file=sys.stderr,
                )
        share_note = None if shared else (spec.share_note or "weights not shared (the converter failed)")
        for impl in run.fields:
            run.fields[impl]["note"] = f"{note}, attn_implementation={run.fields[impl].get('hf_attn')!r}" + (
                f"; {share_note}" if share_note else ""
            )
        run._verify(
            name, vk if shared else None, base.to(device=o.dev, dtype=weight_dtype), shape, weight_dtype, autocast, o
        )
        return run

    def _verify(self, name, vk, base, shape, weight_dtype, autocast, o: _Options) -> None:
        """Outputs of one batch of 2: every HF model vs the vitkernels model (`verify_err`, when the weights
        are shared), the patched model vs the unpatched one (`patch_err`) and the vitkernels ops it ran
        (`vk_ops`; none: the row is skipped, it would time transformers' own code)."""
        from .. import use_backend
        from .hf import OpCounter, hf_inputs

        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, *shape, generator=g).to(device=o.dev, dtype=weight_dtype)
        xh = hf_inputs([x], self.video)[0]
        try:
            with torch.inference_mode(), autocast():
                base.eval()
                want = _first_tensor(base(xh))
                ours = None
                if vk is not None:
                    vk.eval()
                    with use_backend(o.backend):
                        ours = _first_tensor(vk(x))
                for impl in list(self.models):
                    if impl == "hf+compile":  # the same model as hf-sdpa (or hf-eager), compiled later
                        continue
                    m = self.models[impl]
                    m.eval()
                    if impl == "hf+patch_hf":
                        with use_backend(o.backend), OpCounter() as counter:
                            got = _first_tensor(m(xh))
                        self.fields[impl].update(patch_err=_rel_err((got,), (want,)), vk_ops=dict(counter.counts))
                        if not counter.counts:
                            del self.models[impl]
                            self.why[impl] = "the patched model ran no vitkernels op"
                            continue
                    else:
                        got = want if m is base else _first_tensor(m(xh))
                    if ours is not None:
                        self.fields[impl]["verify_err"] = _rel_err((got,), (ours,))
        except Exception as e:
            print(f"note: {name}: verifying the transformers models failed ({_short(e)})", file=sys.stderr)
