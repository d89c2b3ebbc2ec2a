"""Kernel-level tests of vitkernels/triton/attention.py (FlashAttention-2 forward + backward).

The two launchers are called directly. Without a GPU they run under the Triton interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported; export it yourself
when running this file alone). With a GPU the same tests run on CUDA, bfloat16 included.

Oracle: the attention math written here in float64. Pass rule (flash-attention / SDPA style):
    max|fused - oracle| <= 2 * max|eager - oracle| + floor
where eager is the same math run in the input dtype. Outputs and every gradient are checked.
"""

import pytest
import torch

from helpers import device_marks, require_triton

_INTERPRET, DEVICE, DTYPES = require_triton()
pytestmark = device_marks(DEVICE)

from vitkernels.triton import attention as K  # noqa: E402

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------------------------
# Oracle and helpers
# ---------------------------------------------------------------------------------------------


def attention_math(q, k, v, bias, scale):
    """softmax(q kᵀ·scale + bias) v in the inputs' dtype; fully -inf rows give 0 (and no NaN grads)."""
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v


def run_math(q, k, v, bias_param, bias_shape, scale, dout, dtype):
    """Output and grads (q, k, v, bias_param) of attention_math evaluated in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    bp = None if bias_param is None else bias_param.detach().to(dtype).requires_grad_()
    bias = None if bp is None else bp.expand(bias_shape)
    out = attention_math(*leaves, bias, scale)
    out.backward(dout.to(dtype))
    grads = [t.grad for t in leaves] + ([bp.grad] if bp is not None else [])
    return out.detach(), grads


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def make_bias(kind, B, H, Nq, Nk, dtype, gen_device=DEVICE):
    """Returns (parameter, expanded view). kind: None | full | head | keypad | deadrow."""
    if kind is None:
        return None, None
    if kind == "full":
        p = torch.randn(B, H, Nq, Nk, device=gen_device)
    elif kind == "head":  # relative-position style (1, H, Nq, Nk)
        p = torch.randn(1, H, Nq, Nk, device=gen_device)
    elif kind == "keypad":  # key-padding mask (B, 1, 1, Nk) with some -inf keys
        p = torch.zeros(B, 1, 1, Nk, device=gen_device)
        if Nk > 1:
            p[..., Nk - max(1, Nk // 4) :] = float("-inf")
    elif kind == "deadrow":  # full bias, query row 0 of every (b, h) entirely -inf
        p = torch.randn(B, H, Nq, Nk, device=gen_device)
        p[:, :, 0, :] = float("-inf")
    else:
        raise ValueError(kind)
    p = p.to(dtype)
    return p, p.expand(B, H, Nq, Nk)


def fused(q, k, v, bias, scale, dout, bias_grad, out=None, grads=None):
    """Run the kernels; out / grads may be given as (strided) destination views."""
    if out is None:
        out = torch.full_like(q, float("nan"))
    lse = K.attention_forward(q, k, v, bias, scale, out)
    if grads is None:
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    dq, dk, dv = grads
    dbias = K.attention_backward(dout, q, k, v, bias, out, lse, scale, dq, dk, dv, bias_grad)
    return out, lse, dq, dk, dv, dbias


def check_against_oracle(q, k, v, bias_param, bias, scale, dout, got, dtype):
    """got = (out, dq, dk, dv[, dbias]); applies the 2x-eager rule to every tensor."""
    shape = None if bias is None else bias.shape
    ref, ref_grads = run_math(q, k, v, bias_param, shape, scale, dout, torch.float64)
    eag, eag_grads = run_math(q, k, v, bias_param, shape, scale, dout, dtype)
    names = ["out", "dq", "dk", "dv", "dbias"]
    for name, g, r, e in zip(names, got, [ref] + ref_grads, [eag] + eag_grads):
        assert g.shape == r.shape, (name, tuple(g.shape), tuple(r.shape))
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err, err_eager = max_err(g, r), max_err(e, r)
        tol = 2 * err_eager + FLOOR[dtype]
        assert err <= tol, f"{name}: error {err:.3e} > 2*eager {err_eager:.3e} + floor {FLOOR[dtype]}"


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def make_qkv(B, H, Nq, Nk, D, dtype):
    return rand(B, H, Nq, D, dtype=dtype), rand(B, H, Nk, D, dtype=dtype), rand(B, H, Nk, D, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Sweep: shapes x bias kinds x dtypes
# ---------------------------------------------------------------------------------------------

SHAPES = [  # (B, H, Nq, Nk, D)
    (2, 3, 1, 1, 32),
    (1, 2, 49, 49, 32),
    (2, 1, 50, 77, 48),
    (1, 1, 33, 130, 80),
    (1, 1, 17, 17, 96),
    (1, 1, 40, 40, 128),
    (2, 2, 64, 64, 64),  # multiples of the block: the unmasked (EVEN) code path
    (1, 2, 9, 20, 20),  # D not a power of two and < 16
]
BIASES = [None, "full", "head", "keypad"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", BIASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(shape, bias_kind, dtype):
    B, H, Nq, Nk, D = shape
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    dout = rand(B, H, Nq, D, dtype=dtype)
    bias_param, bias = make_bias(bias_kind, B, H, Nq, Nk, dtype)
    scale = D**-0.5
    out, lse, dq, dk, dv, dbias = fused(q, k, v, bias, scale, dout, bias is not None)
    got = [out, dq, dk, dv] + ([dbias] if bias is not None else [])
    if dbias is not None:
        assert dbias.dtype == torch.float32
    check_against_oracle(q, k, v, bias_param, bias, scale, dout, got, dtype)

    # lse is the natural-log logsumexp of the scaled+biased scores (rows with a finite score).
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == (B, H, Nq)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vit_base_length_197(dtype):
    B, H, N, D = 1, 2, 197, 64
    q, k, v, dout = (rand(B, H, N, D, dtype=dtype) for _ in range(4))
    bias_param, bias = make_bias("head", B, H, N, N, dtype)
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, D**-0.5, dout, True)
    check_against_oracle(q, k, v, bias_param, bias, D**-0.5, dout, [out, dq, dk, dv, dbias], dtype)


def test_length_197_no_bias_fp16():
    B, H, N, D = 1, 2, 197, 64
    dtype = torch.float16
    q, k, v, dout = (rand(B, H, N, D, dtype=dtype) for _ in range(4))
    out, _lse, dq, dk, dv, _ = fused(q, k, v, None, D**-0.5, dout, False)
    check_against_oracle(q, k, v, None, None, D**-0.5, dout, [out, dq, dk, dv], dtype)


# ---------------------------------------------------------------------------------------------
# Fully -inf rows, broadcast dbias layouts, strided views
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 33, 40, 32), (1, 1, 1, 1, 16)], ids=["33x40", "1x1"])
def test_fully_masked_row(shape, dtype):
    B, H, Nq, Nk, D = shape
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    dout = rand(B, H, Nq, D, dtype=dtype)
    bias_param, bias = make_bias("deadrow", B, H, Nq, Nk, dtype)
    out, lse, dq, dk, dv, dbias = fused(q, k, v, bias, D**-0.5, dout, True)
    assert (out[:, :, 0] == 0).all(), "a fully -inf row must give output 0"
    assert torch.isinf(lse[:, :, 0]).all() and (lse[:, :, 0] > 0).all(), "lse of a dead row is +inf"
    assert (dq[:, :, 0] == 0).all()
    assert (dbias[:, :, 0] == 0).all()
    for t in (dq, dk, dv, dbias):
        assert torch.isfinite(t).all()
    check_against_oracle(q, k, v, bias_param, bias, D**-0.5, dout, [out, dq, dk, dv, dbias], dtype)


@pytest.mark.parametrize(
    "param_shape",
    [
        (1, 3, 21, 37),  # batch broadcast (atomics across batch)
        (2, 1, 21, 37),  # head broadcast
        (2, 3, 1, 37),  # query broadcast: reduced in-tile over rows
        (2, 3, 21, 1),  # key broadcast: reduced in-tile over columns, bias stride(-1) == 0
        (1, 1, 1, 1),  # scalar bias: everything reduced
        (1, 3, 1, 37),  # mixed
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_dbias_broadcast_reduction(param_shape):
    B, H, Nq, Nk, D = 2, 3, 21, 37, 32
    dtype = torch.float32
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    dout = rand(B, H, Nq, D, dtype=dtype)
    bias_param = rand(*param_shape, dtype=dtype)
    bias = bias_param.expand(B, H, Nq, Nk)
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, 0.3, dout, True)
    assert dbias.shape == bias_param.shape
    check_against_oracle(q, k, v, bias_param, bias, 0.3, dout, [out, dq, dk, dv, dbias], dtype)


def test_bias_without_grad_and_odd_bias_strides():
    """Bias stored transposed (stride(-1) != 1); bias_requires_grad=False returns None."""
    B, H, Nq, Nk, D = 1, 2, 19, 23, 32
    dtype = torch.float32
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    dout = rand(B, H, Nq, D, dtype=dtype)
    bias_param = rand(B, H, Nk, Nq, dtype=dtype).transpose(-1, -2)
    assert bias_param.stride(-1) != 1
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias_param, 0.25, dout, False)
    assert dbias is None
    check_against_oracle(q, k, v, bias_param, bias_param, 0.25, dout, [out, dq, dk, dv], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_qkv_views_and_token_layout_outputs(dtype):
    """q/k/v are permuted slices of a (B, N, 3, H, D) projection; out goes into a (B, N, H, D)
    buffer and dq/dk/dv into one packed (B, N, 3, H, D) gradient buffer (what self_attention does)."""
    B, N, H, D = 2, 45, 3, 48
    qkv = rand(B, N, 3 * H * D, dtype=dtype).view(B, N, 3, H, D)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    out_buf = torch.full((B, N, H, D), float("nan"), device=DEVICE, dtype=dtype)
    out = out_buf.permute(0, 2, 1, 3)
    grad_buf = torch.full((B, N, 3, H, D), float("nan"), device=DEVICE, dtype=dtype)
    grads = [grad_buf[:, :, i].permute(0, 2, 1, 3) for i in range(3)]
    dout = rand(B, N, H, D, dtype=dtype).permute(0, 2, 1, 3)
    bias_param, bias = make_bias("keypad", B, H, N, N, dtype)
    o, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, D**-0.5, dout, True, out=out, grads=grads)
    assert o is out and dq is grads[0]
    assert torch.isfinite(out_buf).all() and torch.isfinite(grad_buf).all(), "every element written"
    check_against_oracle(q, k, v, bias_param, bias, D**-0.5, dout, [out, dq, dk, dv, dbias], dtype)


def test_cross_attention_different_sources():
    """q from one tensor, k and v from a packed (B, M, 2, H, D) kv projection (sr_attention)."""
    B, N, M, H, D = 2, 70, 13, 2, 32
    dtype = torch.float32
    q = rand(B, N, H * D, dtype=dtype).view(B, N, H, D).permute(0, 2, 1, 3)
    kv = rand(B, M, 2 * H * D, dtype=dtype).view(B, M, 2, H, D)
    k, v = kv[:, :, 0].permute(0, 2, 1, 3), kv[:, :, 1].permute(0, 2, 1, 3)
    dout = rand(B, H, N, D, dtype=dtype)
    out, _lse, dq, dk, dv, _ = fused(q, k, v, None, 0.2, dout, False)
    check_against_oracle(q, k, v, None, None, 0.2, dout, [out, dq, dk, dv], dtype)


def test_non_unit_last_stride_inputs_and_outputs_are_handled():
    """Inputs with stride(-1) != 1 are copied, outputs written through a temporary."""
    B, H, N, D = 1, 2, 12, 16
    dtype = torch.float32
    q, k, v = (rand(B, H, D, N, dtype=dtype).transpose(-1, -2) for _ in range(3))
    dout = rand(B, H, N, D, dtype=dtype)
    out = torch.full((B, H, D, N), float("nan"), device=DEVICE).transpose(-1, -2)
    grads = [torch.full((B, H, D, N), float("nan"), device=DEVICE).transpose(-1, -2) for _ in range(3)]
    fused(q, k, v, None, 0.5, dout, False, out=out, grads=grads)
    check_against_oracle(q, k, v, None, None, 0.5, dout, [out] + grads, dtype)


def test_autograd_style_dout_with_zero_strides():
    """dO of out.sum() arrives as an expanded tensor with all strides 0."""
    B, H, N, D = 1, 1, 10, 32
    dtype = torch.float32
    q, k, v = (rand(B, H, N, D, dtype=dtype) for _ in range(3))
    dout = torch.ones((), device=DEVICE).expand(B, H, N, D)
    out, _lse, dq, dk, dv, _ = fused(q, k, v, None, 0.5, dout, False)
    check_against_oracle(q, k, v, None, None, 0.5, dout, [out, dq, dk, dv], dtype)


# ---------------------------------------------------------------------------------------------
# Tilings, autotuned launch path, determinism, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not _INTERPRET, reason="INTERPRET_BLOCKS only applies to the interpreter")
@pytest.mark.parametrize("kernel", ["split", "fused-deterministic"])
@pytest.mark.parametrize("blocks", [(16, 64), (64, 16), (16, 16)], ids=str)
def test_other_tilings(monkeypatch, blocks, kernel):
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
    for name in ("fwd", "dkdv", "dq", "fused"):
        monkeypatch.setitem(K.INTERPRET_BLOCKS, name, blocks)
    B, H, Nq, Nk, D = 1, 2, 48, 35, 32
    dtype = torch.float32
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    dout = rand(B, H, Nq, D, dtype=dtype)
    bias_param, bias = make_bias("full", B, H, Nq, Nk, dtype)
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, 0.2, dout, True)
    check_against_oracle(q, k, v, bias_param, bias, 0.2, dout, [out, dq, dk, dv, dbias], dtype)


@pytest.mark.skipif(not _INTERPRET, reason="exercises the GPU launch path inside the interpreter")
def test_autotuned_launch_path_in_interpreter(monkeypatch):
    """Runs the triton.autotune'd kernels (pruning, heuristics, grid lambdas, restore_value of the
    atomically accumulated dbias) with a fake benchmark that really launches every candidate."""
    calls = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        calls.append(1)
        t = float(len(calls) % 3 + 1)
        return [t, t, t]

    tuners = [t for fam in K._TUNED.values() for t in fam]
    for t in tuners:
        monkeypatch.setattr(t, "_do_bench", fake_bench)
        monkeypatch.setattr(t, "cache", {})
    monkeypatch.setattr(K, "_use_fixed", lambda t: False)

    B, H, Nq, Nk, D = 2, 2, 40, 24, 32
    dtype = torch.float32
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    dout = rand(B, H, Nq, D, dtype=dtype)
    bias_param, bias = make_bias("head", B, H, Nq, Nk, dtype)  # batch-broadcast → atomics
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, 0.2, dout, True)
    assert len(calls) >= 3, "several configs were benchmarked"
    check_against_oracle(q, k, v, bias_param, bias, 0.2, dout, [out, dq, dk, dv, dbias], dtype)


# ---------------------------------------------------------------------------------------------
# The single-kernel backward (VITKERNELS_ATTN_BWD_KERNEL = fused | fused-deterministic)
# ---------------------------------------------------------------------------------------------

SINGLE_KERNEL = [("fused", torch.float16), ("fused-deterministic", torch.float32)]
if not _INTERPRET:
    SINGLE_KERNEL += [("fused", torch.bfloat16), ("fused-deterministic", torch.bfloat16)]


def run_kernel(monkeypatch, kernel):
    """Make attention_backward run ``kernel`` (short sequences too: no packing) and record the
    kernels it launches."""
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
    monkeypatch.setenv("VITKERNELS_ATTN_PACKED", "off")
    launched = []
    real = K._launch
    monkeypatch.setattr(K, "_launch", lambda name, *a, **kw: (launched.append(name), real(name, *a, **kw))[1])
    return launched


@pytest.mark.parametrize("kernel,dtype", SINGLE_KERNEL, ids=str)
@pytest.mark.parametrize("bias_kind", BIASES + ["deadrow"], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_single_kernel_backward_matches_oracle(monkeypatch, shape, bias_kind, kernel, dtype):
    """dQ from the dK/dV kernel (fp32 atomics, or ordered per-key-block partials), dbias from its
    transposed dS tiles (full, head-broadcast and key-padding biases, a fully masked row)."""
    launched = run_kernel(monkeypatch, kernel)
    B, H, Nq, Nk, D = shape
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    dout = rand(B, H, Nq, D, dtype=dtype)
    bias_param, bias = make_bias(bias_kind, B, H, Nq, Nk, dtype)
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, D**-0.5, dout, bias is not None)
    assert launched == ["fwd", "fused"]
    got = [out, dq, dk, dv] + ([dbias] if bias is not None else [])
    check_against_oracle(q, k, v, bias_param, bias, D**-0.5, dout, got, dtype)


@pytest.mark.skipif(_INTERPRET, reason="a real model shape: GPU only")
@pytest.mark.parametrize("kernel", ["split", "fused", "fused-deterministic"])
@pytest.mark.parametrize("bias_kind", [None, "head"], ids=str)
def test_real_shapes_single_kernel_backward(monkeypatch, kernel, bias_kind):
    """ViT-B/16 at 384 px (577 tokens, 12 heads, D 64) in bf16, where "auto" takes the single kernel,
    with each backward kernel (the one-call GPU proof runs this)."""
    run_kernel(monkeypatch, kernel)
    B, H, N, D = 2, 12, 577, 64
    q, k, v = make_qkv(B, H, N, N, D, torch.bfloat16)
    dout = rand(B, H, N, D, dtype=torch.bfloat16)
    bias_param, bias = make_bias(bias_kind, B, H, N, N, torch.bfloat16)
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, D**-0.5, dout, bias is not None)
    got = [out, dq, dk, dv] + ([dbias] if bias is not None else [])
    check_against_oracle(q, k, v, bias_param, bias, D**-0.5, dout, got, torch.bfloat16)


def test_single_kernel_deterministic_variant_is_bitwise_reproducible(monkeypatch):
    run_kernel(monkeypatch, "fused-deterministic")
    B, H, Nq, Nk, D = 1, 2, 70, 75, 32
    q, k, v = make_qkv(B, H, Nq, Nk, D, torch.float32)
    dout = rand(B, H, Nq, D, dtype=torch.float32)
    first = fused(q, k, v, None, 0.2, dout, False)[2:5]
    second = fused(q, k, v, None, 0.2, dout, False)[2:5]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_backward_kernel_choice(monkeypatch):
    """ "auto": the single kernel (atomics) where both sequences are long, unless deterministic
    algorithms are on; the split kernels otherwise. A bad value names the switch."""
    monkeypatch.delenv("VITKERNELS_ATTN_BWD_KERNEL", raising=False)
    assert K.backward_kernel(197, 197) == "split"
    assert K.backward_kernel(K.FUSED_MIN_LEN, 4 * K.FUSED_MIN_LEN) == "fused"
    assert K.backward_kernel(16384, 256) == "split"
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert K.backward_kernel(2048, 2048) == "split"
    finally:
        torch.use_deterministic_algorithms(was)
    for kernel in ("split", "fused", "fused-deterministic"):
        monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
        assert K.backward_kernel(8, 8) == kernel
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", "fastest")
    q = rand(1, 1, 8, 16, dtype=torch.float32)
    out = torch.empty_like(q)
    lse = K.attention_forward(q, q, q, None, 0.1, out)
    with pytest.raises(ValueError, match="VITKERNELS_ATTN_BWD_KERNEL"):
        K.attention_backward(q, q, q, q, None, out, lse, 0.1, *(torch.empty_like(q) for _ in range(3)), False)


def test_single_kernel_only_dq_wanted_runs_the_dq_kernel(monkeypatch):
    launched = run_kernel(monkeypatch, "fused")
    q, k, v = make_qkv(1, 2, 20, 30, 16, torch.float32)
    out = torch.empty_like(q)
    lse = K.attention_forward(q, k, v, None, 0.25, out)
    dq = torch.empty_like(q)
    K.attention_backward(torch.ones_like(q), q, k, v, None, out, lse, 0.25, dq, None, None, False)
    assert launched == ["fwd", "dq"] and torch.isfinite(dq).all()


@pytest.mark.skipif(not _INTERPRET, reason="exercises the GPU launch path inside the interpreter")
@pytest.mark.parametrize("kernel", ["fused", "fused-deterministic"])
def test_single_kernel_autotuned_launch_path(monkeypatch, kernel):
    """The tuned single kernel: every config benchmarked restores dQ's buffer (and dbias), so the
    result holds only the picked config's dQ terms, whatever the configs before it wrote."""
    run_kernel(monkeypatch, kernel)
    calls = []

    def fake_bench(kernel_call, quantiles):  # the first config a tuner benchmarks wins
        kernel_call()
        calls.append(1)
        return [float(len(calls))] * 3

    for t in (t for fam in K._TUNED.values() for t in fam):
        monkeypatch.setattr(t, "_do_bench", fake_bench)
        monkeypatch.setattr(t, "cache", {})
    monkeypatch.setattr(K, "_use_fixed", lambda t: False)
    B, H, Nq, Nk, D = 2, 2, 40, 70, 32
    q, k, v = make_qkv(B, H, Nq, Nk, D, torch.float32)
    dout = rand(B, H, Nq, D, dtype=torch.float32)
    bias_param, bias = make_bias("head", B, H, Nq, Nk, torch.float32)
    out, _lse, dq, dk, dv, dbias = fused(q, k, v, bias, 0.2, dout, True)
    tuner = K._TUNED["fp32"][3]
    assert len(tuner.configs_timings) >= 2, "several single-kernel configs were benchmarked"
    # The pick is not the smallest BLOCK_N: without the restore, the deterministic variant's
    # partial slots past its key blocks would keep a smaller config's dQ terms.
    assert tuner.best_config.kwargs["BLOCK_N"] == 64
    check_against_oracle(q, k, v, bias_param, bias, 0.2, dout, [out, dq, dk, dv, dbias], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Nq,Nk", [(37, 41), (32, 20), (64, 64), (1, 5), (0, 7), (9, 0)], ids=str)
def test_forward_extra_query_row_in_the_same_launch(Nq, Nk, dtype):
    """extra_q: one more query row per (b, g, h) (a class token's query, stride 0 over the groups),
    with the prefix row, run as row Nq of the last block (a block of its own when the block size
    divides Nq): the same out / lse as its own launch, and the patch rows unchanged."""
    B, G, H, D = 2, 3, 2, 32
    q, k, v = rand(B, G, H, Nq, D, dtype=dtype), rand(B, G, H, Nk, D, dtype=dtype), rand(B, G, H, Nk, D, dtype=dtype)
    pk, pv, xq = (rand(B, 1, H, D, dtype=dtype).expand(B, G, H, D) for _ in range(3))
    out, xo, xl = torch.empty_like(q), torch.empty(B, G, H, D, dtype=dtype), torch.empty(B, G, H)
    lse = K.attention_forward(q, k, v, None, 0.3, out, prefix=(pk, pv), extra_q=(xq, xo, xl))
    out2 = torch.empty_like(q)
    lse2 = K.attention_forward(q, k, v, None, 0.3, out2, prefix=(pk, pv))
    xo2 = torch.empty(B, G, H, 1, D, dtype=dtype)
    xl2 = K.attention_forward(xq.unsqueeze(-2), k, v, None, 0.3, xo2, prefix=(pk, pv))
    # On a GPU the launches may tune to other key blocks (another summation order).
    tol = 0.0 if _INTERPRET else FLOOR[dtype]
    torch.testing.assert_close(out, out2, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, lse2, atol=tol, rtol=tol)
    torch.testing.assert_close(xo, xo2[..., 0, :], atol=tol, rtol=tol)
    torch.testing.assert_close(xl, xl2[..., 0], atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="xlse must be"):
        K.attention_forward(q, k, v, None, 0.3, out, prefix=(pk, pv), extra_q=(xq, xo, xl.double()))


@pytest.mark.parametrize("kernel", ["split", "fused", "fused-deterministic"])
@pytest.mark.parametrize("Nq,Nk", [(37, 41), (32, 20), (1, 5)], ids=str)
def test_backward_extra_query_row_dq(monkeypatch, Nq, Nk, kernel):
    """extra_q with dxq: the extra row's dq (folded into the dQ kernel as row Nq by the split
    backward, a one-row dQ launch after the single kernel), its dK/dV terms and the prefix row's
    gradients from every query, against float64 autograd of the concatenated sequence."""
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
    dtype = torch.float32
    B, G, H, D = 2, 3, 2, 32
    q, do = rand(B, G, H, Nq, D, dtype=dtype), rand(B, G, H, Nq, D, dtype=dtype)
    k, v = rand(B, G, H, Nk, D, dtype=dtype), rand(B, G, H, Nk, D, dtype=dtype)
    pk, pv, xq = (rand(B, 1, H, D, dtype=dtype).expand(B, G, H, D) for _ in range(3))
    xdo = rand(B, G, H, D, dtype=dtype)
    out, xo, xl = torch.empty_like(q), torch.empty(B, G, H, D), torch.empty(B, G, H)
    lse = K.attention_forward(q, k, v, None, 0.3, out, prefix=(pk, pv), extra_q=(xq, xo, xl))
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    dxq, dpk, dpv = (torch.empty(B, G, H, D) for _ in range(3))
    xdelta = (xo * xdo).sum(-1)
    K.attention_backward(
        do, q, k, v, None, out, lse, 0.3, dq, dk, dv, False, (pk, pv), (dpk, dpv), (xq, xdo, xl, xdelta, dxq)
    )
    qf = torch.cat([q, xq.unsqueeze(-2)], -2).double().requires_grad_()
    kf = torch.cat([pk.unsqueeze(-2), k], -2).double().requires_grad_()
    vf = torch.cat([pv.unsqueeze(-2), v], -2).double().requires_grad_()
    (torch.softmax(qf @ kf.transpose(-1, -2) * 0.3, -1) @ vf).backward(torch.cat([do, xdo.unsqueeze(-2)], -2).double())
    want = [qf.grad[..., :Nq, :], qf.grad[..., Nq, :], kf.grad[..., 1:, :], vf.grad[..., 1:, :]]
    want += [kf.grad[..., 0, :], vf.grad[..., 0, :]]
    for name, g, w in zip(["dq", "dxq", "dk", "dv", "dpk", "dpv"], [dq, dxq, dk, dv, dpk, dpv], want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Many short sequences: the packed kernels (vitkernels/triton/attention_short.py)
# ---------------------------------------------------------------------------------------------


def spy_packed(monkeypatch):
    from vitkernels.triton import attention_short as S

    launched = []
    real = S._launch
    monkeypatch.setattr(S, "_launch", lambda index, *a: (launched.append(index), real(index, *a))[1])
    return launched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,G,H,N,D,interleaved",
    [
        (2, 1, 3, 8, 64, False),
        (1, 13, 2, 8, 32, True),
        (2, 5, 1, 3, 20, False),
        (1, 3, 2, 16, 48, True),
        (3, 1, 1, 1, 16, False),
    ],
    ids=str,
)
def test_packed_short_sequences_match_oracle(monkeypatch, B, G, H, N, D, interleaved, dtype):
    """Several whole sequences per tile, block-diagonal scores: 4-D and 5-D views, a ragged last
    tile (sequence count not a multiple of the sequences per tile), interleaved rows (the time axis
    of a "ts" layout: the group stride is smaller than the row stride), N = 1, 3, 8 and 16."""
    launched = spy_packed(monkeypatch)
    shape = (B, H, N, D) if G == 1 else (B, G, H, N, D)
    if interleaved:  # (B, N, G, H, D) storage viewed as (B, G, H, N, D)
        q, k, v, dout = (rand(B, N, G, H, D, dtype=dtype).permute(0, 2, 3, 1, 4) for _ in range(4))
    else:
        q, k, v, dout = (rand(*shape, dtype=dtype) for _ in range(4))
    flat = [t.reshape(-1, N, D) for t in (q, k, v, dout)]  # (sequences, N, D) for the oracle
    out, lse, dq, dk, dv, _ = fused(q, k, v, None, D**-0.5, dout, False)
    assert launched == [0, 1]
    got = [t.reshape(-1, N, D)[:, None] for t in (out, dq, dk, dv)]
    fq, fk, fv, fd = (t[:, None] for t in flat)
    check_against_oracle(fq, fk, fv, None, None, D**-0.5, fd, got, dtype)
    s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)


