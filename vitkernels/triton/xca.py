"""Triton kernels for ``vitkernels.xca`` (XCiT cross-covariance attention), forward and backward.

Math, per (batch b, head h), q, k, v the head's (N, D) slices of the packed qkv, τ = temperature[h]:

    G = qᵀ k (D × D, over the N tokens),  r_q = max(‖q_i‖₂, 1e-12), r_k likewise (per channel)
    A = softmax_rows(τ G / (r_q r_kᵀ)),   out = v Aᵀ
    backward, dĜ = τ dS: dA = dOᵀ v, dS = A ∘ (dA − rowsum(dA ∘ A)), dτ = Σ dS ∘ Ĝ, dv = dO A,
    dq = (k (dĜ / r_kᵀ)ᵀ − q·c/r_q) / r_q, dk = (q (dĜ / r_q) − k·e/r_k) / r_k
    with c_i = Σ_j dĜ_ij Ĝ_ij, e_j = Σ_i dĜ_ij Ĝ_ij (0 where the norm is clamped)

Layout: qkv (B, N, 3C) token layout with a unit last stride, any batch / token strides; out and
dqkv contiguous. Two passes over the tokens per (b·head, chunk of ``rows`` tokens): a stats pass
(G, norms; backward also dA) and an apply pass; one kernel does both when a head is one chunk
(ONE_PASS), else fp32 chunk partials are summed in a fixed order (deterministic). D ≤ 64.
Design notes, cost and versions: docs/xca.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch as launch
from ._launch import occupancy, sm_count, use_fixed  # module globals: tests patch them here
from ._tiles import block_offsets, load_tile, store_tile
from .sr_attention import _program_rows

MAX_HEAD_DIM = 64
# Test hooks: tokens per program (None = sized for the GPU) and the interpreter's token block.
ROWS_PER_PROGRAM = None
INTERPRET_BLOCK_N = 16
# Programs per SM assumed where the compiled kernel's occupancy is not used (VITKERNELS_GRID=fixed).
FIXED_PROGRAMS_PER_SM = 2


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(base, offs_n, n_ok, stride_n, offs_d, d_ok, MASK_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of token rows, zero past the chunk and past D."""
    return load_tile(base, stride_n, offs_n, offs_d, n_ok, d_ok, True, MASK_D)


@triton.jit
def _head_rows(X, b, h, n0, stride_b, stride_n, HEAD_DIM: tl.constexpr):
    """Head h's first channel in token row n0 of image b of a token-layout (B, N, ·) tensor (int64 offsets)."""
    return X + b * stride_b + n0.to(tl.int64) * stride_n + h * HEAD_DIM


