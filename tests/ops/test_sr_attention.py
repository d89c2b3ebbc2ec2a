"""The N ≫ M kernels of vitkernels/triton/sr_attention.py, directly and through ``vitkernels.sr_attention``.

Without a GPU they run in the Triton interpreter on CPU (float32, float16); with one, on CUDA with
bfloat16 too. Oracle: the math in float64; pass rule: error ≤ 2 × the same math's error in the
input dtype + floor (helpers.assert_within), for the output and every gradient.
"""

import pytest
import torch
import triton

import vitkernels as vk

from helpers import assert_within, device_marks, require_triton

_INTERPRET, DEVICE, DTYPES = require_triton()
pytestmark = device_marks(DEVICE)

from vitkernels.triton import attention as general  # noqa: E402
from vitkernels.triton import sr_attention as K  # noqa: E402


def math(q, k, v, scale, dout):
    """Output and (dq, dk, dv) of softmax(q kᵀ·scale) v evaluated in q's dtype."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = torch.softmax((leaves[0] @ leaves[1].transpose(-1, -2)) * scale, -1) @ leaves[2]
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def run_kernels(q, k, v, scale, dout):
    """(out, dq, dk, dv, lse) from the kernels, every destination NaN-poisoned first."""
    out = torch.full_like(q, float("nan"))
    lse = K.sr_attention_forward(q, k, v, scale, out)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    K.sr_attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv)
    return out, dq, dk, dv, lse


def check(q, k, v, dout, got, dtype, scale):
    oracle = math(*(t.double() for t in (q, k, v)), scale, dout.double())
    eager = math(q, k, v, scale, dout)
    for name, g, e, o in zip(("out", "dq", "dk", "dv"), got, eager, oracle):
        assert_within(name, g, e, o, dtype)


# A query chunk of two blocks (interpreter) or one GPU chunk unit: heads split over several programs.
SMALL_ROWS = 2 * max(K.INTERPRET_BLOCK_M.values()) if _INTERPRET else 128


@pytest.fixture
def chunks(monkeypatch):
    """Small query chunks so that one head's rows are split over several programs (partial dK/dV)."""
    monkeypatch.setattr(K, "ROWS_PER_PROGRAM", SMALL_ROWS)


SHAPES = [  # B, H, N, M, D
    (2, 1, 70, 7, 32),  # ragged N, M < 16 (keys padded to 16)
    (1, 2, 64, 16, 64),  # N and M multiples of the blocks: unmasked path
    (1, 3, 100, 49, 48),  # PVTv2's M = 49; D not a power of two
    (2, 1, 33, 1, 32),  # a single key
    (1, 1, 45, 256, 32),  # SegFormer's M = 256 (largest resident key set)
    (1, 2, 9, 20, 20),  # D < 16, N smaller than a block
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_oracle(shape, dtype, chunks):
    B, H, N, M, D = shape
    q = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, H, M, D, device=DEVICE).to(dtype) for _ in range(2))
    dout = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    scale = D**-0.5
    out, dq, dk, dv, lse = run_kernels(q, k, v, scale, dout)
    check(q, k, v, dout, (out, dq, dk, dv), dtype, scale)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, N)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=tol, rtol=tol)


