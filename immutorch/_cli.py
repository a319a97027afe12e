"""The command line: ``immutorch demo``, ``audit TARGET``, ``schema-audit``, ``run SCRIPT`` and
``build-native`` (also run as ``python -m immutorch``), and ``--version``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional, TextIO, cast

AUDIT_EPILOG = """\
TARGET is package.module:name. A module instance is audited as is; a class is instantiated
with --init's arguments (none by default); a function without required parameters is a
factory whose result (a module or function) is audited; any other function is audited itself.

--init takes JSON: an object of keyword arguments or a list of positional ones, for a class
TARGET only. A module target runs in the mode it was built in (nn.Module's default is
training; many factories call eval()) unless --train or --eval sets it; the output says which.

The target is called as target(*inputs): one random float32 tensor per --input, then, with
--lengths, relative lengths (one per item of the first input's first dimension). --runs N
calls the same built target N times; run i draws its inputs, and seeds torch's global
generator, from --seed + i, so a given --seed and --runs repeat exactly. With --lengths, the
first run passes lengths of 1.0 and later runs random ones: 1.0 for the first item (the
longest, as in a padded SpeechBrain batch), uniform in [0.1, 1.0] for the others, so writes
that happen only for padded items show up.

The inputs, and every argument of every nn.Module call inside the run, are protected in warn
mode: each write goes ahead, so every write is found, not only the first. Each row is one
place that wrote (module path and class, op, argument, source line), with how many times it
wrote there over all runs and, with --runs, in how many runs. A header line says what was
run. --json prints an object: "version" (2), what was run ("target", "init", "training",
"training_from", "inputs", "lengths" of each run, "runs", "seed") and "writes", the rows
("count" all runs together, "runs", "per_run" counts). Version 1 (immutorch 0.1) printed the
bare list that is now "writes".

exit status: 0 no writes, 1 writes found, 2 bad usage or the target could not be loaded,
built or run.

examples:
  python -m immutorch audit immutorch._reference:legacy_encoder --input 8,80,300 --lengths
  python -m immutorch audit immutorch._reference:LegacyInputNormalization \\
      --init '{"norm_type": "sentence"}' --train --runs 3 --input 4,100,80 --lengths
"""


def build_parser(prog: str = "immutorch") -> argparse.ArgumentParser:
    """The parser of the ``immutorch`` command; ``prog`` is how the usage lines name it
    (``python -m immutorch`` runs the same parser)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="immutorch: find and stop PyTorch code that writes into tensors it was handed.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=version_line(),
        help="print immutorch's version, and torch's and Python's, and exit",
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
        help="run a model on random inputs and list every write into them",
        description=(
            "Run TARGET on random inputs (once, or --runs times) and list every write into "
            "a tensor it was handed."
        ),
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
        help="also pass relative lengths after the inputs (1.0 in the first run, random after)",
    )
    audit.add_argument(
        "--init",
        metavar="JSON",
        help="""constructor arguments for a class TARGET: '{"norm_type": "sentence"}' """
        "(keywords) or '[true, false]' (positional)",
    )
    mode = audit.add_mutually_exclusive_group()
    mode.add_argument(
        "--train",
        dest="train",
        action="store_const",
        const=True,
        help="run a module target in training mode (default: the mode it was built in)",
    )
    mode.add_argument(
        "--eval",
        dest="train",
        action="store_const",
        const=False,
        help="run a module target in eval mode (default: the mode it was built in)",
    )
    audit.add_argument(
        "--runs",
        type=int,
        default=1,
        metavar="N",
        help="run N times with fresh random inputs and merge the writes (default 1)",
    )
    audit.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="run i uses seed S+i for its inputs and torch's generator (default 0)",
    )
    audit.add_argument(
        "--json", action="store_true", help="print what was run and the writes as JSON"
    )
    audit.set_defaults(subparser=audit)
    _add_schema_audit(commands)
    _add_run(commands)
    _add_build_native(commands)
    return parser