@triton.jit
def _stats(
    base,
    do_base,
    C,
    n0,
    n1,
    stride_n,
    stride_don,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WITH_DA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(G = qᵀk, ‖q‖², ‖k‖², dA = dOᵀv) summed over tokens [n0, n1) of one head, fp32: base points at the
    head's q in token row n0 of qkv (k C, v 2C after it), do_base at its dO."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    g = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    da = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    sk = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(n0, n1, BLOCK_N):
        n_ok = start + offs_n < n1
        q = _tile(base, offs_n, n_ok, stride_n, offs_d, d_ok, MASK_D)
        k = _tile(base + C, offs_n, n_ok, stride_n, offs_d, d_ok, MASK_D)
        g = tl.dot(tl.trans(q), k, g, input_precision=PRECISION)
        qf, kf = q.to(tl.float32), k.to(tl.float32)
        sq += tl.sum(qf * qf, 0)
        sk += tl.sum(kf * kf, 0)
        if WITH_DA:
            v = _tile(base + 2 * C, offs_n, n_ok, stride_n, offs_d, d_ok, MASK_D)
            do = _tile(do_base, offs_n, n_ok, stride_don, offs_d, d_ok, MASK_D)
            da = tl.dot(tl.trans(do), v, da, input_precision=PRECISION)
        base += BLOCK_N * stride_n
        do_base += BLOCK_N * stride_don
    return g, sq, sk, da


@triton.jit
def _store_stats(Part, pid, g, sq, sk, da, BLOCK_D: tl.constexpr, WITH_DA: tl.constexpr):
    """One program's partial sums, a contiguous fp32 slot: G, [dA,] ‖q‖², ‖k‖² (BLOCK_D-padded)."""
    sq_at: tl.constexpr = (2 if WITH_DA else 1) * BLOCK_D * BLOCK_D
    slot_size: tl.constexpr = sq_at + 2 * BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    square = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    slot = Part + pid.to(tl.int64) * slot_size
    tl.store(slot + square, g)
    if WITH_DA:
        tl.store(slot + BLOCK_D * BLOCK_D + square, da)
    tl.store(slot + sq_at + offs_d, sq)
    tl.store(slot + sq_at + BLOCK_D + offs_d, sk)


@triton.jit
def _sum_stats(Part, bh, chunks, BLOCK_D: tl.constexpr, WITH_DA: tl.constexpr):
    """The partial sums of head bh's ``chunks`` programs, added in chunk order (deterministic)."""
    sq_at: tl.constexpr = (2 if WITH_DA else 1) * BLOCK_D * BLOCK_D
    slot_size: tl.constexpr = sq_at + 2 * BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    square = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    g = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    da = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    sk = tl.zeros([BLOCK_D], dtype=tl.float32)
    slot = Part + (bh * chunks).to(tl.int64) * slot_size
    for _chunk in range(0, chunks):
        g += tl.load(slot + square)
        if WITH_DA:
            da += tl.load(slot + BLOCK_D * BLOCK_D + square)
        sq += tl.load(slot + sq_at + offs_d)
        sk += tl.load(slot + sq_at + BLOCK_D + offs_d)
        slot += slot_size
    return g, sq, sk, da


@triton.jit
def _attention_map(g, sq, sk, tau, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(A, Ĝ, r_q, r_k): the row softmax of τ·Ĝ with padded key channels j ≥ D excluded."""
    j_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    rq = tl.maximum(tl.sqrt(sq), 1e-12)
    rk = tl.maximum(tl.sqrt(sk), 1e-12)
    gh = g / rq[:, None] / rk[None, :]
    s = tl.where(j_ok[None, :], gh * tau, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    return p / tl.sum(p, 1)[:, None], gh, rq, rk


@triton.jit(do_not_specialize=["rows"])  # one compile whatever chunk size the grid takes
def _xca_stats_kernel(
    QKV,
    DO,
    Part,
    stride_b,
    stride_n,
    stride_dob,
    stride_don,
    H,
    N,
    C,
    rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WITH_DA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One chunk's partial sums of a head split over several programs (``_store_stats``)."""
    bh, b, h, n0, n1 = _program_rows(H, N, rows)
    base = _head_rows(QKV, b, h, n0, stride_b, stride_n, HEAD_DIM)
    do_base = _head_rows(DO, b, h, n0, stride_dob, stride_don, HEAD_DIM)
    g, sq, sk, da = _stats(
        base, do_base, C, n0, n1, stride_n, stride_don, HEAD_DIM, BLOCK_D, BLOCK_N, WITH_DA, PRECISION
    )
    _store_stats(Part, tl.program_id(0), g, sq, sk, da, BLOCK_D, WITH_DA)


@triton.jit(do_not_specialize=["rows"])
def _xca_fwd_kernel(
    QKV,
    Temp,
    Out,
    Part,
    stride_b,
    stride_n,
    stride_ob,
    stride_on,
    H,
    N,
    C,
    rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out = v Aᵀ of a chunk of tokens, A from the head's stats: this program's own (ONE_PASS: the head is one
    chunk) or the stats kernel's partials."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    bh, b, h, n0, n1 = _program_rows(H, N, rows)
    if ONE_PASS:
        base = _head_rows(QKV, b, h, n0, stride_b, stride_n, HEAD_DIM)
        g, sq, sk, _ = _stats(base, base, C, n0, n1, stride_n, 0, HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION)
    else:
        g, sq, sk, _ = _sum_stats(Part, bh, tl.cdiv(N, rows), BLOCK_D, False)
    a, _, _, _ = _attention_map(g, sq, sk, tl.load(Temp + h).to(tl.float32), HEAD_DIM, BLOCK_D)
    at = tl.trans(a)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    v_base = QKV + b * stride_b + n0.to(tl.int64) * stride_n + 2 * C + h * HEAD_DIM  # the head's v
    o_base = _head_rows(Out, b, h, n0, stride_ob, stride_on, HEAD_DIM)
    for start in range(n0, n1, BLOCK_N):
        n_ok = start + offs_n < n1
        v = _tile(v_base, offs_n, n_ok, stride_n, offs_d, d_ok, MASK_D).to(tl.float32)
        out = tl.dot(v, at, input_precision=PRECISION)
        store_tile(o_base, stride_on, offs_n, offs_d, out, n_ok, d_ok, True, MASK_D)
        v_base += BLOCK_N * stride_n
        o_base += BLOCK_N * stride_on


@triton.jit(do_not_specialize=["rows"])
def _xca_bwd_kernel(
    QKV,
    DO,
    Temp,
    DQKV,
    DTemp,
    Part,
    stride_b,
    stride_n,
    stride_dob,
    stride_don,
    stride_gb,
    stride_gn,
    H,
    N,
    C,
    rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq, dk, dv of a chunk of tokens and, from its first chunk, dτ of (b, h); the head's stats as in
    ``_xca_fwd_kernel``, with dA."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    bh, b, h, n0, n1 = _program_rows(H, N, rows)
    if ONE_PASS:
        base = _head_rows(QKV, b, h, n0, stride_b, stride_n, HEAD_DIM)
        do_base = _head_rows(DO, b, h, n0, stride_dob, stride_don, HEAD_DIM)
        g, sq, sk, da = _stats(
            base, do_base, C, n0, n1, stride_n, stride_don, HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION
        )
    else:
        g, sq, sk, da = _sum_stats(Part, bh, tl.cdiv(N, rows), BLOCK_D, True)
    tau = tl.load(Temp + h).to(tl.float32)
    a, gh, rq, rk = _attention_map(g, sq, sk, tau, HEAD_DIM, BLOCK_D)
    ds = a * (da - tl.sum(da * a, 1)[:, None])
    if n0 == 0:  # one program per head writes dτ of (b, h); the launcher sums over b
        tl.store(DTemp + bh, tl.sum(tl.sum(ds * gh, 1), 0))
    dgh = ds * tau
    dgg = dgh * gh
    c = tl.where(tl.sqrt(sq) > 1e-12, tl.sum(dgg, 1), 0.0)  # ⟨dq̂_i, q̂_i⟩ (0 where the norm is clamped)
    e = tl.where(tl.sqrt(sk) > 1e-12, tl.sum(dgg, 0), 0.0)  # ⟨dk̂_j, k̂_j⟩
    dgh_t = tl.trans(dgh)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_ok = block_offsets(0, HEAD_DIM, BLOCK_D)
    # The chunk's rows addressed here, after the stats (not kept live through them).
    base = _head_rows(QKV, b, h, n0, stride_b, stride_n, HEAD_DIM)
    do_base = _head_rows(DO, b, h, n0, stride_dob, stride_don, HEAD_DIM)
    g_base = _head_rows(DQKV, b, h, n0, stride_gb, stride_gn, HEAD_DIM)
    for start in range(n0, n1, BLOCK_N):
        n_ok = start + offs_n < n1
        qh = _tile(base, offs_n, n_ok, stride_n, offs_d, d_ok, MASK_D).to(tl.float32) / rq[None, :]
        kh = _tile(base + C, offs_n, n_ok, stride_n, offs_d, d_ok, MASK_D).to(tl.float32) / rk[None, :]
        do = _tile(do_base, offs_n, n_ok, stride_don, offs_d, d_ok, MASK_D).to(tl.float32)
        # dq = (dq̂ − q̂·c) / r_q with dq̂ = k̂ dĜᵀ; dk likewise with dk̂ = q̂ dĜ.
        dq = (tl.dot(kh, dgh_t, input_precision=PRECISION) - qh * c[None, :]) / rq[None, :]
        dk = (tl.dot(qh, dgh, input_precision=PRECISION) - kh * e[None, :]) / rk[None, :]
        dv = tl.dot(do, a, input_precision=PRECISION)
        store_tile(g_base, stride_gn, offs_n, offs_d, dq, n_ok, d_ok, True, MASK_D)
        store_tile(g_base + C, stride_gn, offs_n, offs_d, dk, n_ok, d_ok, True, MASK_D)
        store_tile(g_base + 2 * C, stride_gn, offs_n, offs_d, dv, n_ok, d_ok, True, MASK_D)
        base += BLOCK_N * stride_n
        do_base += BLOCK_N * stride_don
        g_base += BLOCK_N * stride_gn


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------


# Configs kept from an offline sm_90a compile (tests/triton/triton_sm90.py) at XCiT-S12's shape: none
# spills with bf16/fp16 inputs. The backward holds ~4 D×D fp32 tiles besides its token tiles, so
# 4 warps only fit small token blocks. fp32 inputs take their own, smaller tiles.
_CONFIGS = {  # per family: (stats, forward apply, backward apply); (BLOCK_N, num_warps, num_stages)
    "half": (
        launch.configs(["BLOCK_N"], [(64, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 2)]),
        launch.configs(["BLOCK_N"], [(64, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 2)]),
        launch.configs(["BLOCK_N"], [(64, 8, 2), (32, 8, 2), (16, 4, 2), (64, 8, 1)]),
    ),
    "fp32": (
        launch.configs(["BLOCK_N"], [(64, 8, 2), (32, 4, 2), (32, 8, 2)]),
        launch.configs(["BLOCK_N"], [(64, 8, 2), (32, 4, 2)]),
        launch.configs(["BLOCK_N"], [(32, 8, 2), (16, 8, 2), (16, 4, 2)]),
    ),
}
_KEY = ["N", "BLOCK_D", "ONE_PASS", "PRECISION"]
_INTERPRETED = launch.is_interpreted(_xca_fwd_kernel)
_TUNED = launch.tuned_table(
    _CONFIGS,
    [
        (_xca_stats_kernel, dict(key=["N", "BLOCK_D", "WITH_DA", "PRECISION"])),
        (_xca_fwd_kernel, dict(key=_KEY)),
        (_xca_bwd_kernel, dict(key=_KEY)),
    ],
)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def supports(head_dim: int) -> bool:
    return 1 <= head_dim <= MAX_HEAD_DIM


def _rows_per_program(n: int, bh: int, device, fixed: bool, resident: int | None = None) -> int:
    """Tokens per program: all of them when b·heads alone fills the resident programs, else chunks of
    ≥ 128 tokens. On a GPU with ``resident`` programs of the apply kernel per SM (``occupancy``):
    ⌊resident·SMs / (b·heads)⌋ chunks per head (one wave); without (VITKERNELS_GRID=fixed, no compiled
    kernel): ⌈2·SMs / (b·heads)⌉, the old assumption. The interpreter takes one chunk; tests set
    ROWS_PER_PROGRAM for the split path."""
    if ROWS_PER_PROGRAM is not None:
        return max(1, int(ROWS_PER_PROGRAM))
    if fixed:
        return max(n, 1)
    if resident is None:
        per_head = launch.cdiv(FIXED_PROGRAMS_PER_SM * sm_count(device), max(bh, 1))
    else:
        per_head = resident * sm_count(device) // max(bh, 1)
    chunks = max(1, min(per_head, launch.cdiv(n, 128)))
    return launch.cdiv(n, chunks)


def _geometry(qkv, num_heads):
    """(B, N, C, D, BLOCK_D) of a call after the checks."""
    B, N, c3 = qkv.shape
    C = c3 // 3
    D = C // num_heads
    if not supports(D):
        raise ValueError(f"xca Triton kernel: head dim {D} is not supported (1 ≤ D ≤ {MAX_HEAD_DIM})")
    if qkv.stride(-1) != 1:
        raise ValueError("xca Triton kernel: qkv's last dim must be contiguous")
    return B, N, C, D, launch.pow2_at_least(D)


class _Plan:
    """Grid, chunking and config of one call (shared by forward and backward)."""

    def __init__(self, qkv, num_heads, geometry, index, apply_args):
        """``index``, ``apply_args``: the apply kernel of the call (1 forward, 2 backward) and its
        tensors and strides, the stats partials a stand-in: its occupancy sizes the grid of both
        kernels (read once per call signature, at the variant the fallback's chunking selects)."""
        self.B, self.N, self.C, self.D, self.block_d = geometry
        self.num_heads, self.device, self.dtype = num_heads, qkv.device, qkv.dtype
        self.fixed = use_fixed(qkv, _INTERPRETED, "xca")
        bh = self.B * num_heads
        mode = launch.grid_mode()
        self.rows = _rows_per_program(self.N, bh, qkv.device, self.fixed)
        if not self.fixed and mode == "auto" and ROWS_PER_PROGRAM is None:
            tuned = _TUNED[launch.family(self.dtype)][index]
            one_pass = launch.cdiv(self.N, self.rows) == 1
            resident = occupancy(tuned, (*apply_args, *self._ints()), self._meta(ONE_PASS=one_pass), qkv.device)
            if resident is not None:
                self.rows = _rows_per_program(self.N, bh, qkv.device, False, resident)
        self.chunks = launch.cdiv(self.N, self.rows)
        self.programs = bh * self.chunks
        self.one_pass = self.chunks == 1

    def _ints(self):
        return (self.num_heads, self.N, self.C, self.rows)

    def _meta(self, **flags):
        return dict(HEAD_DIM=self.D, BLOCK_D=self.block_d, PRECISION=launch.precision(self.dtype), **flags)

    def run(self, index, kernel, args, **flags):
        """Kernel ``index`` of the tuned table (``kernel`` under the interpreter) over the plan's programs: its
        tensors and token-layout strides ``args``, then (heads, N, C, rows) and the constexprs."""
        launch.pick(self.fixed, kernel, _TUNED, self.dtype, index)[(self.programs,)](
            *args,
            *self._ints(),
            **self._meta(**flags),
            **launch.fixed_meta(self.fixed, BLOCK_N=INTERPRET_BLOCK_N),
        )

    def stats(self, qkv, dout):
        """The stats kernel's partials of a head split over several programs (with dA when dout is given)."""
        if self.one_pass:  # the fused kernel reduces in registers: a placeholder pointer
            return torch.empty(1, device=self.device, dtype=torch.float32)
        with_da = dout is not None
        slot = (2 if with_da else 1) * self.block_d * self.block_d + 2 * self.block_d
        part = torch.empty((self.programs, slot), device=self.device, dtype=torch.float32)
        src = dout if with_da else qkv
        self.run(0, _xca_stats_kernel, (qkv, src, part, *launch.strides(qkv, src)), WITH_DA=with_da)
        return part


def xca_forward(qkv, num_heads, temperature):
    """out (B, N, C) of XCiT's cross-covariance attention (SPEC op 5) in qkv's dtype.

    qkv (B, N, 3C) with a unit last stride (any batch / token strides); temperature of
    ``num_heads`` elements."""
    geometry = _geometry(qkv, num_heads)
    B, N, C = geometry[:3]
    tau = temperature.reshape(num_heads).contiguous()
    out = torch.empty((B, N, C), device=qkv.device, dtype=qkv.dtype)
    if out.numel() == 0:
        return out
    with launch.device_ctx(qkv):
        stand_in = torch.empty(1, device=qkv.device, dtype=torch.float32)
        plan = _Plan(qkv, num_heads, geometry, 1, (qkv, tau, out, stand_in, *launch.strides(qkv, out)))
        part = plan.stats(qkv, None)
        plan.run(1, _xca_fwd_kernel, (qkv, tau, out, part, *launch.strides(qkv, out)), ONE_PASS=plan.one_pass)
    return out


def xca_backward(dout, qkv, num_heads, temperature):
    """(dqkv (B, N, 3C) in qkv's dtype, dtemperature shaped and typed like ``temperature``).

    Deterministic: chunk partials and the per-batch dτ are summed in a fixed order."""
    geometry = _geometry(qkv, num_heads)
    B, N, C = geometry[:3]
    tau = temperature.reshape(num_heads).contiguous()
    dqkv = torch.empty((B, N, 3 * C), device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return dqkv.zero_(), torch.zeros_like(temperature)
    dout = launch.unit_last(dout.to(qkv.dtype))
    with launch.device_ctx(qkv):
        dtau = torch.empty((B, num_heads), device=qkv.device, dtype=torch.float32)
        stand_in = torch.empty(1, device=qkv.device, dtype=torch.float32)
        apply_args = (qkv, dout, tau, dqkv, dtau, stand_in, *launch.strides(qkv, dout, dqkv))
        plan = _Plan(qkv, num_heads, geometry, 2, apply_args)
        part = plan.stats(qkv, dout)
        args = (qkv, dout, tau, dqkv, dtau, part, *launch.strides(qkv, dout, dqkv))
        plan.run(2, _xca_bwd_kernel, args, ONE_PASS=plan.one_pass)
    return dqkv, dtau.sum(0).reshape(temperature.shape).to(temperature.dtype)