def test_chunking_does_not_change_results(monkeypatch):
    """One program per head and many programs per head (partial sums) agree to rounding."""
    q = torch.randn(1, 2, 150, 32, device=DEVICE)
    k, v = (torch.randn(1, 2, 49, 32, device=DEVICE) for _ in range(2))
    dout = torch.randn_like(q)
    results = []
    # 1024: one program per head; 40: a chunk that is not a multiple of BLOCK_M (its last block is
    # cut at the chunk's end, so no query is counted twice in dK/dV).
    for rows in (1024, SMALL_ROWS, 40):
        monkeypatch.setattr(K, "ROWS_PER_PROGRAM", rows)
        results.append(run_kernels(q, k, v, 32**-0.5, dout))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic(chunks):
    q = torch.randn(2, 1, 90, 32, device=DEVICE)
    k, v = (torch.randn(2, 1, 20, 32, device=DEVICE) for _ in range(2))
    dout = torch.randn_like(q)
    first, second = run_kernels(q, k, v, 0.2, dout), run_kernels(q, k, v, 0.2, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_strided_views_in_and_out(chunks):
    """q / k / v as views of packed token-layout buffers, out and grads written into token-layout views."""
    B, N, M, H, D = 2, 37, 11, 2, 32
    C = H * D
    q_tok = torch.randn(B, N, C + 8, device=DEVICE)[..., 8:]  # sliced: row stride C + 8
    kv_tok = torch.randn(B, M, 2 * C, device=DEVICE)
    q = q_tok.reshape(B, N, H, D).transpose(1, 2)
    k, v = kv_tok.reshape(B, M, 2, H, D).permute(2, 0, 3, 1, 4)
    out_tok = torch.full((B, N, C), float("nan"), device=DEVICE)
    dq_tok = torch.full((B, N, C), float("nan"), device=DEVICE)
    dkv_tok = torch.full((B, M, 2 * C), float("nan"), device=DEVICE)
    out = out_tok.view(B, N, H, D).transpose(1, 2)
    dq = dq_tok.view(B, N, H, D).transpose(1, 2)
    dk, dv = dkv_tok.view(B, M, 2, H, D).permute(2, 0, 3, 1, 4)
    dout = torch.randn(B, N, C, device=DEVICE).view(B, N, H, D).transpose(1, 2)
    lse = K.sr_attention_forward(q, k, v, D**-0.5, out)
    K.sr_attention_backward(dout, q, k, v, out, lse, D**-0.5, dq, dk, dv)
    want = run_kernels(*(t.contiguous() for t in (q, k, v)), D**-0.5, dout.contiguous())
    for got, w in zip((out, dq, dk, dv), want):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)


def test_limits():
    assert K.supports_forward(256, 64) and K.supports_forward(49, 128)
    assert not K.supports_forward(257, 32) and not K.supports_forward(256, 128)
    assert K.supports_backward(256, 32) and K.supports_backward(128, 64)
    assert not K.supports_backward(256, 64) and not K.supports_backward(0, 32)
    assert K.supports_split_backward(256, 64) and K.supports_split_backward(4096, 128)
    assert not K.supports_split_backward(0, 64) and not K.supports_split_backward(16, 160)
    q = torch.randn(1, 1, 8, 32, device=DEVICE)
    kv = torch.randn(1, 1, 300, 32, device=DEVICE)
    with pytest.raises(ValueError, match="on-chip limit"):
        K.sr_attention_forward(q, kv, kv, 1.0, torch.empty_like(q))
    grads = [torch.empty_like(t) for t in (q, kv, kv)]
    lse = torch.zeros(1, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="on-chip limit"):
        K.sr_attention_backward(q, q, kv, kv, q, lse, 1.0, *grads)
    q160 = torch.randn(1, 1, 8, 160, device=DEVICE)
    with pytest.raises(ValueError, match="D ≤ 128"):
        K.sr_attention_split_backward(q160, q160, q160, q160, q160, lse, 1.0, *(torch.empty_like(q160),) * 3)


# ------------------------------------------------------------------------------ split backward


def run_split(q, k, v, scale, dout):
    """(out, dq, dk, dv) with the split backward; out and lse from the N ≫ M forward where it fits,
    else from the general one. Gradients NaN-poisoned first."""
    out = torch.full_like(q, float("nan"))
    if K.supports_forward(k.shape[2], q.shape[-1]):
        lse = K.sr_attention_forward(q, k, v, scale, out)
    else:
        lse = general.attention_forward(q, k, v, None, scale, out)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    K.sr_attention_split_backward(dout, q, k, v, out, lse, scale, dq, dk, dv)
    return out, dq, dk, dv


SPLIT_BLOCK_N = K.INTERPRET_SPLIT_BLOCKS["BLOCK_N"] if _INTERPRET else 64
# Two query blocks per chunk (interpreter) or one GPU chunk unit.
SPLIT_ROWS = 2 * K.INTERPRET_SPLIT_BLOCKS["BLOCK_M"] if _INTERPRET else 128


