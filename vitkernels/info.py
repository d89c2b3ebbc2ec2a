"""`python -m vitkernels.info [--check]`: versions, GPU, CUDA extension, and per op which backends can run."""

from __future__ import annotations

import argparse
import platform
import sys


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # not installed / broken
        return f"not available ({type(e).__name__})"


def report() -> str:
    import torch

    import vitkernels

    from . import _env, _ext, backends
    from ._samples import samples

    lines = [
        f"vitkernels {vitkernels.__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton {_version('triton')}",
        "environment: " + (" ".join(f"{k}={v}" for k, v in _env.set_flags().items()) or "no vitkernels flags set"),
        f"default backend: {backends.get_backend()}",
    ]
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
        device, dtype = "cuda", torch.bfloat16
    else:
        lines.append("GPU: none (ops run the reference backend on CPU; Triton kernels only with TRITON_INTERPRET=1)")
        device, dtype = "cpu", torch.float32
    ext = _ext.load_cuda_ext()
    if ext is not None and ext.emulated:
        lines.append(
            f"CUDA extension: the vkemu CPU emulation of the CUDA kernels ({ext.path}; "
            "VITKERNELS_CUDA_EMULATOR), cuda backend on CPU tensors"
        )
    elif ext is not None:
        lines.append(f"CUDA extension: loaded ({ext.__name__}), built for {_ext.built_cuda_archs()}")
    else:
        lines.append(f"CUDA extension: unavailable ({_ext.cuda_ext_unavailable_reason()})")
    lines.append(f"backends per op (sample {str(dtype).replace('torch.', '')} inputs on {device}):")
    for name, args in samples(dtype=dtype, device=device).items():
        lines.append(f"  {name}:")
        for backend in backends.BACKENDS:
            reasons = backends.not_supported_reasons(name, backend, *args)
            lines.append(f"    {backend:10s} {'ok' if not reasons else 'no: ' + '; '.join(reasons)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="also run the correctness self-check on this device")
    a = p.parse_args(argv)
    print(report())
    if a.check:
        from .bench import check

        return 0 if check.run(quick=True) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
