"""The plugin changes nothing about a suite but what it was asked to check: the suite's own
warnings summary, ``warnings.filters`` and torch's global state are those of a plain run.

torch installs warnings filters when it is imported (``TracerWarning.ignore_lib_warnings``:
TracerWarnings from any module named ``torch*`` but ``torch.jit`` are ignored). Imported by
the plugin outside pytest's warning capture, those filters stayed on for the whole session and
a suite's TracerWarnings vanished from its summary (9 of 28 on SpeechBrain's unit tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from project_files import write_files

pytest_plugins = ["pytester"]

SUITE = {
    "pkg/__init__.py": "",
    "pkg/layers.py": """
        import torch


        class Doubling(torch.nn.Module):
            def forward(self, x):
                return x * 2
    """,
    # The suite's own helper, in a module whose name torch's filter matches (as torchaudio's,
    # torchvision's and torchmetrics' do).
    "torchtools.py": """
        import warnings

        import torch


        def shape_check(x):
            warnings.warn("shape check on a traced value", torch.jit.TracerWarning)
            return x
    """,
    # Records torch's global state and the warnings filters at each test's setup, in its body
    # and at its teardown, into the file STATE_FILE names.
    "conftest.py": """
        import json
        import os
        import warnings

        import pytest

        # torch is imported by the tests, not here: a conftest's imports run inside pytest's
        # warning capture, and would hide the plugin's own import of torch.
        RECORDS = []


        def snapshot(where, hooks=True):
            import torch
            from torch.nn.modules import module as nn_module

            state = {
                "where": where,
                "default_dtype": str(torch.get_default_dtype()),
                "grad": torch.is_grad_enabled(),
                "inference": torch.is_inference_mode_enabled(),
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                "dispatch_modes": torch._C._len_torch_dispatch_stack(),
                "function_modes": torch._C._is_torch_function_mode_enabled(),
                "filters": [
                    [a, getattr(m, "pattern", m), c.__name__, getattr(mod, "pattern", mod), n]
                    for a, m, c, mod, n in warnings.filters
                ],
            }
            if hooks:
                # With a module watch, immutorch's module-call shell is in Module._call_impl's
                # place from collection to the end of the run (that is the check asked for);
                # without one, torch's own.
                # (The shell is the code of torch's function: its file says whose it is.)
                call_impl = torch.nn.Module.__dict__["_call_impl"]
                state["call_impl"] = (
                    call_impl.__module__ + "." + call_impl.__qualname__ + " in "
                    + os.path.basename(call_impl.__code__.co_filename)
                )
                state["module_hooks"] = [
                    len(getattr(nn_module, name, {}))
                    for name in (
                        "_global_forward_pre_hooks",
                        "_global_forward_hooks",
                        "_global_backward_pre_hooks",
                        "_global_backward_hooks",
                    )
                ]
            RECORDS.append(state)


        @pytest.fixture
        def record_state(request):
            yield lambda: snapshot(request.node.nodeid + " body", hooks=False)


        def pytest_runtest_setup(item):
            snapshot(item.nodeid + " setup")


        def pytest_runtest_teardown(item):
            snapshot(item.nodeid + " teardown")


        def pytest_sessionfinish(session):
            with open(os.environ["STATE_FILE"], "w") as f:
                json.dump(RECORDS, f, indent=1)
    """,
    "test_suite.py": """
        import warnings

        import torch
        from pkg.layers import Doubling
        from torchtools import shape_check


        def log_prob(x):
            return torch.distributions.Normal(x, torch.ones_like(x)).log_prob(x)


        def test_traces_torch_code(record_state):
            # TracerWarnings raised inside torch.distributions, where the suite's code led.
            torch.jit.trace(log_prob, torch.ones(3), check_trace=False)
            record_state()


        def test_own_tracer_warning(record_state):
            shape_check(Doubling()(torch.ones(2)))
            record_state()


        def test_own_user_warning(record_state):
            warnings.warn("the suite's own warning", UserWarning)
            record_state()


        def test_quiet(record_state):
            Doubling()(torch.ones(2))
            record_state()
    """,
}


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    write_files(pytester.path, SUITE)
    return pytester


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str, *options: str
) -> tuple[str, list[dict[str, object]]]:
    """The run's warnings summary (its text) and the state its conftest recorded."""
    state_file = pytester.path / f"{name}.json"
    monkeypatch.setenv("STATE_FILE", str(state_file))
    monkeypatch.delenv("IMMUTORCH_MODE", raising=False)
    monkeypatch.delenv("IMMUTORCH_SCOPE", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *options)
    result.assert_outcomes(passed=4, warnings=_count_warnings(result.outlines))
    text = "\n".join(result.outlines)
    assert "warnings summary" in text, text
    summary = text.split("warnings summary", 1)[1].split("-- Docs:", 1)[0]
    return summary, json.loads(Path(state_file).read_text())


def _count_warnings(lines: list[str]) -> int:
    import re

    for line in reversed(lines):
        found = re.search(r"(\d+) warnings?", line)
        if found:
            return int(found.group(1))
    return 0


_SHELL = "torch.nn.modules.module.Module._call_impl in _boundaries.py"

# Each way of turning the plugin on: a module watch alone (the configure-time import of torch
# was here), strict mode with a watch and a report, strict mode alone.
PLUGIN_ON = [
    ("--immutorch-modules=pkg",),
    ("--immutorch=warn", "--immutorch-modules=pkg", "--immutorch-report=report.json"),
    ("--immutorch=raise",),
]


def test_the_suite_sees_its_own_warnings_and_torch_state(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain_summary, plain_state = _run(suite, monkeypatch, "plain", "-p", "no:immutorch")
    # The premise: the plain run shows the TracerWarnings torch's filter would hide.
    assert "torch/distributions/distribution.py" in plain_summary
    assert "shape check on a traced value" in plain_summary
    assert "the suite's own warning" in plain_summary
    for i, options in enumerate(PLUGIN_ON):
        summary, state = _run(suite, monkeypatch, f"plugin{i}", *options)
        assert summary == plain_summary, options
        assert [s["where"] for s in state] == [s["where"] for s in plain_state]
        watches = any(option.startswith("--immutorch-modules") for option in options)
        for with_plugin, without in zip(state, plain_state):
            if watches and "call_impl" in without:
                assert with_plugin["call_impl"] == _SHELL, (options, with_plugin["where"])
                with_plugin = {**with_plugin, "call_impl": without["call_impl"]}
            assert with_plugin == without, (options, with_plugin["where"])
