"""Every Triton kernel launch compiles for sm_90a (H100 / H200) and fits its shared memory.

The interpreter never runs Triton's compiler; tests/triton/triton_sm90.py does, without a GPU: it records
the launches the GPU path makes at real model shapes (all autotune configs the pruners keep) and
compiles each to a cubin. Here in its --quick form (bf16 at the main model shapes, about 1.5 min on
2 cores); `python tests/triton/triton_sm90.py` alone adds fp32 and more shapes.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _offline_compiler_missing():
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this Triton cannot compile offline: {e}"
    if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")):
        return "this Triton has no NVIDIA backend"
    return None


@pytest.mark.skipif(_offline_compiler_missing() is not None, reason=str(_offline_compiler_missing()))
def test_every_triton_launch_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, never from a stale cache
    report = tmp_path / "sm90.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "triton", "triton_sm90.py"), "--quick", "--json", str(report)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert report.exists(), f"capture failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = json.loads(report.read_text())["launches"]
    kernels = {r["kernel"] for r in rows}
    # The recorder must have seen every kernel of every op, or the check proves nothing.
    assert kernels >= {
        "_attn_fwd_kernel",
        "_attn_bwd_preprocess",
        "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel",
        "_packed_fwd_kernel",
        "_packed_bwd_kernel",
        "_wa_fwd_kernel",
        "_wa_bwd_kernel",
        "_dwconv_kernel",
        "_dwconv_bwd_reduce_kernel",
        "_dwconv_bwd_v2_kernel",
        "_attn_fwd_tma_kernel",
        "_sr_fwd_kernel",
        "_sr_bwd_kernel",
        "_sr_split_bwd_kernel",
        "_mix_ffn_fwd_kernel",
        "_xca_stats_kernel",
        "_xca_fwd_kernel",
        "_xca_bwd_kernel",
        "_pool_fwd_kernel",
        "_pool_bwd_pre_kernel",
        "_pool_bwd_dkdv_kernel",
        "_pool_bwd_dq_kernel",
        "_pool_bwd_table_kernel",
    }, kernels
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in failed)
    too_big = [(r["kernel"], r["constexprs"], r["shared"]) for r in rows if not r["fits_smem"]]
    assert not too_big, too_big
    assert proc.returncode == 0, proc.stdout[-3000:]
