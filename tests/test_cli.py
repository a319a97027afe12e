"""``python -m immutorch``: the demo table and the audit command's findings and exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from immutorch import _demo
from immutorch._cli import main

ENCODER_INPUT = ["--input", "4,80,60", "--lengths"]
MODES = (
    "unguarded (legacy normalizer)",
    'guard(mode="raise")',
    'guard(mode="warn")',
    'guard(mode="clone")',
    "fixed InputNormalization",
)


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_audit_finds_the_legacy_write_with_its_module_and_line() -> None:
    code, text = _run("audit", "immutorch._reference:legacy_encoder", *ENCODER_INPUT, "--json")
    assert code == 1
    (write,) = json.loads(text)
    assert write["where"] == "mods.normalizer (LegacyInputNormalization)"
    assert write["op"] == "aten::copy_"
    assert write["argument"] == "x"
    assert write["location"].endswith(".py:" + write["location"].rsplit(":", 1)[1])
    assert "_reference.py:" in write["location"]
    assert write["source"].startswith("x[i] = (x[i] - mean) / std")
    assert write["count"] == 4  # one per sentence: every write is collected, not the first


def test_audit_table_names_module_op_argument_and_line() -> None:
    code, text = _run("audit", "immutorch._reference:legacy_encoder", *ENCODER_INPUT)
    assert code == 1
    assert "mods.normalizer (LegacyInputNormalization)" in text
    assert "aten::copy_" in text
    assert "_reference.py:" in text
    assert "4 write(s) into its inputs at 1 place(s)" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["immutorch._reference:fixed_encoder", *ENCODER_INPUT],
        ["immutorch._reference:fixed_normalizer", "--input", "4,60,80", "--lengths"],
        # a class, instantiated with no arguments (norm_type="global" computes out of place)
        ["immutorch._reference:LegacyInputNormalization", "--input", "4,60,80"],
        # a function with required parameters is audited itself
        ["immutorch._reference:mse", "--input", "3,4", "--input", "3,4"],
    ],
    ids=["fixed-encoder", "fixed-normalizer", "class", "function"],
)
def test_audit_finds_nothing_in_code_that_does_not_write(argv: list[str]) -> None:
    code, text = _run("audit", *argv)
    assert code == 0, text
    assert "no writes into its inputs" in text
    code, text = _run("audit", *argv, "--json")
    assert (code, json.loads(text)) == (0, [])


def test_audit_of_a_writing_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "scaler_pkg.py").write_text(
        textwrap.dedent(
            """
            def scale_(x, factor=2.0):
                x.mul_(factor)
                return x
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, text = _run("audit", "scaler_pkg:scale_", "--input", "3,4", "--json")
    assert code == 1
    (write,) = json.loads(text)
    assert write["op"] == "aten::mul_"
    assert write["location"].endswith("scaler_pkg.py:3")
    assert write["source"] == "x.mul_(factor)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["immutorch._reference"], "package.module:callable"),
        (["no_such_module_xyz:f"], "cannot import"),
        (["immutorch._reference:no_such_name"], "no attribute"),
        (["immutorch._reference:fixed_encoder", "--input", "8,a"], "comma-separated"),
        (["immutorch._reference:fixed_encoder", "--lengths"], "--lengths needs"),
        (["immutorch._reference:fixed_encoder", "--input", "2,80"], "running the target raised"),
        (["immutorch._reference:ENCODER_NORMALIZER"], "not a module, class or function"),
    ],
)
def test_audit_usage_errors_exit_2_and_say_why(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run("audit", *argv)
    assert code == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run()[0] == 2
    assert _run("audit")[0] == 2
    assert _run("frobnicate")[0] == 2
    capsys.readouterr()
    assert _run("audit", "--help")[0] == 0
    help_text = capsys.readouterr().out
    assert "TARGET" in help_text and "--lengths" in help_text and "exit status" in help_text


def test_demo_prints_every_mode() -> None:
    code, text = _run("demo", "--repeats", "1")
    assert code == 0
    for mode in MODES:
        assert mode in text
    assert "aten::copy_ in LegacyInputNormalization" in text


def test_demo_rows_tell_the_story() -> None:
    rows = {row.mode: row for row in _demo.run(repeats=1, batch=2, frames=60)}
    assert list(rows) == [*MODES, 'fixed + guard(mode="raise")']
    # without a guard, and in warn mode, the caller's mel changes; otherwise it is intact
    assert rows["unguarded (legacy normalizer)"].mel_mse > 1.0
    assert rows['guard(mode="warn")'].mel_mse == rows["unguarded (legacy normalizer)"].mel_mse
    for mode in ('guard(mode="raise")', 'guard(mode="clone")', "fixed InputNormalization"):
        assert rows[mode].mel_mse == 0.0
    assert rows['guard(mode="raise")'].embedding == "raised"
    assert rows['guard(mode="clone")'].embedding == "yes"  # bit-identical
    assert rows["fixed InputNormalization"].embedding.startswith("yes")
    assert rows['guard(mode="raise")'].ratio is None
    assert all(r.ratio is not None and r.ratio > 0 for m, r in rows.items() if "raise" not in m)


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "immutorch",
            "audit",
            "immutorch._reference:legacy_normalizer",
            "--input",
            "2,50,80",
            "--lengths",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "LegacyInputNormalization" in result.stdout


def test_audit_and_demo_ignore_a_forced_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # The audit needs warn mode to see every write; IMMUTORCH_MODE must not turn it into raise.
    monkeypatch.setenv("IMMUTORCH_MODE", "raise")
    code, text = _run("audit", "immutorch._reference:legacy_encoder", *ENCODER_INPUT, "--json")
    assert code == 1
    assert json.loads(text)[0]["count"] == 4
    assert _run("demo", "--repeats", "0")[0] == 2
