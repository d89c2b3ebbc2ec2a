"""The Hopper attention forward and backward through TMA tensor descriptors
(vitkernels/triton/attention_tma.py).

VITKERNELS_ATTN_TMA=on. Without a GPU the kernels run in the Triton interpreter, which emulates
the descriptors (zero fill past a view's rows and head dim, clipped stores) on CPU tensors in
float16. The descriptor kernels do the pointer kernels' arithmetic in the same order, so at the
same tiles their out and lse, and dq, dk, dv and dbias (the split and both single-kernel
backwards, every autotune config of the backward's tuners), must equal the pointer kernels' bit for
bit; they are also checked against the float64 math. Also checked: who is eligible (dtype,
alignment, 0 strides, prefix, extra row, the switch).
"""

import pytest
import torch

from helpers import device_marks, require_triton

_INTERPRET, DEVICE, DTYPES = require_triton()
pytestmark = device_marks(DEVICE)

from vitkernels.triton import attention as K  # noqa: E402
from vitkernels.triton import attention_tma as T  # noqa: E402

HALF = [d for d in DTYPES if d != torch.float32]


@pytest.fixture
def tma_on(monkeypatch):
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
    if not _INTERPRET and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs an sm_90+ GPU")
    launched = []
    real = T.tma_forward
    monkeypatch.setattr(T, "tma_forward", lambda *a: launched.append(1) or real(*a))
    return launched


def _forward(q, k, v, bias, scale):
    out = torch.full_like(q, float("nan"))
    lse = K.attention_forward(q, k, v, bias, scale, out)
    return out, lse


def _math(q, k, v, bias, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.double()
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double(), lse


def _bias(kind, B, H, Nq, Nk):
    if kind == "full":
        return torch.randn(B, H, Nq, Nk, device=DEVICE)
    if kind == "keypad":  # a boolean key-padding mask, the last keys excluded
        keep = torch.ones(B, 1, 1, Nk, dtype=torch.bool, device=DEVICE)
        keep[..., Nk - max(1, Nk // 4) :] = False
        return keep.expand(B, H, Nq, Nk)
    if kind == "deadrow":  # query row 0 sees no key: out 0, lse +inf
        b = torch.randn(B, H, Nq, Nk, device=DEVICE)
        b[:, :, 0] = float("-inf")
        return b
    return None


SHAPES = [  # (B, H, Nq, Nk, D): ragged rows and keys, D below its block, exact multiples
    (2, 3, 70, 45, 48),
    (1, 2, 64, 64, 64),
    (2, 1, 33, 97, 16),
    (1, 1, 1, 5, 32),
    (1, 2, 40, 40, 128),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("bias_kind", [None, "full", "keypad", "deadrow"], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_pointer_kernel_and_math(shape, bias_kind, dtype, tma_on, monkeypatch):
    B, H, Nq, Nk, D = shape
    q, k, v = (torch.randn(B, H, n, D, device=DEVICE).to(dtype) for n in (Nq, Nk, Nk))
    bias = _bias(bias_kind, B, H, Nq, Nk)
    scale = D**-0.5
    out, lse = _forward(q, k, v, bias, scale)
    assert tma_on == [1], "the TMA kernel did not run"
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "off")
    ref_out, ref_lse = _forward(q, k, v, bias, scale)
    assert tma_on == [1]
    if _INTERPRET:  # one arithmetic, the same tiles: bitwise
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    want, want_lse = _math(q, k, v, bias, scale)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert (out.double() - want).abs().max().item() <= tol
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], want_lse[finite], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_packed_and_grouped_views(dtype, tma_on, monkeypatch):
    """q, k, v as strided slices of one packed (B, N, 3, H, D) projection, and 5-D (B, G, H, N, D)
    views (the space axis of factorised video attention), read in place through descriptors."""
    B, N, H, D = 2, 50, 3, 32
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D), token stride 3·H·D
    grouped = torch.randn(2, 3, 2, 24, 64, device=DEVICE).to(dtype)  # (B, G, H, N, D)
    for args in ((q, k, v), (grouped, grouped.flip(3), grouped * 0.5)):
        out, lse = _forward(*args, None, 0.2)
        monkeypatch.setenv("VITKERNELS_ATTN_TMA", "off")
        ref_out, ref_lse = _forward(*args, None, 0.2)
        monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
        torch.testing.assert_close(out, ref_out, atol=0 if _INTERPRET else 2e-3, rtol=0 if _INTERPRET else 2e-3)
        torch.testing.assert_close(lse, ref_lse, atol=0 if _INTERPRET else 1e-4, rtol=0)
    assert tma_on == [1, 1]


def test_eligibility(monkeypatch):
    q = torch.randn(1, 2, 16, 32, device=DEVICE).half()
    assert not T.eligible(q, q, q, q, None, None, None), "off unless VITKERNELS_ATTN_TMA=on"
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
    if not _INTERPRET and torch.cuda.get_device_capability()[0] < 9:
        assert not T.eligible(q, q, q, q, None, None, None)
        return
    assert T.eligible(q, q, q, q, None, None, None)
    odd = torch.randn(1, 2, 16, 9, device=DEVICE).half()  # a 18-byte row stride
    assert not T.eligible(odd, odd, odd, odd, None, None, None)
    shifted = torch.randn(1, 2, 16, 33, device=DEVICE).half()[..., 1:]  # base 2 bytes past alignment
    assert not T.eligible(shifted, q, q, q, None, None, None)
    assert not T.eligible(q.float(), q.float(), q.float(), q.float(), None, None, None)
    assert not T.eligible(q, q, q, q, None, (q[:, :, 0], q[:, :, 0]), None), "prefix key"
    assert not T.eligible(q, q, q, q, None, None, (q[:, :, 0], q[:, :, 0], None)), "extra query row"
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "yes")
    with pytest.raises(ValueError, match="VITKERNELS_ATTN_TMA"):
        T.eligible(q, q, q, q, None, None, None)


@pytest.mark.skipif(_INTERPRET, reason="real model shapes: GPU only (the interpreter takes minutes)")
@pytest.mark.parametrize("bias_kind", [None, "keypad"], ids=str)
def test_real_shapes_tma(bias_kind, tma_on, monkeypatch):
    """ViT-B/16 at 384 px (577 tokens, 12 heads, D = 64) in bf16 through the tuned TMA forward: the same
    out and lse as the pointer kernel within bf16 rounding, and the float64 math."""
    B, H, N, D = 2, 12, 577, 64
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE).bfloat16() for _ in range(3))
    bias = _bias(bias_kind, B, H, N, N)
    out, lse = _forward(q, k, v, bias, D**-0.5)
    assert tma_on == [1]
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "off")
    ref_out, ref_lse = _forward(q, k, v, bias, D**-0.5)
    torch.testing.assert_close(out, ref_out, atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)
    want, _ = _math(q, k, v, bias, D**-0.5)
    assert (out.double() - want).abs().max().item() <= 1.6e-2


