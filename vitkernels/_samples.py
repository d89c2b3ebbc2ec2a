"""Small sample arguments for each public op (positional, in SPEC order): API tests, info and the self-check."""
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
