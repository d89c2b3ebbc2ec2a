import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32 (the ops accumulate in float32); float32/64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def up(t, dtype):
    return None if t is None else t.to(dtype)
