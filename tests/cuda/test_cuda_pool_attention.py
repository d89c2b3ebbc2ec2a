"""Tests of the CUDA C++ MViTv2 pooling-attention forward, `torch.ops.vitkernels_C.pool_attention_fwd`:
on a GPU the compiled extension, without one the same csrc/ under the vkemu CPU emulator (the `ops`
fixture, tests/conftest.py).

The oracle is written here from timm's MultiScaleAttention (materialised scores, `cal_rel_pos_type`'s
float32 index arithmetic, q unscaled in the rel terms) in float64; the eager composition is the
same code in the input dtype. Pass rule (tests/helpers.py): error vs the oracle <= 2 x the eager
error + a small floor; lse (natural log, float32) within 1e-3.
"""

import math
from fractions import Fraction

import pytest
import torch

from helpers import assert_within

# On a GPU every test here is a GPU test, so `pytest -m gpu` (bench/gpu_suite.sh) runs them all there.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def rel_index(q_size, k_size):
    """timm's cal_rel_pos_type index along one axis: long aranges times Python-float ratios
    (float32 tensors), then .long()."""
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = torch.arange(q_size).unsqueeze(-1) * q_ratio - torch.arange(k_size).unsqueeze(0) * k_ratio
    dist += (k_size - 1) * k_ratio
    return dist.long()


def composition(q, k, v, q_hw, k_hw, rel_h, rel_w, cls, residual, scale):
    """timm's MultiScaleAttention core in the inputs' dtype: (out (B, Nq, H*D), lse (B, H, Nq))."""
    B, H, Nq, D = q.shape
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_h is not None:
        sp = 1 if cls else 0
        (q_h, q_w), (k_h, k_w) = q_hw, k_hw
        rh = rel_h[rel_index(q_h, k_h)]  # (q_h, k_h, D)
        rw = rel_w[rel_index(q_w, k_w)]  # (q_w, k_w, D)
        r_q = q[:, :, sp:].reshape(B, H, q_h, q_w, D)
        rel_hh = torch.einsum("byhwc,hkc->byhwk", r_q, rh)
        rel_ww = torch.einsum("byhwc,wkc->byhwk", r_q, rw)
        spatial = attn[:, :, sp:, sp:].reshape(B, H, q_h, q_w, k_h, k_w)
        spatial = spatial + rel_hh.unsqueeze(-1) + rel_ww.unsqueeze(-2)
        attn = attn.clone()
        attn[:, :, sp:, sp:] = spatial.reshape(B, H, q_h * q_w, k_h * k_w)
    lse = torch.logsumexp(attn.double() if attn.dtype == torch.float64 else attn.float(), dim=-1)
    x = attn.softmax(dim=-1) @ v
    if residual:
        x = x + q
    return x.transpose(1, 2).reshape(B, Nq, H * D), lse


def oracle(q, k, v, q_hw, k_hw, rel_h, rel_w, cls, residual, scale):
    d64 = [None if t is None else t.detach().double().cpu() for t in (q, k, v, rel_h, rel_w)]
    return composition(*d64[:3], q_hw, k_hw, d64[3], d64[4], cls, residual, scale)


def make(dev, dtype, B, H, D, q_hw, k_hw, cls, tables, L_extra=0):
    n_q = q_hw[0] * q_hw[1] + cls
    n_k = k_hw[0] * k_hw[1] + cls
    q = torch.randn(B, H, n_q, D, device=dev, dtype=dtype)
    k = torch.randn(B, H, n_k, D, device=dev, dtype=dtype)
    v = torch.randn(B, H, n_k, D, device=dev, dtype=dtype)
    rel_h = rel_w = None
    if tables:  # timm's table sizes; magnitudes that make the rel terms matter next to q.k
        L_h = 2 * max(q_hw[0], k_hw[0]) - 1 + L_extra
        L_w = 2 * max(q_hw[1], k_hw[1]) - 1 + L_extra
        rel_h = (torch.randn(L_h, D, device=dev) * D**-0.5).to(dtype)
        rel_w = (torch.randn(L_w, D, device=dev) * D**-0.5).to(dtype)
    return q, k, v, rel_h, rel_w