# ---------------------------------------------------------------------------------------------
# The backward: the dK/dV and dQ kernels (and the single kernel) through TMA descriptors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tma_bwd(monkeypatch):
    """VITKERNELS_ATTN_TMA=on; records the TMA backward launches ("dkdv" / "dq") and lets a test
    switch the backward kernel (VITKERNELS_ATTN_BWD_KERNEL)."""
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
    monkeypatch.setenv("VITKERNELS_ATTN_PACKED", "off")  # short sequences too take the general kernels
    if not _INTERPRET and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs an sm_90+ GPU")
    launched = []
    for name in ("dkdv", "dq"):
        real = getattr(T, f"tma_{name}")
        monkeypatch.setattr(T, f"tma_{name}", lambda *a, real=real, name=name: launched.append(name) or real(*a))
    return launched


def _backward(q, k, v, bias, out, lse, dout, scale, only_dq=False, packed=False):
    """(dq, dk, dv, dbias) of ``attention_backward`` into NaN-poisoned buffers (dbias for a float
    bias); ``packed``: dq, dk, dv are slices of one (B, N, 3, H, D) buffer, as q, k, v of a packed qkv."""
    if packed:
        B, H, N, D = q.shape
        dq, dk, dv = torch.full((B, N, 3, H, D), float("nan"), device=q.device, dtype=q.dtype).permute(2, 0, 3, 1, 4)
    else:
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    if only_dq:
        dk = dv = None
    grad_bias = bias is not None and bias.dtype != torch.bool
    dbias = K.attention_backward(dout, q, k, v, bias, out, lse, scale, dq, dk, dv, grad_bias)
    return dq, dk, dv, dbias


def _tma_and_pointer_backward(monkeypatch, q, k, v, bias, dout, scale, **opts):
    """The backward with VITKERNELS_ATTN_TMA on, then off (the pointer kernels), from one forward."""
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "off")
    out, lse = _forward(q, k, v, bias, scale)
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
    got = _backward(q, k, v, bias, out, lse, dout, scale, **opts)
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "off")
    want = _backward(q, k, v, bias, out, lse, dout, scale, **opts)
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
    return got, want


def _assert_same(got, want, atol, rtol):
    """Bitwise in the interpreter (atol = rtol = 0), else within atol, rtol; None stays None."""
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=False, msg=lambda m, n=name: f"{n}: {m}")


