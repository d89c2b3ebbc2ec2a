"""Small sample arguments for each public op (positional, in SPEC order): API tests, info and the self-check.

The argument sets themselves live in each op's spec (`OpSpec.samples`, `OpSpec.variants`, in
ops/<op>.py); this module draws them. `samples()` has one argument set per op (optional features at
their defaults where SPEC adds them later, so every consumer keeps running the op's main path);
`variant_samples()` adds argument sets that switch those options on (window_attention's shift_first
and logit_scale), for the API tests."""

import torch


class Sampler:
    """Draws an op's sample tensors: `s(*shape)` is seeded randn in one dtype on one device,
    optionally requiring grad (`scale` / `offset` shift it); `s.const(values, shape)` a fixed tensor.
    Sizes: batch `s.b`, `s.heads` = 2 heads of `s.d` = 8 channels, `s.c` = 16 channels."""

    heads, d = 2, 8
    c = heads * d

    def __init__(self, seed: int, dtype=torch.float32, device="cpu", requires_grad=False, batch=2):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype, self.device, self.requires_grad, self.b = dtype, device, requires_grad, batch

    def __call__(self, *shape, scale=1.0, offset=0.0):
        x = torch.randn(*shape, generator=self.g, dtype=self.dtype)
        if scale != 1.0 or offset != 0.0:
            x = x * scale + offset
        return x.to(self.device).requires_grad_(self.requires_grad)

    def const(self, values, shape=None):
        x = torch.tensor(values, dtype=self.dtype)
        if shape is not None:
            x = x.reshape(shape)
        return x.to(self.device).requires_grad_(self.requires_grad)


def _specs():
    from .ops import _spec

    return _spec.specs()


def samples(dtype=torch.float32, device="cpu", requires_grad=False, batch=2):
    """{op: args}: every op's sample arguments, drawn in SPEC order from one seeded generator."""
    s = Sampler(1, dtype, device, requires_grad, batch)
    return {spec.name: spec.samples(s) for spec in _specs()}


def variant_samples(dtype=torch.float32, device="cpu", requires_grad=False, batch=2):
    """{op: {label: args}}: argument sets exercising the optional features `samples()` leaves off
    (ops whose spec has `variants`). window_attention: timm's shift-then-pad order and Swin V2 cosine
    attention (a logit scale per head, one of them past the ln 100 clamp) on a map that needs padding
    (5×7, window 3, shift 1)."""
    s = Sampler(2, dtype, device, requires_grad, batch)
    return {spec.name: {label: make(s) for label, make in spec.variants.items()} for spec in _specs() if spec.variants}
