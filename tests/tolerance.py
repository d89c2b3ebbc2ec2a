"""The pass rule of every kernel test (the one flash-attention and PyTorch's SDPA tests use):

    error(fused) <= 2 * error(eager composition in the same precision) + floor

where error = max |x - oracle| and the oracle is the float64 reference on CPU.
"""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.detach().double().cpu() - oracle.detach().double().cpu()).abs().max().item()


def assert_within(name: str, fused, eager, oracle, dtype, factor: float = 2.0):
    assert fused.shape == oracle.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    e_fused, e_eager = max_err(fused, oracle), max_err(eager, oracle)
    bound = factor * e_eager + FLOOR[dtype] * max(1.0, oracle.abs().max().item())
    assert e_fused <= bound, f"{name}: error {e_fused:.3e} > {factor} x eager error {e_eager:.3e} + floor ({bound:.3e})"
