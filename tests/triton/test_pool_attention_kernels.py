"""Kernel-level tests of vitkernels/triton/pool_attention.py (MViTv2 pooling attention, decomposed rel-pos).

The launchers ``pool_attention_fwd`` / ``pool_attention_bwd`` are called directly. Without a GPU they run in
the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU the same tests run
on CUDA, bfloat16 included. The interpreter's fixed blocks are 16 rows, so the shapes below reach several
query blocks, key blocks, dK/dV query chunks and table-gradient programs, with and without ragged tails.

Oracle: the math written here (scores materialised, timm's MultiScaleAttention order: q·scale @ kᵀ, then
the decomposed rel terms from the unscaled q, softmax, @ v, + q) in float64. Pass rule: error(kernel) ≤
2·error(the same math in the input dtype) + floor, for out, lse and every gradient (q, k, v, both tables).
The table-row index is checked against timm's own ``cal_rel_pos_type`` on many size pairs.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_within, device_marks, require_triton

_INTERPRET, DEVICE, DTYPES = require_triton()
pytestmark = device_marks(DEVICE)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vitkernels.triton import pool_attention as K  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The math, timm-style
# ---------------------------------------------------------------------------------------------


def timm_index(q_size, k_size):
    """The table row of (query position, key position) as timm's cal_rel_pos_type builds it: long aranges
    times Python-float ratios (float32 tensors), the offset added in place, then .long()."""
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = torch.arange(q_size)[:, None] * q_ratio - torch.arange(k_size)[None, :] * k_ratio
    dist += (k_size - 1) * k_ratio
    return dist.long()


def pool_math(q, k, v, q_hw, k_hw, th, tw, cls, residual, scale):
    """(out (B, Nq, H·D), lse (B, H, Nq)) in the inputs' dtype, the Nq×Nk scores materialised."""
    B, H, Nq, D = q.shape
    attn = (q * scale) @ k.transpose(-2, -1)
    if th is not None:
        (q_h, q_w), (k_h, k_w), sp = q_hw, k_hw, int(cls)
        r_q = q[:, :, sp:].reshape(B, H, q_h, q_w, D)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, th.to(q.dtype)[timm_index(q_h, k_h)])
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, tw.to(q.dtype)[timm_index(q_w, k_w)])
        rel = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, H, q_h * q_w, k_h * k_w)
        attn = attn + F.pad(rel, (sp, 0, sp, 0))  # the class row and column get 0
    lse = torch.logsumexp(attn, -1)
    out = attn.softmax(-1) @ v
    if residual:
        out = out + q
    return out.transpose(1, 2).reshape(B, Nq, H * D), lse


def math_grads(inputs, cot, dtype, args):
    """[out, lse, dq, dk, dv, (dth, dtw)] of pool_math evaluated in ``dtype`` (tables keep their dtype)."""
    leaves = [
        None if t is None else t.detach().to(dtype if i < 3 else t.dtype).requires_grad_() for i, t in enumerate(inputs)
    ]
    out, lse = pool_math(*leaves[:3], *args[:2], *leaves[3:], *args[2:])
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, used, cot.to(out.dtype))
    return [out.detach(), lse.detach(), *grads]


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def laid_out(t, layout):
    """The same values in another memory layout: "contig", "tokens" (a (B, N, H, D) buffer seen as
    (B, H, N, D): unit last stride, strided heads) or "dlast" (D not the fastest dim: the launcher copies)."""
    if layout == "tokens":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "dlast":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def table_laid_out(t, layout):
    """Tables: "contig", "rows" (a row stride larger than D) or "dlast" (transposed storage)."""
    if layout == "rows":
        return F.pad(t, (0, 5))[:, : t.shape[1]]
    if layout == "dlast":
        return t.t().contiguous().t()
    return t.contiguous()


# (q_hw, k_hw, D, has_cls_token, residual, tables, layout). Nq / Nk against the interpreter's 16-row blocks:
# 17 = two blocks with a tail, 16 = one even block.
CASES = {
    "q4x4-k2x2-cls-res": ((4, 4), (2, 2), 16, True, True, "contig", "contig"),
    "q2x2-k4x4-cls-d24": ((2, 2), (4, 4), 24, True, False, "contig", "tokens"),
    "q3x5-k2x3-d40": ((3, 5), (2, 3), 40, False, False, "rows", "tokens"),
    "q1x1-k1x1-cls-res": ((1, 1), (1, 1), 16, True, True, "contig", "contig"),
    "q3x5-k2x3-cls-res-d96": ((3, 5), (2, 3), 96, True, True, "dlast", "dlast"),
    "q4x4-k2x2-notables-res": ((4, 4), (2, 2), 16, False, True, None, "tokens"),
    "q2x3-k2x3-cls-notables": ((2, 3), (2, 3), 32, True, False, None, "contig"),
    "q4x8-k4x4-even": ((4, 8), (4, 4), 16, False, True, "contig", "contig"),
}


