"""The `vitkernels` torch library: every public op's schema is defined here, in one place.

Public ops are CompositeImplicitAutograd: they validate their arguments (clear errors, also under
torch.compile tracing) and call a private `_<op>_fwd` custom op, whose extra outputs (the softmax
logsumexp of the attention ops) are saved for the private `_<op>_bwd` custom op. The private ops carry
the fake kernels and the autograd formula; their kernels pick a backend at run time.
"""
import torch

lib = torch.library.Library("vitkernels", "FRAGMENT")

SCHEMAS = {
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None, float? scale=None) -> Tensor",
    "self_attention": "self_attention(Tensor qkv, int num_heads, float? scale=None) -> Tensor",
    "window_attention": (
        "window_attention(Tensor qkv, int[2] hw, int num_heads, int window_size, int shift_size=0, "
        "Tensor? rel_pos_bias_table=None, Tensor? qkv_bias=None, float? scale=None, Tensor? logit_scale=None, "
        "bool shift_first=False) -> Tensor"),
    "sr_attention": "sr_attention(Tensor q, Tensor kv, int num_heads, float? scale=None) -> Tensor",
    "xca": "xca(Tensor qkv, int num_heads, Tensor temperature) -> Tensor",
    "space_time_attention": (
        "space_time_attention(Tensor qkv, int frames, int num_heads, str axis, Tensor? cls_qkv=None, "
        "str layout=\"st\", float? scale=None) -> (Tensor, Tensor)"),
    "dwconv": "dwconv(Tensor x, int[2] hw, Tensor weight, Tensor? bias=None, str? activation=None) -> Tensor",
    "mix_ffn": (
        "mix_ffn(Tensor x, int[2] hw, Tensor fc1_weight, Tensor? fc1_bias, Tensor dw_weight, Tensor? dw_bias, "
        "Tensor fc2_weight, Tensor? fc2_bias, bool extra_relu=False) -> Tensor"),
}

for _schema in SCHEMAS.values():
    lib.define(_schema)


def composite(name):
    """Decorator: register the public op's CompositeImplicitAutograd implementation."""
    def register(fn):
        lib.impl(name, fn, "CompositeImplicitAutograd")
        return fn
    return register
