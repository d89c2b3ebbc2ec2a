"""Hugging Face transformers: `vitkernels.patch_hf(model)` and the "vitkernels" attention backend.

`patch_hf(model)` swaps, in place, the attention (and conv-FFN) modules of transformers ViT, DeiT,
Swin, Swinv2, SegFormer, PVTv2, TimeSformer and ViViT models for fused ones, as `patch_timm` does for timm (the
machinery is shared, see `_patching.py`): a swapped module is the same object with the same parameters
(`state_dict()` keys unchanged); only its class becomes `Fused<Name>`, a subclass of the transformers
class that overrides `forward` and keeps the original as `_hf_forward`. The fused forwards call the
model's own q/k/v/output linears, norms and sequence-reduction modules (PEFT/LoRA wrappers keep
working) and feed the op the layout those produce, without permute/partition copies:

- ViT / DeiT / ViViT attention (5.x `*Attention` with q_proj/k_proj/v_proj/o_proj; 4.x `*SelfAttention`
  and `*SdpaSelfAttention` with query/key/value): `attention` on (B, heads, N, D) views of the three
  linears' outputs (no concatenation); the output is already in token layout for the output linear;
- Swin `SwinLayer`: one `window_attention` per block on [q|k|v] of the un-padded tokens (HF pads, then
  shifts: the op's default order; a padded token's q/k/v is the linears applied to a zero token);
- Swin V2 `Swinv2Layer`: the same, with cosine attention (`logit_scale`) and HF's continuous position bias
  (its own MLP, 16·sigmoid) as the table; a shifted layer whose logit scale is too large for transformers'
  doubled shift mask to be negligible keeps HF's forward (see `swinv2_tau_bound`);
- SegFormer attention and PVTv2 `PvtV2SelfAttention`: HF's own sequence reduction, then `sr_attention`
  (a stage without reduction: `attention` on views); Mix-FFN (`SegformerMixMLP` / 4.x `SegformerMixFFN`,
  `PvtV2ConvFeedForwardNetwork`, its ReLU variant too): `mix_ffn`, or, when the linears are wrapped (LoRA)
  or dropout is active, the model's own linears around the fused `dwconv` + GELU;
- TimeSformer: `TimesformerLayer` (divided space-time) runs `space_time_attention` twice (time, then
  space with the class token as `cls_qkv`) on HF's own token order (index s·T + t, layout "st");
  `TimesformerSelfAttention` (space_only / joint_space_time) runs `self_attention` on its packed qkv.

What is decided when (as in `patch_timm`): at patch time, a module whose configuration the op does not
cover keeps its class and the log (logger "vitkernels") says why; at run time, attention weights
(`output_attentions`, also from the config), a head mask (4.x), attention dropout while training or a
non-tensor (flex `BlockMask`) mask run the original forward with a `FusedFallbackWarning`, once per reason.

The attention backend: `register_attention()` (called on import of this module and by `patch_hf`)
registers "vitkernels" in transformers' `AttentionInterface` (and, with it, the boolean SDPA mask
builder under the same name in `AttentionMaskInterface`, so padding masks are built), so
`from_pretrained(..., attn_implementation="vitkernels")` or `model.set_attn_implementation("vitkernels")`
runs `vitkernels.attention` inside every model that goes through the registry. `import vitkernels`
alone does not register it (it never imports transformers).
"""

import inspect
import logging
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._patching import FusedFallbackWarning, FusedSpec, lazy_fused_classes, patch_modules, warn_fallback, warn_once
from .timm import attention, mix_ffn, self_attention, sr_attention, window_attention

# The Fused classes (FusedViTAttention, FusedSwinLayer, ...) are importable from here too; they need
# transformers, so `import *` skips them.
__all__ = ["patch_hf", "register_attention", "vitkernels_attention_forward", "FusedFallbackWarning"]

logger = logging.getLogger("vitkernels")

_ORIG = "_hf_"
_LIB = "transformers"
_M = "transformers.models."


# ----------------------------------------------------------------------------- ops, as the fused forwards call them
# Module attributes, so tests (and users) can wrap them; each calls the torch op directly. The typed wrappers
# patch_timm's forwards call too are imported from timm.py (above); these two only patch_hf's forwards use.


def space_time_attention(
    qkv: Tensor, frames: int, num_heads: int, axis: str, cls_qkv: Optional[Tensor], layout: str, scale: Optional[float]
) -> Tuple[Tensor, Tensor]:
    return torch.ops.vitkernels.space_time_attention(qkv, frames, num_heads, axis, cls_qkv, layout, scale)


