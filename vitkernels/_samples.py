"""Small sample arguments for each public op (positional, in SPEC order): API tests, info and the self-check.

`samples()` has one argument set per op (optional features at their defaults where SPEC adds them
later, so every consumer keeps running the op's main path); `variant_samples()` adds argument sets
that switch those options on (window_attention's shift_first and logit_scale), for the API tests."""
import torch


def samples(dtype=torch.float32, device="cpu", requires_grad=False, batch=2):
    g = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)

    b, heads, d = batch, 2, 8
    c = heads * d
    return {
        "attention": (t(b, heads, 5, d), t(b, heads, 7, d), t(b, heads, 7, d), t(heads, 5, 7), None),
        "self_attention": (t(b, 9, 3 * c), heads, None),
        "window_attention": (t(b, 5 * 7, 3 * c), [5, 7], heads, 3, 1, t(25, heads), t(3 * c), None),
        "sr_attention": (t(b, 20, c), t(b, 4, 2 * c), heads, None),
        "xca": (t(b, 9, 3 * c), heads, t(heads, 1, 1)),
        "space_time_attention": (t(b, 4 * 3, 3 * c), 3, heads, "space", t(b, 3 * c), "ts", None),
        "dwconv": (t(b, 4 * 5, c), [4, 5], t(c, 1, 3, 3), t(c), "gelu"),
        "mix_ffn": (t(b, 4 * 5, c), [4, 5], t(2 * c, c), t(2 * c), t(2 * c, 1, 3, 3), t(2 * c), t(c, 2 * c), t(c), True),
    }


def variant_samples(dtype=torch.float32, device="cpu", requires_grad=False, batch=2):
    """{op: {label: args}}: argument sets exercising the optional features `samples()` leaves off.
    window_attention: timm's shift-then-pad order and Swin V2 cosine attention (a logit scale per
    head, one of them past the ln 100 clamp) on a map that needs padding (5×7, window 3, shift 1)."""
    g = torch.Generator().manual_seed(2)

    def t(*shape, scale=1.0, offset=0.0):
        x = torch.randn(*shape, generator=g, dtype=dtype) * scale + offset
        return x.to(device).requires_grad_(requires_grad)

    b, heads, d = batch, 2, 8
    c = heads * d
    ls = torch.tensor([2.3, 4.9], dtype=dtype)  # ln 10 (Swin V2's init) and a clamped head
    return {
        "window_attention": {
            "shift_first+logit_scale": (t(b, 5 * 7, 3 * c), [5, 7], heads, 3, 1, t(25, heads), t(3 * c), None,
                                        ls.reshape(heads, 1, 1).to(device).requires_grad_(requires_grad), True),
            "logit_scale": (t(b, 5 * 7, 3 * c), [5, 7], heads, 3, 1, None, t(3 * c), 0.5,
                            t(heads, scale=0.3, offset=2.3), False),
            "shift_first": (t(b, 4 * 5, 3 * c), [4, 5], heads, 3, 2, t(25, heads), None, None, None, True),
        },
    }
