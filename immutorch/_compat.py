"""Every private torch API immutorch uses, behind one small function each.

immutorch reaches below torch's public surface in a few places (the dispatch-mode stack, the
version counter, Dynamo's bookkeeping). Each such call lives here and knows the signature of
every supported release, so a change upstream breaks this file and nothing else. Importing it
also checks the installed torch against the supported range: an older torch gets an
ImportError that names both versions at first use, not a TypeError deep inside a write.

Supported: torch >= 2.4 (``TORCH_FLOOR``); docs/releases.md says which releases ran.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch

# Keep in step with pyproject's `torch>=` and noxfile.TORCH_RELEASES[0]. Below it: 2.3.1 fails
# the suite (see the release table in docs/releases.md); 2.1.2 keeps no Python storage object
# alive with its memory (read-only marks and birth records live on them); 2.2 was not run.
TORCH_FLOOR = (2, 4)


def torch_release(version: Optional[str] = None) -> tuple[int, int]:
    """(major, minor) of a torch version string: ``"2.5.1+cu124"`` -> ``(2, 5)``."""
    text = str(torch.__version__ if version is None else version)
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:  # a source build with an odd version: let the probes below decide
        return TORCH_FLOOR
    return int(match.group(1)), int(match.group(2))


def require_supported_torch(version: Optional[str] = None) -> None:
    """Raise ImportError naming the installed and the required torch when it is too old."""
    installed = str(torch.__version__ if version is None else version)
    if torch_release(installed) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(
            f"immutorch needs torch >= {floor}; this is torch {installed} "
            f"({getattr(torch, '__file__', '?')}). Upgrade torch: pip install 'torch>={floor}'."
        )


# The release matrix tries releases below the floor with the check off (noxfile's below_floor).
if os.environ.get("IMMUTORCH_IGNORE_TORCH_FLOOR") != "1":
    require_supported_torch()

# Below the check: on an unsupported torch the ImportError above is what the user sees.
import torch.utils._python_dispatch as _dispatch  # noqa: E402

# -- the dispatch-mode stack ------------------------------------------------------------------
# The C++ guard class itself, for hot paths where a function call around it costs too much.
DisableTorchDispatch: Any = torch._C._DisableTorchDispatch


def is_functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functorch wrapper (vmap's BatchedTensor, grad's TensorWrapper)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def is_functional(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functionalization wrapper (torch.func.functionalize's inputs)."""
    return bool(torch._is_functional_tensor(t))


def functional_mutations(t: torch.Tensor) -> int:
    """How many writes a functionalization wrapper has recorded: functionalize applies them to
    the tensor it wraps only when the transformed function returns."""
    counter = getattr(torch, "_functionalize_mutation_counter", None)
    if counter is not None:
        data = int(counter(t))
    else:  # before the counter existed: whether there was any
        data = int(torch._functionalize_has_data_mutation(t))  # type: ignore[attr-defined]
    return data + int(torch._functionalize_has_metadata_mutation(t))  # type: ignore[attr-defined]


def functorch_unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The tensor one functorch level below the wrapper ``t``: what the wrapper holds, over
    the same storage (a BatchedTensor's physical value, a TensorWrapper's unwrapped tensor)."""
    return torch._C._functorch.get_unwrapped(t)


def storage_use_count(storage: Any) -> Optional[int]:
    """How many references hold the StorageImpl (tensors, Python storage objects), or None
    where this torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        return int(count(storage._cdata))
    except Exception:
        return None


def tracing_now() -> bool:
    """Whether a trace records this thread's ops: make_fx's or torch.export's proxy mode, or a
    fake or functional mode, is active (torch's infra modes, kept apart from the user stack)."""
    get = torch._C._get_dispatch_mode
    keys = torch._C._TorchDispatchModeKey
    return any(get(key) is not None for key in (keys.PROXY, keys.FAKE, keys.FUNCTIONAL))


def exporting_under_dynamo() -> bool:
    """Whether Dynamo is tracing for torch.export(strict=True) right now."""
    # is_compiling() is true under non-strict export and make_fx too; is_dynamo_compiling()
    # (torch >= 2.5) only while Dynamo itself traces.
    # torch 2.4 has no is_exporting(): there this cannot be told, and is taken as no.
    exporting = getattr(torch.compiler, "is_exporting", None)
    if exporting is None:
        return False
    dynamo = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
    return bool(exporting() and dynamo())


