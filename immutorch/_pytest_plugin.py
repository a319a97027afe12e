"""The pytest plugin: strict mode for a test suite, with no change to the code under test.

``--immutorch=MODE`` forces every guard and decorator into MODE for the session;
``--immutorch-scope=SCOPE`` forces which ops they intercept (``all`` or ``arguments``);
``--immutorch-modules=PKG[,PKG...]`` protects the inputs of every ``nn.Module`` call whose
class lives in those packages, in every test. The same settings come from the ini keys
``immutorch``, ``immutorch_scope`` and ``immutorch_modules``, the environment variables
``IMMUTORCH_MODE`` and ``IMMUTORCH_SCOPE``, and the marker
``@pytest.mark.immutorch(mode=..., scope=..., modules=...)``. Precedence, weakest first (the
pytest-timeout convention): code < ini < environment < command line < marker.

Whenever the plugin is on (any of these settings, or a marker on the test), the end of the run
lists every place that wrote into protected memory, refused or warned of, one row per place
(``immutorch._findings``); ``--immutorch-report=PATH`` (ini ``immutorch_report``) writes the
same as JSON. Under pytest-xdist the workers' findings merge into the controller's report.

Strict mode (a mode from any source but the code) forces the scope too: the one configured,
else ``all``. A test suite wants every write caught: there precision beats speed.

pytest loads this module in every run wherever immutorch is installed, so it imports nothing
heavy: torch and the immutorch core are imported inside the hooks, and only when a setting asks
for them. ``-p no:immutorch`` turns the plugin off.

    pytest --immutorch=raise --immutorch-modules=mypkg
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional, cast

import pytest

if TYPE_CHECKING:
    import torch

    from ._config import Mode, Scope
    from ._findings import Findings

# Copies of immutorch._config.MODES, ENV_VAR, SCOPES and SCOPE_ENV_VAR: importing _config here
# would import the immutorch package. tests/test_plugin.py checks that they agree.
MODES: tuple[str, ...] = ("raise", "warn", "clone", "off")
ENV_VAR = "IMMUTORCH_MODE"
SCOPES: tuple[str, ...] = ("all", "arguments")
SCOPE_ENV_VAR = "IMMUTORCH_SCOPE"

_CMDLINE = "command line"
_INI = "ini file"
_ENV = f"environment {ENV_VAR}"
_SCOPE_ENV = f"environment {SCOPE_ENV_VAR}"
_MARKER = "marker"
_DEFAULT = "default for modules"
_STRICT_DEFAULT = "default in strict mode"
# The scope strict mode runs in when none is configured: every op, so no write slips past.
STRICT_SCOPE = "all"


@dataclass(frozen=True)
class _Settings:
    """What the plugin does for a session or a test: the mode and the scope and where each
    came from (None: each guard keeps its own), and the packages whose modules' inputs are
    protected."""

    mode: Optional[Mode] = None
    mode_source: Optional[str] = None
    modules: tuple[str, ...] = ()
    scope: Optional[Scope] = None
    scope_source: Optional[str] = None

    @property
    def forced(self) -> bool:
        """Does this mode override every guard's own? Not when it comes from the environment:
        ``immutorch._config.resolve`` reads ``IMMUTORCH_MODE`` itself (and so honours a test's
        ``monkeypatch.setenv``); not when it is only the default for ``--immutorch-modules``."""
        return self.mode is not None and self.mode_source in (_INI, _CMDLINE, _MARKER)

    @property
    def strict(self) -> bool:
        """Strict mode: a mode from the ini file, the environment, the command line or a
        marker (not the default that ``--immutorch-modules`` alone gets)."""
        return self.mode is not None and self.mode_source in (_INI, _ENV, _CMDLINE, _MARKER)

    @property
    def forced_scope(self) -> Optional[Scope]:
        """The scope the plugin forces on every guard, decorator and watch (None: none).

        A configured scope is forced, with or without strict mode, except one from the
        environment: ``immutorch._config.resolve_scope`` reads ``IMMUTORCH_SCOPE`` itself, as
        ``resolve`` does ``IMMUTORCH_MODE``. In strict mode with no scope configured: ``all``,
        for a test suite wants every write caught, and there precision beats speed."""
        if self.scope is not None:
            return self.scope if self.scope_source != _SCOPE_ENV else None
        return cast("Scope", STRICT_SCOPE) if self.strict else None

    def describe_scope(self) -> Optional[str]:
        """``scope=all (default in strict mode)`` for the header; None when no scope is set."""
        if self.scope is not None:
            return f"scope={self.scope} ({self.scope_source})"
        if self.strict:
            return f"scope={STRICT_SCOPE} ({_STRICT_DEFAULT})"
        return None

    @property
    def watches(self) -> bool:
        return bool(self.modules) and self.mode is not None and self.mode != "off"


_SESSION = pytest.StashKey[_Settings]()
_TEST = pytest.StashKey[_Settings]()
_PREVIOUS_OVERRIDE: pytest.StashKey[Optional[Mode]] = pytest.StashKey()
_PREVIOUS_SCOPE_OVERRIDE: pytest.StashKey[Optional[Scope]] = pytest.StashKey()
_FINDINGS = pytest.StashKey["Findings"]()
_POSITIONS = pytest.StashKey[dict[str, int]]()


# -- parsing ----------------------------------------------------------------------------------
def _check_choice(value: object, choices: tuple[str, ...], source: str) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    allowed = ", ".join(repr(c) for c in choices)
    raise pytest.UsageError(f"immutorch: {source} must be one of {allowed}, got {value!r}")


def _check_mode(value: object, source: str) -> Mode:
    return cast("Mode", _check_choice(value, MODES, source))


def _check_scope(value: object, source: str) -> Scope:
    return cast("Scope", _check_choice(value, SCOPES, source))


def _check_modules(value: object, source: str) -> tuple[str, ...]:
    """``"a, b.c"`` or ``["a", "b.c"]`` -> ``("a", "b.c")``: dotted package names."""
    if isinstance(value, str):
        items = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise pytest.UsageError(
            f"immutorch: {source} must be package names, as a comma-separated string or a "
            f"list of strings; got {value!r}"
        )
    for name in items:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise pytest.UsageError(
                f"immutorch: {source} must be dotted package names like 'mypkg' or "
                f"'mypkg.models'; got {name!r}"
            )
    return tuple(items)


def _from_sources(
    config: pytest.Config,
    ini: str,
    env_var: str,
    env_source: str,
    option: str,
    dest: str,
    choices: tuple[str, ...],
) -> tuple[Any, Optional[str]]:
    """A setting from the ini file < the environment < the command line, each source that is
    set validated: (value, where it came from), or (None, None)."""
    inifile = f" ({config.inipath})" if config.inipath else ""
    value: Optional[str] = None
    source: Optional[str] = None
    from_ini = str(config.getini(ini) or "").strip()
    if from_ini:
        value, source = _check_choice(from_ini, choices, f"the ini option {ini}{inifile}"), _INI
    from_env = os.environ.get(env_var, "").strip()
    if from_env:
        value = _check_choice(from_env, choices, f"the environment variable {env_var}")
        source = env_source
    from_cmd: Optional[str] = config.getoption(dest)
    if from_cmd is not None:
        value, source = _check_choice(from_cmd, choices, option), _CMDLINE
    return value, source


def _session_settings(config: pytest.Config) -> _Settings:
    """Resolve ini < environment < command line, validating each source that is set."""
    inifile = f" ({config.inipath})" if config.inipath else ""
    mode: Optional[Mode]
    mode, source = _from_sources(
        config, "immutorch", ENV_VAR, _ENV, "--immutorch", "immutorch_mode", MODES
    )
    scope: Optional[Scope]
    scope, scope_source = _from_sources(
        config,
        "immutorch_scope",
        SCOPE_ENV_VAR,
        _SCOPE_ENV,
        "--immutorch-scope",
        "immutorch_scope",
        SCOPES,
    )

    modules: tuple[str, ...] = ()
    ini_modules = str(config.getini("immutorch_modules") or "").strip()
    if ini_modules:
        modules = _check_modules(ini_modules, f"the ini option immutorch_modules{inifile}")
    cmd_modules: Optional[str] = config.getoption("immutorch_modules")
    if cmd_modules is not None:
        modules = _check_modules(cmd_modules, "--immutorch-modules")
    if modules and mode is None:
        mode, source = "raise", _DEFAULT
    return _Settings(mode, source, modules, scope, scope_source)


def _test_settings(item: pytest.Item) -> _Settings:
    """The session's settings, with the closest ``immutorch`` marker's on top."""
    session = item.config.stash.get(_SESSION, _Settings())
    marker = item.get_closest_marker("immutorch")
    if marker is None:
        return session
    source = f"@pytest.mark.immutorch on {item.nodeid}"
    kwargs = dict(marker.kwargs)
    kwargs.pop("saved", None)  # read by _saved_in_test
    if (
        set(kwargs) - {"mode", "modules", "scope"}
        or len(marker.args) > 1
        or (marker.args and "mode" in kwargs)
    ):
        raise pytest.UsageError(
            f"immutorch: {source} takes mode=... (or one positional mode), scope=..., "
            f"modules=... and saved=...; got args {marker.args!r} and kwargs {kwargs!r}"
        )
    if marker.args:
        kwargs["mode"] = marker.args[0]
    mode, mode_source = session.mode, session.mode_source
    if kwargs.get("mode") is not None:
        mode, mode_source = _check_mode(kwargs["mode"], f"mode= of {source}"), _MARKER
    modules = session.modules
    if kwargs.get("modules") is not None:
        modules = _check_modules(kwargs["modules"], f"modules= of {source}")
    if modules and mode is None:
        mode, mode_source = "raise", _DEFAULT
    scope, scope_source = session.scope, session.scope_source
    if kwargs.get("scope") is not None:
        scope, scope_source = _check_scope(kwargs["scope"], f"scope= of {source}"), _MARKER
    return _Settings(mode, mode_source, modules, scope, scope_source)


# -- the hooks --------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "immutorch", "immutorch: refuse writes into the tensors that code was handed"
    )
    modes = "|".join(MODES)
    group.addoption(
        "--immutorch",
        dest="immutorch_mode",
        metavar="MODE",
        default=None,
        help=(
            f"Run every immutorch guard and decorator in MODE ({modes}) for the session, "
            "whatever mode the code asks for. --immutorch=raise is strict mode; "
            f"--immutorch=off turns immutorch off. Overrides the ini option and {ENV_VAR}."
        ),
    )
    scopes = "|".join(SCOPES)
    group.addoption(
        "--immutorch-scope",
        dest="immutorch_scope",
        metavar="SCOPE",
        default=None,
        help=(
            f"Which ops every immutorch guard, decorator and watch intercepts ({scopes}): "
            "all ops on the thread, or only those whose arguments include protected tensors "
            "(cheaper; misses writes through other references). Strict mode forces 'all' "
            f"unless this, the ini option or {SCOPE_ENV_VAR} says otherwise."
        ),
    )
    group.addoption(
        "--immutorch-modules",
        dest="immutorch_modules",
        metavar="PKG[,PKG...]",
        default=None,
        help=(
            "In every test, protect the tensor inputs of each call to an nn.Module whose "
            "class is defined in one of these packages (or their subpackages), with no code "
            "change. Mode: the one --immutorch, the ini option or IMMUTORCH_MODE sets, else "
            "raise. Modules called through Module.__call__ are seen, not .forward() calls."
        ),
    )
    parser.addini(
        "immutorch",
        type="string",
        default="",
        help=f"immutorch mode for the session ({modes}); {ENV_VAR} and --immutorch override it.",
    )
    parser.addini(
        "immutorch_scope",
        type="string",
        default="",
        help=f"immutorch scope for the session ({scopes}); {SCOPE_ENV_VAR} and "
        "--immutorch-scope override it.",
    )
    group.addoption(
        "--immutorch-inplace-modules",
        dest="immutorch_inplace_modules",
        action="store_true",
        default=None,
        help=(
            "Also protect the inputs of watched modules built to write in place "
            "(inplace=True, e.g. nn.ReLU(inplace=True)), which are exempt by default."
        ),
    )
    parser.addini(
        "immutorch_inplace_modules",
        type="bool",
        default=False,
        help="Also watch modules with inplace=True; --immutorch-inplace-modules sets it too.",
    )
    parser.addini(
        "immutorch_modules",
        type="string",
        default="",
        help="Comma-separated packages whose nn.Modules' inputs are protected in every test; "
        "--immutorch-modules overrides it.",
    )
    _add_report_options(group, parser)
    _add_saved_options(group, parser)


def _add_report_options(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    group.addoption(
        "--immutorch-report",
        dest="immutorch_report",
        metavar="PATH",
        default=None,
        help=(
            "Write every place that wrote into protected memory during the run (the rows of "
            "the terminal summary's immutorch section) to PATH as JSON, the rows in the "
            "schema of `immutorch audit --json`. Turns the plugin on for every test."
        ),
    )
    parser.addini(
        "immutorch_report",
        type="string",
        default="",
        help="Path of the JSON findings report (relative to the ini file); "
        "--immutorch-report overrides it.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "immutorch(mode=None, modules=None, scope=None, saved=None): for this test, run "
        "immutorch guards "
        "in MODE (raise, warn, clone, off) and SCOPE (all, arguments; all when a mode is "
        "forced and no scope is set), and protect the inputs of the nn.Modules of the listed "
        "packages; saved=True (False) turns guard_saved on (off) for the test body; overrides "
        "--immutorch, --immutorch-scope, --immutorch-modules, --immutorch-saved, the ini "
        f"options, {ENV_VAR}, {SCOPE_ENV_VAR} and {SAVED_ENV_VAR}.",
    )
    config.stash[_SAVED] = _saved_setting(config)
    settings = _session_settings(config)
    config.stash[_SESSION] = settings
    _configure_findings(config, settings)
    if settings.mode is not None or settings.modules or settings.forced_scope is not None:
        _check_core_imports(settings)
    if settings.forced:
        from . import _config

        config.stash[_PREVIOUS_OVERRIDE] = _config.set_override(settings.mode)
    if settings.forced_scope is not None:
        from . import _config

        config.stash[_PREVIOUS_SCOPE_OVERRIDE] = _config.set_scope_override(settings.forced_scope)


# What immutorch imports; looked up without importing them, so that a run with a mode only
# still leaves torch to the code under test.
_DEPENDENCIES = ("torch", "wrapt", "typing_extensions")


def _check_core_imports(settings: _Settings) -> None:
    """Stop the run at start-up, once, when immutorch's dependencies are missing, instead of
    failing every test that reaches a guard. Looked up, not imported: importing torch here
    would change the suite (see :func:`pytest_collection`)."""
    import importlib.util

    missing = [name for name in _DEPENDENCIES if _find_spec(importlib.util, name) is None]
    if missing:
        _cannot_import(settings, missing)


def _cannot_import(
    settings: _Settings, missing: list[str], problem: Optional[BaseException] = None
) -> NoReturn:
    on = (
        f"mode={settings.mode} from {settings.mode_source}"
        if settings.mode is not None
        else f"scope={settings.scope} from {settings.scope_source}"
    )
    raise pytest.UsageError(
        f"immutorch: the plugin is on ({on}) but immutorch cannot be imported: "
        f"{', '.join(missing)} is missing. Install it (`pip install {' '.join(missing)}`, "
        "or reinstall immutorch), or turn the plugin off with -p no:immutorch."
    ) from problem


def pytest_collection(session: pytest.Session) -> None:
    """With a module watch, import the core (and so torch) once, before the first test, and
    fail the run here if it cannot be imported.

    Not at configure time: pytest's warning capture wraps collection but not configure, and
    torch installs warnings filters at import (``TracerWarning.ignore_lib_warnings`` ignores
    every TracerWarning from modules named ``torch*`` but ``torch.jit``). Imported outside
    the capture, those filters stayed for the whole session, and the suite's TracerWarnings
    from torch's own code vanished from its warnings summary. Imported here, they last for
    collection only, as when the suite's test modules import torch themselves. So does what
    the first watched call would import (Dynamo, sympy): not in the middle of a test.
    """
    config = session.config
    settings = config.stash.get(_SESSION, _Settings())
    if not settings.watches or config.pluginmanager.hasplugin("dsession"):
        return  # nothing to watch, or an xdist controller, which runs no test
    try:
        from . import _boundaries
    except ImportError as exc:
        _cannot_import(settings, [getattr(exc, "name", None) or str(exc)], exc)
    from . import _compat

    # The first watched module call would import Dynamo (and sympy) inside a test.
    _compat.load_dynamo()
    # The module-call shell stays on from here to the end of the run, not on and off around
    # each test: each new watch after the shell was off must walk every nn.Module class (a
    # class wrapped by torch.compiler.disable meanwhile would bypass it), which cost more
    # than all else a strict-mode test paid in kornia's suite (~1 ms a test, of ~15 ms).
    # Between tests, and in a test marked off, module calls pay only the empty shell.
    _boundaries.acquire_hooks()
    config.add_cleanup(_boundaries.release_hooks)


def _find_spec(util: Any, name: str) -> Any:
    try:
        return util.find_spec(name)
    except (ImportError, ValueError):
        return None


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PREVIOUS_OVERRIDE in config.stash:
        from . import _config

        _config.set_override(config.stash[_PREVIOUS_OVERRIDE])
        del config.stash[_PREVIOUS_OVERRIDE]
    if _PREVIOUS_SCOPE_OVERRIDE in config.stash:
        from . import _config

        _config.set_scope_override(config.stash[_PREVIOUS_SCOPE_OVERRIDE])
        del config.stash[_PREVIOUS_SCOPE_OVERRIDE]


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash.get(_SESSION, _Settings())
    parts = []
    if settings.mode is not None:
        parts.append(f"mode={settings.mode} ({settings.mode_source})")
    scope = settings.describe_scope()
    if scope is not None:
        parts.append(scope)
    if settings.modules:
        parts.append(f"modules={','.join(settings.modules)}")
    saved = config.stash.get(_SAVED, None)
    if saved is not None:
        parts.append(f"saved ({saved})")
    if not parts:
        return []
    # Without importing torch here: the header runs before collection, outside pytest's
    # warning capture, and torch's import installs warnings filters (see _watch).
    from . import _backends

    native = sys.modules.get("immutorch._backends.native")
    backend = native.status() if native is not None else _backends.requested_status()
    return [f"immutorch: {', '.join(parts)}", f"immutorch: every-op backend: {backend}"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[_TEST] = _Settings()
    problem: Optional[str] = None
    try:
        item.stash[_TEST] = _test_settings(item)
    except pytest.UsageError as error:
        problem = str(error)
    if problem is not None:
        # A bad marker errors this test alone, at setup, before any of it runs.
        pytest.fail(problem, pytrace=False)
    with _marker_override(item.stash[_TEST]):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    settings = item.stash.get(_TEST, _Settings())
    with _marker_override(settings), _watch(settings, _include_inplace(item.config)):
        with _saved_in_test(item):
            yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, None, None]:
    """Make a refused write read like the user's bug: the ImmutableTensorError (recovered
    from TorchScript's rewrap) with the user's line last, torch's frames between that line and
    immutorch's dispatch mode (Module._call_impl, the dynamo disable-wrapper) left out."""
    if call.excinfo is not None:
        _readable_refusal(call)
    yield