def check(ops, q, k, v, q_hw, k_hw, rel_h, rel_w, cls, residual, scale, name):
    dtype = q.dtype
    out, lse = ops.pool_attention_fwd(q, k, v, list(q_hw), list(k_hw), rel_h, rel_w, cls, residual, scale)
    ops.sync()
    B, H, Nq, D = q.shape
    assert out.shape == (B, Nq, H * D) and out.dtype == dtype and out.is_contiguous() and out.device == q.device
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32 and lse.is_contiguous()
    want, want_lse = oracle(q, k, v, q_hw, k_hw, rel_h, rel_w, cls, residual, scale)
    eager, _ = composition(q, k, v, q_hw, k_hw, rel_h, rel_w, cls, residual, scale)
    assert_within(name, out, eager, want, dtype)
    lse_err = (lse.double().cpu() - want_lse).abs().max().item()
    assert lse_err <= 1e-3 * max(1.0, want_lse.abs().max().item()), f"{name}: lse error {lse_err:.3e}"
    return out, lse


# (q_hw, k_hw, D): q pooled more than k and the reverse, non-square maps with fractional ratios, a
# single token, and 8 -> 6 rows, where timm's float32 index differs from exact arithmetic.
SHAPES = [
    ((4, 4), (2, 2), 32),
    ((2, 2), (4, 4), 64),
    ((3, 5), (2, 3), 96),
    ((1, 1), (1, 1), 32),
    ((8, 3), (6, 2), 40),
]
# (has_cls_token, residual, tables)
VARIANTS = [(True, True, True), (False, False, True), (True, False, False), (False, True, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}x{}-{}x{}-D{}".format(*s[0], *s[1], s[2]))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "cls{:d}-res{:d}-rel{:d}".format(*v))
def test_pool_attention_fwd_matches_oracle(ops, dtype, shape, variant):
    q_hw, k_hw, D = shape
    cls, residual, tables = variant
    q, k, v, rel_h, rel_w = make(ops.device, dtype, 2, 2, D, q_hw, k_hw, cls, tables)
    check(ops, q, k, v, q_hw, k_hw, rel_h, rel_w, cls, residual, D**-0.5, f"{shape} {variant} {dtype}")


@pytest.mark.parametrize("cls", [True, False])
def test_oracle_is_timms_code(cls):
    """The oracle's scores are timm's: attn = (q * scale) @ k^T, then timm's own cal_rel_pos_type."""
    mvitv2 = pytest.importorskip("timm.models.mvitv2")
    q_hw, k_hw, D, scale = (8, 3), (6, 2), 16, 0.3
    q, k, v, rel_h, rel_w = make("cpu", torch.float64, 2, 2, D, q_hw, k_hw, cls, True)
    attn = mvitv2.cal_rel_pos_type((q * scale) @ k.transpose(-2, -1), q, cls, q_hw, k_hw, rel_h, rel_w)
    x = attn.softmax(dim=-1) @ v + q
    out, lse = oracle(q, k, v, q_hw, k_hw, rel_h, rel_w, cls, True, scale)
    torch.testing.assert_close(out, x.transpose(1, 2).reshape(out.shape), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, attn.logsumexp(-1), atol=1e-12, rtol=1e-12)


def test_float32_index_arithmetic_matters_for_8_to_6():
    """The 8 -> 6 case above is one where timm's float32 index differs from exact arithmetic, so
    the kernel must reproduce the float32 steps to pass it."""
    exact = torch.tensor([[math.floor(i + (5 - j) * Fraction(8, 6)) for j in range(6)] for i in range(8)])
    assert not torch.equal(rel_index(8, 6), exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "q_hw, k_hw, D",
    [((9, 10), (9, 9), 64), ((5, 20), (3, 10), 48)],
    ids=["91q-82k-two-tiles-two-key-blocks", "wide-rows-k_w10"],
)
def test_several_tiles_and_key_blocks(ops, dtype, q_hw, k_hw, D):
    """Nq and Nk past one query tile / key block and not multiples of them; rows wider than a
    warp's 16 (a warp spans two qh) and k_w > 8 (two kw column tiles)."""
    q, k, v, rel_h, rel_w = make(ops.device, dtype, 1, 2, D, q_hw, k_hw, True, True)
    check(ops, q, k, v, q_hw, k_hw, rel_h, rel_w, True, True, D**-0.5, f"{q_hw}->{k_hw} D{D} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(ops, dtype):
    """q from a token-layout (B, N, H, D) buffer, k and v from a packed (B, N, 2, H, D) one: read in
    place at their strides; a misaligned q and a transposed (non-unit last stride) v are copied."""
    B, H, D, q_hw, k_hw = 2, 3, 32, (3, 4), (2, 2)
    n_q, n_k = 13, 5
    dev = ops.device
    q = torch.randn(B, n_q, H, D, device=dev, dtype=dtype).transpose(1, 2)
    kv = torch.randn(B, n_k, 2, H, D, device=dev, dtype=dtype).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    assert not q.is_contiguous() and not k.is_contiguous()
    rel_h = (torch.randn(5, D, device=dev) * 0.2).to(dtype)
    rel_w = (torch.randn(7, D, device=dev) * 0.2).to(dtype)
    out, lse = check(ops, q, k, v, q_hw, k_hw, rel_h, rel_w, True, True, 0.2, f"strided {dtype}")
    args = (list(q_hw), list(k_hw), rel_h, rel_w, True, True, 0.2)
    ref, ref_lse = ops.pool_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), *args)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)

    flat = torch.randn(q.numel() + 1, device=dev, dtype=dtype)
    q_odd = flat[1:].view(q.shape)  # storage offset 1: not 16-byte aligned
    v_t = torch.randn(B, H, D, n_k, device=dev, dtype=dtype).transpose(-1, -2)  # last-dim stride n_k
    got, _ = ops.pool_attention_fwd(q_odd, k, v_t, *args)
    want, _ = ops.pool_attention_fwd(q_odd.contiguous(), k.contiguous(), v_t.contiguous(), *args)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_float32_tables_with_half_inputs_are_rounded(ops):
    """A float32 table (kept so under autocast) is rounded to q's dtype, as timm's einsum would."""
    q, k, v, rel_h, rel_w = make(ops.device, torch.float16, 1, 2, 32, (4, 4), (2, 2), True, True)
    args = ([4, 4], [2, 2])
    out, _ = ops.pool_attention_fwd(q, k, v, *args, rel_h.float(), rel_w.float(), True, True, 0.2)
    ref, _ = ops.pool_attention_fwd(q, k, v, *args, rel_h, rel_w, True, True, 0.2)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_longer_tables_than_timm(ops):
    """Rows past the largest index are never read (L > 2 max(q, k) - 1 is allowed)."""
    q, k, v, rel_h, rel_w = make(ops.device, torch.bfloat16, 1, 1, 64, (3, 5), (2, 3), False, True, L_extra=7)
    check(ops, q, k, v, (3, 5), (2, 3), rel_h, rel_w, False, True, 0.125, "long tables")