def run_case(case, dtype, table_dtype=None, B=2, H=2):
    q_hw, k_hw, D, cls, residual, tables, layout = CASES[case]
    Nq, Nk = q_hw[0] * q_hw[1] + cls, k_hw[0] * k_hw[1] + cls
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (Nq, Nk, Nk))
    th = tw = None
    if tables is not None:
        th = torch.randn(2 * max(q_hw[0], k_hw[0]) - 1, D, dtype=torch.float64)
        tw = torch.randn(2 * max(q_hw[1], k_hw[1]) - 1, D, dtype=torch.float64)
    cot = torch.randn(B, Nq, H * D, dtype=torch.float64)
    scale = D**-0.5
    args = (q_hw, k_hw, cls, residual, scale)
    table_dtype = table_dtype or dtype
    low = [None if t is None else t.to(table_dtype) for t in (th, tw)]
    oracle = math_grads([q, k, v, th, tw], cot, torch.float64, args)
    eager = math_grads([q, k, v, *low], cot, dtype, args)

    def dev(t, lay):
        return laid_out(t.to(device=DEVICE, dtype=dtype), lay)

    qd, kd, vd = (dev(t, layout) for t in (q, k, v))
    thd, twd = (None if t is None else table_laid_out(t.to(DEVICE), tables) for t in low)
    out, lse = K.pool_attention_fwd(qd, kd, vd, q_hw, k_hw, thd, twd, cls, residual, scale)
    assert out.shape == (B, Nq, H * D) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32
    # dO as a row slice of a longer buffer: a strided (B, Nq, H·D) view.
    dout = torch.cat([cot, cot[:, :3]], 1).to(device=DEVICE, dtype=dtype)[:, :Nq]
    grads = K.pool_attention_bwd(dout, qd, kd, vd, out, lse, q_hw, k_hw, thd, twd, cls, residual, scale)
    if th is None:
        assert grads[3] is None and grads[4] is None
        grads = grads[:3]
    else:
        for g, t in zip(grads[3:], (thd, twd)):
            assert g.shape == t.shape and g.dtype == t.dtype
    for g, t in zip(grads[:3], (qd, kd, vd)):
        assert g.shape == t.shape and g.dtype == dtype
    names = ["out", "lse", "dq", "dk", "dv", "drel_pos_h", "drel_pos_w"]
    for name, got, e, o in zip(names, [out, lse, *grads], eager, oracle):
        assert_within(f"{case} {dtype} {name}", got, e, o, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case, dtype):
    run_case(case, dtype)