def is_traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor of a trace (export's and make_fx's fake and functional
    tensors), which holds no data of its own."""
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t))


def disable_dynamo(fn: Any) -> Any:
    """``fn`` wrapped so that Dynamo never traces into it (it runs as a graph break)."""
    return torch._disable_dynamo(fn)  # type: ignore[attr-defined]


def load_dynamo() -> None:
    """Import Dynamo now. A function wrapped by :func:`disable_dynamo` imports it (and sympy,
    and the warnings filters they install) at its first call, and every dispatch mode's
    ``__torch_dispatch__`` is such a function: the pytest plugin has this happen while pytest
    collects, inside its warning capture, not in the middle of the first watched test."""
    import torch._dynamo  # noqa: F401


def disable_torch_dispatch() -> Any:
    """A context manager under which ops skip every Python dispatch mode (C++ guard)."""
    return torch._C._DisableTorchDispatch()


def current_dispatch_mode() -> Any:
    """The innermost TorchDispatchMode on this thread's stack, or None."""
    return _dispatch._get_current_dispatch_mode()


def pop_dispatch_mode() -> Any:
    """Take the innermost mode off this thread's stack (no ``__exit__``) and return it."""
    return _dispatch._pop_mode()


def push_dispatch_mode(mode: Any) -> None:
    """Put back a mode taken off with :func:`pop_dispatch_mode`."""
    _dispatch._push_mode(mode)


# Module globals that ``TorchDispatchMode.__enter__`` sets and that Dynamo reads to decide
# whether to skip a frame. ``_pop_mode`` does not clear them: on 2.5 to 2.12 a compiled call
# made with the mode popped is still skipped, and Dynamo caches the skip for the code object
# for the rest of the process. 2.4 does not look; 2.5 reads
# `_is_in_non_infra_torch_dispatch_mode`; 2.9 reads
# `_is_in_any_mode_without_ignore_compile_internals` (and mirrors it into C++); 2.13 walks the
# real stack when `inline_torch_dispatch_torch_compile` is on (its default). Each release has
# only some of these names: set the ones that exist.
_MODE_FLAGS = (
    "_is_in_torch_dispatch_mode",
    "_is_in_non_infra_torch_dispatch_mode",
    "_is_in_any_mode_without_ignore_compile_internals",
)


def _flags_for(modes: list[Any]) -> dict[str, bool]:
    def infra(m: Any) -> bool:
        is_infra = getattr(m, "is_infra_mode", None)
        return bool(is_infra()) if callable(is_infra) else False

    def ignores_compile(m: Any) -> bool:
        ignore = getattr(m, "ignore_compile_internals", None)
        return bool(ignore()) if callable(ignore) else False

    return {
        "_is_in_torch_dispatch_mode": bool(modes),
        "_is_in_non_infra_torch_dispatch_mode": any(not infra(m) for m in modes),
        "_is_in_any_mode_without_ignore_compile_internals": any(
            not ignores_compile(m) for m in modes
        ),
    }


def _set_mode_flags(values: dict[str, bool]) -> None:
    for name, value in values.items():
        if hasattr(_dispatch, name):
            setattr(_dispatch, name, value)
    mirror: Optional[Callable[[bool], None]] = getattr(
        _dispatch, "set_is_in_mode_without_ignore_compile_internals", None
    )
    key = "_is_in_any_mode_without_ignore_compile_internals"
    if mirror is not None and key in values:
        mirror(values[key])


@contextlib.contextmanager
def dispatch_mode_flags_match_stack() -> Iterator[None]:
    """Make the flags Dynamo reads describe the modes really on the stack, for the block.

    Used around a compiled call made with immutorch's mode popped, so Dynamo compiles it
    instead of skipping it (and every later call of the same code). The flags are process-wide
    globals in torch, not per thread; they are restored on the way out.
    """
    saved = {name: getattr(_dispatch, name) for name in _MODE_FLAGS if hasattr(_dispatch, name)}
    _set_mode_flags(_flags_for(list(_dispatch._get_current_dispatch_mode_stack())))
    try:
        yield
    finally:
        _set_mode_flags(saved)