def _grads_math(q, k, v, bias, dout, scale):
    """(dq, dk, dv, dbias) of the float64 math; dbias summed to the bias's own (expanded) shape."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    b = None
    if bias is not None and bias.dtype != torch.bool:
        b = bias.double().requires_grad_()
    s = (leaves[0] @ leaves[1].transpose(-1, -2)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + b
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    (p @ leaves[2]).backward(dout.double())
    return [t.grad for t in leaves] + [b.grad if b is not None else None]


# (shape, bias, backward kernel): ragged rows and keys against the 32-row interpreter tiles, exact
# multiples, D below its block (48 → 64, 80 → 128) and at it, a fully masked row, float biases
# (dbias stored, and summed over a broadcast batch with atomics) and boolean masks, each backward
# kernel (split: dK/dV + dQ kernels; fused: dQ by fp32 atomics; fused-deterministic: per-key-block
# partials).
BWD_CASES = [
    ((1, 2, 70, 45, 48), "full", "split"),
    ((1, 2, 70, 45, 48), "keypad", "fused"),
    ((1, 2, 64, 64, 64), None, "split"),
    ((1, 1, 64, 64, 64), "deadrow", "fused-deterministic"),
    ((1, 1, 33, 97, 16), "deadrow", "split"),
    ((2, 1, 33, 50, 16), "heads", "fused"),
    ((2, 1, 40, 40, 80), "heads", "split"),
    ((1, 1, 40, 40, 128), "keypad", "split"),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "shape,bias_kind,kernel", BWD_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c)
)
def test_backward_matches_pointer_kernels_and_math(shape, bias_kind, kernel, dtype, tma_bwd, monkeypatch):
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
    B, H, Nq, Nk, D = shape
    q, k, v = (torch.randn(B, H, n, D, device=DEVICE).to(dtype) for n in (Nq, Nk, Nk))
    dout = torch.randn(B, H, Nq, D, device=DEVICE).to(dtype)
    if bias_kind == "heads":  # a (H, Nq, Nk) bias shared by the batch: dbias summed over it
        bias = torch.randn(H, Nq, Nk, device=DEVICE).expand(B, H, Nq, Nk)
    else:
        bias = _bias(bias_kind, B, H, Nq, Nk)
    scale = D**-0.5
    got, want = _tma_and_pointer_backward(monkeypatch, q, k, v, bias, dout, scale)
    assert tma_bwd == (["dkdv", "dq"] if kernel == "split" else ["dkdv"]), "the TMA backward did not run"
    exact = 0 if _INTERPRET else 1e-2  # on a GPU: the same tiles, atomics in any order
    _assert_same(got, want, exact, exact)  # in the interpreter: one arithmetic, the same tiles
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    for name, g, m in zip(("dq", "dk", "dv", "dbias"), got, _grads_math(q, k, v, bias, dout, scale)):
        if m is not None:
            if name == "dbias" and g.shape != m.shape:
                m = m.sum(0, keepdim=True)  # the batch-broadcast bias
            assert (g.double() - m).abs().max().item() <= tol * max(1.0, m.abs().max().item()), name


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_backward_packed_and_grouped_views(dtype, tma_bwd, monkeypatch):
    """q, k, v as slices of one packed (B, N, 3, H, D) projection (dO likewise, and the grads written
    into packed slices), 5-D (B, G, H, N, D) views, and a dQ-only backward (dk = dv = None)."""
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", "split")
    B, N, H, D = 1, 40, 2, 32
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D), token stride 3·H·D
    dout = torch.randn(B, N, H, D, device=DEVICE).to(dtype).transpose(1, 2)  # token stride H·D
    got, want = _tma_and_pointer_backward(monkeypatch, q, k, v, None, dout, 0.2, packed=True)
    exact = 0 if _INTERPRET else 1e-2  # on a GPU: the same tiles, atomics in any order
    _assert_same(got, want, exact, exact)
    assert tma_bwd == ["dkdv", "dq"]

    grouped = torch.randn(1, 2, 2, 24, 64, device=DEVICE).to(dtype)  # (B, G, H, N, D)
    gq, gk, gv = grouped, grouped.flip(3), grouped * 0.5
    got, want = _tma_and_pointer_backward(monkeypatch, gq, gk, gv, None, torch.randn_like(gq), 0.2)
    _assert_same(got, want, exact, exact)
    got, want = _tma_and_pointer_backward(monkeypatch, gq, gk, gv, None, torch.randn_like(gq), 0.2, only_dq=True)
    _assert_same(got, want, exact, exact)
    assert tma_bwd == ["dkdv", "dq", "dkdv", "dq", "dq"]


def test_backward_eligibility(monkeypatch):
    q = torch.randn(1, 2, 16, 32, device=DEVICE).half()
    args = (q, q, q, q, q, q, q, None, None)
    assert not T.eligible_backward(*args), "off unless VITKERNELS_ATTN_TMA=on"
    monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
    if not _INTERPRET and torch.cuda.get_device_capability()[0] < 9:
        assert not T.eligible_backward(*args)
        return
    assert T.eligible_backward(*args)
    assert T.eligible_backward(q, q, q, q, q, None, None, None, None), "dQ only"
    shifted = torch.randn(1, 2, 16, 33, device=DEVICE).half()[..., 1:]  # base 2 bytes past alignment
    for i in range(7):  # q, k, v, dO, dq, dk, dv each
        assert not T.eligible_backward(*args[:i], shifted, *args[i + 1 :]), i
    summed = torch.ones(1, 1, 1, 32, device=DEVICE).half().expand(1, 2, 16, 32)  # dO of a sum: 0 strides
    assert not T.eligible_backward(q, q, q, summed, q, q, q, None, None)
    f = q.float()
    assert not T.eligible_backward(f, f, f, f, f, f, f, None, None)
    assert not T.eligible_backward(*args[:7], (q[:, :, 0], q[:, :, 0]), None), "prefix key"
    assert not T.eligible_backward(*args[:7], None, (q[:, :, 0], q[:, :, 0], None, None)), "extra query row"


@pytest.mark.skipif(not _INTERPRET, reason="the GPU runs every config in tests/triton/test_triton_configs.py")
@pytest.mark.parametrize("kernel", ["split", "fused", "fused-deterministic"])
def test_backward_every_autotune_config(kernel, monkeypatch):
    """Each config of the TMA backward's tuners (the pointer kernels' tiles, boxes set by the
    pre-hook) through the ConfigForcer: bitwise the pointer kernels' result at the same config. A full
    float bias (dbias stored); shapes that keep every tile (BLOCK_M up to 128 in the dQ kernel,
    BLOCK_N up to 128 in the dK/dV kernels)."""
    from helpers import ConfigForcer

    forcer = ConfigForcer(distinct=True)
    forcer.install(monkeypatch.setattr)
    for mod in (K, T):  # the autotuned GPU path, in the interpreter
        monkeypatch.setattr(mod, "use_fixed", lambda t, interpreted, what: False)
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
    Nq, Nk, D = (70 if kernel == "split" else 40), 70, 32
    q, k, v = (torch.randn(1, 1, n, D).half() for n in (Nq, Nk, Nk))
    bias, dout = torch.randn(1, 1, Nq, Nk), torch.randn(1, 1, Nq, D).half()
    out, lse = _math(q, k, v, bias, 0.3)
    out, lse = out.half(), lse.float()
    tuners = {id(T._dkdv_tuned), id(T._dq_tuned)} if kernel == "split" else {id(T._fused_tuned)}
    index, total = 0, 1
    while index < total:
        forcer.index, forcer.counts = index, {}
        monkeypatch.setenv("VITKERNELS_ATTN_TMA", "on")
        got = _backward(q, k, v, bias, out, lse, dout, 0.3)
        assert tuners <= set(forcer.counts), "the TMA tuners did not run"
        monkeypatch.setenv("VITKERNELS_ATTN_TMA", "off")
        want = _backward(q, k, v, bias, out, lse, dout, 0.3)
        _assert_same(got, want, 0, 0)
        total = max(forcer.counts.values())
        index += 1
    assert total >= 4, f"only {total} configs ran"


@pytest.mark.skipif(_INTERPRET, reason="real model shapes: GPU only (the interpreter takes minutes)")
@pytest.mark.parametrize(
    "N,kernel,bias_kind",
    [(577, "auto", None), (577, "split", "keypad"), (197, "auto", None)],
    ids=str,
)
def test_real_shapes_tma_backward(N, kernel, bias_kind, tma_bwd, monkeypatch):
    """ViT-B/16 at 384 px (577 tokens: "auto" takes the single kernel) and 224 px (197: the split
    kernels), 12 heads, D = 64, bf16, through the tuned TMA backward: the pointer kernels' dq, dk, dv
    within bf16 rounding (the single kernel's fp32 dQ atomics add in any order)."""
    monkeypatch.setenv("VITKERNELS_ATTN_BWD_KERNEL", kernel)
    B, H, D = 2, 12, 64
    q, k, v, dout = (torch.randn(B, H, N, D, device=DEVICE).bfloat16() for _ in range(4))
    bias = _bias(bias_kind, B, H, N, N)
    got, want = _tma_and_pointer_backward(monkeypatch, q, k, v, bias, dout, D**-0.5)
    assert tma_bwd == (["dkdv"] if kernel == "auto" and N >= K.FUSED_MIN_LEN else ["dkdv", "dq"])
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert (g.double() - w.double()).abs().max().item() <= 2e-2 * max(1.0, w.abs().max().item()), name
