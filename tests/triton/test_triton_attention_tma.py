"""The Hopper attention forward through TMA tensor descriptors (vitkernels/triton/attention_tma.py).

VITKERNELS_ATTN_TMA=on. Without a GPU the kernel runs in the Triton interpreter, which emulates
the descriptors (zero fill past a view's rows and head dim, clipped stores) on CPU tensors in
float16. The descriptor kernel does the pointer kernel's arithmetic in the same order, so at the
same tiles its out and lse must equal the pointer kernel's bit for bit; they are also checked
against the float64 math. Also checked: who is eligible (dtype, alignment, prefix, extra row, the
switch).
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
