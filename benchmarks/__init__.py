"""What immutorch costs, measured side by side: ``python benchmarks/run.py`` (see ``run.py``).

- ``workloads.py``: what is timed (the callees and their inputs).
- ``variants.py``: the ways each callee is called (unguarded, the floor, every guard).
- ``harness.py``: how it is timed (``torch.utils.benchmark.Timer``, the shuffled round-robin,
  the backend switch, the copy and memory counts, the clone-mode checks).
- ``report.py``: what is written (Markdown tables, targets, JSON, the matplotlib plot).
- ``run.py``: the command line.

Not part of the installed package.
"""
