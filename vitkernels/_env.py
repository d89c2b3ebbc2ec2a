"""Every environment variable vitkernels reads, in one place.

Values are read when asked for (not cached at import), so a test or a launcher script can set one
after `import vitkernels`. `python -m vitkernels.info` prints the ones that are set.

Library (read by vitkernels/):
  VITKERNELS_BACKEND        "auto" | "triton" | "cuda" | "reference": the default backend (SPEC).
  VITKERNELS_SR_KERNEL      "auto" | "general" | "split": sr_attention's Triton kernels ("general":
                            the general ones; "split": the split backward at every M).
  VITKERNELS_ATTN_BWD_KERNEL "auto" | "split" | "fused" | "fused-deterministic": the Triton attention
                            backward (vitkernels/triton/attention.py: the dK/dV + dQ kernels, or one
                            kernel with dQ by fp32 atomics or by ordered per-key-block partials).
  VITKERNELS_ATTN_PACKED    "auto" | "off": "off" runs short sequences (Nq = Nk ≤ 16, the time axis)
                            on the general attention kernels instead of the packed ones
                            (vitkernels/triton/attention_short.py).
  VITKERNELS_ATTN_TMA       "off" | "on": "on" runs the attention forward and backward through TMA tensor
                            descriptors on sm_90+ GPUs (vitkernels/triton/attention_tma.py) where the views allow it.
  VITKERNELS_MIX_FFN_KERNEL "auto" | "composite" | "fused": mix_ffn's dwconv + GELU + fc2 as one
                            Triton kernel ("auto": where dwconv's Triton kernel runs) or as dwconv + F.linear.
  VITKERNELS_DWCONV_KERNEL  "auto" | "v1": "v1" runs dwconv's first Triton kernels (dz in fp32 through
                            HBM, a dweight reduction per tap and sub-tile, libdevice erf).
  VITKERNELS_WINDOW_CUDA_KERNEL "auto" | "v1": "v1" runs the first CUDA window_attention forward (one
                            window per 4-warp CTA, Q loaded after the K/V barrier).
  VITKERNELS_ATTN_CUDA_KERNEL "auto" | "v1": "v1" runs the first fp16 / bf16 CUDA attention forward (16
                            query rows per warp; "auto": 32 where the head dim is ≤ 64).
  VITKERNELS_GRID           "auto" | "fixed": "fixed" sizes the persistent Triton grids (window, sr,
                            xca) from the old assumed programs per SM instead of the compiled
                            kernel's occupancy.
  VITKERNELS_CUDA_EMULATOR  path of a vkemu build of csrc/ (tests/cuda_emu): CUDA kernels on CPU.
  VITKERNELS_NO_JIT         "1": never JIT-compile the CUDA extension (use only a prebuilt one).
  VITKERNELS_CACHE_DIR      where JIT and emulator builds are cached (default ~/.cache/vitkernels).
  VITKERNELS_CSRC           the csrc/ folder to JIT-compile from (default: found beside the package).
  VITKERNELS_COMMIT         the git commit recorded in benchmark results (default: `git rev-parse`).
  TRITON_INTERPRET          "1": Triton kernels run in the interpreter on CPU tensors (Triton's own).

Build (read by setup.py, which cannot import this module):
  VITKERNELS_SKIP_CUDA_BUILD  "1": install without compiling the CUDA extension.
  VITKERNELS_CUDA_ARCHS       the TORCH_CUDA_ARCH_LIST-style archs to compile for.
  VITKERNELS_TORCH_VERSION    the torch scripts/bootstrap.sh installs where none is (default 2.14.1).

The CUDA emulator (read by tests/cuda_emu's C++ at launch):
  VKEMU_THREADS             worker threads that run blocks (default: all cores).
  VKEMU_SCHEDULE            "reverse": run a block's threads in the opposite order between barriers.

Tests and tools (read by tests/ and bench/):
  VITKERNELS_REQUIRE_CUDA_EMU    "1": fail (not skip) when the emulator cannot be built (CI).
  VITKERNELS_REQUIRE_CUDA_EXT    "1": fail when the compiled CUDA extension is missing on a GPU.
  VITKERNELS_REQUIRE_PARITY_DEPS "1": fail when timm or transformers does not import (CI).
  VITKERNELS_TEST_AUTOTUNE       "1": on a GPU, let the Triton tuners run in tests.
  VITKERNELS_TEST_SLOW           "1": run the slow model sweeps.
  VITKERNELS_BENCH_SLOW          "1": run the slow bench CLI tests.
  VITKERNELS_COMMIT_FILE         a file holding the commit hash, for bench/gpu_proof.py.
  VK_PROOF_DEADLINE              seconds bench/gpu_proof.py may use in all.
"""