def dwconv(x: Tensor, hw: List[int], weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    return torch.ops.vitkernels.dwconv(x, hw, weight, bias, activation)


# ----------------------------------------------------------------------------- the attention-interface backend

_LOGGED = set()


def _log_once(key: str, msg: str) -> None:
    if key not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add(key)
        logger.warning(msg)


def _repeat_heads(x: Tensor, n_rep: int) -> Tensor:
    """(B, kv_heads, N, D) -> (B, kv_heads·n_rep, N, D), each kv head repeated for its query group (GQA)."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def vitkernels_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    is_causal: Optional[bool] = None,
    position_bias: Optional[Tensor] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers attention function (the `AttentionInterface` signature) on `vitkernels.attention`.

    query (B, heads, Nq, D), key/value (B, kv_heads, Nk, D) -> ((B, Nq, heads, D), None), with SDPA's
    semantics as transformers' "sdpa" backend applies them: `attention_mask` None, boolean (True = take
    part) or additive float, broadcastable to (B, heads, Nq, Nk); `is_causal` (else `module.is_causal`,
    default True) only without a mask and for Nq > 1 (upper-left aligned; keys beyond Nq are dropped as
    sdpa does); `position_bias` combined with the mask as sdpa does; kv heads repeated for GQA.
    Attention dropout (dropout > 0) falls back to transformers' sdpa with a `FusedFallbackWarning` (once).
    No attention weights are returned (as with sdpa)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("vitkernels attention: `softcap` is not supported (use eager or flex_attention)")
    if kwargs.get("s_aux") is not None:
        raise ValueError("vitkernels attention: attention sinks (`s_aux`) are not supported (use eager)")
    if dropout > 0.0:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        warn_once(
            ("vitkernels_attention_forward", "dropout"),
            f"vitkernels: the 'vitkernels' attention backend runs transformers' sdpa for "
            f"{type(module).__name__}: attention dropout while training (the fused op has no dropout). "
            f"(Shown once per reason.)",
        )
        if position_bias is not None:
            kwargs["position_bias"] = position_bias
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if kwargs.get("output_attentions", False):
        _log_once(
            "output_attentions",
            "vitkernels: the 'vitkernels' attention backend returns no attention weights "
            "(as sdpa); use attn_implementation='eager' for output_attentions=True",
        )
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"vitkernels attention: attention_mask must be a tensor or None, got "
            f"{type(attention_mask).__name__} (a flex_attention BlockMask?)"
        )
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        if kv_heads == 0 or heads % kv_heads or value.shape[1] != kv_heads:
            raise ValueError(
                f"vitkernels attention: query has {heads} heads, key {key.shape[1]} and value "
                f"{value.shape[1]}: grouped-query attention needs key/value heads dividing the query "
                f"heads (query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)})"
            )
        key, value = _repeat_heads(key, heads // kv_heads), _repeat_heads(value, heads // kv_heads)
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and q_len > 1 and attention_mask is None
    if causal and key.shape[2] > q_len:  # what sdpa does for a prefill into an empty static cache
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    bias = attention_mask
    if causal:
        bias = torch.ones((q_len, key.shape[2]), dtype=torch.bool, device=query.device).tril()
    if position_bias is not None:
        low = max(torch.finfo(key.dtype).min, torch.finfo(position_bias.dtype).min)  # sdpa's fill value
        if bias is None:
            bias = position_bias
        elif bias.dtype == torch.bool:
            bias = torch.where(bias, position_bias, low)
        else:
            bias = position_bias + bias
    out = attention(query, key, value, bias, scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention(name: str = "vitkernels") -> None:
    """Register `vitkernels_attention_forward` as transformers attention implementation `name` (and SDPA's
    boolean mask builder for it, so models that build padding/causal masks get them). Then
    `from_pretrained(..., attn_implementation=name)` and `model.set_attn_implementation(name)` use it.
    Idempotent. Raises ImportError without a transformers that has `AttentionInterface` (>= 4.48)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, vitkernels_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds masks per model, from the sdpa/eager branches
        return
    AttentionMaskInterface.register(name, sdpa_mask)


# ----------------------------------------------------------------------------- helpers of the fused forwards


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, N, heads·D) -> (B, heads, N, D) view, no copy."""
    return x.unflatten(-1, (-1, head_dim)).transpose(-3, -2)


def _tokens(out: Tensor) -> Tensor:
    """(B, heads, N, D) -> (B, N, heads·D); a view when the op stored (B, N, heads, D), as its kernels do."""
    return out.transpose(-3, -2).flatten(-2)


def _wants_weights(module: nn.Module, output_attentions: Optional[bool]) -> bool:
    """output_attentions passed, else the config's (transformers 5 records weights from the module's output)."""
    if output_attentions is None:
        config = getattr(module, "config", None)
        output_attentions = getattr(config, "output_attentions", False) if config is not None else False
    return bool(output_attentions)


def _why_original(
    module: nn.Module, output_attentions: bool, dropout_p: float, head_mask=None, mask=None
) -> Optional[str]:
    """The run-time reason to run transformers' own forward, or None."""
    if output_attentions:
        return "attention weights requested (output_attentions)"
    if head_mask is not None:
        return "a head mask"
    if module.training and dropout_p > 0.0:
        return "attention dropout while training (the fused op has no dropout)"
    if mask is not None and not isinstance(mask, Tensor):
        return f"a {type(mask).__name__} attention mask (flex_attention)"
    return None


def _p(m: Optional[nn.Module]) -> float:
    return float(m.p) if isinstance(m, nn.Dropout) else 0.0


