"""The pytest plugin: strict mode, module watching, precedence, errors, and a light import.

Runs that exercise torch (a module or decorator writing into its input) go through
``runpytest_subprocess``: in-process runs drop the modules they import first from
``sys.modules`` afterwards. Runs that only resolve settings stay in-process, where they are
fast; their test files import nothing but ``immutorch._config``, already imported here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401  (see below)
from corpus import ELEMENT_ASSIGN, any_op
from project_files import LAYERS, write_files

import immutorch._pytest_plugin as plugin
from immutorch import _config

pytest_plugins = ["pytester"]

# An in-process run with a module watch imports Dynamo while it collects (the plugin loads it
# there, not in the first watched test); pytester drops the modules an in-process run imported
# first, and Dynamo cannot be imported twice in one process: so it is imported here, once.


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inner runs see no mode or scope from this session: no environment, no override."""
    monkeypatch.delenv(_config.ENV_VAR, raising=False)
    monkeypatch.delenv(_config.SCOPE_ENV_VAR, raising=False)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    previous = _config.set_override(None)
    previous_scope = _config.set_scope_override(None)
    try:
        yield
    finally:
        _config.set_override(previous)
        _config.set_scope_override(previous_scope)


# -- a small project: a package whose modules write into their input -------------------------
PROJECT = {
    "pkg/__init__.py": "",
    "pkg/layers.py": LAYERS,
    # Shares a prefix with "pkg" but is another package: not watched by --immutorch-modules=pkg.
    "pkgextra/__init__.py": """
        import torch


        class Rectifying(torch.nn.Module):
            def forward(self, x):
                return x.relu_()
    """,
    "userlib.py": """
        from immutorch import immutable_inputs


        @immutable_inputs(mode="raise")
        def shift(x):
            x.add_(1)
            return x
    """,
    "test_models.py": """
        import torch
        from pkg.layers import Doubling, Zeroing
        from pkgextra import Rectifying


        def test_zeroing():
            x = torch.ones(3)
            Zeroing()(x)


        def test_doubling():
            x = torch.ones(3)
            assert Doubling()(x).sum() == 6


        def test_other_package():
            x = -torch.ones(3)
            Rectifying()(x)
    """,
    "test_decorated.py": """
        import torch
        from userlib import shift


        def test_shift():
            shift(torch.zeros(2))
    """,
    "test_marked.py": """
        import pytest
        import torch
        from pkg.layers import Zeroing


        @pytest.mark.immutorch(modules="pkg")
        def test_marked():
            Zeroing()(torch.ones(3))


        def test_unmarked():
            Zeroing()(torch.ones(3))
    """,
}


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_files(pytester.path, PROJECT)
    return pytester


def test_strict_mode_fails_a_watched_module_that_writes_its_input(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest_subprocess(
        "--immutorch=raise", "--immutorch-modules=pkg", "test_models.py"
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["immutorch: mode=raise (command line), scope=all (default in strict mode), modules=pkg"]
    )
    result.stdout.fnmatch_lines(["FAILED test_models.py::test_zeroing - *ImmutableTensorError*"])
    out = result.stdout.str()
    # The module class, the op, and the module's own source line.
    zeroing = rf"{any_op(ELEMENT_ASSIGN)} would write into `x`.*protected by the watch on Zeroing"
    assert re.search(zeroing, out)
    assert re.search(r"at .*pkg[/\\]layers\.py:6\b", out)


def test_without_options_only_the_marked_test_and_the_decorator_fail(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "FAILED test_decorated.py::test_shift - *ImmutableTensorError*",
            "FAILED test_marked.py::test_marked - *ImmutableTensorError*",
            "E * aten::add_ would write into `x` *, protected by immutable_inputs on userlib.shift",
            "E * aten::*_ would write into `x` *, protected by the watch on Zeroing",
        ]
    )
    zeroing = (
        rf"E .* {any_op(ELEMENT_ASSIGN)} would write into `x` .*, protected by the watch on Zeroing"
    )
    assert re.search(zeroing, result.stdout.str())
    result.stdout.no_fnmatch_line("immutorch: mode=*")


