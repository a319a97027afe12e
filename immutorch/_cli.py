"""The command line: ``python -m immutorch demo``, ``audit TARGET`` and ``schema-audit``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Optional, TextIO

AUDIT_EPILOG = """\
TARGET is package.module:name. A module instance is audited as is; a class is instantiated
with no arguments; a function without required parameters is a factory whose result (a
module or function) is audited; any other function is audited itself.

The target is called once as target(*inputs): one random float32 tensor per --input, then,
with --lengths, a relative-lengths tensor of ones (one per item of the first input's first
dimension). The inputs, and every argument of every nn.Module call inside the run, are
protected in warn mode: each write goes ahead, so every write is found, not only the first.
Each row is one place that wrote (module path and class, op, argument, source line), with how
many times it wrote there.

exit status: 0 no writes, 1 writes found, 2 bad usage or the target could not be loaded or run.

example:
  python -m immutorch audit immutorch._reference:legacy_encoder --input 8,80,300 --lengths
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m immutorch",
        description="immutorch: find and stop PyTorch code that writes into tensors it was handed.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="show SpeechBrain's mel-encoder bug under each guard mode",
        description=(
            "Run a miniature of SpeechBrain's MelSpectrogramEncoder, whose legacy "
            "InputNormalization wrote into the caller's mel on CPU, unguarded, under "
            "guard(mode=raise|warn|clone), and with the fixed immutorch.nn.InputNormalization; "
            "print how much the caller's mel changed, whether the embedding is unchanged, and "
            "the time against the unguarded call."
        ),
    )
    demo.set_defaults(subparser=demo)
    demo.add_argument(
        "--repeats", type=int, default=15, help="timed runs per mode; the best is shown"
    )
    audit = commands.add_parser(
        "audit",
        help="run a model once and list every write into its inputs",
        description="Run TARGET once and list every write into a tensor it was handed.",
        epilog=AUDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("target", metavar="TARGET", help="package.module:name to audit")
    audit.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="SHAPE",
        help="shape of one random float input, e.g. 8,80,300 (repeat for more inputs)",
    )
    audit.add_argument(
        "--lengths",
        action="store_true",
        help="also pass relative lengths (a tensor of ones) after the inputs",
    )
    audit.add_argument("--json", action="store_true", help="print a JSON list of writes")
    audit.set_defaults(subparser=audit)
    from ._schema_audit import add_parser as add_schema_audit

    add_schema_audit(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    """Run the command line; return the exit status (argparse's own exits included)."""
    out = out if out is not None else sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    with _modes_as_written():
        if args.command == "demo":
            if args.repeats < 1:
                return _usage_error(args.subparser, "--repeats must be at least 1")
            from . import _demo

            return _demo.main(out, repeats=args.repeats)
        if args.command == "schema-audit":
            from . import _schema_audit

            return _schema_audit.run(args, out)
        return _run_audit(args, out)


@contextlib.contextmanager
def _modes_as_written() -> Iterator[None]:
    """The demo compares modes and the audit needs warn mode: neither may be overridden by
    IMMUTORCH_MODE or the pytest plugin's --immutorch (both restored afterwards)."""
    from . import _config

    previous = _config.set_override(None)
    env = os.environ.pop(_config.ENV_VAR, None)
    try:
        yield
    finally:
        _config.set_override(previous)
        if env is not None:
            os.environ[_config.ENV_VAR] = env


def _run_audit(args: argparse.Namespace, out: TextIO) -> int:
    from . import _audit

    parser: argparse.ArgumentParser = args.subparser
    try:
        shapes = [_audit.parse_shape(text) for text in args.inputs]
    except ValueError as exc:
        return _usage_error(parser, f"--input: {exc}")
    if args.lengths and (not shapes or not shapes[0]):
        return _usage_error(parser, "--lengths needs an --input with a batch dimension first")
    try:
        target = _audit.load_target(args.target)
        writes = _audit.audit(target, _audit.make_inputs(shapes, args.lengths))
    except _audit.AuditError as exc:
        return _usage_error(parser, str(exc))

    if args.json:
        print(json.dumps([w.as_dict() for w in writes], indent=2), file=out)
    elif not writes:
        print(f"{args.target}: no writes into its inputs.", file=out)
    else:
        print(_table(writes), file=out)
        total = sum(w.count for w in writes)
        print(
            f"\n{args.target}: {total} write(s) into its inputs at {len(writes)} place(s).",
            file=out,
        )
    return 1 if writes else 0


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def _short(location: Optional[str]) -> str:
    if not location:
        return "?"
    rel = os.path.relpath(location)
    return location if rel.startswith("..") else rel


def _table(writes: Sequence[object]) -> str:
    from ._audit import Write

    rows = [("module", "op", "argument", "times", "line", "source")]
    for w in writes:
        assert isinstance(w, Write)
        rows.append((w.where, w.op, w.argument, str(w.count), _short(w.location), w.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [cell.ljust(width) for cell, width in zip(r, widths)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    return "\n".join(lines)