def _add_build_native(commands: Any) -> None:
    """Register ``build-native`` on the CLI's subparsers."""
    commands.add_parser(
        "build-native",
        help="build the native every-op backend into the per-user cache now",
        description=(
            "Compile immutorch's C++ dispatcher fallback for this torch and Python into the "
            "private per-user cache ($IMMUTORCH_CACHE_DIR, else ~/.cache/immutorch). Once it "
            "is there, every guard in scope all uses it by default (guards never start the "
            "compiler themselves unless IMMUTORCH_BACKEND=native asks for it). "
            "Needs a C++ compiler and ninja (pip install 'immutorch[native]')."
        ),
        epilog="exit status: 0 built (or already cached) and loadable, 1 it cannot be built here.",
    )


def _build_native(out: TextIO) -> int:
    import time

    from ._backends.native import loader

    started = time.perf_counter()
    try:
        entry = loader.build(verbose=False)
        library = loader.verified_library(entry)
        loader.load()
    except loader.NativeUnavailable as err:
        print(f"immutorch: the native backend cannot be built here: {err}", file=out)
        return 1
    took = time.perf_counter() - started
    size = library.stat().st_size
    print(
        f"immutorch: native backend ready: {library} ({size // 1024} KiB, {took:.1f} s)", file=out
    )
    return 0


# schema-audit's options live here, not in _schema_audit: that module imports torch, and
# `python -m immutorch --help` should not.
SCHEMA_AUDIT_EPILOG = """\
exit status: 0 every undeclared write found is in immutorch's table, 1 a write is missing
from it (the mode would let it through).

examples:
  python -m immutorch schema-audit                      # all of op_db and the collectives
  python -m immutorch schema-audit --ops 'nn.functional.*norm*' --no-collectives
"""


