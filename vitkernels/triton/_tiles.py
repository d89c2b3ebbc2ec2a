"""@triton.jit helpers shared by the Triton kernel files (vitkernels/triton/<op>.py).

Tiles: 1-D and 2-D loads and stores whose masks are compile-time choices (MASK_* constexprs: an
unmasked full tile costs no predicate), and the (rows, columns) tile of a row-major view with a unit
column stride. Programs: the (b·h, query block) position of a 1-D grid. Softmax: the output
accumulator's step and the natural-log logsumexp of the base-2 online softmax, and the logsumexp's
reload (in base 2) by the backward kernels.

Addressing convention: a kernel computes a scalar base pointer in int64 for a tile's origin (batch,
head, first row) and addresses the tile with small int32 offsets (row · stride + column); streamed
tiles advance the scalar base (no 2-D pointer tensor or int64 vector carried through a loop).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "accumulate_pv",
    "block_offsets",
    "load_1d",
    "load_2d",
    "load_lse2",
    "load_tile",
    "logsumexp",
    "query_block",
    "store_1d",
    "store_2d",
    "store_tile",
]


@triton.jit
def load_2d(ptrs, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Load a 2-D tile; r_ok / c_ok are 1-D validity vectors used only when MASK_* is set."""
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=r_ok[:, None], other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=c_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_2d(ptrs, x, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    if MASK_R:
        if MASK_C:
            tl.store(ptrs, x, mask=r_ok[:, None] & c_ok[None, :])
        else:
            tl.store(ptrs, x, mask=r_ok[:, None])
    else:
        if MASK_C:
            tl.store(ptrs, x, mask=c_ok[None, :])
        else:
            tl.store(ptrs, x)


@triton.jit
def load_1d(ptrs, ok, other, MASK: tl.constexpr):
    if MASK:
        x = tl.load(ptrs, mask=ok, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def store_1d(ptrs, x, ok, MASK: tl.constexpr):
    if MASK:
        tl.store(ptrs, x, mask=ok)
    else:
        tl.store(ptrs, x)


@triton.jit
def load_tile(base, stride_r, offs_r, offs_c, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """The (rows, columns) tile at base + offs_r·stride_r + offs_c (unit column stride); 0 where masked."""
    return load_2d(base + offs_r[:, None] * stride_r + offs_c[None, :], r_ok, c_ok, MASK_R, MASK_C)


@triton.jit
def store_tile(base, stride_r, offs_r, offs_c, x, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Store x, converted to base's element type, as the tile ``load_tile`` reads."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :]
    store_2d(ptrs, x.to(base.dtype.element_ty), r_ok, c_ok, MASK_R, MASK_C)


@triton.jit
def block_offsets(start, n, BLOCK: tl.constexpr):
    """(offs, ok): the BLOCK offsets of a block and which of start + offs lie below n."""
    offs = tl.arange(0, BLOCK)
    return offs, start + offs < n


@triton.jit
def query_block(H, N, BLOCK_M: tl.constexpr):
    """(bh, b, h, start_m) of this program: pid = bh·⌈N / BLOCK_M⌉ + query block on a 1-D grid, bh =
    b·H + h; b and h in int64."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), start_m


@triton.jit
def accumulate_pv(acc, alpha, p, v, PRECISION: tl.constexpr):
    """The online softmax's output accumulator after a key block: acc rescaled by alpha (per row), plus
    P V with P in v's dtype (fp32 accumulation)."""
    acc = acc * alpha[:, None]
    return tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)


@triton.jit
def logsumexp(m_i, l_i):
    """Natural-log logsumexp of rows from the base-2 online softmax's running max m_i and sum l_i."""
    return (m_i + tl.math.log2(l_i)) * 0.6931471805599453


@triton.jit
def load_lse2(ptrs, ok, MASK: tl.constexpr):
    """Saved logsumexp rows in base 2 (× log2 e); rows not ok read +inf, so their P = exp2(s − lse2) = 0."""
    return load_1d(ptrs, ok, float("inf"), MASK) * 1.4426950408889634