def test_packed_kernels_switch_and_limits(monkeypatch):
    """Not packed: a bias, Nq ≠ Nk, N > MAX_LEN, or VITKERNELS_ATTN_PACKED=off (the general
    kernels, same results)."""
    from vitkernels.triton import attention_short as S

    launched = spy_packed(monkeypatch)
    q, k, v = make_qkv(2, 2, 8, 8, 32, torch.float32)
    dout = rand(2, 2, 8, 32, dtype=torch.float32)
    packed = fused(q, k, v, None, 0.2, dout, False)
    assert launched == [0, 1]
    monkeypatch.setenv("VITKERNELS_ATTN_PACKED", "off")
    general = fused(q, k, v, None, 0.2, dout, False)
    assert launched == [0, 1]
    for a, b in zip(packed[:5], general[:5]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("VITKERNELS_ATTN_PACKED", "auto")
    _, bias = make_bias("full", 2, 2, 8, 8, torch.float32)
    fused(q, k, v, bias, 0.2, dout, True)
    fused(q, k[:, :, :7], v[:, :, :7], None, 0.2, dout, False)
    n = S.MAX_LEN + 1
    fused(*make_qkv(1, 1, n, n, 16, torch.float32), None, 0.2, rand(1, 1, n, 16, dtype=torch.float32), False)
    assert launched == [0, 1]
    monkeypatch.setenv("VITKERNELS_ATTN_PACKED", "on")
    with pytest.raises(ValueError, match="VITKERNELS_ATTN_PACKED"):
        fused(q, k, v, None, 0.2, dout, False)


def test_forward_is_deterministic():
    B, H, Nq, Nk, D = 1, 2, 37, 41, 32
    dtype = torch.float16
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    _, bias = make_bias("full", B, H, Nq, Nk, dtype)
    o1, o2 = torch.empty_like(q), torch.empty_like(q)
    l1 = K.attention_forward(q, k, v, bias, 0.3, o1)
    l2 = K.attention_forward(q, k, v, bias, 0.3, o2)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_bad_inputs_raise_clear_errors():
    q = rand(1, 2, 8, 160, dtype=torch.float32)
    with pytest.raises(ValueError, match="head dim D=160"):
        K.attention_forward(q, q, q, None, 0.1, torch.empty_like(q))
    q = rand(1, 2, 8, 16, dtype=torch.float32)
    k = rand(1, 2, 9, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="k has shape"):
        K.attention_forward(q, k, k, None, 0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="bias has shape"):
        K.attention_forward(q, q, q, rand(1, 2, 8, 9, dtype=torch.float32), 0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="v has dtype"):
        K.attention_forward(q, q, q.half(), None, 0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="must be 4-D"):
        K.attention_forward(q[0], q, q, None, 0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="out has dtype"):
        K.attention_forward(q, q, q, None, 0.1, torch.empty_like(q).half())


def test_empty_batch():
    q = rand(0, 2, 8, 16, dtype=torch.float32)
    out = torch.empty_like(q)
    lse = K.attention_forward(q, q, q, None, 0.1, out)
    assert lse.shape == (0, 2, 8)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    assert K.attention_backward(q, q, q, q, None, out, lse, 0.1, dq, dk, dv, False) is None


def test_flop_count():
    assert K.attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert K.attention_flops(2, 3, 5, 7, 11, backward=True) == int(2.5 * 4 * 2 * 3 * 5 * 7 * 11)