def _add_schema_audit(commands: Any) -> argparse.ArgumentParser:
    """Register ``schema-audit`` on the CLI's subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "schema-audit",
        help="find ops that write an argument their schema does not declare",
        description=(
            "Run PyTorch's OpInfo samples (op_db, float32, CPU) and the torch.distributed "
            "collectives (gloo, loopback) under a mode that compares each argument's bytes, "
            "size and strides before and after each op; list the writes the schemas do not "
            "declare and check them against immutorch's table."
        ),
        epilog=SCHEMA_AUDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_schema_audit_arguments(parser)
    return parser


def _add_schema_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ops",
        nargs="*",
        default=[],
        metavar="PATTERN",
        help="OpInfo names to run (fnmatch patterns, e.g. 'nn.functional.*'); default: all",
    )
    parser.add_argument(
        "--no-opinfo", action="store_true", help="skip op_db; run the collectives only"
    )
    parser.add_argument("--no-collectives", action="store_true", help="skip the collectives")
    parser.add_argument(
        "--world-size", type=int, default=2, help="processes in the gloo group (default 2)"
    )
    parser.add_argument(
        "--grad",
        action="store_true",
        help="also run each sample with requires_grad=True inputs (about twice the time)",
    )
    parser.add_argument(
        "--max-samples", type=int, default=0, help="samples per OpInfo (0: all, the default)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per sample before it is abandoned"
    )
    parser.add_argument("--progress", action="store_true", help="print each OpInfo as it starts")


def version_line() -> str:
    """``immutorch 0.2.0 (torch 2.13.0, Python 3.11.7)``: the installed torch's version is read
    from its metadata, not by importing it, so ``--version`` answers at once."""
    import platform
    from importlib import metadata

    from . import __version__

    try:
        torch_version = f"torch {metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        torch_version = "torch not installed"
    return f"immutorch {__version__} ({torch_version}, Python {platform.python_version()})"


def main(
    argv: Optional[Sequence[str]] = None,
    out: Optional[TextIO] = None,
    *,
    prog: str = "immutorch",
) -> int:
    """Run the command line; return the exit status (argparse's own exits included).

    The ``immutorch`` console script calls this with no arguments (``sys.argv``);
    ``python -m immutorch`` passes its own ``prog``."""
    out = out if out is not None else sys.stdout
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "run":
        return _run_script(args)
    _import_torch_without_numpy_notice()
    with _modes_as_written():
        if args.command == "demo":
            if args.repeats < 1:
                return _usage_error(args.subparser, "--repeats must be at least 1")
            from . import _demo

            return _demo.main(out, repeats=args.repeats)
        if args.command == "build-native":
            return _build_native(out)
        if args.command == "schema-audit":
            from . import _schema_audit

            return _schema_audit.run(args, out)
        return _run_audit(args, out)


# torch's words where numpy is not installed (torch's wheels do not depend on it).
_NUMPY_NOTICE = "Failed to initialize NumPy"


def _import_torch_without_numpy_notice() -> None:
    """Import torch with its "Failed to initialize NumPy" UserWarning silenced, and nothing
    else changed.

    On a fresh machine (``pip install torch immutorch``, no numpy) torch says this at import,
    and it was the first line the demo printed: a notice about a torch feature no command
    here uses (an audited target that needs numpy imports it, and fails with its own error).
    Only this one warning, only during the import: the filter comes off afterwards, and the
    filters torch installs at import stay, as in any program that imports torch.
    """
    if "torch" in sys.modules:
        return
    import warnings

    ours = ("ignore", re.compile(_NUMPY_NOTICE, re.IGNORECASE), UserWarning, None, 0)
    there_before = ours in warnings.filters
    warnings.filterwarnings("ignore", message=_NUMPY_NOTICE, category=UserWarning)
    try:
        import torch  # noqa: F401
    finally:
        filters = cast("list[Any]", warnings.filters)  # typeshed says Sequence; it is a list
        if not there_before and ours in filters:
            filters.remove(ours)


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
    if args.seed < 0:
        return _usage_error(parser, f"--seed must be 0 or more, got {args.seed}")
    try:
        init = None if args.init is None else _audit.parse_init(args.init)
        result = _audit.audit_runs(
            args.target,
            shapes,
            args.lengths,
            init=init,
            train=args.train,
            runs=args.runs,
            seed=args.seed,
        )
    except _audit.AuditError as exc:
        return _usage_error(parser, str(exc))

    writes = result.writes
    if args.json:
        print(json.dumps(result.as_dict(), indent=2), file=out)
        return 1 if writes else 0
    print(_header(result), file=out)
    if not writes:
        print(f"{args.target}: no writes into its inputs.", file=out)
        return 0
    print("", file=out)
    print(_table(writes, result.runs), file=out)
    total = sum(w.count for w in writes)
    over = f" over {result.runs} runs" if result.runs > 1 else ""
    print(
        f"\n{args.target}: {total} write(s) into its inputs at {len(writes)} place(s){over}.",
        file=out,
    )
    return 1


def _header(result: object) -> str:
    """One line: the target as called, its mode, the inputs, the runs and seeds."""
    from ._audit import MIN_LENGTH, Audit

    assert isinstance(result, Audit)
    target = result.target
    if isinstance(result.init, list):
        target += "(" + ", ".join(map(repr, result.init)) + ")"
    elif isinstance(result.init, dict):
        target += "(" + ", ".join(f"{k}={v!r}" for k, v in result.init.items()) + ")"
    if result.training is None:
        mode = "not a module (no train/eval mode)"
    else:
        mode = f"{'training' if result.training else 'eval'} mode ({result.training_from})"
    inputs = ", ".join("x".join(map(str, shape)) for shape in result.shapes) or "none"
    if result.lengths is not None:
        inputs += " + lengths" + (
            f" (1.0 in run 1, random in [{MIN_LENGTH}, 1.0] after)" if result.runs > 1 else ""
        )
    if result.runs == 1:
        runs = f"1 run, seed {result.seed}"
    else:
        runs = f"{result.runs} runs, seeds {result.seed}-{result.seed + result.runs - 1}"
    return f"audit: {target}; {mode}; inputs {inputs}; {runs}"


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def _table(writes: Sequence[object], runs: int = 1) -> str:
    from ._rows import Write, relative_location, table

    header: tuple[str, ...] = ("module", "op", "argument", "times", "runs", "line", "source")
    rows: list[tuple[str, ...]] = []
    for w in writes:
        assert isinstance(w, Write)
        seen_in = f"{w.runs}/{runs}"
        line = relative_location(w.location) or "?"
        rows.append((w.where, w.op, w.argument, str(w.count), seen_in, line, w.source))
    if runs == 1:  # the runs column says nothing about a single run
        header = (*header[:4], *header[5:])
        rows = [(*r[:4], *r[5:]) for r in rows]
    return table(header, rows)


# -- run: a script under strict mode's settings ---------------------------------------------------
RUN_EPILOG = """\
The script runs in this process as __main__ (sys.argv and sys.path[0] as `python SCRIPT` or
`python -m MODULE` sets them), with the settings the pytest plugin forces in strict mode:
every guard and decorator in --mode (default: IMMUTORCH_MODE, else raise) and --scope
(default: IMMUTORCH_SCOPE, else all); --modules protects the tensor inputs of every call to an
nn.Module whose class lives in those packages; --saved runs the whole script under
immutorch.guard_saved(), so a write into a tensor autograd saved for backward is refused.

exit status: the script's own; 1 when it was stopped at a refused write (immutorch's message
and the script's line that wrote are printed) or ended with an exception.

examples:
  python -m immutorch run --saved train.py --epochs 1
  python -m immutorch run --modules mypkg --mode warn -m mypkg.train
"""


def _add_run(commands: Any) -> argparse.ArgumentParser:
    """Register ``run`` on the CLI's subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "run",
        help="run a script with strict checks (like coverage run)",
        description="Run a Python script or module with immutorch's strict checks on.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", default=None, help="raise|warn|clone|off (default raise)")
    parser.add_argument("--scope", default=None, help="all|arguments (default all)")
    parser.add_argument(
        "--modules", default=None, metavar="PKG[,PKG...]", help="packages whose modules to watch"
    )
    parser.add_argument(
        "--saved", action="store_true", help="protect the tensors autograd saves for backward"
    )
    parser.add_argument("-m", dest="module", metavar="MODULE", help="run a module, as python -m")
    parser.add_argument(
        "target", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS...]", help="the script to run"
    )
    parser.set_defaults(subparser=parser)
    return parser


