"""The documentation runs as written, and names only what the package makes public.

Every ```python block of every page under docs/ runs, as README's do (tests/test_readme.py):
pages merged later are picked up without a change here. Every ``immutorch.NAME`` that README or
a page uses, in a code block or in inline code, is importable and public (``__all__``), and
every public name has its entry in the API reference.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

import immutorch
import immutorch.nn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
API_PAGE = DOCS / "api.md"
PAGES = sorted(DOCS.rglob("*.md"))
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", flags=re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# immutorch.name[.name...][:name]; "immutorch.X" in prose or output (```text) is not a use, nor a
# file name given as an option's value (--immutorch-report=immutorch.json).
DOTTED = re.compile(r"(?<![\w./=-])immutorch((?:\.[A-Za-z_]\w*)+)(?::([A-Za-z_]\w*))?")


def _python_blocks(page: Path) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == "python"]


BLOCKS = [(page, i, code) for page in PAGES for i, code in enumerate(_python_blocks(page))]


# torch 2.4 and 2.5 hand back a read-only numpy array from np.from_dlpack and warn once per
# process when it becomes a tensor (which test meets it first depends on the order).
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")
@pytest.mark.parametrize(
    ("page", "index", "code"),
    BLOCKS,
    ids=[f"{page.relative_to(DOCS)}:block{i}" for page, i, _ in BLOCKS],
)
def test_docs_example_runs(
    request: pytest.FixtureRequest, page: Path, index: int, code: str
) -> None:
    if "immutable_inputs" in code and "strict=strict" in code and "torch.export" in code:
        from test_export_and_leftovers import DECORATED_STRICT_EXPORT_2_5

        request.applymarker(DECORATED_STRICT_EXPORT_2_5)  # the page says why
    # dont_inherit: a reader runs the block without this module's `from __future__ import
    # annotations` (under it, torch 2.4's custom_op sees "torch.Tensor" as a string).
    compiled = compile(code, f"{page}:block{index}", "exec", dont_inherit=True)
    exec(compiled, {"__name__": "docs"})


def test_every_page_has_something_to_read() -> None:
    assert PAGES, f"no pages under {DOCS}"
    for page in PAGES:
        assert page.read_text().strip(), f"{page} is empty"


# -- the public API matches the docs ------------------------------------------------------------
def _uses(path: Path) -> set[str]:
    """The ``immutorch...`` names a page uses: in code blocks other than output (```text), in
    inline code, and imported by its Python blocks."""
    text = path.read_text()
    code = [body for lang, body in FENCE.findall(text) if lang not in ("text", "")]
    prose = FENCE.sub("", text)
    found: set[str] = set()
    for chunk in [*code, *INLINE.findall(prose)]:
        for dotted, attr in DOTTED.findall(chunk):
            found.add("immutorch" + dotted + (f":{attr}" if attr else ""))
    for lang, body in FENCE.findall(text):
        if lang != "python":
            continue
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("immutorch"):
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is a module, not a package
        return False


def _resolve(name: str) -> object:
    """Import the longest module prefix of ``name``, then walk the attributes after it."""
    dotted, _, attr = name.partition(":")
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        if not _is_module(module_name):
            continue
        value: object = importlib.import_module(module_name)
        for part in [*parts[cut:], *([attr] if attr else [])]:
            value = getattr(value, part)
        return value
    raise ImportError(name)


def _check_public(name: str) -> str | None:
    """Why ``name`` (as the docs spell it) is not a public, importable name, or None."""
    try:
        _resolve(name)
    except (ImportError, AttributeError) as err:
        return f"{name} does not resolve ({type(err).__name__}: {err})"
    parts = name.partition(":")[0].split(".")[1:]
    head = parts[0]
    if head.startswith("_"):
        return None  # a private module, named on purpose (the audit's targets, Protected)
    if head in immutorch.__all__:
        return None
    # A public subpackage (immutorch.nn): its own __all__ decides.
    if _is_module(f"immutorch.{head}"):
        module = importlib.import_module(f"immutorch.{head}")
        if len(parts) == 1 or parts[1] in getattr(module, "__all__", ()):
            return None
        return f"{name}: {parts[1]!r} is not in immutorch.{head}.__all__"
    return f"{name}: {head!r} is not in immutorch.__all__ (add it to _EXPORTS)"


def test_every_name_the_docs_use_is_public() -> None:
    problems = []
    for path in [README, *PAGES]:
        for name in sorted(_uses(path)):
            why = _check_public(name)
            if why is not None:
                problems.append(f"{path.relative_to(ROOT)}: {why}")
    assert not problems, "\n".join(problems)


def test_the_docs_use_the_public_names() -> None:
    # The check above must have something to check: README's own examples use these.
    used = _uses(README)
    assert {"immutorch.immutable_inputs", "immutorch.guard"} <= used, used


def test_every_public_name_is_in_the_api_reference() -> None:
    entries = set(re.findall(r"^::: (immutorch[\w.]*)$", API_PAGE.read_text(), flags=re.M))
    public = {f"immutorch.{name}" for name in immutorch.__all__}
    public |= {f"immutorch.nn.{name}" for name in immutorch.nn.__all__}
    missing = sorted(public - entries)
    assert not missing, f"add `::: NAME` to {API_PAGE.relative_to(ROOT)} for: {missing}"
    unknown = sorted(entries - public)
    assert not unknown, (
        f"{API_PAGE.relative_to(ROOT)} documents names that are not public: {unknown}"
    )


# -- README: what a newcomer needs first, and links that lead somewhere --------------------------
def test_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines; keep it under {README_MAX_LINES} and move detail into docs/"
    )


def test_readme_links_point_to_files_that_exist() -> None:
    text = FENCE.sub("", README.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [
        link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")
    ]
    assert relative, "README links into the docs"
    missing = [link for link in relative if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
