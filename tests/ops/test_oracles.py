"""Self-checks of tests/oracles.py against independently known facts.

These do not import vitkernels: they prove the oracle itself (against PyTorch's own ops and
against re-typed versions of the timm / original-Swin / XCiT / TimeSformer code paths).
"""

import pytest
import torch
import torch.nn.functional as F

import oracles

DT = torch.float64
TOL = dict(atol=1e-11, rtol=1e-10)


def rnd(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=DT) * scale


@pytest.fixture
def g():
    return torch.Generator().manual_seed(1234)


# ------------------------------------------------------------------------------------------
# attention / self_attention / sr_attention
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_shape", [None, (3, 5, 7), (2, 1, 1, 7), (1, 1, 5, 7), (2, 3, 5, 7)])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_attention_equals_sdpa(g, bias_shape, scale):
    q, k, v = rnd(2, 3, 5, 4, gen=g), rnd(2, 3, 7, 4, gen=g), rnd(2, 3, 7, 4, gen=g)
    bias = None if bias_shape is None else rnd(*bias_shape, gen=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    torch.testing.assert_close(oracles.attention(q, k, v, bias, scale), ref, **TOL)


@pytest.mark.parametrize("mask_shape", [(3, 5, 7), (2, 1, 1, 7), (5, 1), (2, 3, 5, 7)])
def test_attention_bool_mask_equals_sdpa(g, mask_shape):
    q, k, v = rnd(2, 3, 5, 4, gen=g), rnd(2, 3, 7, 4, gen=g), rnd(2, 3, 7, 4, gen=g)
    mask = torch.rand(mask_shape, generator=g) > 0.4
    mask[..., 0] = True  # SDPA gives NaN on rows with no key; the oracle gives 0 (tested above)
    ins = [t.requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ins, attn_mask=mask)
    out = oracles.attention(*ins, mask)
    torch.testing.assert_close(out, ref, **TOL)
    go = rnd(2, 3, 5, 4, gen=g)
    for x, y in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins, go)):
        torch.testing.assert_close(x, y, **TOL)


def test_attention_grads_equal_sdpa(g):
    q, k, v = rnd(2, 3, 5, 4, gen=g), rnd(2, 3, 7, 4, gen=g), rnd(2, 3, 7, 4, gen=g)
    bias = rnd(1, 3, 1, 7, gen=g)
    ins = [t.requires_grad_() for t in (q, k, v, bias)]
    go = rnd(2, 3, 5, 4, gen=g)
    a = torch.autograd.grad(oracles.attention(*ins), ins, go)
    b = torch.autograd.grad(F.scaled_dot_product_attention(*ins[:3], attn_mask=ins[3]), ins, go)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)


def test_attention_fully_masked_row(g):
    q, k, v = rnd(1, 2, 4, 3, gen=g), rnd(1, 2, 6, 3, gen=g), rnd(1, 2, 6, 3, gen=g)
    bias = rnd(1, 2, 4, 6, gen=g)
    bias[0, 1, 2, :] = float("-inf")
    bias[0, 0, 1, ::2] = float("-inf")  # partly masked row
    ins = [t.requires_grad_() for t in (q, k, v, bias)]
    out = oracles.attention(*ins)
    assert torch.all(out[0, 1, 2] == 0)
    # the other rows equal a computation without the dead row
    keep = torch.ones(4, dtype=torch.bool)
    keep[2] = False
    ref = F.scaled_dot_product_attention(q[:, 1:2, keep], k[:, 1:2], v[:, 1:2], attn_mask=bias[:, 1:2, keep])
    torch.testing.assert_close(out[:, 1:2, keep], ref, **TOL)
    grads = torch.autograd.grad(out, ins, torch.randn_like(out))
    for gr in grads:
        assert torch.isfinite(gr).all()
    assert torch.all(grads[0][0, 1, 2] == 0)  # dead query gets no gradient


def test_self_attention_timm(g):
    B, N, Hh, D = 2, 9, 3, 5
    qkv = rnd(B, N, 3 * Hh * D, gen=g)
    # timm Attention.forward
    q, k, v = qkv.reshape(B, N, 3, Hh, D).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * D**-0.5) @ k.transpose(-2, -1)
    ref = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, Hh * D)
    torch.testing.assert_close(oracles.self_attention(qkv, Hh), ref, **TOL)
    # N = 1 -> output is v
    q1 = rnd(2, 1, 3 * Hh * D, gen=g)
    torch.testing.assert_close(oracles.self_attention(q1, Hh), q1[..., 2 * Hh * D :], **TOL)


def test_sr_attention_pvt(g):
    B, N, M, Hh, D = 2, 23, 4, 2, 3
    C = Hh * D
    q, kv = rnd(B, N, C, gen=g), rnd(B, M, 2 * C, gen=g)
    # timm PVTv2 Attention.forward
    qh = q.reshape(B, N, Hh, D).permute(0, 2, 1, 3)
    k, v = kv.reshape(B, -1, 2, Hh, D).permute(2, 0, 3, 1, 4).unbind(0)
    ref = F.scaled_dot_product_attention(qh, k, v).transpose(1, 2).reshape(B, N, C)
    torch.testing.assert_close(oracles.sr_attention(q, kv, Hh), ref, **TOL)
    torch.testing.assert_close(
        oracles.sr_attention(q, kv, Hh, scale=0.2),
        F.scaled_dot_product_attention(qh, k, v, scale=0.2).transpose(1, 2).reshape(B, N, C),
        **TOL,
    )


