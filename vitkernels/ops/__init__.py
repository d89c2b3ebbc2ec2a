"""The public ops. Importing this package registers every `torch.ops.vitkernels.*` op.

Each op module defines its spec (`SPEC`, ops/_spec.py) and registers its schema, private ops and
backend kernels; the lines below import them. `__all__` lists the ops from their specs, in SPEC order.
"""

from . import _spec
from .attention import attention as attention
from .dwconv import dwconv as dwconv
from .mix_ffn import mix_ffn as mix_ffn
from .pool_attention import pool_attention as pool_attention
from .self_attention import self_attention as self_attention
from .space_time_attention import space_time_attention as space_time_attention
from .sr_attention import sr_attention as sr_attention
from .window_attention import window_attention as window_attention
from .xca import xca as xca

__all__ = _spec.names()