def _readable_refusal(call: pytest.CallInfo[None]) -> None:
    import sys

    excinfo = call.excinfo
    if excinfo is None or "immutorch._policy" not in sys.modules:
        return  # nothing of immutorch's ran: no refusal to show
    from ._errors import ImmutableTensorError, MutationWarning
    from ._policy import recover_dispatch_error

    value = excinfo.value
    if not isinstance(value, (ImmutableTensorError, MutationWarning)):
        refused = recover_dispatch_error(value)
        if refused is None or not hasattr(pytest.ExceptionInfo, "from_exception"):
            return
        # The remembered copy has no traceback: it takes the frames the rewrap went through.
        refused = refused.with_traceback(value.__traceback__)
        refused.__cause__ = value
        excinfo = call.excinfo = pytest.ExceptionInfo.from_exception(refused)
    torch_dir = _package_dir("torch")
    if torch_dir is None:
        return
    _unlink_frames(excinfo.tb, torch_dir)
    excinfo.traceback = pytest.ExceptionInfo.from_exception(excinfo.value).traceback


def _unlink_frames(tb: Optional[TracebackType], prefix: str) -> None:
    """Drop the frames of files under ``prefix`` from the traceback chain itself (pytest
    rebuilds its view from the raw chain when it cuts to the test, so filtering its view is
    not enough). The first frame, pytest's own, always stays."""
    while tb is not None:
        after = tb.tb_next
        while after is not None and after.tb_frame.f_code.co_filename.startswith(prefix):
            after = after.tb_next
        tb.tb_next = after
        tb = after