def _core(
    q: Tensor,
    k_in: Tensor,
    v_in: Tensor,
    num_heads: int,
    head_dim: int,
    scale: float,
    reduced: bool,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention of q (B, N, C) over k, v (B, M, C), all straight from their linears -> (B, N, C).
    With a spatial reduction (M ≪ N, no mask): `sr_attention` on q and [k|v] (a copy of the M reduced
    tokens only); else `attention` on head views (no copy)."""
    if reduced and mask is None:
        return sr_attention(q, torch.cat([k_in, v_in], -1), num_heads, scale)
    return _tokens(attention(_heads(q, head_dim), _heads(k_in, head_dim), _heads(v_in, head_dim), mask, scale))


# ----------------------------------------------------------------------------- fused forwards: ViT, DeiT, ViViT


def _fused_proj_attention_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers 5 ViT/DeiT/ViViT attention: own q/k/v linears -> `attention` on head views -> o_proj."""
    why = _why_original(
        self, _wants_weights(self, kwargs.get("output_attentions")), self.attention_dropout, mask=attention_mask
    )
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, attention_mask, **kwargs)
    d = self.head_dim
    q = _heads(self.q_proj(hidden_states), d)
    k = _heads(self.k_proj(hidden_states), d)
    v = _heads(self.v_proj(hidden_states), d)
    kwargs.pop("output_attentions", None)
    out, _ = vitkernels_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
    return self.o_proj(out.flatten(-2)), None


def _attn_dropout_v4(m: nn.Module) -> float:
    p = getattr(m, "dropout_prob", None)  # 4.48+: a float; before: an nn.Dropout
    return float(p) if p is not None else _p(getattr(m, "dropout", None))


def _recorded_v4(m: nn.Module) -> bool:
    """transformers 4.53-4.5x `check_model_inputs` records attention weights by setting the module's `forward`
    to its `wrapped_forward` for the call (other instance-level wrappers, e.g. accelerate's, are not that)."""
    fwd = vars(m).get("forward")
    return fwd is not None and getattr(getattr(fwd, "__code__", None), "co_name", "") == "wrapped_forward"


def _fused_self_attention_v4_forward(self, hidden_states: Tensor, head_mask: Optional[Tensor] = None, *args, **kwargs):
    """transformers 4.x ViT/DeiT/ViViT `*SelfAttention`: query/key/value -> `attention` on head views
    -> context (B, N, C) for the separate output module. Returns (context, None) as the sdpa class does.
    Attention weights are requested through `output_attentions` (up to ~4.52) or, from 4.53, by the
    output recorder that replaces this module's `forward` for the call (`check_model_inputs`)."""
    output_attentions = args[0] if args else kwargs.get("output_attentions", False)
    wants = bool(output_attentions) or _recorded_v4(self)
    why = _why_original(self, wants, _attn_dropout_v4(self), head_mask)
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, head_mask, *args, **kwargs)
    d = self.attention_head_size
    out = attention(
        _heads(self.query(hidden_states), d),
        _heads(self.key(hidden_states), d),
        _heads(self.value(hidden_states), d),
        None,
        d**-0.5,
    )
    return _tokens(out), None


# ----------------------------------------------------------------------------- fused forwards: Swin


def _swin_table_misfit(window, table: Tensor) -> Optional[str]:
    """Why the relative position bias table does not fit the (clamped) window, or None."""
    if isinstance(window, int) and table.shape[0] == (2 * window - 1) ** 2:
        return None
    return (
        f"window {window} (clamped to the input resolution) does not fit the relative position bias table "
        f"{tuple(table.shape)}"
    )


def _swinv2_table_misfit(window: int, coords_table: Tensor) -> Optional[str]:
    """Why Swin V2's coordinate table does not fit the window, or None."""
    if tuple(coords_table.shape[1:3]) == (2 * window - 1, 2 * window - 1):
        return None
    return f"window {window} does not fit the coordinate table {tuple(coords_table.shape)} of its attention"


def _window_qkv(
    x: Tensor, q_lin: nn.Module, k_lin: nn.Module, v_lin: nn.Module, height: int, width: int, window: int
) -> Tuple[Tensor, Optional[Tensor]]:
    """`window_attention`'s qkv and qkv_bias from the model's own q/k/v linears on the un-padded tokens x:
    [q|k|v] packed (the op's layout; one copy) and, where the map needs padding to whole windows, the qkv of
    a padded (zero) token, the linears of a zero vector (None without padding)."""
    qkv = torch.cat([q_lin(x), k_lin(x), v_lin(x)], -1)
    if height % window == 0 and width % window == 0:
        return qkv, None
    zero = x.new_zeros((1, x.shape[-1]))
    return qkv, torch.cat([q_lin(zero), k_lin(zero), v_lin(zero)], -1)[0]


def _fused_swin_layer_forward(self, hidden_states: Tensor, input_dimensions: Tuple[int, int], *args, **kwargs):
    """HF `SwinLayer`: layernorm -> own q/k/v linears on the un-padded tokens -> one `window_attention`
    (pad, shift, partition, bias gather, shift mask, attention, reverse: HF's pad-then-shift order, the op's
    default) -> output linear -> residual -> MLP, exactly as HF's layer (5.x and 4.x layouts)."""
    if self._vk_hf4:  # forward(hidden_states, input_dimensions, head_mask, output_attentions, always_partition)
        head_mask = args[0] if len(args) > 0 else kwargs.get("head_mask")
        output_attentions = args[1] if len(args) > 1 else kwargs.get("output_attentions", False)
        always_partition = args[2] if len(args) > 2 else kwargs.get("always_partition", False)
        attn = self.attention.self
        wants, p = bool(output_attentions), _p(attn.dropout)
        q_lin, k_lin, v_lin, table = attn.query, attn.key, attn.value, attn.relative_position_bias_table
        scale = attn.attention_head_size**-0.5
    else:  # forward(hidden_states, input_dimensions, always_partition=False, **kwargs)
        head_mask = None
        always_partition = args[0] if len(args) > 0 else kwargs.get("always_partition", False)
        attn = self.attention
        wants, p = _wants_weights(attn, kwargs.get("output_attentions")), attn.attention_dropout
        q_lin, k_lin, v_lin, table = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.relative_position_bias.relative_position_bias_table,
        )
        scale = attn.scaling
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)  # HF clamps window/shift in place; so do we
    window, shift = self.window_size, self.shift_size
    why = _why_original(self, wants, p, head_mask) or _swin_table_misfit(window, table)
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, input_dimensions, *args, **kwargs)
    height, width = input_dimensions
    shortcut = hidden_states
    x = self.layernorm_before(hidden_states)  # HF pads the normed tokens with zeros before its q/k/v linears
    qkv, qkv_bias = _window_qkv(x, q_lin, k_lin, v_lin, height, width, window)
    out = window_attention(
        qkv, (height, width), attn.num_attention_heads, window, int(shift), table, qkv_bias, scale, None, False
    )
    if self._vk_hf4:
        out = self.attention.output(out, None)  # dense, dropout
        hidden_states = shortcut + self.drop_path(out)
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        return (hidden_states + layer_output,)
    out = self.dropout(attn.o_proj(out))
    hidden_states = shortcut + self.drop_path(out)
    residual = hidden_states
    hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
    return hidden_states, None


