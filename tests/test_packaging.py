"""The sdist and the wheel hold what a user and the test suite need, and agree on the version.

CI builds both once (``python -m build``) and points ``IMMUTORCH_DIST_DIR`` at them, so these
tests check the very files it installs. Elsewhere they build both from this checkout into a
temporary folder (``python -m build --no-isolation``: the wheel from the sdist, a few seconds),
or skip where there is no checkout or no ``build``.
"""

from __future__ import annotations

import email
import email.message
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import immutorch

ROOT = Path(__file__).resolve().parent.parent
DIST_ENV = "IMMUTORCH_DIST_DIR"
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
# What the test suite and the docs read beside the package: the sdist must carry them.
SDIST_FILES = ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "mkdocs.yml")
SDIST_TREES = ("tests", "docs", "examples", "benchmarks")
# Build output and tool state, left out of the copy a local run builds from.
NOT_SOURCE = ("*.egg-info", "build", "dist", "site", ".git", ".nox", ".*cache", ".hypothesis")
# Bytecode and what tools leave in a tree (.pytest_cache/ in examples/strict_test_suite/ once
# its suite has run): never shipped, never expected.
JUNK = re.compile(r"(^|/)(__pycache__/|\.[^/]+/|[^/]*\.py[cod]$)")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    given = os.environ.get(DIST_ENV)
    if given:
        out = Path(given)
    else:
        if not (ROOT / "immutorch" / "__init__.py").is_file():
            pytest.skip(f"no source checkout at {ROOT} to build from, and {DIST_ENV} is not set")
        if importlib.util.find_spec("build") is None:
            pytest.skip("`build` is not installed (pip install -e '.[dev]')")
        # From a copy: setuptools folds an existing immutorch.egg-info's file list (an
        # editable install leaves one) into the sdist, which would hide a file left out.
        src = tmp_path_factory.mktemp("src") / "immutorch"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
        out = tmp_path_factory.mktemp("dist")
        subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
            check=True,
            capture_output=True,
            text=True,
        )
    (wheel,) = out.glob("immutorch-*.whl")
    (sdist,) = out.glob("immutorch-*.tar.gz")
    return wheel, sdist


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _sdist_names(sdist: Path) -> set[str]:
    """The sdist's files, without its top folder (``immutorch-0.2.0/``)."""
    with tarfile.open(sdist) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile() or m.issym()]
    return {name.split("/", 1)[1] for name in names if "/" in name}


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(name))


def _tracked(folder: str) -> set[str] | None:
    """Files under ``folder`` that git tracks in this checkout (None outside a checkout)."""
    if not (ROOT / folder).is_dir():
        return None
    try:
        done = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", folder],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    files = {line for line in done.stdout.splitlines() if line}
    return {f for f in files if (ROOT / f).is_file() and not JUNK.search(f)} or None


def test_the_wheel_holds_every_file_of_the_package(dists: tuple[Path, Path]) -> None:
    wheel, sdist = dists
    in_wheel = _wheel_names(wheel)
    assert "immutorch/py.typed" in in_wheel
    assert "immutorch/__init__.py" in in_wheel
    # Every file of the package the sdist carries (Python or not) reaches the wheel ...
    package = {n for n in _sdist_names(sdist) if n.startswith("immutorch/") and not JUNK.search(n)}
    assert package, "the sdist holds no immutorch/ package"
    assert not package - in_wheel, f"in the sdist, missing from the wheel: {package - in_wheel}"
    # ... and every file under immutorch/ in this checkout reaches the sdist.
    tracked = _tracked("immutorch")
    if tracked is not None:
        assert not tracked - package, f"missing from the sdist: {sorted(tracked - package)}"


def test_the_wheel_ships_the_license_and_the_entry_point(dists: tuple[Path, Path]) -> None:
    wheel, _ = dists
    names = _wheel_names(wheel)
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(license_file).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entries = zf.read(entry_points).decode()
    assert text.startswith("MIT License") and "the immutorch authors" in text
    assert "[pytest11]" in entries and "immutorch = immutorch._pytest_plugin" in entries
    assert not [n for n in names if n.startswith(("tests/", "docs/"))], "tests in the wheel"


def test_the_sdist_carries_tests_docs_and_license(dists: tuple[Path, Path]) -> None:
    _, sdist = dists
    names = _sdist_names(sdist)
    missing = [f for f in SDIST_FILES if f not in names]
    assert not missing, f"missing from the sdist: {missing}"
    for tree in SDIST_TREES:
        assert any(n.startswith(tree + "/") for n in names), f"no {tree}/ in the sdist"
        # Every file of that tree in this checkout (or in CI's copy of one).
        expected = _tracked(tree)
        if expected is None:
            expected = {
                str(p.relative_to(ROOT))
                for p in (ROOT / tree).rglob("*")
                if p.is_file() and not JUNK.search(str(p.relative_to(ROOT)))
            }
        assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    assert not [n for n in names if JUNK.search(n)], "bytecode in the sdist"


def _changelog_release() -> str:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "\n## [Unreleased]\n" in text, "CHANGELOG.md keeps an [Unreleased] section on top"
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", text, flags=re.M)
    assert releases, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' release heading"
    return releases[0][0]


def test_every_version_agrees(dists: tuple[Path, Path]) -> None:
    wheel, sdist = dists
    version = immutorch.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert _metadata(wheel)["Version"] == version
    assert wheel.name.startswith(f"immutorch-{version}-")
    assert sdist.name == f"immutorch-{version}.tar.gz"
    assert _changelog_release() == version, "the newest CHANGELOG.md release is not __version__"
    # The installed distribution, where it is the one imported (CI's venv; not an editable
    # install of another checkout).
    dist = importlib.metadata.distribution("immutorch")
    if Path(str(dist.locate_file("immutorch/__init__.py"))) == Path(immutorch.__file__):
        assert dist.version == version
    # One source of truth: pyproject reads __version__ and states no version of its own.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'version = { attr = "immutorch.__version__" }' in pyproject
    project = pyproject.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert 'dynamic = ["version"]' in project and "\nversion = " not in project


def test_the_metadata_is_complete(dists: tuple[Path, Path]) -> None:
    wheel, _ = dists
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] == ">=" + PYTHONS[0]
    urls = {value.split(",", 1)[0] for value in meta.get_all("Project-URL", [])}
    assert {"Homepage", "Documentation", "Issues", "Changelog"} <= urls, urls
    assert len(meta["Keywords"].split(",")) >= 5
    classifiers = set(meta.get_all("Classifier", []))
    assert {f"Programming Language :: Python :: {v}" for v in PYTHONS} <= classifiers
    assert "Typing :: Typed" in classifiers and "Framework :: Pytest" in classifiers
    assert any(r.startswith("torch>=") for r in meta.get_all("Requires-Dist", []))
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# immutorch"), "README is the long description"


def test_every_classifier_exists(dists: tuple[Path, Path]) -> None:
    trove = pytest.importorskip("trove_classifiers", reason="pip install -e '.[dev]'")
    wheel, _ = dists
    unknown = set(_metadata(wheel).get_all("Classifier", [])) - set(trove.classifiers)
    assert not unknown, f"not trove classifiers (PyPI refuses the upload): {sorted(unknown)}"


def test_ci_runs_the_suite_against_the_installed_wheel() -> None:
    if not os.environ.get(DIST_ENV):
        pytest.skip(f"only where .ci/run tests the wheel it built ({DIST_ENV} is set)")
    where = Path(immutorch.__file__).resolve()
    assert ROOT not in where.parents, f"immutorch imported from the tree under test: {where}"
    assert "site-packages" in where.parts, where
