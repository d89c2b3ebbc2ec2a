"""The eight public ops. Importing this package registers every `torch.ops.vitkernels.*` op."""
from .attention import attention
from .dwconv import dwconv
from .mix_ffn import mix_ffn
from .self_attention import self_attention
from .space_time_attention import space_time_attention
from .sr_attention import sr_attention
from .window_attention import window_attention
from .xca import xca

__all__ = ["attention", "self_attention", "window_attention", "sr_attention", "xca", "space_time_attention",
           "dwconv", "mix_ffn"]