@pytest.fixture
def split_chunks(monkeypatch):
    """Small split-backward chunks: one head's rows over several programs (partial dK/dV)."""
    monkeypatch.setattr(K, "ROWS_PER_PROGRAM", SPLIT_ROWS)


SPLIT_SHAPES = [  # B, H, N, M, D (interpreter: 16-row query blocks, 32-key passes, 32-row chunks)
    (1, 2, 45, 70, 32),  # M: 2 passes + a ragged one; N: a full chunk and a ragged one
    (2, 1, 64, 64, 64),  # M, N multiples of every block and chunk: the unmasked paths
    (1, 1, 50, 200, 48),  # SegFormer-like M = 200 (7 passes), D not a power of two
    (1, 2, 37, 20, 64),  # M < BLOCK_N: one pass (no dQ scratch, no stored delta)
    (1, 1, 40, 300, 32),  # M > 256: beyond every on-chip kernel (general forward)
]


@pytest.mark.parametrize("rows", ["chunked", "one_chunk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_split_backward_matches_oracle(monkeypatch, shape, dtype, rows):
    """dq, dk, dv of the split backward vs float64 (2× rule), with a head's queries over several
    programs (partials summed) and in one program (a single chunk)."""
    B, H, N, M, D = shape
    monkeypatch.setattr(K, "ROWS_PER_PROGRAM", SPLIT_ROWS if rows == "chunked" else 1024)
    if _INTERPRET and rows == "chunked":
        assert triton.cdiv(N, SPLIT_ROWS) > 1
    q = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, H, M, D, device=DEVICE).to(dtype) for _ in range(2))
    dout = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    check(q, k, v, dout, run_split(q, k, v, D**-0.5, dout), dtype, D**-0.5)


def test_split_backward_very_negative_scores(split_chunks):
    """Every score ≈ -20 (lse ≪ 0) in float16 with a ragged last key block: the zero-filled padding
    keys (score 0: exp(0 - lse) > the float16 range) must be masked out of P, or dq turns NaN."""
    B, H, N, M, D = 1, 1, 40, SPLIT_BLOCK_N + 7, 32
    u = torch.randn(D, device=DEVICE)
    k = u + 0.05 * torch.randn(B, H, M, D, device=DEVICE)
    q = (-20 / D**-0.5) * u / u.dot(u) + 0.05 * torch.randn(B, H, N, D, device=DEVICE)
    v, dout = torch.randn(B, H, M, D, device=DEVICE), torch.randn_like(q)
    q, k, v, dout = (t.half() for t in (q, k, v, dout))
    assert ((q.double() @ k.double().transpose(-1, -2)) * D**-0.5).max() < -15
    check(q, k, v, dout, run_split(q, k, v, D**-0.5, dout), torch.float16, D**-0.5)


def test_split_backward_is_deterministic(split_chunks):
    """No atomics: two runs with several chunks and passes per head are bitwise equal."""
    q = torch.randn(2, 1, 90, 32, device=DEVICE)
    k, v = (torch.randn(2, 1, 3 * SPLIT_BLOCK_N - 5, 32, device=DEVICE) for _ in range(2))
    dout = torch.randn_like(q)
    first, second = run_split(q, k, v, 0.2, dout), run_split(q, k, v, 0.2, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_split_backward_strided_views(split_chunks):
    """Token-layout views in (q with a padded row stride) and out (dq, dk, dv into packed buffers)."""
    B, N, M, H, D = 2, 37, 2 * SPLIT_BLOCK_N + 3, 2, 32
    C = H * D
    q = torch.randn(B, N, C + 8, device=DEVICE)[..., 8:].reshape(B, N, H, D).transpose(1, 2)
    k, v = torch.randn(B, M, 2 * C, device=DEVICE).reshape(B, M, 2, H, D).permute(2, 0, 3, 1, 4)
    dout = torch.randn(B, N, C, device=DEVICE).view(B, N, H, D).transpose(1, 2)
    out = torch.empty(B, N, C, device=DEVICE).view(B, N, H, D).transpose(1, 2)
    lse = K.sr_attention_forward(q, k, v, D**-0.5, out)
    dq = torch.full((B, N, C), float("nan"), device=DEVICE).view(B, N, H, D).transpose(1, 2)
    dk, dv = torch.full((B, M, 2 * C), float("nan"), device=DEVICE).view(B, M, 2, H, D).permute(2, 0, 3, 1, 4)
    K.sr_attention_split_backward(dout, q, k, v, out, lse, D**-0.5, dq, dk, dv)
    want = run_split(*(t.contiguous() for t in (q, k, v)), D**-0.5, dout.contiguous())
    for got, w in zip((out, dq, dk, dv), want):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)