from __future__ import annotations

import os

FLAGS: dict[str, str] = {
    "VITKERNELS_BACKEND": "auto",
    "VITKERNELS_SR_KERNEL": "auto",
    "VITKERNELS_ATTN_BWD_KERNEL": "auto",
    "VITKERNELS_ATTN_PACKED": "auto",
    "VITKERNELS_ATTN_TMA": "off",
    "VITKERNELS_MIX_FFN_KERNEL": "auto",
    "VITKERNELS_DWCONV_KERNEL": "auto",
    "VITKERNELS_WINDOW_CUDA_KERNEL": "auto",
    "VITKERNELS_ATTN_CUDA_KERNEL": "auto",
    "VITKERNELS_GRID": "auto",
    "VITKERNELS_CUDA_EMULATOR": "",
    "VITKERNELS_NO_JIT": "0",
    "VITKERNELS_CACHE_DIR": "",
    "VITKERNELS_CSRC": "",
    "VITKERNELS_COMMIT": "",
    "TRITON_INTERPRET": "0",
    "VITKERNELS_SKIP_CUDA_BUILD": "0",
    "VITKERNELS_CUDA_ARCHS": "",
    "VITKERNELS_TORCH_VERSION": "",
    "VKEMU_THREADS": "",
    "VKEMU_SCHEDULE": "",
    "VITKERNELS_REQUIRE_CUDA_EMU": "0",
    "VITKERNELS_REQUIRE_CUDA_EXT": "0",
    "VITKERNELS_REQUIRE_PARITY_DEPS": "0",
    "VITKERNELS_TEST_AUTOTUNE": "0",
    "VITKERNELS_TEST_SLOW": "0",
    "VITKERNELS_BENCH_SLOW": "0",
    "VITKERNELS_COMMIT_FILE": "",
    "VK_PROOF_DEADLINE": "",
}
"""Name → default (the empty string: unset)."""


# os.environ keeps its entries encoded (os.environ._data on CPython): reading that dict with the
# flag's encoded name skips the encode / decode of every os.environ.get, 0.6 of 0.65 µs per read.
# Every write through os.environ (monkeypatch.setenv included) lands there too.
_ENCODED = {name: os.environ.encodekey(name) for name in FLAGS}


def _read(name: str):
    data = getattr(os.environ, "_data", None)
    if data is None:  # another Python: the plain way
        return os.environ.get(name)
    raw = data.get(_ENCODED[name])
    return None if raw is None else os.environ.decodevalue(raw)


def get(name: str) -> str:
    """The value of flag ``name``, stripped, or its default."""
    default = FLAGS.get(name)
    if default is None:
        raise KeyError(f"{name} is not a vitkernels environment flag (see vitkernels/_env.py)")
    value = _read(name)
    if value is None:  # the common case, on every op call for VITKERNELS_BACKEND: keep it cheap
        return default
    value = value.strip()
    return value if value else default


_CHECKED: dict = {}  # (flag, value as read) -> what its check returned


def checked(name: str, check):
    """``check(get(name))``, remembered per value read: a flag read on every call (the backend, a
    kernel switch) is validated and normalised once per value. ``check`` raises for a bad value
    (nothing is remembered then)."""
    key = (name, get(name))
    try:
        return _CHECKED[key]
    except KeyError:
        result = _CHECKED[key] = check(key[1])
        return result


def enabled(name: str) -> bool:
    """True when flag ``name`` is "1", "true", "yes", "on" or "y" (Triton's reading of its own flags)."""
    return get(name).lower() in ("1", "true", "yes", "on", "y")


def set_flags() -> dict[str, str]:
    """The flags set in this process's environment (for `vitkernels.info`)."""
    return {name: os.environ[name] for name in FLAGS if os.environ.get(name)}
