"""Shared machinery of `patch_timm` and `patch_hf`: class swap, importable Fused classes,
patch-time logging and run-time fallback warnings.

A patched module stays the same object with the same parameters, buffers, hooks and `state_dict()`
keys: only its class becomes `Fused<Name>`, a subclass of the library's class that overrides one
method and keeps the original reachable as `<orig_prefix><method>` (e.g. `_timm_forward`).

Fused classes are built on demand (the library is an optional dependency) but are importable by
name: each integration module's module-level `__getattr__` (from `lazy_fused_classes`) calls `resolve`, so pickle
(`torch.save(model)` / `torch.load(..., weights_only=False)`) finds `vitkernels.integrations.timm.
FusedAttention` in a fresh process, and `copy.deepcopy` keeps the class.

Logging: logger "vitkernels". `patch_modules` logs (INFO) what it fused and what keeps its original
forward and why; `warn_fallback` warns (`FusedFallbackWarning`) once per class and reason per process
when a fused module runs its original forward at run time. Neither is on the TorchScript path (the
fused forwards call `warn_fallback` under `if not torch.jit.is_scripting()`), nor under
`torch.compile` tracing (no graph break for a warning).
"""

import importlib
import logging
import types
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import nn

logger = logging.getLogger("vitkernels")


class FusedFallbackWarning(UserWarning):
    """A fused module ran its library's original forward (e.g. attention dropout while training)."""


@dataclass
class FusedSpec:
    """How one library class is fused.

    name:      the Fused class's name (and its attribute name in the integration module);
    targets:   (module, class name) of the library class, in order of preference (a class that moved
               between library versions is listed at each place; the first importable one is used
               when the class is looked up by name, e.g. on unpickling);
    method:    the overridden method; `fn` its fused implementation;
    ops:       the vitkernels ops it runs (for the log);
    reason:    module -> None when the fused path covers the module's configuration, else why not
               (checked at patch time; the module then keeps its class and its original forward);
    prepare:   optional module -> None, stores static decisions on the instance at patch time;
    applies:   module -> bool; False when a class of the targeted name is another layout the spec does not
               describe (e.g. a transformers 4.x wrapper that shares its 5.x name): the module is then treated
               as untargeted (no swap, no "kept" line; its fused children speak for it).
    """

    name: str
    targets: List[Tuple[str, str]]
    method: str
    fn: Callable
    ops: str
    reason: Callable[[nn.Module], Optional[str]] = lambda module: None
    prepare: Optional[Callable[[nn.Module], None]] = None
    applies: Callable[[nn.Module], bool] = lambda module: True


def _renamed(fn: Callable, name: str) -> Callable:
    """`fn` as a function called `name`: TorchScript names a method it compiles after its function's
    `__name__`, so timm's `forward` kept as `_timm_forward` must not be called `forward`."""
    if fn.__name__ == name:
        return fn
    new = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__annotations__ = dict(fn.__annotations__)
    new.__dict__.update(fn.__dict__)
    new.__doc__, new.__module__ = fn.__doc__, fn.__module__
    new.__qualname__ = fn.__qualname__.rsplit(".", 1)[0] + "." + name if "." in fn.__qualname__ else name
    return new


_CLASSES: Dict[Tuple[str, type], type] = {}  # (integration module, library class) -> Fused class


def fused_class(spec: FusedSpec, base: type, module_name: str, orig_prefix: str) -> type:
    """The Fused subclass of `base` for `spec` (built once per base class and cached)."""
    key = (module_name, base)
    cls = _CLASSES.get(key)
    if cls is None:
        orig = orig_prefix + spec.method.lstrip("_")
        namespace = {
            "__module__": module_name,
            "__qualname__": spec.name,
            "__doc__": f"{base.__module__}.{base.__qualname__} with `{spec.method}` fused ({spec.ops}); "
            f"the original stays reachable as `{orig}`. Made by vitkernels.",
            spec.method: _renamed(spec.fn, spec.method),
            orig: _renamed(getattr(base, spec.method), orig),
            "_vk_spec_name": spec.name,
        }
        cls = type(spec.name, (base,), namespace)
        _CLASSES[key] = cls
    return cls


def resolve(name: str, specs: List[FusedSpec], module_name: str, orig_prefix: str, library: str) -> type:
    """Module-level `__getattr__` helper: the Fused class called `name`, built against the installed
    library (this is what pickle looks up when it loads a patched model)."""
    for spec in specs:
        if spec.name != name:
            continue
        errors = []
        for mod, cls_name in spec.targets:
            try:
                base = getattr(importlib.import_module(mod), cls_name)
            except (ImportError, AttributeError) as e:
                errors.append(f"{mod}.{cls_name}: {e}")
                continue
            if (base.__module__, base.__name__) in spec.targets:  # the class itself, not a re-export
                return fused_class(spec, base, module_name, orig_prefix)
            errors.append(f"{mod}.{cls_name} is {base.__module__}.{base.__name__}")
        raise AttributeError(
            f"module {module_name!r}: cannot build {name} — the {library} class it extends is "
            f"not importable ({'; '.join(errors)})"
        )
    raise AttributeError(f"module {module_name!r} has no attribute {name!r}")