def test_split_rows_fill_one_wave(monkeypatch):
    """GPU chunking: ⌊SMs / (B·H)⌋ chunks per head, rows a multiple of 128; never more programs than
    SMs unless one chunk per head already exceeds them."""
    monkeypatch.setattr(K, "sm_count", lambda device: 132)
    for bh, n in [(8, 16384), (16, 4096), (40, 1024), (1, 256), (200, 4096), (5, 100)]:
        rows = K._split_rows(n, bh, torch.device("cuda"), False, 16)
        chunks = triton.cdiv(n, rows)
        assert rows % 128 == 0
        assert bh * chunks <= max(132, bh), (bh, n, rows)
        assert rows == 128 or bh * chunks * 2 > 132, (bh, n, rows)  # half a wave at least, unless N is short
    assert K._split_rows(16384, 8, torch.device("cuda"), False, 16) == 1024  # SegFormer-B2 s1, B 8: 128 programs
    assert K._split_rows(4096, 16, torch.device("cuda"), False, 16) == 512  # stage 2 (2 heads): 128 programs


# ------------------------------------------------------------------------------ through the op


@pytest.mark.parametrize(
    "m,d,switch,bwd",
    [
        (49, 64, "auto", "sr_attention_backward"),
        (256, 32, "auto", "sr_attention_backward"),
        (200, 64, "auto", "sr_attention_split_backward"),  # beyond the on-chip backward
        (300, 32, "auto", "sr_attention_split_backward"),  # beyond the on-chip forward too
        (49, 64, "split", "sr_attention_split_backward"),
        (300, 32, "split", "sr_attention_split_backward"),
        (49, 64, "general", "attention_backward"),
        (200, 64, "general", "attention_backward"),
    ],
)
def test_op_dispatch(monkeypatch, m, d, switch, bwd):
    """VITKERNELS_SR_KERNEL: "auto" runs the N ≫ M kernels while they fit on chip, beyond them the
    general forward and the split backward; "split" forces the split backward; "general" the
    general kernels."""
    monkeypatch.setenv("VITKERNELS_SR_KERNEL", switch)
    calls = []
    for mod, names in (
        (K, ("sr_attention_forward", "sr_attention_backward", "sr_attention_split_backward")),
        (general, ("attention_forward", "attention_backward")),
    ):
        for name in names:
            fn = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name: (calls.append(_n), _fn(*a))[1])
    q = torch.randn(1, 20, d, device=DEVICE, requires_grad=True)
    kv = torch.randn(1, m, 2 * d, device=DEVICE, requires_grad=True)
    with vk.use_backend("triton"):
        vk.sr_attention(q, kv, 1).sum().backward()
    fwd = "sr_attention_forward" if K.supports_forward(m, d) and switch != "general" else "attention_forward"
    assert calls == [fwd, bwd]