def _run_script(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.subparser
    target: list[str] = list(args.target)
    if target[:1] == ["--"]:
        target = target[1:]
    if args.module is None and not target:
        return _usage_error(parser, "give a SCRIPT to run, or -m MODULE")
    if args.module is None and not os.path.isfile(target[0]):
        return _usage_error(parser, f"no such script: {target[0]}")
    env_mode = os.environ.get("IMMUTORCH_MODE", "").strip().lower()
    env_scope = os.environ.get("IMMUTORCH_SCOPE", "").strip().lower()
    mode = (args.mode or env_mode or "raise").strip().lower()
    scope = (args.scope or env_scope or "all").strip().lower()
    modules: tuple[str, ...] = ()
    if args.modules:
        modules = tuple(m.strip() for m in args.modules.replace(",", " ").split())
        bad = [m for m in modules if not all(part.isidentifier() for part in m.split("."))]
        if bad:
            return _usage_error(parser, f"--modules takes dotted package names, got {bad[0]!r}")
    from . import _config, _run

    try:
        _config.check_mode(mode, source="--mode")
        _config.check_scope(scope, source="--scope")
    except ValueError as exc:
        return _usage_error(parser, str(exc))
    return _run.run(
        script=None if args.module is not None else target[0],
        module=args.module,
        args=target if args.module is not None else target[1:],
        mode=mode,
        scope=scope,
        modules=modules,
        saved=args.saved,
        err=sys.stderr,
    )