# -- the version counter ----------------------------------------------------------------------
def _pick_version_setter() -> Callable[[torch.Tensor, int], None]:
    setter: Any = torch._C._autograd._unsafe_set_version_counter
    probe = torch.empty(0)
    try:
        setter((probe,), (0,))  # 2.9 and later: (Sequence[Tensor], Sequence[int])
    except TypeError:
        setter(probe, 0)  # 2.4 and 2.5: (Tensor, int)
        return setter  # type: ignore[no-any-return]

    def set_many(t: torch.Tensor, version: int) -> None:
        setter((t,), (version,))

    return set_many


_set_version = _pick_version_setter()


def set_version_counter(t: torch.Tensor, version: int) -> None:
    """Set ``t._version``: clone mode re-points an alias at its copy without a visible write."""
    _set_version(t, version)


# -- Dynamo -----------------------------------------------------------------------------------
def dynamo_backends() -> Optional[dict[Any, Any]]:
    """The backends ``torch.compile`` calls have set up in this process, keyed by id; None
    where Dynamo is not loaded (``{}``) or keeps no such record (then assume compile is used).
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:
        return {}
    backends = getattr(eval_frame, "cached_backends", None)
    return backends if isinstance(backends, dict) else None


# -- autograd's saved-tensor hooks and engine ---------------------------------------------------
def push_saved_tensors_hooks(pack: Callable[[Any], Any], unpack: Callable[[Any], Any]) -> None:
    """Make ``pack``/``unpack`` this thread's innermost saved-tensor hooks (what
    ``torch.autograd.graph.saved_tensors_hooks.__enter__`` does, without the object)."""
    torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def pop_saved_tensors_hooks() -> None:
    """Take the innermost saved-tensor hooks off this thread's stack."""
    torch._C._autograd._pop_saved_tensors_default_hooks()


def top_saved_tensors_hooks() -> Optional[tuple[Callable[[Any], Any], Callable[[Any], Any]]]:
    """This thread's innermost (pack, unpack) pair, or None where none is pushed, or where
    the release cannot say (2.4 has no ``_top_saved_tensors_default_hooks``: see
    ``_saved._open``)."""
    top_hooks: Any = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is None:
        return None
    try:
        top = top_hooks(False)  # (ignore_is_tracing) in recent releases
    except TypeError:
        top = top_hooks()
    return None if top is None else (top[0], top[1])


def can_read_saved_hooks() -> bool:
    """Whether this release can say which saved-tensor hooks are on top (2.5 and newer)."""
    return hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks")


def in_backward() -> bool:
    """Whether this thread is running a node of a backward pass. The engine runs each node
    under the thread-local state it captured when backward started, and puts the thread's own
    back afterwards: a dispatch mode popped there comes back."""
    return bool(torch._C._current_graph_task_id() != -1)


def recomputing_hook_types() -> tuple[type, ...]:
    """The saved-tensor hook classes of non-reentrant activation checkpointing: inside them
    autograd saves nothing checkpoint will read back (it recomputes from the inputs it saved
    through the hooks outside). Looked up by name; a release without them gives ()."""
    import torch.utils.checkpoint as checkpoint

    names = ("_checkpoint_hook", "_recomputation_hook")
    return tuple(t for t in (getattr(checkpoint, n, None) for n in names) if isinstance(t, type))


def checkpoint_input_saver_codes() -> tuple[Any, ...]:
    """Code objects of the functions through which non-reentrant checkpointing saves the
    inputs it recomputes from (``_CheckpointFrame.save_inputs`` on 2.13), for naming them."""
    import torch.utils.checkpoint as checkpoint

    frame_cls = getattr(checkpoint, "_CheckpointFrame", None)
    save_inputs = getattr(frame_cls, "save_inputs", None)
    code = getattr(save_inputs, "__code__", None)
    return (code,) if code is not None else ()


def checkpoint_input_saver_functions() -> tuple[type, ...]:
    """The custom autograd Functions through which non-reentrant checkpointing saves its
    inputs on releases that have one (``_NoopSaveInputs`` up to 2.9; gone by 2.13)."""
    import torch.utils.checkpoint as checkpoint

    saver = getattr(checkpoint, "_NoopSaveInputs", None)
    return (saver,) if isinstance(saver, type) else ()