def lazy_fused_classes(module_globals: dict, specs: List[FusedSpec], orig_prefix: str, library: str) -> tuple:
    """The module-level `__getattr__` and `__dir__` (PEP 562) of an integration module: its Fused classes are
    built on first lookup against the installed library (importing the library up front would slow
    `import vitkernels`; it may not be installed) and kept as module attributes. Pickle looks them up this
    way too."""
    module_name = module_globals["__name__"]
    names = {spec.name for spec in specs}

    def __getattr__(name: str):
        if name in names:
            cls = resolve(name, specs, module_name, orig_prefix, library)
            module_globals[name] = cls
            return cls
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(module_globals) | names)

    return __getattr__, __dir__


def swap_class(module: nn.Module, cls: type) -> nn.Module:
    """Same object, same parameters, buffers and hooks: only `module.__class__` changes."""
    module.__class__ = cls
    return module


_WARNED = set()


@torch.jit.unused
def warn_once(key, message: str, stacklevel: int = 3) -> None:
    """`warnings.warn(message, FusedFallbackWarning)` the first time `key` is seen in this process
    (never while torch.compile traces: a warning is not worth a graph break)."""
    if torch.compiler.is_compiling() or key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, FusedFallbackWarning, stacklevel=stacklevel)


@torch.jit.unused
def warn_fallback(module: nn.Module, reason: str, library: str = "timm") -> None:
    """Warn once per (Fused class, reason) per process that `module` runs its original forward."""
    if torch.compiler.is_compiling():
        return  # a warning is not worth a graph break; eager runs and patch-time logs say it
    base = type(module).__mro__[1]
    owner = library + ("'" if library.endswith("s") else "'s")
    msg = (
        f"vitkernels: {type(module).__name__} ({base.__module__}.{base.__qualname__}) runs {owner} own "
        f"forward: {reason}. (Shown once per reason.)"
    )
    warn_once((type(module).__name__, reason), msg, stacklevel=3)


def _is_attention_like(module: nn.Module) -> bool:
    name = type(module).__name__
    return any(s in name for s in ("Attention", "Attn", "XCA")) and not name.endswith(("Block", "Layer", "Stage"))


def patch_modules(
    model: nn.Module, specs: List[FusedSpec], module_name: str, orig_prefix: str, library: str, entry: str
) -> nn.Module:
    """Swap, in place, every module of `model` whose class a spec targets and whose configuration the
    spec covers; log what was fused and what keeps its original forward (and why)."""
    by_target = {t: spec for spec in specs for t in spec.targets}
    fused: Counter = Counter()  # (fused name, library class, ops) -> count
    kept: Counter = Counter()  # (library class, reason) -> count
    covered = set()  # ids of swapped (or already fused) modules and their descendants
    swapped = set()  # ids of swapped (or already fused) modules
    for _, module in model.named_modules():
        cls = type(module)
        if getattr(cls, "_vk_spec_name", None) is not None:  # already patched
            fused[(cls.__name__, f"{cls.__mro__[1].__module__}.{cls.__mro__[1].__qualname__}", "already fused")] += 1
            covered.update(id(m) for m in module.modules())
            swapped.add(id(module))
            continue
        spec = by_target.get((cls.__module__, cls.__name__))
        if spec is None or not spec.applies(module):
            continue
        full = f"{cls.__module__}.{cls.__qualname__}"
        reason = spec.reason(module)
        if reason is not None:
            kept[(full, reason)] += 1
            covered.update(id(m) for m in module.modules())
            continue
        if spec.prepare is not None:
            spec.prepare(module)
        swap_class(module, fused_class(spec, cls, module_name, orig_prefix))
        fused[(spec.name, full, spec.ops)] += 1
        covered.update(id(m) for m in module.modules())
        swapped.add(id(module))
    # Attention-like modules no spec targets: they keep their forward; say so (innermost ones only; a
    # wrapper around a fused module, e.g. transformers 4.x `ViTAttention` around `ViTSelfAttention`, is not).
    for _, module in model.named_modules():
        if id(module) in covered or not _is_attention_like(module):
            continue
        inner = list(module.modules())[1:]
        if any(_is_attention_like(m) and id(m) not in covered for m in inner) or any(id(m) in swapped for m in inner):
            continue
        cls = type(module)
        kept[(f"{cls.__module__}.{cls.__qualname__}", "no fused op covers this module class")] += 1
    model_name = type(model).__name__
    for (name, full, ops), n in sorted(fused.items()):
        logger.info("%s(%s): fused %d × %s -> %s (%s)", entry, model_name, n, full, name, ops)
    for (full, reason), n in sorted(kept.items()):
        logger.info("%s(%s): kept the original forward of %d × %s: %s", entry, model_name, n, full, reason)
    if not fused:
        hint = ""
        if any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):
            hint = (
                " — it holds a torch.fx GraphModule, whose traced code inlined the attention forwards: "
                "patch the model first, then trace it (e.g. timm's FeatureGraphNet or torchvision's "
                "create_feature_extractor on the patched model)"
            )
        logger.warning("%s(%s): nothing fused (no supported %s module found)%s", entry, model_name, library, hint)
    return model
