"""The backends: how a guard sees the ops that may write into protected memory.

Each backend intercepts aten ops its own way and hands every written tensor to the same
judgement (``immutorch._judge``), so policies, messages and the block rule are shared:

- ``mode``: a ``TorchDispatchMode`` that sees every op on the thread (``scope="all"``);
- ``scoped``: the ``Protected`` tensor subclass handed to a callee in place of each protected
  argument, so only ops on protected memory leave C++ (``scope="arguments"``).

The backends never import each other.
"""
