"""Independent float64 oracles for the nine vitkernels ops.

Written directly from the words of SPEC.md, deliberately naive: explicit padding, explicit
index-gather shifts, explicit window partition, explicit (nW, N, N) masks and python loops where
that reads more obviously.  Nothing here imports ``vitkernels``; these functions exist only so the
package's reference backend (and through it every fused backend) can be checked against a second,
independently written implementation.  Every function is built from differentiable torch ops, so
``torch.autograd.grad`` through them gives gradient oracles as well.

Speed is irrelevant: use small shapes, float64, CPU.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention",
    "self_attention",
    "window_attention",
    "sr_attention",
    "xca",
    "space_time_attention",
    "dwconv",
    "mix_ffn",
    "pool_attention",
    "pool_rel_pos_index",
    "window_rel_pos_index",
    "window_shift_mask",
]


def _default_scale(d: int, scale):
    return d**-0.5 if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# 1. attention
# ---------------------------------------------------------------------------------------------
def attention(q, k, v, bias=None, scale=None):
    """softmax(q kᵀ scale + bias) v; q (B,Hh,Nq,D), k/v (B,Hh,Nk,D).

    A row whose every score is -inf gives output 0; its scores get zero gradient (so every
    gradient is finite). A boolean bias is a mask as in SDPA: True = the key takes part,
    False = -inf.
    """
    scale = _default_scale(q.shape[-1], scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, Hh, Nq, Nk)
    if bias is not None and bias.dtype == torch.bool:
        minus_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
        scores = torch.where(bias, scores, minus_inf)  # broadcast
    elif bias is not None:
        scores = scores + bias  # broadcast; autograd reduces bias's grad over broadcast dims
    if scores.shape[-1] == 0:
        # no keys at all: every row is "fully masked"
        return torch.zeros(*scores.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device) + 0 * q.sum()
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (…, Nq, 1)
    safe = torch.where(dead, torch.zeros_like(scores), scores)
    p = torch.softmax(safe, dim=-1)
    p = torch.where(dead, torch.zeros_like(p), p)
    return torch.matmul(p, v)


# ---------------------------------------------------------------------------------------------
# 2. self_attention
# ---------------------------------------------------------------------------------------------
def _split_packed(x, parts, num_heads):
    """(B, N, parts*C) -> tuple of `parts` tensors (B, heads, N, D); channel s*C + h*D + d."""
    B, N, PC = x.shape
    assert PC % parts == 0
    C = PC // parts
    assert C % num_heads == 0
    D = C // num_heads
    x = x.reshape(B, N, parts, num_heads, D).permute(2, 0, 3, 1, 4)  # (parts, B, h, N, D)
    return tuple(x[i] for i in range(parts))


def _merge_heads(o):
    """(B, heads, N, D) -> (B, N, heads*D)."""
    B, Hh, N, D = o.shape
    return o.permute(0, 2, 1, 3).reshape(B, N, Hh * D)


def self_attention(qkv, num_heads, scale=None):
    q, k, v = _split_packed(qkv, 3, num_heads)
    return _merge_heads(attention(q, k, v, None, scale))


# ---------------------------------------------------------------------------------------------
# 3. window_attention
# ---------------------------------------------------------------------------------------------
def window_rel_pos_index(M: int):
    """(M*M, M*M) long: idx[i,j] = (p_i-p_j+M-1)*(2M-1) + (q_i-q_j+M-1), token t = p*M + q."""
    N = M * M
    idx = torch.empty(N, N, dtype=torch.long)
    for i in range(N):
        p_i, q_i = divmod(i, M)
        for j in range(N):
            p_j, q_j = divmod(j, M)
            idx[i, j] = (p_i - p_j + M - 1) * (2 * M - 1) + (q_i - q_j + M - 1)
    return idx


def _region(x: int, L: int, M: int, s: int) -> int:
    # slices [0, L-M), [L-M, L-s), [L-s, L)
    if x < L - M:
        return 0
    if x < L - s:
        return 1
    return 2


def window_shift_mask(Hp: int, Wp: int, M: int, s: int):
    """(nW, M*M, M*M) float64 mask, windows in row-major window order; zeros when s == 0."""
    nWh, nWw = Hp // M, Wp // M
    N = M * M
    mask = torch.zeros(nWh * nWw, N, N, dtype=torch.float64)
    if s == 0:
        return mask
    label = [[3 * _region(h, Hp, M, s) + _region(w, Wp, M, s) for w in range(Wp)] for h in range(Hp)]
    for wh in range(nWh):
        for ww in range(nWw):
            labs = [label[wh * M + p][ww * M + q] for p in range(M) for q in range(M)]
            for i in range(N):
                for j in range(N):
                    if labs[i] != labs[j]:
                        mask[wh * nWw + ww, i, j] = -100.0
    return mask


def window_attention(
    qkv,
    hw,
    num_heads,
    window_size,
    shift_size=0,
    rel_pos_bias_table=None,
    qkv_bias=None,
    scale=None,
    logit_scale=None,
    shift_first=False,
):
    """SPEC op 3, step by step. Default order: pad, then shift the padded map. shift_first=True
    (timm): shift the unpadded H×W map, then pad; the region labels / mask are those of the padded
    grid either way, and the reverse is (shift back, crop) or (crop, shift back) respectively.
    logit_scale (heads,) or (heads, 1, 1): cosine attention, scores = (q̂·k̂ᵀ)·exp(min(ls_h, ln 100))
    with q̂ = q / max(‖q‖₂ over D, 1e-12) (likewise k̂); `scale` unused."""
    B, L, C3 = qkv.shape
    H, W = int(hw[0]), int(hw[1])
    M, s = int(window_size), int(shift_size)
    assert L == H * W and C3 % 3 == 0 and M >= 1 and 0 <= s < M
    C = C3 // 3
    N = M * M
    Hp = -(-H // M) * M
    Wp = -(-W // M) * M

    # 1. feature map, padded bottom/right with the qkv of a zero token (= qkv_bias, or zeros);
    #    with shift_first the unpadded map is first shifted cyclically: x[h, w] <- x[(h+s) mod H, (w+s) mod W]
    x = qkv.reshape(B, H, W, C3)
    if shift_first:
        x = x.index_select(1, torch.tensor([(h + s) % H for h in range(H)], device=qkv.device))
        x = x.index_select(2, torch.tensor([(w + s) % W for w in range(W)], device=qkv.device))
    fill = qkv_bias if qkv_bias is not None else torch.zeros(C3, dtype=qkv.dtype, device=qkv.device)
    fill = fill.reshape(1, 1, 1, C3)
    if Wp > W:
        x = torch.cat([x, fill.expand(B, H, Wp - W, C3)], dim=2)
    if Hp > H:
        x = torch.cat([x, fill.expand(B, Hp - H, Wp, C3)], dim=1)

    # 2. cyclic shift y[h, w] = x[(h+s) mod Hp, (w+s) mod Wp] (already done with shift_first)
    if shift_first:
        y = x
    else:
        ih = torch.tensor([(h + s) % Hp for h in range(Hp)], device=qkv.device)
        iw = torch.tensor([(w + s) % Wp for w in range(Wp)], device=qkv.device)
        y = x.index_select(1, ih).index_select(2, iw)

    # 3. partition into MxM windows, window token t = p*M + q; windows row-major, batch-major
    nWh, nWw = Hp // M, Wp // M
    wins = []
    for b in range(B):
        for wh in range(nWh):
            for ww in range(nWw):
                wins.append(y[b, wh * M : (wh + 1) * M, ww * M : (ww + 1) * M, :].reshape(N, C3))
    nW = nWh * nWw
    if B == 0:
        win = y.new_zeros(0, N, C3) + 0 * y.sum()
    else:
        win = torch.stack(wins, 0)  # (B*nW, N, 3C)

    # 4. bias = B_rel (heads, N, N) + mask (nW, N, N)
    bias = torch.zeros(B * nW, num_heads, N, N, dtype=qkv.dtype, device=qkv.device)
    if rel_pos_bias_table is not None:
        idx = window_rel_pos_index(M).to(qkv.device)
        b_rel = rel_pos_bias_table[idx.reshape(-1)].reshape(N, N, num_heads).permute(2, 0, 1)
        bias = bias + b_rel.unsqueeze(0)
    if s > 0:
        mask = window_shift_mask(Hp, Wp, M, s).to(device=qkv.device, dtype=qkv.dtype)
        bias = bias + mask.repeat(B, 1, 1).unsqueeze(1)

    q, k, v = _split_packed(win, 3, num_heads)
    if logit_scale is not None:
        # cosine attention: q̂ = q / max(‖q‖, 1e-12), k̂ likewise; τ_h = exp(min(ls_h, ln 100)), whose
        # gradient is zero where the clamp holds (ls_h >= ln 100, as torch.clamp)
        ls = logit_scale.reshape(num_heads)
        ln100 = math.log(100.0)
        tau = torch.exp(torch.where(ls < ln100, ls, torch.full_like(ls, ln100))).reshape(1, num_heads, 1, 1)
        qn = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12)
        kn = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        q, k, scale = qn * tau, kn, 1.0  # (τ·q̂)·k̂ᵀ = τ·(q̂·k̂ᵀ)
    o = _merge_heads(attention(q, k, v, bias, scale))  # (B*nW, N, C)

    # 5. reverse the partition
    out_y = qkv.new_zeros(B, Hp, Wp, C)
    if B > 0:
        rows = []
        for b in range(B):
            wrow = []
            for wh in range(nWh):
                cols = [o[(b * nWh + wh) * nWw + ww].reshape(M, M, C) for ww in range(nWw)]
                wrow.append(torch.cat(cols, dim=1))  # (M, Wp, C)
            rows.append(torch.cat(wrow, dim=0))  # (Hp, Wp, C)
        out_y = torch.stack(rows, 0)
    else:
        out_y = out_y + 0 * o.sum()

    if shift_first:
        # 6'. crop, then shift back over the unpadded map: out_x[(h+s) mod H, (w+s) mod W] = out_y[h, w]
        out_y = out_y[:, :H, :W, :]
        jh = torch.tensor([(h - s) % H for h in range(H)], device=qkv.device)
        jw = torch.tensor([(w - s) % W for w in range(W)], device=qkv.device)
        return out_y.index_select(1, jh).index_select(2, jw).reshape(B, H * W, C)

    # 6. shift back: out_x[(h+s) mod Hp, (w+s) mod Wp] = out_y[h, w]
    jh = torch.tensor([(h - s) % Hp for h in range(Hp)], device=qkv.device)
    jw = torch.tensor([(w - s) % Wp for w in range(Wp)], device=qkv.device)
    out_x = out_y.index_select(1, jh).index_select(2, jw)

    # 7. crop
    return out_x[:, :H, :W, :].reshape(B, H * W, C)


# ---------------------------------------------------------------------------------------------
# 4. sr_attention
# ---------------------------------------------------------------------------------------------
def sr_attention(q, kv, num_heads, scale=None):
    (qh,) = _split_packed(q, 1, num_heads)
    kh, vh = _split_packed(kv, 2, num_heads)
    return _merge_heads(attention(qh, kh, vh, None, scale))


# ---------------------------------------------------------------------------------------------
# 5. xca
# ---------------------------------------------------------------------------------------------
def xca(qkv, num_heads, temperature):
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    tau = temperature.reshape(num_heads)
    x = qkv.reshape(B, N, 3, num_heads, D)
    outs = []
    for h in range(num_heads):
        q = x[:, :, 0, h, :].transpose(1, 2)  # (B, D, N)
        k = x[:, :, 1, h, :].transpose(1, 2)
        v = x[:, :, 2, h, :].transpose(1, 2)
        qn = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12)
        kn = torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        qh = q / qn
        kh = k / kn
        A = torch.softmax(tau[h] * torch.matmul(qh, kh.transpose(1, 2)), dim=-1)  # (B, D, D)
        o = torch.matmul(A, v)  # (B, D, N): o[i, n] = sum_j A[i, j] v[j, n]
        outs.append(o.transpose(1, 2))  # (B, N, D)
    return torch.cat(outs, dim=-1)  # channel h*D + i


# ---------------------------------------------------------------------------------------------
# 6. space_time_attention
# ---------------------------------------------------------------------------------------------
def space_time_attention(qkv, frames, num_heads, axis, cls_qkv=None, layout="st", scale=None):
    B, L, C3 = qkv.shape
    C = C3 // 3
    T = int(frames)
    assert T >= 1 and L % T == 0, "S*T must equal the token count"
    S = L // T
    assert layout in ("st", "ts") and axis in ("space", "time")
    assert cls_qkv is None or axis == "space"

    def tok(s_, t_):
        return s_ * T + t_ if layout == "st" else t_ * S + s_

    if axis == "time":
        groups = [[tok(s_, t_) for t_ in range(T)] for s_ in range(S)]
    else:
        groups = [[tok(s_, t_) for s_ in range(S)] for t_ in range(T)]

    out = qkv.new_zeros(B, L, C)
    cls_outs = []
    for g in groups:  # for axis "space" the groups are frames t = 0..T-1 in order
        idx = torch.tensor(g, dtype=torch.long, device=qkv.device)
        seq = qkv.index_select(1, idx)  # (B, len, 3C)
        if cls_qkv is not None:
            seq = torch.cat([cls_qkv.unsqueeze(1), seq], dim=1)
        o = self_attention(seq, num_heads, scale)
        if cls_qkv is not None:
            cls_outs.append(o[:, 0])
            o = o[:, 1:]
        out = out.index_copy(1, idx, o)
    if cls_qkv is None:
        return out
    return out, torch.stack(cls_outs, dim=1)  # (B, T, C)


# ---------------------------------------------------------------------------------------------
# 7. dwconv
# ---------------------------------------------------------------------------------------------
def _gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def dwconv(x, hw, weight, bias=None, activation=None):
    B, L, C = x.shape
    H, W = int(hw[0]), int(hw[1])
    assert L == H * W
    k = weight.shape[-1]
    assert weight.shape == (C, 1, k, k) and k % 2 == 1
    r = k // 2
    img = x.reshape(B, H, W, C)
    # explicit zero padding
    zpad_w = img.new_zeros(B, H, r, C)
    img = torch.cat([zpad_w, img, zpad_w], dim=2)
    zpad_h = img.new_zeros(B, r, W + 2 * r, C)
    img = torch.cat([zpad_h, img, zpad_h], dim=1)  # (B, H+2r, W+2r, C)
    out = x.new_zeros(B, H, W, C)
    for i in range(k):
        for j in range(k):
            # out[b,h,w,c] += x[b, h+i-r, w+j-r, c] * weight[c,0,i,j]  (cross-correlation, as conv2d)
            out = out + img[:, i : i + H, j : j + W, :] * weight[:, 0, i, j]
    if bias is not None:
        out = out + bias
    if activation == "gelu":
        out = _gelu_erf(out)
    elif activation == "relu":
        out = torch.relu(out)
    elif activation is not None:
        raise ValueError(f"activation must be None, 'gelu' or 'relu', got {activation!r}")
    return out.reshape(B, H * W, C)


# ---------------------------------------------------------------------------------------------
# 8. mix_ffn
# ---------------------------------------------------------------------------------------------
def _linear(x, w, b):
    y = torch.matmul(x, w.transpose(0, 1))
    return y if b is None else y + b


def mix_ffn(x, hw, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, extra_relu=False):
    h = _linear(x, fc1_weight, fc1_bias)
    if extra_relu:
        h = torch.relu(h)
    h = dwconv(h, hw, dw_weight, dw_bias, activation="gelu")
    return _linear(h, fc2_weight, fc2_bias)


# ---------------------------------------------------------------------------------------------
# 9. pool_attention
# ---------------------------------------------------------------------------------------------
def pool_rel_pos_index(q_len: int, k_len: int):
    """(q_len, k_len) long: idx[a, c] = trunc(a*max(k/q, 1) - c*max(q/k, 1) + (k-1)*max(q/k, 1)),
    evaluated as SPEC.md says timm's cal_rel_pos_type does it: each operation in float32 (the ratios and
    the offset are Python doubles rounded to float32), then truncated."""

    def f32(x):
        return torch.tensor(x, dtype=torch.float32)

    q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    offset = f32((k_len - 1) * k_ratio)
    keys = torch.arange(k_len, dtype=torch.float32)  # c = 0 .. k-1
    idx = torch.empty(q_len, k_len, dtype=torch.long)
    for a in range(q_len):
        idx[a] = torch.trunc((f32(a) * f32(q_ratio) - keys * f32(k_ratio)) + offset).long()
    return idx


def pool_attention(q, k, v, q_hw, k_hw, rel_pos_h=None, rel_pos_w=None, has_cls_token=True, residual=True, scale=None):
    """q (B, heads, Nq, D), k/v (B, heads, Nk, D) -> (B, Nq, heads*D): softmax(scale q k^T + R) v (+ q).
    R[i, j] = q_i . (rel_pos_h[dh] + rel_pos_w[dw]) for spatial i = (qh, qw), j = (kh, kw); 0 on the
    class token's row and column and without tables."""
    B, Hh, Nq, D = q.shape
    Nk = k.shape[2]
    (q_h, q_w), (k_h, k_w) = (int(x) for x in q_hw), (int(x) for x in k_hw)
    sp = 1 if has_cls_token else 0
    assert Nq == q_h * q_w + sp and Nk == k_h * k_w + sp
    assert (rel_pos_h is None) == (rel_pos_w is None)
    scores = torch.matmul(q, k.transpose(-2, -1)) * _default_scale(D, scale)
    if rel_pos_h is not None:
        ih, iw = pool_rel_pos_index(q_h, k_h), pool_rel_pos_index(q_w, k_w)
        # the (query token, key token) pairs of the spatial grid, row-major, and their table rows
        rows_h = torch.empty(q_h * q_w, k_h * k_w, dtype=torch.long)
        rows_w = torch.empty(q_h * q_w, k_h * k_w, dtype=torch.long)
        for i in range(q_h * q_w):
            a, b = divmod(i, q_w)
            for j in range(k_h * k_w):
                c, e = divmod(j, k_w)
                rows_h[i, j] = ih[a, c]
                rows_w[i, j] = iw[b, e]
        table = rel_pos_h[rows_h] + rel_pos_w[rows_w]  # (Nq_sp, Nk_sp, D)
        r_sp = torch.einsum("bhid,ijd->bhij", q[:, :, sp:], table)  # q unscaled
        R = scores.new_zeros(B, Hh, Nq, Nk)
        R = torch.cat([R[:, :, :sp], torch.cat([R[:, :, sp:, :sp], r_sp], dim=-1)], dim=2)
        scores = scores + R
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if residual:
        out = out + q
    return _merge_heads(out)
