"""Naming the module a write happened in, for messages: ``mods.normalizer (InputNormalization)``.

The path runs from the outermost module in call. With the module hooks installed the calls are
on record (``STATE.modules``); without them the interpreter stack has them.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from . import _arguments
from ._registry import STATE


def is_compiled(obj: Any) -> bool:
    """A module returned by ``torch.compile(module)`` or a function from ``torch.compile(f)``."""
    if isinstance(obj, torch.nn.Module):
        return type(obj).__name__ == "OptimizedModule" and hasattr(obj, "_orig_mod")
    return hasattr(obj, "_torchdynamo_orig_callable")


_names: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()


def _path_in(root: torch.nn.Module, module: torch.nn.Module) -> Optional[str]:
    names = _names.get(root)
    if names is None or id(module) not in names:
        names = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
        _names[root] = names
    return names.get(id(module))


def display_path(module: torch.nn.Module, outermost: Optional[torch.nn.Module] = None) -> str:
    """``mods.normalizer (InputNormalization)``: the path from the outermost module in call."""
    cls = type(module).__name__
    if is_compiled(module):
        inner: torch.nn.Module = getattr(module, "_orig_mod")  # noqa: B009
        module = inner
        cls = f"{type(module).__name__}, compiled"
    elif isinstance(module, torch.jit.ScriptModule):
        how = "traced" if "Traced" in cls else "scripted"
        cls = f"{getattr(module, 'original_name', cls)}, {how}"
    for root in _roots(outermost):
        if root is module:
            return cls
        try:
            path = _path_in(root, module)
        except Exception:  # a module tree half built (copy.deepcopy) or broken: no path
            path = None
        if path:
            return f"{path} ({cls})"
    return cls


def current_module_path() -> Optional[str]:
    """The path of the module whose call is running, for messages; None outside modules.

    With the hooks installed the module calls are on record; without them (raise and warn
    guards of named tensors, the scoped backend) the interpreter stack has them:
    ``Module._call_impl`` frames.
    """
    # Inside a scoped call nested module calls skip the hooks, and block guards alone note
    # module calls without putting them on record (_boundaries._only_noted): there the stack
    # has more of them. The record has the calls TorchScript makes, which the stack lacks.
    stack = _arguments.modules_on_stack()
    stack.reverse()  # outermost first
    recorded = STATE.modules if not STATE.scoped_calls else []
    modules = recorded if len(recorded) > len(stack) else stack
    if not modules:
        return None
    return display_path(modules[-1], modules[0])


def _roots(outermost: Optional[torch.nn.Module]) -> list[torch.nn.Module]:
    roots: list[torch.nn.Module] = []
    for f in STATE.frames:
        if f.module_root is not None:
            roots.append(f.module_root)
            break
    if outermost is not None:
        roots.append(outermost)
    return roots
