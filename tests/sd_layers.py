"""Eager layers that read their parameters from a state dict by prefix, for the tests that rebuild a
model's forward from its checkpoint keys (`sd[prefix + ".weight"]`, `sd[prefix + ".bias"]`)."""
import torch.nn.functional as F


def layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def linear(x, sd, prefix):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def mlp(x, sd, prefix):
    """fc1 → exact GELU → fc2 (timm Mlp)."""
    return linear(F.gelu(linear(x, sd, prefix + ".fc1")), sd, prefix + ".fc2")