def test_supports_query(ops):
    """pool_attention_supports(head_dim, dtype=None, device=None): None = every kernel dtype."""
    for d in (8, 32, 40, 64, 96, 128):
        assert ops.pool_attention_supports(d)
        for dt in DTYPES:
            assert ops.pool_attention_supports(d, dt, torch.device(ops.device))
    for d in (0, 4, 36, 100, 136, -8, 2**40):
        assert not ops.pool_attention_supports(d)
    assert not ops.pool_attention_supports(64, torch.float64) and not ops.pool_attention_supports(64, torch.int8)


def test_bad_inputs_messages(ops):
    dev, h = ops.device, torch.float16
    q, k, v, rel_h, rel_w = make(ops.device, h, 1, 2, 32, (4, 4), (2, 2), True, True)
    f = ops.pool_attention_fwd
    good = ([4, 4], [2, 2], rel_h, rel_w, True, True, 0.1)
    with pytest.raises(RuntimeError, match=r"q must be \(B, heads, Nq, D\)"):
        f(q[0], k, v, *good)
    with pytest.raises(RuntimeError, match=r"v must have k's shape"):
        f(q, k, v[:, :, :3], *good)
    with pytest.raises(RuntimeError, match="share one dtype"):
        f(q, k.float(), v, *good)
    with pytest.raises(RuntimeError, match="q has Nq = 17 tokens but q_hw"):
        f(q, k, v, [4, 5], *good[1:])
    with pytest.raises(RuntimeError, match="k has Nk = 5 tokens but k_hw"):
        f(q, k, v, [4, 4], [2, 3], *good[2:])
    with pytest.raises(RuntimeError, match="q_hw must have 2 elements"):
        f(q, k, v, [4, 4, 1], *good[1:])
    with pytest.raises(RuntimeError, match="both be given or both be None"):
        f(q, k, v, [4, 4], [2, 2], rel_h, None, True, True, 0.1)
    with pytest.raises(RuntimeError, match=r"rel_pos_w must be \(L, D\)"):
        f(q, k, v, [4, 4], [2, 2], rel_h, rel_w[:, :16], True, True, 0.1)
    with pytest.raises(RuntimeError, match="rel_pos_h has 5 rows but query size 4 and key size 2 index up to row 5"):
        f(q, k, v, [4, 4], [2, 2], rel_h[:5], rel_w, True, True, 0.1)
    q36 = torch.randn(1, 1, 5, 36, device=dev, dtype=h)
    with pytest.raises(RuntimeError, match="head dim D = 36"):
        f(q36, q36, q36, [2, 2], [2, 2], None, None, True, True, 0.1)


