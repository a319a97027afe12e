"""MkDocs hook: CHANGELOG.md links to the docs as ``docs/<page>.md``, which is right where
GitHub shows it at the repository root. ``docs/changelog.md`` includes it with a snippet line
(``--8<-- "CHANGELOG.md"``), which this hook expands itself, before the snippets extension
would, with those links made relative to the docs (``<page>.md``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_INCLUDE = re.compile(r'^--8<-- "CHANGELOG\.md"$', re.MULTILINE)
_DOCS_LINK = re.compile(r"\]\(docs/")


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    if page.file.src_uri != "changelog.md":
        return markdown
    root = Path(config["config_file_path"]).parent
    changelog = _DOCS_LINK.sub("](", (root / "CHANGELOG.md").read_text(encoding="utf-8"))
    return _INCLUDE.sub(lambda _: changelog, markdown)
