"""Correctness sweep of every op x fused backend that can run on this device, against the float64 reference.

Pass rule (DESIGN.md): error <= 2 x error of the same op run in the same dtype on the reference
backend + a dtype floor, for the output and the gradient of every float input.
`python -m vitkernels.bench.check [--quick]`.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .. import backends, use_backend
from .._samples import samples
from ..ops import _spec

FUSED = [b for b in backends.BACKENDS if b != "reference"]  # the reference is the oracle itself
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run(fn, args):
    """Outputs and the gradients of every float tensor argument for a fixed upstream gradient."""
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(outs, leaves, cot, allow_unused=True)
    return [o.detach() for o in outs] + [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads)]


def _err(x, oracle):
    return (x.double().cpu() - oracle).abs().max().item() if x.numel() else 0.0


def check_op(name: str, backend: str, dtype: torch.dtype, device: str, batch: int = 2):
    """Returns (status, detail, worst): status "pass", "FAIL" or "skip"; worst = the largest error as a
    fraction of its bound (None when skipped)."""
    import vitkernels

    fn = getattr(vitkernels, name)
    args = samples(dtype=dtype, device=device, batch=batch)[name]
    reasons = backends.not_supported_reasons(name, backend, *args)
    if reasons:
        return "skip", "; ".join(reasons), None
    with use_backend("reference"):
        oracle = [
            t.double().cpu() for t in _run(fn, [a.double().cpu() if isinstance(a, torch.Tensor) else a for a in args])
        ]
        eager = _run(fn, args)
    with use_backend(backend):
        got = _run(fn, args)
    worst = 0.0
    for i, (g, e, o) in enumerate(zip(got, eager, oracle)):
        bound = 2 * _err(e, o) + FLOOR[dtype] * max(1.0, o.abs().max().item() if o.numel() else 1.0)
        err = _err(g, o)
        if not torch.isfinite(g).all():
            return "FAIL", f"tensor {i}: non-finite values", float("inf")
        if err > bound:
            return "FAIL", f"tensor {i}: error {err:.2e} > bound {bound:.2e}", err / bound if bound else float("inf")
        worst = max(worst, err / bound if bound else 0.0)
    return "pass", f"worst error at {worst:.0%} of its bound", worst


def _ratio(worst):
    """error / bound for the rows: None when skipped, "inf" for a non-finite result (valid JSON)."""
    if worst is None:
        return None
    return round(worst, 4) if math.isfinite(worst) else "inf"


def default_dtypes(device: str, quick: bool = False) -> list:
    """float32 on CPU (the interpreter's bfloat16 dots are wrong); every dtype on a GPU, bf16 with quick."""
    if device == "cpu":
        return [torch.float32]
    return [torch.bfloat16] if quick else [torch.float32, torch.float16, torch.bfloat16]


def run(
    quick: bool = False, dtypes=None, ops=None, device=None, rows: list | None = None, batch: int = 2, progress=None
) -> bool:
    """Prints one line per op x fused backend x dtype; appends them as dicts to `rows` if given.
    `batch` is the leading dim of every sample; `progress` (harness.Progress) is stepped per check."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = dtypes or default_dtypes(device, quick)
    ok = True
    print(
        f"vitkernels check on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}): "
        "fused backends vs the float64 reference"
    )
    for name in ops or _spec.names():
        for backend in FUSED:
            for dtype in dtypes:
                status, detail, worst = check_op(name, backend, dtype, device, batch)
                ok &= status != "FAIL"
                if progress is not None:
                    progress.step(f"{name} {backend} {str(dtype).replace('torch.', '')}: {status}")
                if rows is not None:
                    rows.append(
                        {
                            "op": name,
                            "backend": backend,
                            "dtype": str(dtype).replace("torch.", ""),
                            "device": device,
                            "batch": batch,
                            "status": status,
                            "detail": detail,
                            "worst": _ratio(worst),
                        }
                    )
                print(f"  {name:22s} {backend:10s} {str(dtype).replace('torch.', ''):9s} {status:5s} {detail}")
    print("check: all passed" if ok else "check: FAILURES")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one dtype on GPU (bfloat16); float32 on CPU")
    p.add_argument("--op", action="append", help="only these ops (repeatable)")
    a = p.parse_args(argv)
    return 0 if run(quick=a.quick, ops=a.op) else 1


if __name__ == "__main__":
    sys.exit(main())
