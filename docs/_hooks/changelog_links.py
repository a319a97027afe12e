"""MkDocs hook: ``docs/changelog.md`` is the line ``--8<-- "CHANGELOG.md"``, which this hook
replaces with CHANGELOG.md itself. CHANGELOG.md links to the docs as ``docs/<page>.md``, right
where GitHub shows it at the repository root; in the docs those links are made ``<page>.md``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

_INCLUDE = re.compile(r'^--8<-- "CHANGELOG\.md"$', re.MULTILINE)
_DOCS_LINK = re.compile(r"\]\(docs/")


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    if page.file.src_uri != "changelog.md":
        return markdown
    if not _INCLUDE.search(markdown):
        raise PluginError('docs/changelog.md must hold the line --8<-- "CHANGELOG.md"')
    root = Path(config["config_file_path"]).parent
    changelog = _DOCS_LINK.sub("](", (root / "CHANGELOG.md").read_text(encoding="utf-8"))
    return _INCLUDE.sub(lambda _: changelog, markdown)