def test_float32_tables_with_half_inputs():
    """Tables kept in float32 (an op may under autocast) with 16-bit q, k, v: grads in the tables' dtype."""
    run_case("q4x4-k2x2-cls-res", torch.float16, table_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The table-row index against timm
# ---------------------------------------------------------------------------------------------


@triton.jit
def _index_kernel(Out, Sizes, Ratios, MAXQ: tl.constexpr, MAXK: tl.constexpr):
    """Row p: the kernels' index of every (query, key) position pair of size pair p, as they compute it (a
    vector of query positions, a scalar key position, the launcher's float32 ratios)."""
    p = tl.program_id(0)
    nq = tl.load(Sizes + 2 * p)
    nk = tl.load(Sizes + 2 * p + 1)
    rq = tl.load(Ratios + 3 * p)
    rk = tl.load(Ratios + 3 * p + 1)
    c = tl.load(Ratios + 3 * p + 2)
    offs_q = tl.arange(0, MAXQ)
    for kk in range(nk):
        idx = K._rel_index(offs_q, kk, rq, rk, c)
        tl.store(Out + p * MAXQ * MAXK + offs_q * MAXK + kk, idx, mask=offs_q < nq)


# Every pair up to 12 (plain float64 math already differs from timm at (8, 6), (8, 7), (11, 10), ...), MViTv2's
# (q, k) sizes at 224 to 512 px, odd ratios, and pairs where a fused multiply-add would change timm's float32
# rounding ((33, 39), (55, 65), (28, 76): the kernels form products exactly, so a GPU run checks that too).
SIZE_PAIRS = sorted(
    {(a, b) for a in range(1, 13) for b in range(1, 13)}
    | {(56, 7), (28, 7), (14, 7), (7, 7), (64, 8), (32, 8), (16, 8), (8, 8), (96, 12), (48, 12), (24, 12)}
    | {
        (3, 7),
        (7, 3),
        (9, 6),
        (6, 9),
        (21, 28),
        (28, 21),
        (50, 7),
        (7, 50),
        (100, 3),
        (3, 100),
        (45, 56),
        (33, 39),
        (55, 65),
        (28, 76),
    }
)


def timm_reference_index(q_size, k_size):
    """The index extracted from timm's cal_rel_pos_type itself: a one-column table holding its row number,
    q = 1 and a zero width table make the added term exactly dist_h."""
    from timm.models.mvitv2 import cal_rel_pos_type

    L = 2 * max(q_size, k_size) + 1
    attn = torch.zeros(1, 1, q_size, k_size, dtype=torch.float64)
    q = torch.ones(1, 1, q_size, 1, dtype=torch.float64)
    rel_h = torch.arange(L, dtype=torch.float64)[:, None]
    rel_w = torch.zeros(1, 1, dtype=torch.float64)
    return cal_rel_pos_type(attn, q, False, [q_size, 1], [k_size, 1], rel_h, rel_w)[0, 0].long()


def test_rel_index_matches_timm():
    pytest.importorskip("timm")
    maxq = triton.next_power_of_2(max(a for a, _ in SIZE_PAIRS))
    maxk = max(b for _, b in SIZE_PAIRS)
    sizes = torch.tensor(SIZE_PAIRS, dtype=torch.int32, device=DEVICE)
    ratios = torch.tensor([K.rel_ratios(a, b) for a, b in SIZE_PAIRS], dtype=torch.float32, device=DEVICE)
    out = torch.full((len(SIZE_PAIRS), maxq, maxk), -1, dtype=torch.int32, device=DEVICE)
    _index_kernel[(len(SIZE_PAIRS),)](out, sizes, ratios, maxq, maxk)
    out = out.cpu()
    for p, (a, b) in enumerate(SIZE_PAIRS):
        want = timm_reference_index(a, b)
        assert torch.equal(timm_index(a, b), want), (a, b)  # the test's own copy of timm's formula
        assert torch.equal(K.rel_index(a, b), want), (a, b)  # the launcher's host copy (table-length check)
        assert torch.equal(out[p, :a, :b].long(), want), (a, b, out[p, :a, :b], want)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def test_bad_arguments():
    q, k = torch.randn(1, 2, 17, 16, device=DEVICE), torch.randn(1, 2, 5, 16, device=DEVICE)
    th, tw = torch.randn(7, 16, device=DEVICE), torch.randn(7, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        K.pool_attention_fwd(q, k, k, (4, 4), (2, 2), th, tw, False, True, 0.25)
    with pytest.raises(ValueError, match="both given or both None"):
        K.pool_attention_fwd(q, k, k, (4, 4), (2, 2), th, None, True, True, 0.25)
    with pytest.raises(ValueError, match="L >= 6"):  # rows 0..5 are used (timm allocates 2·4 − 1 = 7)
        K.pool_attention_fwd(q, k, k, (4, 4), (2, 2), th[:5], tw, True, True, 0.25)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 1, 2, 160, device=DEVICE)
        K.pool_attention_fwd(big, big, big, (1, 1), (1, 1), None, None, True, True, 0.1)


def test_empty_batch():
    q, k = torch.randn(0, 2, 5, 16, device=DEVICE), torch.randn(0, 2, 5, 16, device=DEVICE)
    th = torch.randn(3, 16, device=DEVICE)
    out, lse = K.pool_attention_fwd(q, k, k, (2, 2), (2, 2), th, th, True, True, 0.25)
    assert out.shape == (0, 5, 32) and lse.shape == (0, 2, 5)
    grads = K.pool_attention_bwd(out, q, k, k, out, lse, (2, 2), (2, 2), th, th, True, True, 0.25)
    assert [tuple(g.shape) for g in grads] == [(0, 2, 5, 16)] * 3 + [(3, 16)] * 2
    assert (grads[3] == 0).all() and (grads[4] == 0).all()