def _package_dir(name: str) -> Optional[str]:
    import sys

    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    settings = item.stash.get(_TEST, _Settings())
    with _marker_override(settings):
        yield


@contextlib.contextmanager
def _marker_override(settings: _Settings) -> Iterator[None]:
    """A marker's mode and scope override every guard for each phase of its test; the
    session's overrides (set in pytest_configure) come back after. A marker's mode is strict
    mode, and so forces a scope too: the configured one, else ``all``."""
    sets_mode = settings.mode_source == _MARKER
    if not sets_mode and settings.scope_source != _MARKER:
        yield
        return
    from . import _config

    previous = _config.set_override(settings.mode) if sets_mode else None
    previous_scope = _config.set_scope_override(settings.forced_scope)
    try:
        yield
    finally:
        _config.set_scope_override(previous_scope)
        if sets_mode:
            _config.set_override(previous)


def _include_inplace(config: pytest.Config) -> bool:
    return bool(
        config.getoption("immutorch_inplace_modules") or config.getini("immutorch_inplace_modules")
    )


@contextlib.contextmanager
def _watch(settings: _Settings, include_inplace: bool = False) -> Iterator[None]:
    """Protect the inputs of the watched packages' modules for the test body."""
    if not settings.watches or settings.mode is None:
        yield
        return
    from . import _boundaries

    # The watch is the plugin's own: complete ("all") unless a scope was configured, as in
    # strict mode; an override, if any, still wins inside watch_modules.
    with _boundaries.watch_modules(
        _class_in(settings.modules),
        settings.mode,
        include_inplace=include_inplace,
        scope=settings.scope or "all",
    ):
        yield