def test_key_map_beyond_the_shared_memory_limit(ops, monkeypatch):
    """With tables the staged rel terms grow with k_h + k_w: k_w = 257 is refused by name, and
    k 256 x 256 at D = 128 fits an H100's shared memory but not an A100's."""
    if not ops.emulated:
        pytest.skip("the limit is the device's own on a GPU")
    h, D = torch.float16, 128
    q = torch.randn(1, 1, 1, D, dtype=h)
    k = torch.randn(1, 1, 257, D, dtype=h)
    tab = torch.zeros(600, D, dtype=h)
    with pytest.raises(RuntimeError, match=r"k_hw = \[1, 257\] with relative-position tables is not supported"):
        ops.pool_attention_fwd(q, k, k, [1, 1], [1, 257], tab, tab, False, False, 0.1)
    k = torch.randn(1, 1, 256 * 256, D, dtype=h)
    monkeypatch.setenv("VKEMU_SMEM_OPTIN", str(163 * 1024))
    with pytest.raises(RuntimeError, match=r"bytes of shared memory \(this device allows 166912\)"):
        ops.pool_attention_fwd(q, k, k, [1, 1], [256, 256], tab, tab, False, False, 0.1)
    # without tables nothing is staged: any key map
    out, _ = ops.pool_attention_fwd(q, k[:, :, :300], k[:, :, :300], [1, 1], [1, 300], None, None, False, False, 0.1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reverse_thread_order(ops, reverse_thread_order, dtype):
    """A missing barrier or cp.async wait reads poisoned shared memory in the other thread order."""
    q_hw, k_hw, D = (9, 8), (9, 8), 48
    q, k, v, rel_h, rel_w = make(ops.device, dtype, 1, 1, D, q_hw, k_hw, True, True)
    check(ops, q, k, v, q_hw, k_hw, rel_h, rel_w, True, True, D**-0.5, f"reverse order {dtype}")