# ----------------------------------------------------------------------------- fused forwards: Swin V2


def swinv2_tau_bound(window_size: int, eps: float = 1e-7) -> float:
    """The largest logit scale τ = exp(min(logit_scale, ln 100)) at which a shifted `Swinv2Layer` is fused.

    transformers' `Swinv2SelfAttention` adds its shift mask twice, so its masked scores get −200 where the
    original Swin V2, timm and the op use −100. The two differ only by the softmax weight the masked keys
    keep under −100. In a window of N = M² keys, a (real) query row's scores are τ·(q̂·k̂) + b + mask with
    |q̂·k̂| ≤ 1 and Swin V2's bias b = 16·sigmoid(·) ∈ (0, 16). The query's own key is never masked and scores
    above −τ, a masked key below τ + 16 − 100, so each masked key's weight is below exp(2τ + 16 − 100) and
    all of them together below W = (N − 1)·exp(2τ − 84) (under −200: below (N − 1)·exp(2τ − 184), negligible).
    Both outputs are the unmasked average moved by at most W of the way towards the masked values, so they
    differ by at most 2·W·max|v|. The bound is the τ at which W = eps (1e-7: float32 rounding):
    τ ≤ (84 + ln(eps / (N − 1))) / 2 — 32.6 for M = 4, 32.0 for M = 7, 31.9 for M = 8, 31.2 for M = 16,
    30.8 for M = 24. At initialisation τ = 10."""
    n = window_size * window_size
    return (100.0 - 16.0 + math.log(eps / max(n - 1, 1))) / 2.0


_DOUBLE_MASK = {}


def _swinv2_double_mask(cls: type) -> bool:
    """Whether this transformers' `Swinv2SelfAttention.forward` adds the shift mask twice (4.46, 4.56 and 5.25
    do: `+ attention_mask.unsqueeze(1).unsqueeze(0)` on two lines). Assumed so unless its source shows
    exactly one addition (e.g. a later release that fixes it)."""
    if cls not in _DOUBLE_MASK:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _DOUBLE_MASK[cls] = src.count("attention_mask.unsqueeze(1).unsqueeze(0)") != 1
    return _DOUBLE_MASK[cls]


def _fused_swinv2_layer_forward(self, hidden_states: Tensor, input_dimensions: Tuple[int, int], *args, **kwargs):
    """HF `Swinv2Layer` (res-post-norm): own q/k/v linears on the un-padded tokens -> one `window_attention`
    with cosine attention (`logit_scale`) and HF's continuous position bias (its own MLP on its coordinate
    table, 16·sigmoid) as the table, in HF's pad-then-shift order (the op's default) -> output linear ->
    layernorm_before -> drop path -> residual -> HF's MLP -> layernorm_after -> drop path -> residual.
    The mask is the op's −100 (HF adds its own twice: −200); patch time decides that this does not matter
    for this layer (`swinv2_tau_bound`)."""
    if self._vk_hf4:  # forward(hidden_states, input_dimensions, head_mask=None, output_attentions=False)
        head_mask = args[0] if len(args) > 0 else kwargs.get("head_mask")
        output_attentions = args[1] if len(args) > 1 else kwargs.get("output_attentions", False)
    else:  # forward(hidden_states, input_dimensions, output_attentions=False)
        head_mask = None
        output_attentions = args[0] if len(args) > 0 else kwargs.get("output_attentions", False)
    attn = self.attention.self
    window, shift = self.window_size, self.shift_size
    why = _why_original(self, bool(output_attentions), _p(attn.dropout), head_mask)
    why = why or _swinv2_table_misfit(window, attn.relative_coords_table)
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, input_dimensions, *args, **kwargs)
    height, width = input_dimensions
    heads = attn.num_attention_heads
    x = hidden_states  # V2 has no norm before attention: HF pads the block input itself with zeros
    qkv, qkv_bias = _window_qkv(x, attn.query, attn.key, attn.value, height, width, window)
    table = 16 * torch.sigmoid(attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, heads))
    out = window_attention(
        qkv, (height, width), heads, window, int(shift), table, qkv_bias, None, attn.logit_scale, False
    )
    out = self.attention.output(out, x)  # dense, dropout
    hidden_states = hidden_states + self.drop_path(self.layernorm_before(out))
    layer_output = self.output(self.intermediate(hidden_states))
    return (hidden_states + self.drop_path(self.layernorm_after(layer_output)),)