def _class_in(packages: tuple[str, ...]) -> Callable[[torch.nn.Module], bool]:
    """A predicate: is the module's class defined in one of ``packages`` (or below)?"""
    prefixes = tuple(p + "." for p in packages)
    seen: dict[type, bool] = {}

    def accepts(module: torch.nn.Module) -> bool:
        cls = type(module)
        hit = seen.get(cls)
        if hit is None:
            name = _scripted_source_module(module)
            if name is not None:  # every scripted module shares one class: no cache
                return name in packages or name.startswith(prefixes)
            name = getattr(cls, "__module__", None) or ""
            hit = seen[cls] = name in packages or name.startswith(prefixes)
        return hit

    return accepts


def _scripted_source_module(module: torch.nn.Module) -> Optional[str]:
    """For a ScriptModule, the Python module its original class was defined in (TorchScript
    keeps it in the type's qualified name: ``__torch__.pkg.layers.___torch_mangle_3.Zeroing``);
    None for any other module."""
    import torch

    if not isinstance(module, torch.jit.ScriptModule):
        return None
    try:
        qualified: str = module._c._type().qualified_name()
    except (AttributeError, RuntimeError):
        return ""
    parts = [p for p in qualified.split(".")[1:-1] if not p.startswith("___torch_mangle")]
    return ".".join(parts)


