"""Small projects for pytester runs: files given as {relative path: indented text}."""

from __future__ import annotations

import textwrap
from pathlib import Path

# pkg/layers.py of the plugin's test projects: Zeroing writes its input at line 6 (x[0] = 0),
# Scaling at line 12 (x.mul_(2)); Doubling writes nothing.
LAYERS = """
    import torch


    class Zeroing(torch.nn.Module):
        def forward(self, x):
            x[0] = 0
            return x


    class Scaling(torch.nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x


    class Doubling(torch.nn.Module):
        def forward(self, x):
            return x * 2
"""


def write_files(root: Path, files: dict[str, str]) -> None:
    """Write each file under ``root`` (parent folders made), its text dedented."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
