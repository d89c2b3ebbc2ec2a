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
* ``vitkernels+compile``  `torch.compile` of the vitkernels model (only when asked for with --impl).

When both exist, the eager model's weights are loaded into the vitkernels model (strict; SegFormer's
through `convert_hf_segformer`) and the inference outputs compared, so both run the same function.
Video models take (B, 3, T, H, W).

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
from .results import add_speedups

IMPLS = ("vitkernels", "eager", "compile", "vitkernels+compile")
DEFAULT_IMPLS = ("vitkernels", "eager", "compile")
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
    `vk_model` (its `config`), None) or (None, why not)."""
    cfg = vk_model.config
    try:
        import transformers
        config = transformers.SegformerConfig(
            num_channels=cfg["in_chans"], hidden_sizes=list(cfg["embed_dims"]), depths=list(cfg["depths"]),
            num_attention_heads=list(cfg["num_heads"]), sr_ratios=list(cfg["sr_ratios"]),
            mlp_ratios=[int(cfg["mlp_ratio"])] * len(cfg["depths"]), decoder_hidden_size=cfg["decoder_hidden_size"],
            num_labels=cfg["num_classes"])
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
        small = sorted((n for n in available if "tiny" in n or n.endswith("_b0")),
                       key=lambda n: (not n.startswith("vit_"), n))  # plain ViT is the fastest on CPU
        return (small[:1] or available[:1]), msgs
    return available, msgs


def run_models(names, zoo, *, device, dtypes, modes, impls, backend="auto", batch=None, reps=10, cpu_reps=3,
               budget_s=None, progress: Optional[Progress] = None, on_done=None, precisions=("amp",)) -> tuple:
    """Time every model x dtype x precision x mode x impl. Returns (records, skipped); every record
    and skipped row carries "precision" ("amp" or "pure", see the module doc)."""
    records, skipped = [], []
    dev = torch.device(device)
    timm, timm_why = _timm()
    o = _Options(dev=dev, cpu=dev.type != "cuda", modes=tuple(modes), impls=tuple(impls), backend=backend, batch=batch,
                 reps=reps, cpu_reps=cpu_reps, budget_s=budget_s, t0=time.time(), progress=progress, timm=timm,
                 timm_why=timm_why)
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
                ref_note = ("timm has no SegFormer: the baseline is transformers' "
                            "SegformerForSemanticSegmentation")
                ref_weights = convert_hf_segformer
    eager_backend = None
    if ("eager" in impls and "eager" not in models and "vitkernels" in models
            and is_video(name, models["vitkernels"])):
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
            print(f"note: {name}: the baseline's weights not loaded into the vitkernels model ({_short(e)})",
                  file=sys.stderr)
    for mode in o.modes:
        b = o.batch or default_batch(shape, mode, cpu)
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(b, *shape, generator=g).to(device=dev, dtype=weight_dtype) for _ in range(2)]
        for impl in impls:
            rec = {"kind": "model", "name": name, "mode": mode, "dtype": dtype_name(dtype), "precision": precision,
                   "shape": {"batch": b, "input": list(shape)}, "impl": impl}
            if o.progress:
                o.progress.step(f"{name} {dtype_name(dtype)} {precision} {mode} {impl}")
            if o.budget_s is not None and time.time() - o.t0 > o.budget_s:
                skipped.append(dict(rec, reason="time budget exhausted"))
                continue
            src = "vitkernels" if impl.startswith("vitkernels") else "eager"
            if src not in models:
                skipped.append(dict(rec, reason=why.get(impl) or why.get(src, "not available")))
                continue
            model = models[src]
            try:
                if impl in ("compile", "vitkernels+compile"):
                    torch._dynamo.reset()
                    model = torch.compile(model)
                if src == "vitkernels":
                    ctx = use_backend(backend)
                elif eager_backend is not None:
                    ctx = use_backend(eager_backend)
                    rec["note"] = "eager = vitkernels model on the reference backend (not in timm)"
                else:
                    ctx = contextlib.nullcontext()
                    if ref_note:
                        rec["note"] = ref_note
                with ctx:
                    step = _step(model, inputs, mode, autocast=autocast,
                                 scaler=grad_scaler(dev.type, dtype, precision) if mode == "train" else None)
                    step()  # compile, autotune, allocator warm-up
                    if cpu:
                        ms = time_cpu(step, reps=o.cpu_reps, warmup=0)
                    else:
                        torch.cuda.synchronize()
                        ms = time_cuda_calls(step, warmup=2, reps=o.reps)
            except Exception as e:
                skipped.append(dict(rec, reason=_short(e)))
                if not cpu:
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                continue
            rec.update(ms=ms, tflops=None, gbps=None, throughput=b / (ms * 1e-3),
                       unit="clips/s" if video else "images/s", batch=b,
                       autocast=dtype_name(dtype) if precision == "amp" else None,
                       weights=dtype_name(weight_dtype),
                       backend_choice=backend if src == "vitkernels" else None,
                       verify_err=verify if impl == "eager" else None,
                       timing="CPU timing" if cpu else "cuda-events")
            group.append(rec)
        del inputs
    add_speedups(group)
    return group