# -- the findings report ----------------------------------------------------------------------
_REPORT = pytest.StashKey[Optional[str]]()
_ON = pytest.StashKey[bool]()
_SECTION = "immutorch: writes into protected memory"


def _configure_findings(config: pytest.Config, settings: _Settings) -> None:
    """Where the JSON report goes (None: nowhere), and whether every test is watched for
    findings: with any setting on, or a report asked for; else only the marked tests."""
    path: Optional[str] = None
    from_cmd: Optional[str] = config.getoption("immutorch_report")
    from_ini = str(config.getini("immutorch_report") or "").strip()
    if from_cmd:
        path = os.path.join(str(config.invocation_params.dir), from_cmd)
    elif from_ini:
        base = config.inipath.parent if config.inipath else config.rootpath
        path = os.path.join(str(base), from_ini)
    config.stash[_REPORT] = os.path.normpath(path) if path else None
    config.stash[_ON] = (
        settings.mode is not None
        or bool(settings.modules)
        or settings.scope is not None
        or path is not None
    )


def _findings_of(config: pytest.Config) -> Findings:
    found = config.stash.get(_FINDINGS, None)
    if found is None:
        from ._findings import Findings

        found = config.stash[_FINDINGS] = Findings()
    return found


def pytest_collection_finish(session: pytest.Session) -> None:
    # Each test's place in the run: the same in every xdist worker, so merged rows name the
    # same first test as a run without xdist.
    session.config.stash[_POSITIONS] = {item.nodeid: i for i, item in enumerate(session.items)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """Hear every write into protected memory from the test's setup to its teardown."""
    config = item.config
    if not config.stash.get(_ON, False) and item.get_closest_marker("immutorch") is None:
        yield
        return
    from . import _recorder

    findings = _findings_of(config)
    positions = config.stash.get(_POSITIONS, {})
    findings.start_test(item.nodeid, positions.get(item.nodeid, len(positions) + findings.tests))
    _recorder.add_listener(findings.hear)
    try:
        yield
    finally:
        _recorder.remove_listener(findings.hear)
        findings.end_test()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, in the controller: a worker is done; merge the findings it sent."""
    from ._findings import WIRE_KEY

    data = getattr(node, "workeroutput", {}).get(WIRE_KEY)
    if data:
        _findings_of(node.config).merge_wire(data)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    findings = config.stash.get(_FINDINGS, None)
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports
        if findings is not None:
            from ._findings import WIRE_KEY

            workeroutput[WIRE_KEY] = findings.to_wire()
        return
    path = config.stash.get(_REPORT, None)
    if path is None:
        return
    import json

    from ._findings import Findings, report

    settings = config.stash.get(_SESSION, _Settings())
    asked = {
        "mode": settings.mode,
        "mode_source": settings.mode_source,
        "scope": settings.forced_scope,
        "modules": list(settings.modules),
    }
    document = report(findings if findings is not None else Findings(), str(config.rootpath), asked)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)
        file.write("\n")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workeroutput"):
        return
    findings = config.stash.get(_FINDINGS, None)
    if findings:
        from ._findings import summary_lines

        terminalreporter.write_sep("=", _SECTION, yellow=True)
        for line in summary_lines(findings, str(config.rootpath)):
            terminalreporter.write_line(line)
    path = config.stash.get(_REPORT, None)
    if path is not None:
        terminalreporter.write_line(f"immutorch: findings report written to {path}")


# -- guard_saved for every test (--immutorch-saved) -----------------------------------------------
SAVED_ENV_VAR = "IMMUTORCH_SAVED"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# Where the session's "guard_saved in every test" came from, or None where it is off.
_SAVED = pytest.StashKey[Optional[str]]()


def _add_saved_options(group: Any, parser: pytest.Parser) -> None:
    group.addoption(
        "--immutorch-saved",
        dest="immutorch_saved",
        action="store_true",
        default=None,
        help=(
            "Run every test body under immutorch.guard_saved(): a write into a tensor autograd "
            "saved for backward is refused (in the mode --immutorch or IMMUTORCH_MODE sets, "
            f"else raise). Also the ini option immutorch_saved and {SAVED_ENV_VAR}=1."
        ),
    )
    parser.addini(
        "immutorch_saved",
        type="bool",
        default=False,
        help=f"Run every test body under immutorch.guard_saved(); {SAVED_ENV_VAR} and "
        "--immutorch-saved set it too.",
    )


def _saved_setting(config: pytest.Config) -> Optional[str]:
    """ini < environment < command line: the source that turned it on, or None (off)."""
    source: Optional[str] = _INI if config.getini("immutorch_saved") else None
    raw = os.environ.get(SAVED_ENV_VAR, "").strip().lower()
    if raw in _TRUE:
        source = f"environment {SAVED_ENV_VAR}"
    elif raw in _FALSE:
        source = None
    elif raw:
        choices = ", ".join(repr(v) for v in _TRUE + _FALSE)
        raise pytest.UsageError(
            f"immutorch: the environment variable {SAVED_ENV_VAR} must be one of {choices}, "
            f"got {raw!r}"
        )
    if config.getoption("immutorch_saved"):
        source = _CMDLINE
    return source


def _saved_for(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("immutorch")
    if marker is not None and "saved" in marker.kwargs:
        value = marker.kwargs["saved"]
        if not isinstance(value, bool):
            raise pytest.UsageError(
                f"immutorch: saved= of @pytest.mark.immutorch on {item.nodeid} must be True or "
                f"False, got {value!r}"
            )
        return value
    return item.config.stash.get(_SAVED, None) is not None


@contextlib.contextmanager
def _saved_in_test(item: pytest.Item) -> Iterator[None]:
    """The test body under guard_saved (its mode: the plugin's override, else raise)."""
    if not _saved_for(item):
        yield
        return
    from ._saved import GuardSaved

    with GuardSaved("raise", where="guard_saved() of pytest --immutorch-saved"):
        yield
