"""``python -m immutorch``: the demo table and the audit command's findings and exit codes."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from audit_targets import padded_from

import immutorch
from immutorch import _demo
from immutorch._cli import main

ENCODER_INPUT = ["--input", "4,80,60", "--lengths"]
# What --version prints: the installed distribution's version, read without importing torch
# (PyPI's CUDA wheels carry no "+cu121" there, unlike torch.__version__).
TORCH_DIST_VERSION = metadata.version("torch")
LEGACY = "immutorch._reference:LegacyInputNormalization"  # norm_type="global" unless --init
SENTENCE = ["--init", '{"norm_type": "sentence"}']
AUDIT_PAGE = Path(__file__).resolve().parent.parent / "docs" / "audit.md"
# The docs' "Audit a model" examples: each command, then the output it shows.
DOCS_AUDITS = re.findall(
    r"```bash\n(.*?)```\n\n```text\n(.*?)```",
    AUDIT_PAGE.read_text().split("\n## Audit a model\n", 1)[1].split("\n## ", 1)[0],
    flags=re.S,
)
MODES = (
    "unguarded (legacy normalizer)",
    'guard(mode="raise")',
    'guard(mode="warn")',
    'guard(mode="clone")',
    'guard(mode="clone", scope="arguments")',
    "fixed InputNormalization",
)


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_audit_finds_the_legacy_write_with_its_module_and_line() -> None:
    code, text = _run("audit", "immutorch._reference:legacy_encoder", *ENCODER_INPUT, "--json")
    assert code == 1
    (write,) = json.loads(text)["writes"]
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
    assert (code, json.loads(text)["writes"]) == (0, [])


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
    (write,) = json.loads(text)["writes"]
    assert write["op"] == "aten::mul_"
    assert write["location"].endswith("scaler_pkg.py:3")
    assert write["source"] == "x.mul_(factor)"


def _audit_json(*argv: str) -> tuple[int, dict[str, Any]]:
    code, text = _run("audit", *argv, "--json")
    return code, json.loads(text)


def _places(report: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    return [(w["where"], w["op"], w["count"], w["runs"]) for w in report["writes"]]


def test_init_builds_the_class_with_those_arguments() -> None:
    # By default the class is built with no arguments: norm_type="global", out of place.
    assert _audit_json(LEGACY, "--input", "4,60,80")[0] == 0
    code, report = _audit_json(LEGACY, *SENTENCE, "--input", "4,60,80")
    assert code == 1
    assert _places(report) == [("LegacyInputNormalization", "aten::copy_", 4, 1)]
    assert report["init"] == {"norm_type": "sentence"}
    # a JSON list is positional: mean_norm, std_norm, norm_type
    code, report = _audit_json(LEGACY, "--init", '[true, false, "sentence"]', "--input", "4,60,80")
    assert code == 1
    assert _places(report) == [("LegacyInputNormalization", "aten::copy_", 4, 1)]
    assert report["init"] == [True, False, "sentence"]


def test_a_write_made_only_in_training_is_found_with_train_not_eval() -> None:
    target = ["audit_targets:TrainingTimeMask", "--input", "2,20,3"]
    code, report = _audit_json(*target, "--train")
    assert code == 1
    assert _places(report) == [("TrainingTimeMask", "aten::fill_", 1, 1)]
    assert (report["training"], report["training_from"]) == (True, "--train")
    code, report = _audit_json(*target, "--eval")
    assert (code, report["writes"]) == (0, [])
    assert (report["training"], report["training_from"]) == (False, "--eval")
    # Without either, the module runs as built: nn.Module's default is training.
    code, report = _audit_json(*target)
    assert (code, report["training"], report["training_from"]) == (1, True, "as built")


def test_eval_is_set_on_a_module_a_factory_built_in_training() -> None:
    # legacy_encoder() calls eval(); --train must reach the submodules too.
    code, report = _audit_json("immutorch._reference:legacy_encoder", *ENCODER_INPUT)
    assert (report["training"], report["training_from"]) == (False, "as built")
    code, report = _audit_json("immutorch._reference:legacy_encoder", *ENCODER_INPUT, "--train")
    assert code == 1
    assert report["training"] is True


def test_runs_merge_one_row_per_place_with_counts() -> None:
    argv = ["immutorch._reference:legacy_normalizer", "--input", "4,60,80", "--lengths"]
    code, report = _audit_json(*argv, "--runs", "3")
    assert code == 1
    (write,) = report["writes"]
    assert (write["count"], write["runs"], write["per_run"]) == (12, 3, [4, 4, 4])
    assert (report["runs"], report["seed"]) == (3, 0)
    code, text = _run("audit", *argv, "--runs", "3")
    assert code == 1
    assert "3/3" in text
    assert "12 write(s) into its inputs at 1 place(s) over 3 runs" in text


def test_lengths_vary_after_the_first_run_and_find_writes_into_padding() -> None:
    argv = ["audit_targets:PaddingZeroer", "--input", "4,20,3", "--lengths"]
    # One run passes lengths of 1.0: no padding, no write.
    code, report = _audit_json(*argv)
    assert (code, report["writes"], report["lengths"]) == (0, [], [[1.0] * 4])
    code, report = _audit_json(*argv, "--runs", "3")
    assert code == 1
    first, *later = report["lengths"]
    assert first == [1.0] * 4
    assert len(later) == 2
    for lengths in later:
        assert lengths[0] == 1.0  # the longest item, as in a padded batch
        assert all(0.1 <= n <= 1.0 for n in lengths)
        assert lengths[1:] != [1.0] * 3
    padded = [sum(padded_from(n, 20) < 20 for n in lengths) for lengths in report["lengths"]]
    (write,) = report["writes"]
    assert write["per_run"] == padded
    assert write["per_run"][0] == 0
    assert write["runs"] == sum(1 for n in padded if n) == 2
    assert write["count"] == sum(padded)


def test_seed_makes_runs_reproducible() -> None:
    argv = ["audit_targets:PaddingZeroer", "--input", "4,20,3", "--lengths", "--runs", "3"]
    assert _audit_json(*argv) == _audit_json(*argv, "--seed", "0")
    _, moved = _audit_json(*argv, "--seed", "7")
    assert moved["seed"] == 7
    assert moved["lengths"][1:] != _audit_json(*argv)[1]["lengths"][1:]


def test_a_write_by_chance_shows_in_some_runs_the_same_ones_each_time() -> None:
    argv = ["audit_targets:CoinFlipScale", "--input", "3,4", "--runs", "8"]
    before = torch.random.get_rng_state()
    code, report = _audit_json(*argv)
    # run i seeds torch's global generator with --seed + i, and the caller's state comes back
    assert torch.equal(torch.random.get_rng_state(), before)
    assert code == 1
    (write,) = report["writes"]
    assert 0 < write["runs"] < 8
    assert write["per_run"] == _audit_json(*argv)[1]["writes"][0]["per_run"]
    shifted = _audit_json(*argv, "--seed", "1")[1]["writes"][0]["per_run"]
    assert shifted[:7] == write["per_run"][1:]  # run i of seed 1 is run i + 1 of seed 0


def test_the_output_says_what_was_run() -> None:
    argv = [LEGACY, *SENTENCE, "--eval", "--input", "4,60,80", "--lengths", "--runs", "2"]
    code, text = _run("audit", *argv, "--seed", "5")
    assert code == 1
    assert text.splitlines()[0] == (
        "audit: immutorch._reference:LegacyInputNormalization(norm_type='sentence'); "
        "eval mode (--eval); inputs 4x60x80 + lengths (1.0 in run 1, random in [0.1, 1.0] "
        "after); 2 runs, seeds 5-6"
    )
    code, report = _audit_json(*argv, "--seed", "5")
    assert {k: v for k, v in report.items() if k not in ("lengths", "writes")} == {
        "version": 2,
        "target": LEGACY,
        "init": {"norm_type": "sentence"},
        "training": False,
        "training_from": "--eval",
        "inputs": [[4, 60, 80]],
        "runs": 2,
        "seed": 5,
    }
    code, text = _run("audit", "immutorch._reference:mse", "--input", "3,4", "--input", "3,4")
    assert text.splitlines()[0] == (
        "audit: immutorch._reference:mse; not a module (no train/eval mode); "
        "inputs 3x4, 3x4; 1 run, seed 0"
    )
    assert (
        _audit_json("immutorch._reference:mse", "--input", "3,4", "--input", "3,4")[1]["training"]
        is None
    )


@pytest.mark.parametrize(("command", "shown"), DOCS_AUDITS, ids=["encoder", "init-train-runs"])
def test_docs_audit_examples_print_what_the_docs_show(
    command: str, shown: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The table shows paths relative to the working directory: the folder holding the package
    # (a checkout, or site-packages where the suite runs against the installed wheel).
    monkeypatch.chdir(Path(immutorch.__file__).resolve().parent.parent)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "immutorch"]
    assert _run(*argv[3:]) == (1, shown)


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
        ([LEGACY, "--init", "{norm_type: sentence}"], "--init is not valid JSON"),
        ([LEGACY, "--init", '"sentence"'], "JSON object (keyword arguments) or list"),
        ([LEGACY, "--init", '{"nrom_type": "sentence"}'], "fix the arguments given to --init"),
        ([LEGACY, *SENTENCE, "--input", "2", "--runs", "2"], "run 1 of 2 (seed 0): running"),
        (["immutorch._reference:legacy_encoder", *SENTENCE], "is a function; name the class"),
        (["immutorch._reference:mse", "--init", "[]"], "--init builds a class"),
        (["immutorch._reference:mse", "--train", "--input", "3"], "--train sets an nn.Module"),
        (["immutorch._reference:mse", "--eval", "--input", "3"], "leave out --eval"),
        ([LEGACY, "--train", "--eval"], "not allowed with argument"),
        ([LEGACY, "--runs", "0"], "--runs must be at least 1"),
        ([LEGACY, "--seed", "-1"], "--seed must be 0 or more"),
        ([LEGACY, "--runs", "two"], "invalid int value"),
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
    clone_scoped = 'guard(mode="clone", scope="arguments")'
    for mode in ('guard(mode="raise")', 'guard(mode="clone")', clone_scoped):
        assert rows[mode].mel_mse == 0.0
    assert rows["fixed InputNormalization"].mel_mse == 0.0
    assert rows['guard(mode="raise")'].embedding == "raised"
    assert rows['guard(mode="clone")'].embedding == "yes"  # bit-identical
    assert rows[clone_scoped].embedding == "yes"
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
    assert json.loads(text)["writes"][0]["count"] == 4
    assert _run("demo", "--repeats", "0")[0] == 2


# -- the console script and --version ---------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def _console_script_target() -> str:
    """pyproject.toml's ``[project.scripts]`` entry for ``immutorch``."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    found = re.search(r'^immutorch\s*=\s*"([^"]+)"', section.split("\n[", 1)[0], flags=re.M)
    assert found, "pyproject.toml declares no `immutorch` console script"
    return found.group(1)


def test_the_console_script_is_the_cli_main(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    import immutorch

    module_name, _, attr = _console_script_target().partition(":")
    entry = getattr(importlib.import_module(module_name), attr)
    assert entry is main
    # A console script calls its function with no arguments and exits with what it returns.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["immutorch", "--version"])
        assert entry() == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"immutorch {immutorch.__version__} (torch {TORCH_DIST_VERSION}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["immutorch"])
        assert entry() == 2
    assert capsys.readouterr().err.startswith("usage: immutorch ")


def test_python_dash_m_has_the_same_commands_and_version() -> None:
    import immutorch

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "immutorch", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == (
        f"immutorch {immutorch.__version__} (torch {TORCH_DIST_VERSION}, "
        f"Python {'.'.join(map(str, sys.version_info[:3]))})"
    )
    usage = run("--help")
    assert usage.stdout.startswith("usage: python -m immutorch ")
    from immutorch._cli import build_parser

    script_help = build_parser().format_help()
    assert script_help.startswith("usage: immutorch ")
    listed = re.findall(r"^    (\S+)", usage.stdout, flags=re.M)
    assert listed and listed == re.findall(r"^    (\S+)", script_help, flags=re.M)
    assert {"demo", "audit", "schema-audit"} <= set(listed)


def test_the_installed_immutorch_script_runs_the_cli() -> None:
    import shutil

    import immutorch

    script = shutil.which("immutorch")
    if script is None:
        pytest.skip("no `immutorch` script on PATH (reinstall immutorch to get it)")
    result = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"immutorch {immutorch.__version__} ")


# The first README command on a fresh machine: torch installed, numpy not (torch's wheels do
# not depend on it). The finder hides numpy from the import system, as if it were absent.
WITHOUT_NUMPY = """
import importlib.machinery as machinery, runpy, sys

class HideNumpy:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "numpy":
            return None
        return machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def invalidate_caches(cls):
        machinery.PathFinder.invalidate_caches()

sys.meta_path[:] = [HideNumpy if f is machinery.PathFinder else f for f in sys.meta_path]
sys.path.insert(0, {root!r})
sys.argv = ["immutorch", *sys.argv[1:]]
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def _without_numpy(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "without_numpy.py"
    script.write_text(WITHOUT_NUMPY.format(root=str(ROOT)))
    # An empty OMP_NUM_THREADS in the caller's environment makes libgomp itself warn on stderr
    # ("Invalid value for environment variable OMP_NUM_THREADS"), which is not torch's or ours.
    env = {k: v for k, v in os.environ.items() if not (k == "OMP_NUM_THREADS" and not v.strip())}
    return subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )


def test_the_demo_prints_no_torch_warning_where_numpy_is_missing(tmp_path: Path) -> None:
    # The premise: torch itself warns at import when numpy cannot be imported.
    (tmp_path / "plain.py").write_text("import torch\n")
    plain = _without_numpy(tmp_path, "plain")
    assert plain.returncode == 0 and "Failed to initialize NumPy" in plain.stderr
    demo = _without_numpy(tmp_path, "immutorch", "demo", "--repeats", "1")
    assert demo.returncode == 0, demo.stderr
    assert demo.stderr == ""
    assert 'guard(mode="raise")' in demo.stdout


def test_the_quiet_torch_import_leaves_the_filters_torch_installs() -> None:
    # The CLI's import of torch must leave warnings.filters as a plain `import torch` does.
    show = (
        "import warnings; p = lambda r: getattr(r, 'pattern', r); "
        "print([(a, p(m), c.__name__, p(mod), n) for a, m, c, mod, n in warnings.filters])"
    )
    plain = subprocess.run(
        [sys.executable, "-c", f"import torch; {show}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    quiet = subprocess.run(
        [
            sys.executable,
            "-c",
            "from immutorch._cli import _import_torch_without_numpy_notice as imp; imp(); " + show,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert plain.returncode == quiet.returncode == 0, plain.stderr + quiet.stderr
    assert "TracerWarning" in plain.stdout
    assert quiet.stdout == plain.stdout