def test_warn_mode_reports_and_lets_the_write_happen(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess(
        "--immutorch=warn", "--immutorch-modules=pkg", "test_models.py", "test_decorated.py"
    )
    result.assert_outcomes(passed=4, warnings=2)
    result.stdout.fnmatch_lines_random(
        [
            "immutorch: mode=warn (command line), scope=all (default in strict mode), modules=pkg",
            "*MutationWarning: immutorch: aten::*_ would write*Zeroing*",
            "*MutationWarning: immutorch: aten::add_ would write*",
        ]
    )
    zeroing = rf"MutationWarning: immutorch: {any_op(ELEMENT_ASSIGN)} would write.*Zeroing"
    assert re.search(zeroing, result.stdout.str())


def test_off_turns_off_decorators_and_watches(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--immutorch=off", "--immutorch-modules=pkg")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        ["immutorch: mode=off (command line), scope=all (default in strict mode), modules=pkg"]
    )


# -- resolution: in-process, nothing but immutorch._config ------------------------------------
RESOLUTION = """
    import pytest
    from immutorch._config import get_override, resolve


    def test_plain():
        print(f"MODE plain={resolve('raise')} override={get_override()}")


    @pytest.mark.immutorch(mode="clone")
    def test_marked():
        print(f"MODE marked={resolve('raise')} override={get_override()}")


    def test_after():
        print(f"MODE after={resolve('raise')} override={get_override()}")
"""


@pytest.mark.parametrize(
    ("ini", "env", "cmdline", "expected", "header"),
    [
        (None, None, None, "raise", None),
        ("warn", None, None, "warn", "immutorch: mode=warn (ini file), *"),
        ("warn", "off", None, "off", "immutorch: mode=off (environment IMMUTORCH_MODE), *"),
        ("warn", "off", "clone", "clone", "immutorch: mode=clone (command line), *"),
        (None, None, "warn", "warn", "immutorch: mode=warn (command line), *"),
    ],
)
def test_precedence_ini_env_cmdline_marker(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str | None,
    env: str | None,
    cmdline: str | None,
    expected: str,
    header: str | None,
) -> None:
    pytester.makepyfile(test_resolution=RESOLUTION)
    if ini is not None:
        pytester.makeini(f"[pytest]\nimmutorch = {ini}\n")
    if env is not None:
        monkeypatch.setenv(_config.ENV_VAR, env)
    args = ["-s", "-p", "no:cacheprovider"]
    if cmdline is not None:
        args.append(f"--immutorch={cmdline}")
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    modes = dict(re.findall(r"MODE (\w+)=(\w+) ", out))
    # The marker beats every other source; the session's mode comes back after it.
    assert modes == {"plain": expected, "marked": "clone", "after": expected}
    if header is None:
        assert "immutorch:" not in out
    else:
        result.stdout.fnmatch_lines([header])
    assert _config.get_override() is None  # restored after the inner session


def test_modules_alone_default_to_raise_without_forcing_guards(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_resolution=RESOLUTION)
    pytester.makeini("[pytest]\nimmutorch_modules = mypkg, other.sub\n")
    result = pytester.runpytest("-s", "-k", "plain")
    result.assert_outcomes(passed=1, deselected=2)
    result.stdout.fnmatch_lines(
        [
            "immutorch: mode=raise (default for modules), modules=mypkg,other.sub",
            "*MODE plain=raise override=None*",
        ]
    )


# -- scope: strict mode is complete unless told otherwise -------------------------------------
# Each test prints the scope override and the scope a guard asking for "all", and one asking for
# "arguments", would run in: OVERRIDE:ALL:ARGUMENTS.
SCOPE_RESOLUTION = """
    import pytest
    from immutorch._config import get_scope_override, resolve_scope


    def show(name):
        scopes = [get_scope_override(), resolve_scope("all"), resolve_scope("arguments")]
        print(f"SCOPE {name}={':'.join(map(str, scopes))} ")


    @pytest.fixture
    def in_setup():
        show("marked_args_setup")
        yield
        show("marked_args_teardown")


    def test_plain():
        show("plain")


    @pytest.mark.immutorch(scope="arguments")
    def test_marked_args(in_setup):
        show("marked_args")


    @pytest.mark.immutorch(scope="all")
    def test_marked_all():
        show("marked_all")


    @pytest.mark.immutorch(mode="clone")
    def test_marked_mode():
        show("marked_mode")


    def test_after():
        show("after")
"""

_NONE = "None:all:arguments"  # no override: each guard keeps the scope its code asks for
_ALL = "all:all:all"
_ARGS = "arguments:arguments:arguments"
_STRICT = "scope=all (default in strict mode)"


@pytest.mark.parametrize(
    ("ini", "env", "args", "plain", "marked_mode", "header"),
    [
        # No strict mode, no scope: no override, the code decides; a marker's mode forces "all".
        ([], {}, [], _NONE, _ALL, None),
        # Strict mode from each source forces "all" when no scope is configured.
        ([], {}, ["--immutorch=raise"], _ALL, _ALL, f"mode=raise (command line), {_STRICT}"),
        (["immutorch = warn"], {}, [], _ALL, _ALL, f"mode=warn (ini file), {_STRICT}"),
        (
            [],
            {"IMMUTORCH_MODE": "warn"},
            [],
            _ALL,
            _ALL,
            f"mode=warn (environment IMMUTORCH_MODE), {_STRICT}",
        ),
        # A scope without strict mode is forced too: someone asked for it.
        (["immutorch_scope = arguments"], {}, [], _ARGS, _ARGS, "scope=arguments (ini file)"),
        ([], {}, ["--immutorch-scope=arguments"], _ARGS, _ARGS, "scope=arguments (command line)"),
        # A configured scope beats the strict-mode default.
        (
            ["immutorch = raise", "immutorch_scope = Arguments"],
            {},
            [],
            _ARGS,
            _ARGS,
            "mode=raise (ini file), scope=arguments (ini file)",
        ),
        # ini < environment: IMMUTORCH_SCOPE is read by resolve_scope itself, not forced.
        (
            ["immutorch_scope = arguments"],
            {"IMMUTORCH_SCOPE": "all"},
            ["--immutorch=raise"],
            "None:all:all",
            "None:all:all",
            "mode=raise (command line), scope=all (environment IMMUTORCH_SCOPE)",
        ),
        (
            [],
            {"IMMUTORCH_SCOPE": "arguments"},
            [],
            "None:arguments:arguments",
            "None:arguments:arguments",
            "scope=arguments (environment IMMUTORCH_SCOPE)",
        ),
        # environment < command line.
        (
            ["immutorch_scope = all"],
            {"IMMUTORCH_SCOPE": "all"},
            ["--immutorch=raise", "--immutorch-scope=arguments"],
            _ARGS,
            _ARGS,
            "mode=raise (command line), scope=arguments (command line)",
        ),
        # --immutorch-modules alone is not strict mode: guards keep their own mode and scope.
        (
            ["immutorch_modules = mypkg"],
            {},
            [],
            _NONE,
            _ALL,
            "mode=raise (default for modules), modules=mypkg",
        ),
    ],
)
def test_scope_precedence_and_the_strict_mode_default(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: list[str],
    env: dict[str, str],
    args: list[str],
    plain: str,
    marked_mode: str,
    header: str | None,
) -> None:
    pytester.makepyfile(test_scope=SCOPE_RESOLUTION)
    if ini:
        pytester.makeini("[pytest]\n" + "\n".join(ini) + "\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=5)
    out = result.stdout.str()
    scopes = dict(re.findall(r"SCOPE (\w+)=(\S+) ", out))
    # A marker's scope beats every source, in setup and teardown too; a marker's mode forces
    # the configured scope, else "all"; the session's scope comes back after each marker.
    assert scopes == {
        "plain": plain,
        "marked_args_setup": _ARGS,
        "marked_args": _ARGS,
        "marked_args_teardown": _ARGS,
        "marked_all": _ALL,
        "marked_mode": marked_mode,
        "after": plain,
    }
    if header is None:
        assert "immutorch:" not in out
    else:
        result.stdout.fnmatch_lines([f"immutorch: {header}"])
    assert _config.get_scope_override() is None  # restored after the inner session


def test_the_scope_override_before_the_session_comes_back_after_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_scope=SCOPE_RESOLUTION)
    _config.set_scope_override("arguments")  # the _isolated fixture puts None back
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", "--immutorch=raise", "-k", "plain")
    result.assert_outcomes(passed=1, deselected=4)
    result.stdout.fnmatch_lines([f"*SCOPE plain={_ALL} *"])
    assert _config.get_scope_override() == "arguments"
    assert _config.get_override() is None


# -- bad values --------------------------------------------------------------------------------
ALLOWED = "must be one of 'raise', 'warn', 'clone', 'off'"


@pytest.mark.parametrize(
    ("ini", "env", "args", "message"),
    [
        (None, None, ["--immutorch=bogus"], f"--immutorch {ALLOWED}, got 'bogus'"),
        ("immutorch = strict", None, [], f"the ini option immutorch (*) {ALLOWED}, got 'strict'"),
        (None, "loud", [], f"the environment variable IMMUTORCH_MODE {ALLOWED}, got 'loud'"),
        (None, None, ["--immutorch-modules=pkg/sub"], "*--immutorch-modules must be dotted*"),
        ("immutorch_modules = a-b", None, [], "*the ini option immutorch_modules (*) must be*"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_source(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str | None,
    env: str | None,
    args: list[str],
    message: str,
) -> None:
    _assert_usage_error(pytester, monkeypatch, ini, (_config.ENV_VAR, env), args, message)


def _assert_usage_error(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str | None,
    env: tuple[str, str | None],
    args: list[str],
    message: str,
) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    if ini is not None:
        pytester.makeini(f"[pytest]\n{ini}\n")
    name, value = env
    if value is not None:
        monkeypatch.setenv(name, value)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: immutorch: {message}"])


SCOPES_ALLOWED = "must be one of 'all', 'arguments'"


@pytest.mark.parametrize(
    ("ini", "env", "args", "message"),
    [
        (None, None, ["--immutorch-scope=some"], f"--immutorch-scope {SCOPES_ALLOWED}, got 'some'"),
        (
            "immutorch_scope = wide",
            None,
            ["--immutorch=raise"],
            f"the ini option immutorch_scope (*) {SCOPES_ALLOWED}, got 'wide'",
        ),
        (
            None,
            "args",
            [],
            f"the environment variable IMMUTORCH_SCOPE {SCOPES_ALLOWED}, got 'args'",
        ),
    ],
)
def test_bad_scopes_are_usage_errors_naming_the_source(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str | None,
    env: str | None,
    args: list[str],
    message: str,
) -> None:
    _assert_usage_error(pytester, monkeypatch, ini, (_config.SCOPE_ENV_VAR, env), args, message)
    assert _config.get_scope_override() is None


def test_bad_marker_errors_its_test_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.immutorch(mode="strict")
        def test_bad_mode(): pass

        @pytest.mark.immutorch(modules=3)
        def test_bad_modules(): pass

        @pytest.mark.immutorch(level="raise")
        def test_bad_keyword(): pass

        @pytest.mark.immutorch(scope="some")
        def test_bad_scope(): pass

        def test_fine(): pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=4)
    result.stdout.fnmatch_lines_random(
        [
            f"immutorch: mode= of @pytest.mark.immutorch on *::test_bad_mode {ALLOWED}, "
            "got 'strict'",
            "immutorch: modules= of @pytest.mark.immutorch on *::test_bad_modules must be "
            "package names*; got 3",
            "immutorch: @pytest.mark.immutorch on *::test_bad_keyword takes mode=*'level'*",
            "immutorch: scope= of @pytest.mark.immutorch on *::test_bad_scope must be one of "
            "'all', 'arguments', got 'some'",
        ]
    )
    result.stdout.no_fnmatch_line("*During handling of the above exception*")


# -- the plugin's surface ------------------------------------------------------------------------
def test_help_lists_the_group_options_and_ini_keys(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "immutorch: refuse writes into the tensors that code was handed:",
            "*--immutorch=MODE*Run every immutorch guard and decorator in MODE*",
            "*--immutorch-scope=SCOPE",
            "*Which ops every immutorch guard, decorator and watch",
            "*--immutorch-modules=PKG[[],PKG...[]]",
            "*In every test, protect the tensor inputs of each call to",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*immutorch (string):*", "*immutorch_scope (string):*", "*immutorch_modules (string):*"]
    )


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.immutorch(mode=None, modules=None, scope=None, saved=None): *"]
    )


def test_no_immutorch_turns_the_plugin_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("-p", "no:immutorch", "--immutorch=raise")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unrecognized arguments: --immutorch=raise*"])


def test_plugin_copies_of_modes_agree_with_config() -> None:
    assert plugin.MODES == _config.MODES
    assert plugin.ENV_VAR == _config.ENV_VAR
    assert plugin.SCOPES == _config.SCOPES
    assert plugin.SCOPE_ENV_VAR == _config.SCOPE_ENV_VAR
    assert plugin.STRICT_SCOPE in _config.SCOPES


# -- a light import ------------------------------------------------------------------------------
_REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=_REPO,
        check=False,
    )


def test_plugin_module_itself_imports_neither_torch_nor_the_core() -> None:
    # An empty package stands in for immutorch/__init__.py: this checks the plugin's own
    # imports, whatever the package's __init__ imports.
    done = _python(
        """
        import importlib.util, sys, types
        spec = importlib.util.find_spec("immutorch")
        package = types.ModuleType("immutorch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["immutorch"] = package
        import immutorch._pytest_plugin
        heavy = sorted(
            m for m in sys.modules
            if m == "torch" or (m.startswith("immutorch.") and m != "immutorch._pytest_plugin")
        )
        assert not heavy, heavy
        """
    )
    assert done.returncode == 0, done.stderr


# Until immutorch/__init__.py imports its submodules lazily, importing the plugin imports the
# package and so torch; this expectation turns into a plain test once it does.
_INIT = importlib.util.find_spec("immutorch").origin  # the package under test, wherever it is
_LAZY_PACKAGE = _INIT is not None and "def __getattr__" in Path(_INIT).read_text()


@pytest.mark.xfail(
    not _LAZY_PACKAGE,
    reason="immutorch/__init__.py imports torch eagerly (needs a lazy PEP 562 __init__)",
    strict=True,
)
def test_the_plugin_imports_no_torch_unless_a_setting_needs_it(
    pytester: pytest.Pytester,
) -> None:
    done = _python("import immutorch._pytest_plugin, sys; assert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr
    # A whole run, with a mode and no modules, leaves torch to the code under test.
    pytester.makepyfile(
        """
        import sys

        def test_no_torch():
            assert "torch" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("--immutorch=warn")
    result.assert_outcomes(passed=1)


# -- IMMUTORCH_MODE outside pytest -----------------------------------------------------------------
def test_environment_variable_sets_the_mode_outside_pytest() -> None:
    done = _python(
        """
        import os, warnings
        import torch
        from immutorch import MutationWarning, immutable_inputs

        @immutable_inputs(mode="raise")
        def shift(x):
            x.add_(1)

        x = torch.zeros(2)
        shift(x)  # IMMUTORCH_MODE=off from the parent
        assert x.tolist() == [1.0, 1.0]

        os.environ["IMMUTORCH_MODE"] = "warn"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shift(x)
        assert [w.category for w in caught] == [MutationWarning], caught

        os.environ["IMMUTORCH_MODE"] = "loud"
        try:
            shift(x)
        except ValueError as error:
            assert "the environment variable IMMUTORCH_MODE must be one of" in str(error)
        else:
            raise AssertionError("a bad IMMUTORCH_MODE was accepted")
        """,
        IMMUTORCH_MODE="off",
    )
    assert done.returncode == 0, done.stderr


# -- modules built to write in place ---------------------------------------------------------
def test_inplace_modules_are_exempt_unless_switched_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        **{
            "actpkg/__init__.py": """
                import torch


                class Act(torch.nn.Module):
                    def __init__(self):
                        super().__init__()
                        self.inplace = True

                    def forward(self, x):
                        return x.clamp_(min=0)
            """,
            "test_act.py": """
                import torch
                from actpkg import Act


                def test_act():
                    Act()(torch.randn(4))
            """,
        }
    )
    base = ["-p", "no:cacheprovider", "--immutorch=raise", "--immutorch-modules=actpkg"]
    pytester.runpytest_subprocess(*base).assert_outcomes(passed=1)
    switched = pytester.runpytest_subprocess(*base, "--immutorch-inplace-modules")
    switched.assert_outcomes(failed=1)
    switched.stdout.fnmatch_lines(["*aten::clamp_*"])


# -- readable failures --------------------------------------------------------------------------
def test_a_refusal_ends_on_the_users_line_without_torchs_frames(project: pytest.Pytester) -> None:
    import torch

    result = project.runpytest_subprocess(
        "--immutorch=raise", "--immutorch-modules=pkg", "test_models.py::test_zeroing"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    assert torch_dir not in out, "torch's own frames (Module._call_impl, dynamo) are trimmed"
    # The last frame shown is the module's write, right above the error.
    frames = re.findall(r"^(\S+\.py):(\d+): ", out, flags=re.MULTILINE)
    assert frames and frames[-1][0].replace("\\", "/").endswith("pkg/layers.py")
    assert frames[-1][1] == "6"


def test_a_refusal_inside_torchscript_is_reported_as_itself(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        scripted="""
        import torch


        class Zeroing(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x[0] = 0
                return x
        """,
        test_scripted="""
        import warnings
        import torch
        from scripted import Zeroing

        warnings.filterwarnings("ignore", message="`torch.jit")


        def test_scripted():
            torch.jit.script(Zeroing())(torch.ones(3))
        """,
    )
    result = pytester.runpytest_subprocess(
        "--immutorch=raise", "--immutorch-modules=scripted", "test_scripted.py"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["FAILED test_scripted.py::test_scripted - *ImmutableTensorError*"])
    assert "would write into `x`" in result.stdout.str()


def test_a_missing_dependency_stops_the_run_once_at_start(pytester: pytest.Pytester) -> None:
    # A plugin loaded before immutorch's configure hides wrapt, as if it were not installed.
    pytester.makepyfile(
        hide_wrapt="""
        import sys

        sys.modules["wrapt"] = None
        """,
        test_many="""
        def test_a():
            pass


        def test_b():
            pass
        """,
    )
    result = pytester.runpytest_subprocess(
        "-p", "hide_wrapt", "--immutorch=raise", "--immutorch-modules=pkg", "test_many.py"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert err.count("immutorch cannot be imported") == 1
    assert "wrapt" in err and "-p no:immutorch" in err
    # Without the plugin switched on, the same environment runs as usual.
    result = pytester.runpytest_subprocess("-p", "hide_wrapt", "test_many.py")
    result.assert_outcomes(passed=2)


def test_a_watch_adds_no_torch_warning_to_compiled_modules(pytester: pytest.Pytester) -> None:
    # torch warns when torch.compile(module) meets global module hooks; the watch's hooks are
    # there from the start of each test (found in kornia's suite, failing -W error runs).
    pytester.makepyfile(
        test_compile="""
        import torch


        def test_compile():
            torch.compile(torch.nn.ReLU(), backend="eager")(torch.ones(3))
        """
    )
    result = pytester.runpytest_subprocess(
        "-W", "error::UserWarning", "--immutorch=raise", "--immutorch-modules=otherpkg"
    )
    result.assert_outcomes(passed=1)


CACHED_WRITE = """
import torch
import pkg_cached


def test_cached():
    x = torch.ones(3)
    m = pkg_cached.Cached()
    m.cache = x  # the same memory as the argument, reached through an attribute
    m(x)
"""

CACHED_PKG = """
import torch


class Cached(torch.nn.Module):
    def forward(self, x):
        self.cache.zero_()
        return x + 1
"""


@pytest.mark.parametrize(
    ("args", "caught"),
    [
        (["--immutorch-modules=pkg_cached"], True),  # the plugin's watch: scope "all"
        (["--immutorch-modules=pkg_cached", "--immutorch-scope=arguments"], False),
    ],
)
def test_the_plugins_watch_is_complete_unless_a_scope_is_chosen(
    pytester: pytest.Pytester, args: list[str], caught: bool
) -> None:
    """A write through another reference than the argument (here a cached attribute) is
    caught by the watch in its default scope, "all", and not in scope "arguments"."""
    pytester.makepyfile(pkg_cached=CACHED_PKG, test_cached=CACHED_WRITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    if caught:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*aten::zero_ would write into `x`*the watch on Cached*"])
    else:
        result.assert_outcomes(passed=1)


LATE_WRAPPED = {
    "pkg_late/__init__.py": """
        import torch


        class Writes(torch.nn.Module):
            def forward(self, x):
                x.add_(1)
                return x


        class AlsoWrites(torch.nn.Module):
            def forward(self, x):
                x.mul_(2)
                return x
    """,
    "test_late.py": """
        import pytest
        import torch
        import pkg_late


        @pytest.fixture
        def wrapped_in_a_fixture():
            # Outside the test body: outside the watch.
            return torch.compiler.disable(pkg_late.Writes)


        def test_wraps_a_class():
            torch.compiler.disable(pkg_late.AlsoWrites)


        def test_class_wrapped_in_an_earlier_test():
            x = torch.ones(3)
            pkg_late.AlsoWrites()(x)


        def test_class_wrapped_in_a_fixture(wrapped_in_a_fixture):
            x = torch.ones(3)
            wrapped_in_a_fixture()(x)
    """,
}


def test_a_class_wrapped_between_watches_is_still_watched(pytester: pytest.Pytester) -> None:
    """torch.compiler.disable on a class gives it a ``_call_impl`` of its own, which bypasses
    the shell on ``Module`` unless it wraps the shell. The plugin keeps the shell on for the
    run (one walk of the classes, not one a test), so a class wrapped between tests, in a
    fixture or an earlier test, wraps the shell, and its writes are refused."""
    write_files(pytester.path, LATE_WRAPPED)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "--immutorch-modules=pkg_late"
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "AlsoWrites*aten::mul_*refused*test_class_wrapped_in_an_earlier_test*",
            "Writes*aten::add_*refused*test_class_wrapped_in_a_fixture*",
        ]
    )
