"""XCiT cross-covariance attention: attention over channels (D×D per head) instead of tokens."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._util import compute_dtype


def xca(qkv: Tensor, num_heads: int, temperature: Tensor) -> Tensor:
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    ct = compute_dtype(qkv.dtype)
    # (3, B, heads, D, N): each head's q, k, v as D×N matrices.
    q, k, v = qkv.to(ct).reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 4, 1).unbind(0)
    q = F.normalize(q, dim=-1, eps=1e-12)  # q / max(||q||_2 over N, 1e-12)
    k = F.normalize(k, dim=-1, eps=1e-12)
    attn = torch.matmul(q, k.transpose(-1, -2)) * temperature.to(ct).reshape(num_heads, 1, 1)
    out = torch.matmul(attn.softmax(dim=-1), v)  # (B, heads, D, N)
    return out.permute(0, 3, 1, 2).reshape(b, n, c).to(qkv.dtype)
