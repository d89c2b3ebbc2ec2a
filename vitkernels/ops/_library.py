"""The `vitkernels` torch library: every public op's schema is defined here, from its OpSpec.

Each op's schema lives in its spec (`SPEC` in ops/<op>.py); `ops/_spec.define` passes it to `define`
below before the op file registers anything else, and `SCHEMAS` collects them ({name: schema}).

Public ops are CompositeImplicitAutograd: they validate their arguments (clear errors, also under
torch.compile tracing) and call a private `_<op>_fwd` custom op, whose extra outputs (the softmax
logsumexp of the attention ops) are saved for the private `_<op>_bwd` custom op. The private ops carry
the fake kernels and the autograd formula; their kernels pick a backend at run time.
"""

import torch

lib = torch.library.Library("vitkernels", "FRAGMENT")

SCHEMAS: dict = {}


def define(name: str, schema: str) -> None:
    """Define the public op `name` (called by ops/_spec.define with the op's spec)."""
    if not schema.startswith(f"{name}("):
        raise ValueError(f"the schema of {name} must start with '{name}(', got {schema!r}")
    lib.define(schema)
    SCHEMAS[name] = schema


def composite(name):
    """Decorator: register the public op's CompositeImplicitAutograd implementation."""

    def register(fn):
        lib.impl(name, fn, "CompositeImplicitAutograd")
        return fn

    return register