# ----------------------------------------------------------------------------- fused forwards: SegFormer, PVTv2


def _fused_segformer_attention_forward(
    self, hidden_states: Tensor, height: int, width: int, attention_mask: Optional[Tensor] = None, **kwargs
):
    """transformers 5 `SegformerAttention`: own q linear, HF's sequence reduction, own k/v linears ->
    `sr_attention` -> o_proj."""
    why = _why_original(
        self, _wants_weights(self, kwargs.get("output_attentions")), self.attention_dropout, mask=attention_mask
    )
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, height, width, attention_mask, **kwargs)
    reduced = self.sequence_reduction_ratio > 1
    kv_in = self.sequence_reduction(hidden_states, height, width) if reduced else hidden_states
    out = _core(
        self.q_proj(hidden_states),
        self.k_proj(kv_in),
        self.v_proj(kv_in),
        self.num_attention_heads,
        self.head_dim,
        self.scaling,
        reduced,
        attention_mask,
    )
    return self.o_proj(out), None


def _fused_segformer_sr_attention_v4_forward(
    self, hidden_states: Tensor, height: int, width: int, output_attentions: bool = False
):
    """transformers 4.x `SegformerEfficientSelfAttention`: as above; returns (context,) for its output module."""
    why = _why_original(self, bool(output_attentions), _p(self.dropout))
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, height, width, output_attentions)
    reduced = self.sr_ratio > 1
    kv_in = hidden_states
    if reduced:
        b, n, c = hidden_states.shape
        kv_in = hidden_states.permute(0, 2, 1).reshape(b, c, height, width)
        kv_in = self.layer_norm(self.sr(kv_in).reshape(b, c, -1).permute(0, 2, 1))
    d = self.attention_head_size
    return (
        _core(
            self.query(hidden_states), self.key(kv_in), self.value(kv_in), self.num_attention_heads, d, d**-0.5, reduced
        ),
    )


