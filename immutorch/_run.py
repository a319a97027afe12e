"""``python -m immutorch run``: a script (or ``-m MODULE``) under the settings strict mode forces.

Like ``coverage run``: the script runs in this process as ``__main__``, with ``sys.argv`` and
``sys.path[0]`` as Python would set them, while every guard and decorator runs in ``--mode``
(and ``--scope``, ``all`` unless told), the inputs of the ``--modules`` packages' modules are
protected, and with ``--saved`` the whole run is under ``guard_saved``. The pytest plugin
forces the same in a test suite. A refused write ends the run with immutorch's message, the
script's frames down to the line that wrote, and exit status 1.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import traceback
from collections.abc import Iterator
from typing import Any, Optional, TextIO

REFUSED = 1  # the exit status of a run stopped at a refused write


def run(
    *,
    script: Optional[str],
    module: Optional[str],
    args: list[str],
    mode: str,
    scope: str,
    modules: tuple[str, ...],
    saved: bool,
    err: TextIO,
) -> int:
    """Run the script or module; return its exit status."""
    from . import _config
    from ._errors import ImmutableTensorError
    from ._policy import recover_dispatch_error

    previous = _config.set_override(_config.check_mode(mode))
    previous_scope = _config.set_scope_override(_config.check_scope(scope))
    try:
        with _as_main(script, module, args), _settings(mode, scope, modules, saved):
            try:
                if module is not None:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    assert script is not None
                    runpy.run_path(script, run_name="__main__")
            except SystemExit as exc:
                return _exit_status(exc.code, err)
            except BaseException as exc:
                refused = exc if isinstance(exc, ImmutableTensorError) else None
                if refused is None:
                    original = recover_dispatch_error(exc)  # TorchScript's rewrap
                    if isinstance(original, ImmutableTensorError):
                        refused = original.with_traceback(exc.__traceback__)
                if refused is None:
                    traceback.print_exc(file=err)
                    return 1
                _report(refused, err)
                return REFUSED
        return 0
    finally:
        _config.set_scope_override(previous_scope)
        _config.set_override(previous)


@contextlib.contextmanager
def _settings(mode: str, scope: str, modules: tuple[str, ...], saved: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if modules and mode != "off":
            from ._boundaries import watch_modules
            from ._pytest_plugin import _class_in

            stack.enter_context(
                watch_modules(_class_in(modules), mode, scope=scope)  # type: ignore[arg-type]
            )
        if saved:
            from ._saved import GuardSaved

            where = "guard_saved() of python -m immutorch run --saved"
            stack.enter_context(GuardSaved(mode, where=where))  # type: ignore[arg-type]
        yield


@contextlib.contextmanager
def _as_main(script: Optional[str], module: Optional[str], args: list[str]) -> Iterator[None]:
    """``sys.argv`` and ``sys.path[0]`` as ``python SCRIPT`` or ``python -m MODULE`` sets them,
    restored afterwards (the command may run in a caller's process, as in the tests)."""
    argv, path = sys.argv[:], sys.path[:]
    main = sys.modules.get("__main__")
    if module is not None:
        sys.argv = [module, *args]  # runpy puts the module's file in argv[0]
        sys.path.insert(0, os.getcwd())
    else:
        assert script is not None
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        yield
    finally:
        sys.argv[:] = argv
        sys.path[:] = path
        if main is not None:
            sys.modules["__main__"] = main


def _exit_status(code: Any, err: TextIO) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=err)  # what Python does with SystemExit("message")
    return 1


def _report(refused: BaseException, err: TextIO) -> None:
    """The script's frames (no torch, immutorch or runpy machinery) and immutorch's message."""
    frames = [f for f in traceback.extract_tb(refused.__traceback__) if _is_users(f.filename)]
    print("Traceback (the script's frames, most recent call last):", file=err)
    print("".join(traceback.format_list(frames)).rstrip("\n"), file=err)
    print(f"{type(refused).__module__}.{type(refused).__name__}: {refused}", file=err)
    location = getattr(refused, "location", None)
    where = f" at {location}" if location else ""
    print(f"\npython -m immutorch run: stopped at a refused write{where}.", file=err)


def _is_users(filename: str) -> bool:
    import torch

    if filename.startswith("<frozen"):
        return False
    name = os.path.abspath(filename)
    machinery = (
        os.path.dirname(os.path.abspath(torch.__file__ or "")) + os.sep,
        os.path.dirname(os.path.abspath(__file__)) + os.sep,  # immutorch
        os.path.abspath(runpy.__file__ or ""),
    )
    return not name.startswith(machinery)