# ------------------------------------------------------------------------------------------
# window_attention
# ------------------------------------------------------------------------------------------
def swin_reference(qkv, hw, num_heads, M, s, table, qkv_bias, scale=None):
    """Re-typed original-Swin / HF code path (pad, then torch.roll shift, view/permute partition,
    meshgrid relative_position_index, img_mask slices + masked_fill(-100))."""
    B, L, C3 = qkv.shape
    H, W = hw
    C = C3 // 3
    D = C // num_heads
    scale = D**-0.5 if scale is None else scale
    x = qkv.view(B, H, W, C3)
    pad_r, pad_b = (M - W % M) % M, (M - H % M) % M
    # the padded token is the qkv linear of zeros = qkv_bias
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if qkv_bias is not None:
        valid = torch.zeros(1, H + pad_b, W + pad_r, 1, dtype=x.dtype)
        valid[:, :H, :W] = 1
        x = x + (1 - valid) * qkv_bias
    Hp, Wp = H + pad_b, W + pad_r
    if s > 0:
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        img_mask = torch.zeros(1, Hp, Wp, 1)
        cnt = 0
        for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
                img_mask[:, hs, ws, :] = cnt
                cnt += 1
        mw = img_mask.view(1, Hp // M, M, Wp // M, M, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, M * M)
        attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0).to(DT)
    else:
        attn_mask = None
    xw = x.view(B, Hp // M, M, Wp // M, M, C3).permute(0, 1, 3, 2, 4, 5).reshape(-1, M * M, C3)
    Bw, N, _ = xw.shape
    q, k, v = xw.reshape(Bw, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    if table is not None:
        coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij"))
        cf = torch.flatten(coords, 1)
        rel = (cf[:, :, None] - cf[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += M - 1
        rel[:, :, 1] += M - 1
        rel[:, :, 0] *= 2 * M - 1
        rpi = rel.sum(-1)
        attn = attn + table[rpi.view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    if attn_mask is not None:
        nW = attn_mask.shape[0]
        attn = attn.view(Bw // nW, nW, num_heads, N, N) + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
    o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C)
    o = o.view(B, Hp // M, Wp // M, M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if s > 0:
        o = torch.roll(o, shifts=(s, s), dims=(1, 2))
    return o[:, :H, :W, :].reshape(B, H * W, C)


WIN_CASES = [
    # (B, H, W, heads, D, M, s)
    (2, 7, 9, 2, 3, 3, 0),
    (2, 7, 9, 2, 3, 3, 1),
    (1, 7, 9, 3, 2, 4, 2),
    (1, 7, 9, 3, 2, 4, 1),
    (1, 7, 9, 3, 2, 4, 3),
    (2, 5, 5, 2, 2, 2, 1),
    (1, 8, 8, 2, 2, 4, 2),
    (1, 4, 4, 2, 2, 4, 2),  # Hp == M: first region empty
    (1, 3, 5, 2, 2, 1, 0),
    (1, 6, 5, 2, 2, 7, 3),  # window bigger than map
]


@pytest.mark.parametrize("case", WIN_CASES)
@pytest.mark.parametrize("with_table", [False, True])
@pytest.mark.parametrize("with_qkv_bias", [False, True])
def test_window_attention_vs_swin_code(g, case, with_table, with_qkv_bias):
    B, H, W, Hh, D, M, s = case
    C = Hh * D
    qkv = rnd(B, H * W, 3 * C, gen=g)
    table = rnd((2 * M - 1) ** 2, Hh, gen=g) if with_table else None
    qb = rnd(3 * C, gen=g) if with_qkv_bias else None
    ins = [t.requires_grad_() for t in (qkv, table, qb) if t is not None]
    out = oracles.window_attention(qkv, (H, W), Hh, M, s, table, qb)
    ref = swin_reference(qkv, (H, W), Hh, M, s, table, qb)
    torch.testing.assert_close(out, ref, **TOL)
    go = torch.randn_like(out)
    ga = torch.autograd.grad(out, ins, go, allow_unused=True, materialize_grads=True)
    gb = torch.autograd.grad(ref, ins, go, allow_unused=True, materialize_grads=True)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL)


def test_window_whole_map_equals_self_attention(g):
    qkv = rnd(2, 36, 3 * 6, gen=g)
    torch.testing.assert_close(oracles.window_attention(qkv, (6, 6), 2, 6, 0), oracles.self_attention(qkv, 2), **TOL)
    torch.testing.assert_close(
        oracles.window_attention(qkv, (6, 6), 2, 6, 0, scale=0.3), oracles.self_attention(qkv, 2, scale=0.3), **TOL
    )


def test_window_size_one_is_v(g):
    qkv = rnd(2, 15, 3 * 6, gen=g)
    table = rnd(1, 3, gen=g)
    torch.testing.assert_close(oracles.window_attention(qkv, (3, 5), 3, 1, 0, table), qkv[..., 12:], **TOL)


def test_window_shift_and_table_by_hand(g):
    """Hand-built check of one window on a 4x4 map, M=2, s=1, with table."""
    Hh, D, M, s = 1, 2, 2, 1
    qkv = rnd(1, 16, 6, gen=g)
    table = rnd(9, 1, gen=g)
    out = oracles.window_attention(qkv, (4, 4), Hh, M, s, table)
    # shifted-frame window (1,1) covers shifted positions (2..3, 2..3) = original (3,0),(3,3),(0,3),(0,0)...
    # compute the shifted-frame window (0,0): positions y[0..1, 0..1] = x[1..2, 1..2]: all region 0 -> no mask
    tok = [1 * 4 + 1, 1 * 4 + 2, 2 * 4 + 1, 2 * 4 + 2]
    w = qkv[0, tok]
    q, k, v = w[:, 0:2], w[:, 2:4], w[:, 4:6]
    b = torch.empty(4, 4, dtype=DT)
    for i in range(4):
        for j in range(4):
            pi, qi = divmod(i, 2)
            pj, qj = divmod(j, 2)
            b[i, j] = table[(pi - pj + 1) * 3 + (qi - qj + 1), 0]
    ref = torch.softmax(q @ k.T * D**-0.5 + b, -1) @ v
    torch.testing.assert_close(out[0, tok], ref, **TOL)
    # shifted-frame window (1,1): y[2..3,2..3] = x[(3,3),(3,0),(0,3),(0,0)]; labels: y rows 2 -> region 1,
    # row 3 -> region 2 (slices [0,2),[2,3),[3,4)); same for columns
    tok = [3 * 4 + 3, 3 * 4 + 0, 0 * 4 + 3, 0 * 4 + 0]
    lab = [3 * 1 + 1, 3 * 1 + 2, 3 * 2 + 1, 3 * 2 + 2]
    w = qkv[0, tok]
    q, k, v = w[:, 0:2], w[:, 2:4], w[:, 4:6]
    mask = torch.tensor([[0.0 if lab[i] == lab[j] else -100.0 for j in range(4)] for i in range(4)], dtype=DT)
    ref = torch.softmax(q @ k.T * D**-0.5 + b + mask, -1) @ v
    torch.testing.assert_close(out[0, tok], ref, **TOL)


def test_window_qkv_bias_only_through_padding(g):
    qkv = rnd(1, 16, 6, gen=g).requires_grad_()
    qb = rnd(6, gen=g).requires_grad_()
    out = oracles.window_attention(qkv, (4, 4), 1, 2, 1, None, qb)  # no padding
    (gq,) = torch.autograd.grad(out.sum(), qb, allow_unused=True, materialize_grads=True)
    assert torch.all(gq == 0)
    qkv = rnd(1, 15, 6, gen=g)
    out = oracles.window_attention(qkv, (3, 5), 1, 2, 1, None, qb)  # padded
    (gq,) = torch.autograd.grad(out.sum(), qb)
    assert gq.abs().sum() > 0


def test_window_gradcheck(g):
    qkv = rnd(1, 10, 6, gen=g).requires_grad_()
    table = rnd(9, 1, gen=g).requires_grad_()
    qb = rnd(6, gen=g).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: oracles.window_attention(a, (2, 5), 1, 2, 1, b, c), (qkv, table, qb)
    )


def test_window_empty_batch(g):
    qkv = rnd(0, 15, 6, gen=g)
    assert oracles.window_attention(qkv, (3, 5), 2, 2, 1).shape == (0, 15, 2)


# ------------------------------------------------------------------------------------------
# window_attention options: shift_first (timm's order) and logit_scale (Swin V2 cosine attention)
# ------------------------------------------------------------------------------------------
def _timm():
    try:
        import timm.models.swin_transformer as v1
        import timm.models.swin_transformer_v2 as v2
    except Exception as e:  # ImportError, or torchvision operator errors
        pytest.skip(f"timm does not import: {type(e).__name__}: {e}")
    return v1, v2


# (H, W, heads, D, M, s): odd maps with padding on both sides, a window bigger than the map, no shift
TIMM_CASES = [
    (9, 13, 2, 3, 7, 3),
    (5, 5, 2, 3, 7, 3),
    (7, 10, 3, 2, 4, 2),
    (6, 6, 2, 2, 3, 1),
    (9, 13, 2, 3, 7, 0),
    (3, 8, 1, 4, 3, 2),
]


def _timm_block(cls, C, H, W, heads, M, s, **kw):
    torch.manual_seed(0)
    blk = cls(C, (H, W), heads, window_size=M, shift_size=s, always_partition=True, dynamic_mask=True, **kw).double()
    assert tuple(blk.window_size) == (M, M) and tuple(blk.shift_size) == (s, s)  # nothing clipped
    return blk


@pytest.mark.parametrize("case", TIMM_CASES, ids=lambda c: "{}x{}_h{}_D{}_M{}_s{}".format(*c))
def test_window_shift_first_equals_timm_swin_block(g, case):
    """timm >= 1.0 SwinTransformerBlock._attn (roll the unpadded map, pad, partition, a mask built on
    the padded grid, window attention, reverse, crop, roll back) == the oracle with shift_first=True,
    output and gradients of the input and every attention parameter."""
    v1, _ = _timm()
    H, W, heads, D, M, s = case
    C = heads * D
    blk = _timm_block(v1.SwinTransformerBlock, C, H, W, heads, M, s)
    attn = blk.attn
    with torch.no_grad():
        attn.relative_position_bias_table.copy_(rnd(*attn.relative_position_bias_table.shape, gen=g))
        attn.qkv.bias.copy_(rnd(3 * C, gen=g))
    x = rnd(2, H, W, C, gen=g).requires_grad_()
    ref = blk._attn(x)

    def ours(x):
        qkv = F.linear(x.reshape(2, H * W, C), attn.qkv.weight, attn.qkv.bias)
        o = oracles.window_attention(
            qkv, (H, W), heads, M, s, attn.relative_position_bias_table, attn.qkv.bias, shift_first=True
        )
        return F.linear(o, attn.proj.weight, attn.proj.bias).reshape(2, H, W, C)

    out = ours(x)
    torch.testing.assert_close(out, ref, **TOL)
    leaves = [x, attn.qkv.weight, attn.qkv.bias, attn.relative_position_bias_table]
    go = rnd(*out.shape, gen=g)
    for a, b in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(a, b, **TOL)
    if s > 0 and (H % M or W % M):  # the order matters here: pad-then-shift is a different function
        other = oracles.window_attention(
            F.linear(x.reshape(2, H * W, C), attn.qkv.weight, attn.qkv.bias),
            (H, W),
            heads,
            M,
            s,
            attn.relative_position_bias_table,
            attn.qkv.bias,
        )
        assert (F.linear(other, attn.proj.weight, attn.proj.bias).reshape(2, H, W, C) - ref).abs().max() > 1e-3


def test_window_timm_mask_slices_are_spec_regions():
    """timm's get_attn_mask labels the *padded* grid with slices (0, -M), (-M, -s), (-s, None), which
    are SPEC's [0, Hp-M), [Hp-M, Hp-s), [Hp-s, Hp): its mask equals the oracle's (nW, N, N) mask."""
    v1, _ = _timm()
    for H, W, M, s in [(9, 13, 7, 3), (5, 5, 7, 3), (7, 10, 4, 2), (8, 8, 4, 2)]:
        blk = _timm_block(v1.SwinTransformerBlock, 4, H, W, 1, M, s)
        Hp, Wp = -(-H // M) * M, -(-W // M) * M
        mask = blk.get_attn_mask(torch.zeros(1, Hp, Wp, 4, dtype=DT))
        torch.testing.assert_close(mask, oracles.window_shift_mask(Hp, Wp, M, s), atol=0, rtol=0)


def _swinv2_table(cpb_mlp, coords_table, index, heads):
    """Swin V2's bias table as the caller passes it: 16·sigmoid(cpb_mlp(coords)) per table entry (the
    gather by relative_position_index is the op's own; check that index is SPEC's)."""
    M2 = index.shape[0]
    M = int(round(M2**0.5))
    assert torch.equal(index, oracles.window_rel_pos_index(M))
    return 16 * torch.sigmoid(cpb_mlp(coords_table).reshape(-1, heads))


@pytest.mark.parametrize(
    "case",
    [(9, 13, 2, 3, 7, 3), (5, 5, 2, 3, 7, 3), (8, 8, 2, 4, 4, 2), (6, 7, 3, 2, 3, 0)],
    ids=lambda c: "{}x{}_h{}_D{}_M{}_s{}".format(*c),
)
def test_window_cosine_equals_timm_swinv2_block(g, case):
    """timm SwinTransformerV2Block._attn (shift first, cosine attention with the clamped logit scale,
    16·sigmoid cpb table, q/v biases with a zero k bias) == the oracle with logit_scale and
    shift_first=True; gradients of the input, logit_scale (0 for the clamped head) and the cpb MLP."""
    _, v2 = _timm()
    H, W, heads, D, M, s = case
    C = heads * D
    blk = _timm_block(v2.SwinTransformerV2Block, C, H, W, heads, M, s)
    attn = blk.attn
    with torch.no_grad():
        attn.logit_scale.copy_(rnd(heads, 1, 1, gen=g) * 0.5 + 2.0)
        attn.logit_scale[0] = 4.9  # above ln 100: clamped, zero gradient
        attn.q_bias.copy_(rnd(C, gen=g))
        attn.v_bias.copy_(rnd(C, gen=g))
    x = rnd(2, H, W, C, gen=g).requires_grad_()
    ref = blk._attn(x)

    def ours(x):
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x.reshape(2, H * W, C), attn.qkv.weight, qkv_bias)
        table = _swinv2_table(attn.cpb_mlp, attn.relative_coords_table, attn.relative_position_index, heads)
        o = oracles.window_attention(
            qkv,
            (H, W),
            heads,
            M,
            s,
            table,
            qkv_bias,
            scale=123.0,  # unused
            logit_scale=attn.logit_scale,
            shift_first=True,
        )
        return F.linear(o, attn.proj.weight, attn.proj.bias).reshape(2, H, W, C)

    out = ours(x)
    torch.testing.assert_close(out, ref, **TOL)
    leaves = [
        x,
        attn.logit_scale,
        attn.q_bias,
        attn.v_bias,
        attn.qkv.weight,
        attn.cpb_mlp[0].weight,
        attn.cpb_mlp[2].weight,
    ]
    go = rnd(*out.shape, gen=g)
    ga = torch.autograd.grad(out, leaves, go)
    gb = torch.autograd.grad(ref, leaves, go)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL)
    assert ga[1][0].item() == 0 and ga[1][1:].abs().min() > 0


def test_window_cosine_equals_hf_swinv2_self_attention(g):
    """transformers Swinv2SelfAttention on partitioned windows == the oracle with logit_scale (pad-first
    order; the map is a multiple of M so nothing is padded). HF adds its (nW, N, N) mask to the scores
    twice (attention_scores + mask, then + mask again), so it is given half of SPEC's −100 mask."""
    try:
        from transformers import Swinv2Config
        from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention
    except Exception as e:
        pytest.skip(f"transformers does not import: {type(e).__name__}: {e}")
    B, H, W, heads, D, M = 2, 8, 12, 2, 3, 4
    C, N = heads * D, M * M
    torch.manual_seed(0)
    attn = Swinv2SelfAttention(Swinv2Config(qkv_bias=True, attention_probs_dropout_prob=0.0), C, heads, M).double()
    attn.eval()
    with torch.no_grad():
        attn.logit_scale.copy_(rnd(heads, 1, 1, gen=g) * 0.5 + 2.0)
        attn.logit_scale[1] = 5.0
        attn.query.bias.copy_(rnd(C, gen=g))
        attn.value.bias.copy_(rnd(C, gen=g))
    for s in (0, 2):
        table = _swinv2_table(
            attn.continuous_position_bias_mlp, attn.relative_coords_table, attn.relative_position_index, heads
        )
        weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
        qkv_bias = torch.cat([attn.query.bias, torch.zeros(C, dtype=DT), attn.value.bias])
        x = rnd(B, H, W, C, gen=g).requires_grad_()
        y = torch.roll(x, (-s, -s), (1, 2)) if s else x
        win = y.reshape(B, H // M, M, W // M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
        mask = oracles.window_shift_mask(H, W, M, s) / 2 if s else None
        o = attn(win, mask)[0].reshape(B, H // M, W // M, M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        ref = (torch.roll(o, (s, s), (1, 2)) if s else o).reshape(B, H * W, C)
        qkv = F.linear(x.reshape(B, H * W, C), weight, qkv_bias)
        out = oracles.window_attention(qkv, (H, W), heads, M, s, table, qkv_bias, logit_scale=attn.logit_scale)
        torch.testing.assert_close(out, ref, **TOL)
        leaves = [x, attn.logit_scale, attn.query.bias, attn.continuous_position_bias_mlp[2].weight]
        go = rnd(*out.shape, gen=g)
        ga = torch.autograd.grad(out, leaves, go)
        gb = torch.autograd.grad(ref, leaves, go)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, **TOL)
        assert ga[1][1].item() == 0


def test_window_shift_first_equals_pad_first_without_padding(g):
    """When H and W are multiples of M both orders are the same function (SPEC)."""
    qkv = rnd(2, 8 * 12, 3 * 6, gen=g)
    table, qb, ls = rnd(49, 2, gen=g), rnd(18, gen=g), rnd(2, gen=g)
    for kw in ({}, {"logit_scale": ls}):
        a = oracles.window_attention(qkv, (8, 12), 2, 4, 3, table, qb, **kw)
        b = oracles.window_attention(qkv, (8, 12), 2, 4, 3, table, qb, shift_first=True, **kw)
        torch.testing.assert_close(a, b, **TOL)


def test_window_cosine_by_hand(g):
    """One window, one head, from the words: scores = (q̂·k̂ᵀ)·exp(min(ls, ln 100)) + bias, scale unused;
    a zero q row normalises to 0 (F.normalize's eps)."""
    qkv = rnd(1, 4, 6, gen=g)
    qkv[0, 1, :2] = 0.0
    table = rnd(9, 1, gen=g)
    for ls_val, tau in ((1.5, torch.exp(torch.tensor(1.5, dtype=DT))), (7.0, torch.tensor(100.0, dtype=DT))):
        ls = torch.tensor([ls_val], dtype=DT)
        out = oracles.window_attention(qkv, (2, 2), 1, 2, 0, table, scale=0.01, logit_scale=ls)
        q, k, v = qkv[0, :, :2], qkv[0, :, 2:4], qkv[0, :, 4:]
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kn = k / k.norm(dim=-1, keepdim=True)
        b = table[oracles.window_rel_pos_index(2).reshape(-1), 0].reshape(4, 4)
        ref = torch.softmax(qn @ kn.T * tau + b, -1) @ v
        torch.testing.assert_close(out[0], ref, **TOL)
    torch.testing.assert_close(out[0, 1], (torch.softmax(b, -1) @ v)[1], **TOL)  # q̂ = 0: bias only


def test_window_options_gradcheck(g):
    qkv = rnd(1, 10, 6, gen=g).requires_grad_()
    table = rnd(9, 1, gen=g).requires_grad_()
    qb = rnd(6, gen=g).requires_grad_()
    ls = torch.tensor([1.3], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: oracles.window_attention(a, (2, 5), 1, 2, 1, b, c, logit_scale=d, shift_first=True),
        (qkv, table, qb, ls),
    )


# ------------------------------------------------------------------------------------------
# xca
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tshape", ["hw11", "h"])
def test_xca_timm(g, tshape):
    B, N, Hh, D = 2, 11, 3, 4
    C = Hh * D
    qkv = rnd(B, N, 3 * C, gen=g)
    temp = rnd(Hh, 1, 1, gen=g).abs() + 0.5
    # timm XCA.forward
    q, k, v = qkv.reshape(B, N, 3, Hh, D).permute(2, 0, 3, 4, 1).unbind(0)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temp
    ref = (attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
    t = temp if tshape == "hw11" else temp.reshape(Hh)
    torch.testing.assert_close(oracles.xca(qkv, Hh, t), ref, **TOL)
    # einsum form straight from the SPEC words
    qd = qkv.reshape(B, N, 3, Hh, D)
    qq, kk, vv = qd[:, :, 0], qd[:, :, 1], qd[:, :, 2]  # (B, N, h, D)
    qq = qq / qq.norm(dim=1, keepdim=True).clamp_min(1e-12)
    kk = kk / kk.norm(dim=1, keepdim=True).clamp_min(1e-12)
    A = torch.softmax(temp.reshape(1, Hh, 1, 1) * torch.einsum("bnhi,bnhj->bhij", qq, kk), -1)
    ref2 = torch.einsum("bhij,bnhj->bnhi", A, vv).reshape(B, N, C)
    torch.testing.assert_close(oracles.xca(qkv, Hh, t), ref2, **TOL)


def test_xca_grads_match_timm(g):
    B, N, Hh, D = 1, 7, 2, 3
    C = Hh * D
    qkv = rnd(B, N, 3 * C, gen=g).requires_grad_()
    temp = (rnd(Hh, 1, 1, gen=g).abs() + 0.5).requires_grad_()

    def timm_xca(qkv, temp):
        q, k, v = qkv.reshape(B, N, 3, Hh, D).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * temp
        return (attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C)

    go = rnd(B, N, C, gen=g)
    a = torch.autograd.grad(oracles.xca(qkv, Hh, temp), (qkv, temp), go)
    b = torch.autograd.grad(timm_xca(qkv, temp), (qkv, temp), go)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)


# ------------------------------------------------------------------------------------------
# space_time_attention
# ------------------------------------------------------------------------------------------
def timesformer_reference(qkv, T, Hh, axis, cls_qkv, layout):
    """Rearrange-style composition (what TimeSformer/ViViT do with einops), with plain torch."""
    B, L, C3 = qkv.shape
    S = L // T
    C = C3 // 3
    x = qkv.reshape(B, S, T, C3) if layout == "st" else qkv.reshape(B, T, S, C3).transpose(1, 2)  # (B,S,T,3C)
    if axis == "time":
        seq = x.reshape(B * S, T, C3)  # '(b s) t c'
        o = oracles.self_attention(seq, Hh).reshape(B, S, T, C)
        cls_o = None
    else:
        seq = x.transpose(1, 2).reshape(B * T, S, C3)  # '(b t) s c'
        if cls_qkv is not None:
            seq = torch.cat([cls_qkv.repeat_interleave(T, 0).unsqueeze(1), seq], 1)  # 'b c -> (b t) 1 c'
        o = oracles.self_attention(seq, Hh)
        cls_o = None
        if cls_qkv is not None:
            cls_o = o[:, 0].reshape(B, T, C)
            o = o[:, 1:]
        o = o.reshape(B, T, S, C).transpose(1, 2)
    out = o.reshape(B, L, C) if layout == "st" else o.transpose(1, 2).reshape(B, L, C)
    return out if cls_qkv is None else (out, cls_o)


@pytest.mark.parametrize("layout", ["st", "ts"])
@pytest.mark.parametrize("axis,with_cls", [("time", False), ("space", False), ("space", True)])
@pytest.mark.parametrize("T", [1, 3])
def test_space_time_vs_rearrange(g, layout, axis, with_cls, T):
    B, S, Hh, D = 2, 5, 2, 3
    C = Hh * D
    qkv = rnd(B, S * T, 3 * C, gen=g)
    cls = rnd(B, 3 * C, gen=g) if with_cls else None
    out = oracles.space_time_attention(qkv, T, Hh, axis, cls, layout)
    ref = timesformer_reference(qkv, T, Hh, axis, cls, layout)
    if with_cls:
        assert isinstance(out, tuple) and out[1].shape == (B, T, C)
        torch.testing.assert_close(out[0], ref[0], **TOL)
        torch.testing.assert_close(out[1], ref[1], **TOL)
    else:
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, ref, **TOL)


def test_space_time_trivial_facts(g):
    qkv = rnd(2, 6, 3 * 4, gen=g)
    # T = 1, axis space == plain self-attention
    torch.testing.assert_close(oracles.space_time_attention(qkv, 1, 2, "space"), oracles.self_attention(qkv, 2), **TOL)
    # T = 1, axis time: each token attends only to itself -> v
    torch.testing.assert_close(oracles.space_time_attention(qkv, 1, 2, "time"), qkv[..., 8:], **TOL)
    # T = N, layout st, axis time == self-attention (S = 1)
    torch.testing.assert_close(oracles.space_time_attention(qkv, 6, 2, "time"), oracles.self_attention(qkv, 2), **TOL)
    # cls output by hand: frame t's sequence [cls, its S tokens]
    cls = rnd(2, 12, gen=g)
    out, co = oracles.space_time_attention(qkv, 2, 2, "space", cls, "st")  # S = 3, T = 2, token s*2+t
    seq = torch.cat([cls[:, None], qkv[:, [1, 3, 5]]], 1)
    torch.testing.assert_close(co[:, 1], oracles.self_attention(seq, 2)[:, 0], **TOL)
    torch.testing.assert_close(out[:, [1, 3, 5]], oracles.self_attention(seq, 2)[:, 1:], **TOL)


# ------------------------------------------------------------------------------------------
# dwconv / mix_ffn
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("act", [None, "gelu", "relu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dwconv_vs_conv2d(g, k, act, with_bias):
    B, H, W, C = 2, 5, 7, 3
    x = rnd(B, H * W, C, gen=g)
    w = rnd(C, 1, k, k, gen=g)
    b = rnd(C, gen=g) if with_bias else None
    ref = F.conv2d(x.transpose(1, 2).reshape(B, C, H, W), w, b, padding=k // 2, groups=C)
    if act == "gelu":
        ref = F.gelu(ref)
    elif act == "relu":
        ref = F.relu(ref)
    ref = ref.flatten(2).transpose(1, 2)
    torch.testing.assert_close(oracles.dwconv(x, (H, W), w, b, act), ref, **TOL)


@pytest.mark.parametrize("extra_relu", [False, True])
def test_mix_ffn_vs_modules(g, extra_relu):
    B, H, W, Cin, Hid, Cout = 2, 5, 3, 4, 6, 5
    x = rnd(B, H * W, Cin, gen=g)
    fc1 = torch.nn.Linear(Cin, Hid).double()
    dw = torch.nn.Conv2d(Hid, Hid, 3, 1, 1, groups=Hid).double()
    fc2 = torch.nn.Linear(Hid, Cout).double()
    h = fc1(x)
    if extra_relu:
        h = F.relu(h)
    h = dw(h.transpose(1, 2).reshape(B, Hid, H, W)).flatten(2).transpose(1, 2)
    ref = fc2(F.gelu(h))
    out = oracles.mix_ffn(x, (H, W), fc1.weight, fc1.bias, dw.weight, dw.bias, fc2.weight, fc2.bias, extra_relu)
    torch.testing.assert_close(out, ref, **TOL)


# ------------------------------------------------------------------------------------------
# pool_attention (MViTv2)
# ------------------------------------------------------------------------------------------
def _mvitv2():
    try:
        import timm.models.mvitv2 as mvitv2
    except Exception as e:  # ImportError, or torchvision operator errors
        pytest.skip(f"timm does not import: {type(e).__name__}: {e}")
    return mvitv2


def _timm_pool_attention(mvitv2, q, k, v, q_hw, k_hw, rel_pos_h, rel_pos_w, cls, residual):
    """timm MultiScaleAttention.forward from its scores on (after the pools and norms)."""
    B, Hh, Nq, D = q.shape
    attn = (q * D**-0.5) @ k.transpose(-2, -1)
    attn = mvitv2.cal_rel_pos_type(attn, q, cls, list(q_hw), list(k_hw), rel_pos_h, rel_pos_w)
    x = attn.softmax(dim=-1) @ v
    if residual:
        x = x + q
    return x.transpose(1, 2).reshape(B, Nq, Hh * D)


# (q_hw, k_hw): q bigger than k (kv pooled by 4 / 2), equal, k bigger (a stage's first block), non-square
POOL_TIMM_CASES = [
    ((4, 4), (1, 1)),
    ((4, 4), (2, 2)),
    ((3, 3), (3, 3)),
    ((2, 2), (4, 4)),
    ((3, 5), (2, 3)),
    ((2, 3), (4, 6)),
]


@pytest.mark.parametrize("q_hw,k_hw", POOL_TIMM_CASES, ids=str)
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "nocls"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_pool_attention_vs_timm_cal_rel_pos_type(g, q_hw, k_hw, cls, residual):
    mvitv2 = _mvitv2()
    B, Hh, D, sp = 2, 2, 5, int(cls)
    q = rnd(B, Hh, q_hw[0] * q_hw[1] + sp, D, gen=g).requires_grad_()
    k, v = (rnd(B, Hh, k_hw[0] * k_hw[1] + sp, D, gen=g).requires_grad_() for _ in range(2))
    th = rnd(2 * max(q_hw[0], k_hw[0]) - 1, D, gen=g).requires_grad_()  # timm's table lengths
    tw = rnd(2 * max(q_hw[1], k_hw[1]) - 1, D, gen=g).requires_grad_()
    ours = oracles.pool_attention(q, k, v, q_hw, k_hw, th, tw, cls, residual)
    ref = _timm_pool_attention(mvitv2, q, k, v, q_hw, k_hw, th, tw, cls, residual)
    torch.testing.assert_close(ours, ref, **TOL)
    go = rnd(*ref.shape, gen=g)
    leaves = [q, k, v, th, tw]
    for a, b in zip(torch.autograd.grad(ours, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(
    "stride_q,stride_kv,cls,residual",
    [
        ((1, 1), (4, 4), False, True),
        ((2, 2), (2, 2), True, True),
        ((2, 2), (1, 1), True, False),
        ((1, 1), (2, 2), False, False),
    ],
)
def test_pool_attention_vs_timm_multiscale_attention(g, stride_q, stride_kv, cls, residual):
    """A whole timm MultiScaleAttention (qkv linear, conv pools + LayerNorms, attention, proj): its
    output and gradients equal proj(oracle(q, k, v)) on the q, k, v its pool norms produce."""
    mvitv2 = _mvitv2()
    torch.manual_seed(0)
    dim, heads, H = 12, 2, 8
    attn = mvitv2.MultiScaleAttention(
        dim,
        dim,
        (H, H),
        heads,
        kernel_q=(3, 3),
        kernel_kv=(3, 3),
        stride_q=stride_q,
        stride_kv=stride_kv,
        has_cls_token=cls,
        residual_pooling=residual,
    ).double()
    with torch.no_grad():  # timm initialises the tables at std 0.02: make the rel terms matter
        attn.rel_pos_h.copy_(rnd(*attn.rel_pos_h.shape, gen=g))
        attn.rel_pos_w.copy_(rnd(*attn.rel_pos_w.shape, gen=g))
    seen = {}
    for name in ("norm_q", "norm_k", "norm_v"):
        getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = rnd(2, H * H + int(cls), dim, gen=g).requires_grad_()
    ref, q_size = attn(x, [H, H])
    k_size = [(H + 2 - 3) // s + 1 for s in stride_kv]
    q, k, v = seen["norm_q"], seen["norm_k"], seen["norm_v"]
    o = oracles.pool_attention(q, k, v, q_size, k_size, attn.rel_pos_h, attn.rel_pos_w, cls, residual)
    ours = attn.proj(o)
    torch.testing.assert_close(ours, ref, **TOL)
    go = rnd(*ref.shape, gen=g)
    leaves = [x, attn.rel_pos_h, attn.rel_pos_w, attn.qkv.weight]
    for a, b in zip(torch.autograd.grad(ours, leaves, go, retain_graph=True), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(a, b, **TOL)


def _timm_rel_pos_index(mvitv2, q_len, k_len):
    """timm's table rows along one axis, read back through cal_rel_pos_type: a 1-D table whose row i
    holds i, queries of ones, and a zero table on the other axis."""
    table = torch.arange(2 * max(q_len, k_len), dtype=DT).unsqueeze(1)
    q = torch.ones(1, 1, q_len, 1, dtype=DT)
    attn = torch.zeros(1, 1, q_len, k_len, dtype=DT)
    out = mvitv2.cal_rel_pos_type(attn, q, False, [q_len, 1], [k_len, 1], table, torch.zeros_like(table))
    return out[0, 0].long()


def test_pool_rel_pos_index_equals_timm(g):
    """The oracle's table rows equal timm's for every (q, k) axis pair MViTv2 produces (square inputs
    64..512 px in steps of 16: stride-4 patch embed, q strides 1/2/2/2, adaptive kv strides 4/2/1/1,
    conv pools of kernel 3), and at non-dyadic size ratios where timm's float32 arithmetic lands one
    row below the exact-rational reading of the formula (docs/pool_attention.md)."""
    from fractions import Fraction

    mvitv2 = _mvitv2()

    def pooled(n, s):
        return (n - 1) // s + 1

    pairs = set()
    for res in range(64, 513, 16):
        f = pooled(res, 4)
        for sq, skv in zip((1, 2, 2, 2), (4, 2, 1, 1)):
            pairs.add((pooled(f, sq), pooled(f, skv)))  # the stage's first block
            f = pooled(f, sq)
            pairs.add((f, pooled(f, skv)))  # its other blocks
    odd = [(8, 6), (6, 8), (13, 7), (7, 13), (11, 10), (16, 14)]
    for q_len, k_len in sorted(pairs) + odd:
        got = oracles.pool_rel_pos_index(q_len, k_len)
        assert torch.equal(got, _timm_rel_pos_index(mvitv2, q_len, k_len)), (q_len, k_len)

    def exact(q_len, k_len):
        qr, kr = max(Fraction(k_len, q_len), 1), max(Fraction(q_len, k_len), 1)
        return torch.tensor([[int(a * qr - c * kr + (k_len - 1) * kr) for c in range(k_len)] for a in range(q_len)])

    assert all(torch.equal(oracles.pool_rel_pos_index(*p), exact(*p)) for p in pairs)  # dyadic ratios: no rounding
    assert not torch.equal(oracles.pool_rel_pos_index(8, 6), exact(8, 6))  # timm's rounding is followed