def test_op_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("VITKERNELS_SR_KERNEL", "fastest")
    q, kv = torch.randn(1, 20, 32, device=DEVICE), torch.randn(1, 4, 64, device=DEVICE)
    with vk.use_backend("triton"), pytest.raises(ValueError, match="VITKERNELS_SR_KERNEL"):
        vk.sr_attention(q, kv, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,N,M,H,D,strided",
    [(2, 98, 49, 2, 32, False), (1, 20, 20, 8, 64, False), (1, 100, 140, 2, 64, False), (1, 100, 140, 2, 64, True)],
    ids=["pvt_M49_2x32", "stage4_8x64", "segformer_like_M140_2x64", "segformer_like_strided"],
)
def test_op_pvt_like(dtype, chunks, B, N, M, H, D, strided):
    """vitkernels.sr_attention on the triton backend vs float64: PVTv2-like (M = 49, 2 heads of 32),
    stage 4's 8 heads of 64 (sr ratio 1: M = N), and SegFormer-like heads of 64 with M = 140 (beyond
    the on-chip backward: the split backward), also with q and kv as non-contiguous slices."""
    q = torch.randn(B, N, H * D)
    kv = torch.randn(B, M, 2 * H * D)
    cot = torch.randn(B, N, H * D)

    def grads(fn, dt, dev):
        a, b = (t.to(dev, dt).requires_grad_() for t in (q, kv))
        if strided and dev == DEVICE and dt != torch.float64:  # the fused inputs: row strides > C, 2C
            a, b = (torch.cat([t, t[..., :8]], -1)[..., : t.shape[-1]] for t in (a, b))
            assert not a.is_contiguous() and not b.is_contiguous()
        out = fn(a, b)
        return [out.detach()] + list(torch.autograd.grad(out, (a, b), cot.to(dev, dt)))

    def eager(a, b):
        qh = a.reshape(B, N, H, D).transpose(1, 2)
        k, v = b.reshape(B, M, 2, H, D).permute(2, 0, 3, 1, 4)
        return (torch.softmax(qh @ k.transpose(-1, -2) * D**-0.5, -1) @ v).transpose(1, 2).reshape(B, N, H * D)

    oracle = grads(eager, torch.float64, "cpu")
    with vk.use_backend("triton"):
        fused = grads(lambda a, b: vk.sr_attention(a, b, H), dtype, DEVICE)
    low = grads(eager, dtype, DEVICE)
    for name, f, e, o in zip(("out", "dq", "dkv"), fused, low, oracle):
        assert_within(name, f, e, o, dtype)


# ------------------------------------------------------------------------------ GPU, real shapes

REAL = [  # B, heads, N, M, C from the models
    (8, 1, 3136, 49, 64),  # PVTv2-b2 stage 1 at 224
    (8, 2, 784, 49, 128),  # PVTv2-b2 stage 2
    (8, 5, 196, 49, 320),  # PVTv2-b2 stage 3
    (2, 1, 16384, 256, 32),  # SegFormer-B0 stage 1 at 512
    (2, 2, 4096, 256, 64),  # SegFormer-B1+ stage 2 at 512: the split backward (M·D > the on-chip limit)
    (2, 1, 16384, 256, 64),  # SegFormer-B1+ stage 1 at 512: the split backward
    (1, 1, 65536, 1024, 32),  # SegFormer stage 1 at 1024: general forward, split backward (M > 256)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", REAL, ids=lambda s: "x".join(map(str, s)))
def test_real_shapes_gpu(shape, dtype):
    B, H, N, M, C = shape
    D = C // H
    q = torch.randn(B, N, C, device="cuda", dtype=dtype)
    kv = torch.randn(B, M, 2 * C, device="cuda", dtype=dtype)
    cot = torch.randn(B, N, C, device="cuda", dtype=dtype)

    def grads(fn, a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        out = fn(a, b)
        return [out.detach()] + list(torch.autograd.grad(out, (a, b), cot.to(out.dtype)))

    def eager(a, b):
        qh = a.reshape(B, N, H, D).transpose(1, 2)
        k, v = b.reshape(B, M, 2, H, D).permute(2, 0, 3, 1, 4)
        return (torch.softmax(qh @ k.transpose(-1, -2) * D**-0.5, -1) @ v).transpose(1, 2).reshape(B, N, C)

    with vk.use_backend("triton"):
        fused = grads(lambda a, b: vk.sr_attention(a, b, H), q, kv)
    oracle = grads(eager, q.double(), kv.double())
    low = grads(eager, q, kv)
    for name, f, e, o in zip(("out", "dq", "dkv"), fused, low, oracle):
        assert_within(name, f, e, o, dtype)