def _fused_pvt_attention_forward(self, hidden_states: Tensor, height: int, width: int, output_attentions: bool = False):
    """`PvtV2SelfAttention`: own q linear, HF's spatial reduction (strided conv + LN, or the linear variant's
    AdaptiveAvgPool(7) -> 1x1 conv -> LN -> GELU), own k/v linears -> `sr_attention` -> proj."""
    why = _why_original(self, bool(output_attentions), _p(self.attn_drop))
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, height, width, output_attentions)
    b, n, c = hidden_states.shape
    q = self.query(hidden_states)
    kv_in = hidden_states
    reduced = bool(self.linear_attention) or self.spatial_reduction_ratio > 1
    if self.linear_attention:
        y = hidden_states.permute(0, 2, 1).reshape(b, c, height, width)
        y = self.spatial_reduction(self.pool(y)).reshape(b, c, -1).permute(0, 2, 1)
        kv_in = self.act(self.layer_norm(y))
    elif self.spatial_reduction_ratio > 1:
        y = hidden_states.permute(0, 2, 1).reshape(b, c, height, width)
        kv_in = self.layer_norm(self.spatial_reduction(y).reshape(b, c, -1).permute(0, 2, 1))
    d = self.attention_head_size
    out = _core(q, self.key(kv_in), self.value(kv_in), self.num_attention_heads, d, d**-0.5, reduced)
    return (self.proj_drop(self.proj(out)),)


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear itself (not a LoRA/quantized subclass or wrapper) without hooks: its weights may be read."""
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def _mix_ffn_forward(
    module: nn.Module,
    x: Tensor,
    height: int,
    width: int,
    fc1: nn.Module,
    conv: nn.Module,
    fc2: nn.Module,
    drop: nn.Module,
    relu: Optional[nn.Module],
) -> Tensor:
    """fc1 -> [ReLU] -> dwconv3x3 -> GELU -> dropout -> fc2 -> dropout. Plain linears and no active dropout:
    one `mix_ffn` call. Otherwise (e.g. LoRA-wrapped or hooked linears, dropout while training) the model's own
    linears and dropout around the fused `dwconv` + GELU op (no NCHW transposes either way)."""
    hw = [height, width]
    if _plain_linear(fc1) and _plain_linear(fc2) and (not module.training or _p(drop) == 0.0):
        return mix_ffn(x, hw, fc1.weight, fc1.bias, conv.weight, conv.bias, fc2.weight, fc2.bias, relu is not None)
    y = fc1(x)
    if relu is not None:
        y = relu(y)
    y = drop(dwconv(y, hw, conv.weight, conv.bias, "gelu"))
    return drop(fc2(y))


def _conv_is_plain(module: nn.Module) -> bool:
    return type(module.dwconv.dwconv) is nn.Conv2d


def _fused_segformer_mlp_forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
    """transformers 5 `SegformerMixMLP` (fc1, dwconv, activation_fn, fc2)."""
    if not _conv_is_plain(self):
        warn_fallback(self, "dwconv.dwconv is not a plain nn.Conv2d (e.g. a LoRA wrapper)", _LIB)
        return self._hf_forward(hidden_states, height, width)
    return _mix_ffn_forward(
        self, hidden_states, height, width, self.fc1, self.dwconv.dwconv, self.fc2, self.dropout, None
    )


def _fused_dense_ffn_forward(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
    """transformers 4.x `SegformerMixFFN` and `PvtV2ConvFeedForwardNetwork` (dense1, [relu], dwconv,
    intermediate_act_fn, dense2)."""
    if not _conv_is_plain(self):
        warn_fallback(self, "dwconv.dwconv is not a plain nn.Conv2d (e.g. a LoRA wrapper)", _LIB)
        return self._hf_forward(hidden_states, height, width)
    relu = getattr(self, "relu", None)
    return _mix_ffn_forward(
        self,
        hidden_states,
        height,
        width,
        self.dense1,
        self.dwconv.dwconv,
        self.dense2,
        self.dropout,
        relu if isinstance(relu, nn.ReLU) else None,
    )


# ----------------------------------------------------------------------------- fused forwards: TimeSformer


def _fused_timesformer_self_attention_forward(self, hidden_states: Tensor, output_attentions: bool = False):
    """`TimesformerSelfAttention` (space_only / joint_space_time, and divided blocks run by HF's own layer
    forward): packed qkv linear -> `self_attention` (no layout copies)."""
    why = _why_original(self, bool(output_attentions), _p(self.attn_drop))
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, output_attentions)
    return (self_attention(self.qkv(hidden_states), self.num_heads, self.scale),)


def _sample_scale(drop_path: nn.Module, n: int, like: Tensor) -> Optional[Tensor]:
    """The (n, 1, 1) per-sample factors HF's drop path would apply to a (n, ...) tensor (same RNG draw:
    drop path of ones), or None when it is inactive."""
    if isinstance(drop_path, nn.Identity) or not drop_path.training:
        return None
    return drop_path(torch.ones((n, 1, 1), dtype=like.dtype, device=like.device))


def _fused_timesformer_layer_forward(self, hidden_states: Tensor, output_attentions: bool = False):
    """HF `TimesformerLayer`, divided space-time, on HF's token order [cls, (h, w, t) with time fastest]:
    temporal: own temporal LN + qkv linear -> `space_time_attention(axis="time", layout="st")` -> output
    linear -> drop path (per (clip, position), as HF) -> temporal_dense -> residual; spatial: LN + qkv of the
    patch tokens and of the class token -> `space_time_attention(axis="space", cls_qkv=...)` -> output linear
    -> drop path (per (clip, frame), as HF) -> class outputs averaged over frames -> residual; then HF's MLP.
    No permute/cat of the (B·T, 1+S, C) per-frame sequences."""
    t_attn, s_attn = self.temporal_attention.attention, self.attention.attention
    why = _why_original(self, bool(output_attentions), max(_p(t_attn.attn_drop), _p(s_attn.attn_drop)))
    if why is not None:
        warn_fallback(self, why, _LIB)
        return self._hf_forward(hidden_states, output_attentions)
    frames = self.config.num_frames
    b, n, c = hidden_states.shape
    spatial = (n - 1) // frames
    cls = hidden_states[:, :1]
    x = hidden_states[:, 1:]
    # temporal attention of every position over its frames; HF's (B·S, T, C) shape is a view of (B, S·T, C)
    qkv = t_attn.qkv(self.temporal_layernorm(x))
    out = space_time_attention(qkv, frames, t_attn.num_heads, "time", None, "st", t_attn.scale)[0]
    out = self.drop_path(self.temporal_attention.output(out.reshape(b * spatial, frames, c)))
    x = x + self.temporal_dense(out.reshape(b, spatial * frames, c))
    # spatial attention of every frame over its tokens, the class token prepended to each frame
    qkv = s_attn.qkv(self.layernorm_before(x))
    cls_qkv = s_attn.qkv(self.layernorm_before(cls))[:, 0]
    out, cls_out = space_time_attention(qkv, frames, s_attn.num_heads, "space", cls_qkv, "st", s_attn.scale)
    out = self.attention.output(out)
    cls_out = self.attention.output(cls_out)
    scale = _sample_scale(self.drop_path, b * frames, out)
    if scale is not None:
        out = (out.reshape(b, spatial, frames, c) * scale.reshape(b, 1, frames, 1)).reshape(b, spatial * frames, c)
        cls_out = cls_out * scale.reshape(b, frames, 1)
    hidden_states = torch.cat([cls + cls_out.mean(1, keepdim=True), x + out], 1)
    layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
    return (hidden_states + self.drop_path(layer_output),)


# ----------------------------------------------------------------------------- patch-time checks


def _missing(m: nn.Module, names) -> Optional[str]:
    for name in names:
        if not hasattr(m, name):
            return f"no `{name}` attribute (an unknown variant of the class)"
    return None


def _has(*names) -> Callable[[nn.Module], bool]:
    return lambda m: all(hasattr(m, name) for name in names)


def _proj_attention_reason(m: nn.Module) -> Optional[str]:
    return _missing(m, ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "attention_dropout"))


def _self_attention_v4_reason(m: nn.Module) -> Optional[str]:
    return _missing(m, ("query", "key", "value", "attention_head_size", "num_attention_heads"))


def _swin_prepare(m: nn.Module) -> None:
    m._vk_hf4 = hasattr(m.attention, "self")  # transformers 4.x: attention.self (query/key/value), attention.output


def _swin_reason(m: nn.Module) -> Optional[str]:
    attn = getattr(m, "attention", None)
    if hasattr(attn, "self"):  # 4.x
        why = _missing(attn.self, ("query", "key", "value", "relative_position_bias_table", "dropout"))
        return why or _missing(m, ("output", "intermediate", "drop_path", "layernorm_after"))
    why = _missing(attn, ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias", "scaling"))
    return why or _missing(m, ("mlp", "dropout", "drop_path", "layernorm_after", "set_shift_and_window_size"))


def _swinv2_prepare(m: nn.Module) -> None:
    m._vk_hf4 = "head_mask" in inspect.signature(type(m).forward).parameters  # 4.x: forward(..., head_mask, ...)


def _swinv2_reason(m: nn.Module) -> Optional[str]:
    why = _missing(
        m,
        (
            "attention",
            "window_size",
            "shift_size",
            "layernorm_before",
            "layernorm_after",
            "drop_path",
            "intermediate",
            "output",
        ),
    )
    why = why or _missing(m.attention, ("self", "output"))
    if why:
        return why
    attn = m.attention.self
    why = _missing(
        attn,
        (
            "query",
            "key",
            "value",
            "logit_scale",
            "continuous_position_bias_mlp",
            "relative_coords_table",
            "num_attention_heads",
            "dropout",
        ),
    )
    if why:
        return why
    window, shift = m.window_size, m.shift_size
    if not (isinstance(window, int) and isinstance(shift, int)):
        return f"window {window!r} / shift {shift!r} are not ints (the op takes square windows)"
    if shift > 0 and _swinv2_double_mask(type(attn)):
        scale = attn.logit_scale.detach()
        if scale.is_meta:
            return (
                "shifted windows, logit scale on the meta device: τ unknown at patch time (transformers' "
                "Swinv2SelfAttention adds its shift mask twice; see swinv2_tau_bound)"
            )
        tau = float(scale.float().clamp(max=math.log(100.0)).exp().max())
        bound = swinv2_tau_bound(window)
        if tau > bound:
            weight = (window * window - 1) * math.exp(2 * tau - 84.0)
            return (
                f"shifted windows (window {window}, shift {shift}) with logit scale τ = {tau:.1f} (max over "
                f"heads) > {bound:.1f}: transformers' Swinv2SelfAttention adds its shift mask twice (masked "
                f"scores −200; the op, the original Swin V2 and timm use −100), and at this τ the bound "
                f"(M²−1)·exp(2τ + 16 − 100) = {weight:.2g} on the masked keys' softmax weight under −100 "
                f"exceeds 1e-7: the fused layer might not reproduce HF's output"
            )
    return None


def _exact_gelu(act) -> bool:
    if type(act) is nn.GELU:
        return act.approximate == "none"
    if act is F.gelu:
        return True
    inner = getattr(act, "act", None)  # transformers' GELUActivation: F.gelu or its erf formula in Python
    return type(act).__name__ == "GELUActivation" and (
        inner is F.gelu or getattr(getattr(inner, "__func__", None), "__name__", "") == "_gelu_python"
    )


def _ffn_reason(fc1: str, act: str, fc2: str) -> Callable[[nn.Module], Optional[str]]:
    def reason(m: nn.Module) -> Optional[str]:
        why = _missing(m, (fc1, fc2, act, "dwconv", "dropout"))
        if why:
            return why
        if not _exact_gelu(getattr(m, act)):
            return f"activation {getattr(m, act)!r} (the op fuses exact-erf GELU)"
        relu = getattr(m, "relu", None)
        if relu is not None and not isinstance(relu, (nn.ReLU, nn.Identity)):
            return f"extra activation {relu!r} (the op fuses ReLU or none)"
        conv = getattr(m.dwconv, "dwconv", None)
        if not (
            type(conv) is nn.Conv2d
            and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1)
            and conv.padding == (1, 1)
            and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros"
            and conv.groups == conv.in_channels == conv.out_channels
        ):
            return f"dwconv {conv!r} is not a plain depthwise 3x3 conv"
        if not isinstance(m.dropout, nn.Dropout):
            return f"dropout {m.dropout!r} is not an nn.Dropout"
        return None

    return reason


def _segformer_attention_reason(m: nn.Module) -> Optional[str]:
    return _missing(m, ("q_proj", "k_proj", "v_proj", "o_proj", "sequence_reduction_ratio", "head_dim", "scaling"))


def _segformer_v4_reason(m: nn.Module) -> Optional[str]:
    return _missing(m, ("query", "key", "value", "sr_ratio", "dropout", "attention_head_size"))


def _pvt_reason(m: nn.Module) -> Optional[str]:
    return _missing(
        m,
        (
            "query",
            "key",
            "value",
            "linear_attention",
            "spatial_reduction_ratio",
            "attn_drop",
            "proj",
            "proj_drop",
            "attention_head_size",
        ),
    )


def _timesformer_attention_reason(m: nn.Module) -> Optional[str]:
    return _missing(m, ("qkv", "num_heads", "scale", "attn_drop"))


def _timesformer_layer_reason(m: nn.Module) -> Optional[str]:
    kind = getattr(m, "attention_type", None)
    if kind != "divided_space_time":
        return (
            f"attention_type {kind!r}: joint attention over the whole sequence, fused in its "
            f"TimesformerSelfAttention modules instead"
        )
    why = _missing(
        m,
        (
            "temporal_attention",
            "temporal_layernorm",
            "temporal_dense",
            "attention",
            "config",
            "drop_path",
            "intermediate",
            "output",
        ),
    )
    if why:
        return why
    drop_path = m.drop_path
    if not (isinstance(drop_path, nn.Identity) or type(drop_path).__name__.endswith("DropPath")):
        return f"drop path {drop_path!r} is not transformers' per-sample DropPath"
    return None


def _spec(
    cls_name: str, module: str, fn: Callable, ops: str, reason, prepare=None, applies=None, name: Optional[str] = None
) -> FusedSpec:
    kw = {} if applies is None else {"applies": applies}
    return FusedSpec(name or f"Fused{cls_name}", [(_M + module, cls_name)], "forward", fn, ops, reason, prepare, **kw)


_ATTN = "vitkernels.attention"
_SR = "vitkernels.sr_attention; no reduction: vitkernels.attention"
_FFN = "vitkernels.mix_ffn; wrapped linears or dropout: own linears around vitkernels.dwconv"
_V5 = _has("q_proj", "k_proj", "v_proj")  # a 5.x attention class, not the 4.x wrapper of the same name

_SPECS = [
    # transformers 5: attention modules with q_proj/k_proj/v_proj/o_proj
    _spec(
        "ViTAttention", "vit.modeling_vit", _fused_proj_attention_forward, _ATTN, _proj_attention_reason, applies=_V5
    ),
    _spec(
        "DeiTAttention", "deit.modeling_deit", _fused_proj_attention_forward, _ATTN, _proj_attention_reason, applies=_V5
    ),
    _spec(
        "VivitAttention",
        "vivit.modeling_vivit",
        _fused_proj_attention_forward,
        _ATTN,
        _proj_attention_reason,
        applies=_V5,
    ),
    _spec(
        "SegformerAttention",
        "segformer.modeling_segformer",
        _fused_segformer_attention_forward,
        _SR,
        _segformer_attention_reason,
        applies=_V5,
    ),
    _spec(
        "SegformerMixMLP",
        "segformer.modeling_segformer",
        _fused_segformer_mlp_forward,
        _FFN,
        _ffn_reason("fc1", "activation_fn", "fc2"),
    ),
    # both layouts
    _spec(
        "SwinLayer",
        "swin.modeling_swin",
        _fused_swin_layer_forward,
        "vitkernels.window_attention",
        _swin_reason,
        _swin_prepare,
    ),
    _spec(
        "Swinv2Layer",
        "swinv2.modeling_swinv2",
        _fused_swinv2_layer_forward,
        "vitkernels.window_attention with logit_scale",
        _swinv2_reason,
        _swinv2_prepare,
    ),
    _spec("PvtV2SelfAttention", "pvt_v2.modeling_pvt_v2", _fused_pvt_attention_forward, _SR, _pvt_reason),
    _spec(
        "PvtV2ConvFeedForwardNetwork",
        "pvt_v2.modeling_pvt_v2",
        _fused_dense_ffn_forward,
        _FFN,
        _ffn_reason("dense1", "intermediate_act_fn", "dense2"),
    ),
    _spec(
        "TimesformerSelfAttention",
        "timesformer.modeling_timesformer",
        _fused_timesformer_self_attention_forward,
        "vitkernels.self_attention",
        _timesformer_attention_reason,
    ),
    _spec(
        "TimesformerLayer",
        "timesformer.modeling_timesformer",
        _fused_timesformer_layer_forward,
        "vitkernels.space_time_attention",
        _timesformer_layer_reason,
    ),
    # transformers 4.x: *SelfAttention (query/key/value) inside a wrapper with a separate output module
    *[
        _spec(cls, mod, _fused_self_attention_v4_forward, _ATTN, _self_attention_v4_reason)
        for mod, prefix in (
            ("vit.modeling_vit", "ViT"),
            ("deit.modeling_deit", "DeiT"),
            ("vivit.modeling_vivit", "Vivit"),
        )
        for cls in (f"{prefix}SelfAttention", f"{prefix}SdpaSelfAttention")
    ],
    _spec(
        "SegformerEfficientSelfAttention",
        "segformer.modeling_segformer",
        _fused_segformer_sr_attention_v4_forward,
        _SR,
        _segformer_v4_reason,
    ),
    _spec(
        "SegformerMixFFN",
        "segformer.modeling_segformer",
        _fused_dense_ffn_forward,
        _FFN,
        _ffn_reason("dense1", "intermediate_act_fn", "dense2"),
    ),
]
# `Fused<Name>` classes are importable from this module by name (pickle looks them up this way)
__getattr__, __dir__ = lazy_fused_classes(globals(), _SPECS, _ORIG, _LIB)


def patch_hf(model: nn.Module) -> nn.Module:
    """Swap, in place, the supported transformers attention / conv-FFN modules of `model` for fused ones and
    return `model`; also registers the "vitkernels" attention implementation. Logs (logger "vitkernels",
    INFO) what was fused and what keeps transformers' forward and why."""
    try:
        register_attention()
    except ImportError:
        pass
    return patch_modules(model, _SPECS, __name__, _ORIG, _LIB, "patch_hf")


try:  # importing this module registers the attention backend (a no-op without transformers)
    register_attention()
except ImportError:
    pass
except Exception as _e:  # a transformers that fails to import: patch_hf's log will say what was (not) fused
    logger.warning(
        "vitkernels: could not register the 'vitkernels' attention implementation: %s: %s", type(_e).__name__, _e
    )
