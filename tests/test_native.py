"""What only the native backend has: the build cache's security rules, the choice of backend
(``IMMUTORCH_BACKEND``, the fallback to Python where a dispatch key is taken, the logger line),
and the state it mirrors in C++ (births, read-only marks). The shared corpus runs through it
in every module marked ``both_backends``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import immutorch
from immutorch import ImmutableTensorError, MutationWarning, guard
from immutorch._backends import choice, native
from immutorch._backends.mode import ImmutorchMode
from immutorch._backends.native import NativeHandle, loader
from immutorch._clone import group_of
from immutorch._registry import STATE

ROOT = Path(__file__).resolve().parent.parent


def _built_entry() -> Path:
    if not native.available():
        pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    return loader.cache_root() / loader.build_key()


def _private_copy(tmp_path: Path) -> Path:
    """A private cache holding a copy of the real build."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    entry = root / loader.build_key()
    shutil.copytree(_built_entry(), entry)
    entry.chmod(0o700)
    return root


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- the cache --------------------------------------------------------------------------------
def test_a_cache_others_can_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _private_copy(tmp_path)
    monkeypatch.setenv("IMMUTORCH_CACHE_DIR", str(root))
    loader.verified_library(root / loader.build_key())  # the copy itself is fine
    root.chmod(0o777)
    with pytest.raises(loader.NativeUnavailable, match=r"can be written by other users"):
        loader.build()
    (root / loader.build_key()).chmod(0o757)
    with pytest.raises(loader.NativeUnavailable, match=r"can be written by other users"):
        loader.verified_library(root / loader.build_key())


def test_a_cache_entry_that_is_a_link_is_refused(tmp_path: Path) -> None:
    root = _private_copy(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(root / loader.build_key())
    with pytest.raises(loader.NativeUnavailable, match=r"not a plain directory"):
        loader.verified_library(link)


@pytest.mark.parametrize("field", ["source", "torch", "python"])
def test_a_stamp_that_does_not_match_this_installation_is_refused(
    tmp_path: Path, field: str
) -> None:
    entry = _private_copy(tmp_path) / loader.build_key()
    stamp = json.loads((entry / loader.STAMP).read_text())
    stamp[field] = "something else"
    (entry / loader.STAMP).write_text(json.dumps(stamp))
    with pytest.raises(loader.NativeUnavailable, match=rf"stamp's {field} .*not built by this"):
        loader.verified_library(entry)


def test_a_library_changed_after_its_build_is_refused(tmp_path: Path) -> None:
    entry = _private_copy(tmp_path) / loader.build_key()
    library = next(entry.glob(loader.module_name() + "*"))
    with library.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(loader.NativeUnavailable, match=r"changed since it was built"):
        loader.verified_library(entry)


def test_a_missing_stamp_is_no_build(tmp_path: Path) -> None:
    entry = _private_copy(tmp_path) / loader.build_key()
    (entry / loader.STAMP).unlink()
    with pytest.raises(loader.NativeUnavailable, match=r"no complete build"):
        loader.verified_library(entry)


def test_a_new_cache_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "fresh" / "immutorch"
    monkeypatch.setattr(loader, "_compile", _fake_compile_from(_built_entry()))
    monkeypatch.setenv("IMMUTORCH_CACHE_DIR", str(root))
    entry = loader.build()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    loader.verified_library(entry)
    assert not [p for p in root.iterdir() if p.name.startswith(".build-")]


def _fake_compile_from(built: Path):  # type: ignore[no-untyped-def]
    def compile_(into: Path, verbose: bool) -> Path:
        library = next(built.glob(loader.module_name() + "*"))
        shutil.copy(library, into / library.name)
        return into / library.name

    return compile_


def test_two_processes_building_at_once_build_once(tmp_path: Path) -> None:
    built = _built_entry()
    root = tmp_path / "cache"
    log = tmp_path / "compiles.log"
    code = f"""
        import shutil, time
        from pathlib import Path
        from immutorch._backends.native import loader
        def compile_(into, verbose):
            with open({str(log)!r}, "a") as f:
                f.write("compile\\n")
            time.sleep(1.0)  # long enough for the other process to reach the lock
            library = next(Path({str(built)!r}).glob(loader.module_name() + "*"))
            shutil.copy(library, into / library.name)
            return into / library.name
        loader._compile = compile_
        module = loader.load()
        print("loaded", module.enabled())
    """
    env = {"IMMUTORCH_CACHE_DIR": str(root)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.strip() == "loaded False"
    assert log.read_text().count("compile") == 1
    loader.verified_library(root / loader.build_key())


# -- choosing the backend ---------------------------------------------------------------------
def test_immutorch_backend_is_read_at_each_guard_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    _built_entry()
    x = torch.ones(3)
    for backend, handle in (("native", NativeHandle), ("python", ImmutorchMode)):
        monkeypatch.setenv("IMMUTORCH_BACKEND", backend)
        with guard(x):
            assert isinstance(STATE.mode_handle, handle)
            with pytest.raises(ImmutableTensorError, match=r"aten::add_ would write into"):
                x.add_(1)
        assert STATE.mode_handle is None
    assert torch.equal(x, torch.ones(3))


def test_the_default_is_native_where_a_build_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    _built_entry()
    monkeypatch.delenv("IMMUTORCH_BACKEND", raising=False)
    x = torch.ones(3)
    with guard(x):
        assert isinstance(STATE.mode_handle, NativeHandle)
        with pytest.raises(ImmutableTensorError, match=r"aten::add_ would write into"):
            x.add_(1)
    assert torch.equal(x, torch.ones(3))


def test_the_default_never_builds(tmp_path: Path) -> None:
    # No build in the cache: the Python mode serves at once and says how to get the native
    # one; no compiler runs (CXX would fail). Asking for native by name still tries to build.
    code = """
        import logging, torch, immutorch
        logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
        from immutorch._backends import native
        from immutorch._registry import STATE
        x = torch.ones(2)
        for _ in range(2):
            with immutorch.guard(x):
                print(type(STATE.mode_handle).__name__)
        print(native.status())
        import os
        os.environ["IMMUTORCH_BACKEND"] = "native"
        with immutorch.guard(x):
            print(type(STATE.mode_handle).__name__)
        print(native.status())
    """
    # IMMUTORCH_BACKEND empty: the default, whatever this run set.
    env = {
        "IMMUTORCH_BACKEND": "",
        "IMMUTORCH_CACHE_DIR": str(tmp_path / "c"),
        "CXX": "no-such-cxx",
    }
    done = _run(code, env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["ImmutorchMode", "ImmutorchMode"]
    assert lines[2] == (
        "python (native not built for this torch and Python: "
        "`python -m immutorch build-native` builds it)"
    )
    assert lines[3] == "ImmutorchMode"
    assert lines[4].startswith("python (native unavailable: building guard.cpp failed")
    assert done.stderr.count("every-op backend: python (native not built") == 1
    assert not [p for p in (tmp_path / "c").glob("torch*") if p.is_dir()]


def test_a_bad_backend_name_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMMUTORCH_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"IMMUTORCH_BACKEND='cuda' is not a backend; use one"):
        with guard(torch.ones(1)):
            pass
    assert STATE.mode_handle is None and not STATE.frames


def test_the_choice_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _built_entry()
    monkeypatch.setenv("IMMUTORCH_BACKEND", "native")
    monkeypatch.setattr(choice, "_told", set())
    monkeypatch.setattr(choice, "_told_native", False)
    with caplog.at_level(logging.INFO, logger="immutorch"):
        for _ in range(2):
            with guard(torch.ones(1)):
                pass
    lines = [r.getMessage() for r in caplog.records if r.name == "immutorch"]
    assert lines == ["immutorch: every-op backend: " + native.status()]
    assert native.status().startswith("native (C++ fallback on ")


class _ViewsThenWrites(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.data  # a view made without any op: the C++ key is not told of it
        v = x[1:]
        # Views whose Python object the caller makes itself, of its own type.
        p = torch.nn.Parameter(x, requires_grad=False)
        s = x.as_subclass(torch.Tensor)
        x.mul_(2)  # the first write: every view above must move onto the private copy
        return torch.cat([t.flatten() for t in (d, v, p, s, x)])


def test_clone_mode_is_served_by_native_and_keeps_data_views(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _built_entry()
    monkeypatch.setenv("IMMUTORCH_BACKEND", "native")
    x = torch.ones(3, 4)
    expected = _ViewsThenWrites()(x.clone())
    data = torch._C.TensorBase.__dict__["data"]
    watched = native._module.data_watched  # type: ignore[union-attr]
    assert "data" not in torch.Tensor.__dict__ and not watched(data)
    with guard(torch.zeros(1)):
        assert isinstance(STATE.mode_handle, NativeHandle)
        with guard(mode="clone") as g:
            assert isinstance(STATE.mode_handle, NativeHandle) and native.enabled()
            # The .data watch, while clone mode is here: in torch's descriptor, no class changed.
            assert watched(data) and "data" not in torch.Tensor.__dict__
            assert torch._C.TensorBase.__dict__["data"] is data
            out = _ViewsThenWrites()(x)
        assert not watched(data)
        assert isinstance(STATE.mode_handle, NativeHandle)
    assert torch.equal(out, expected)
    assert torch.equal(x, torch.ones(3, 4))
    assert g.stats.copies == 1


def test_guard_saved_is_served_by_the_python_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    _built_entry()
    monkeypatch.setenv("IMMUTORCH_BACKEND", "native")
    w = torch.ones(3, requires_grad=True)
    with guard(torch.zeros(1)):
        assert isinstance(STATE.mode_handle, NativeHandle)
        with immutorch.guard_saved():
            y = (w * 2).sin()
            assert isinstance(STATE.mode_handle, ImmutorchMode)
        y.sum().backward()


# Another library's fallback on a key, in the subprocesses below. torch 2.4 has no
# Library.fallback; a fallthrough fallback takes the key as well.
_TAKE_KEY = """def take(lib):
            if hasattr(lib, "fallback"):
                lib.fallback(lambda op, ks, *a, **k: op.redispatch(ks, *a, **k), with_keyset=True)
            else:
                lib.m.fallback_fallthrough()"""


def test_a_taken_key_falls_back_to_the_python_mode(tmp_path: Path) -> None:
    _built_entry()
    # Another library's fallback on every key the native backend could use.
    code = f"""
        import logging, torch
        logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
        {_TAKE_KEY}
        keep = []
        for key in ("TESTING_ONLY_GenericMode", "TESTING_ONLY_GenericWrapper", "DeferredInit"):
            lib = torch.library.Library("_", "IMPL", key)
            take(lib)
            keep.append(lib)
        import immutorch
        from immutorch._registry import STATE
        x = torch.ones(2)
        with immutorch.guard(x):
            print(type(STATE.mode_handle).__name__)
            try:
                x.add_(1)
            except immutorch.ImmutableTensorError:
                print("refused")
    """
    done = _run(code, {"IMMUTORCH_BACKEND": "native"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ImmutorchMode", "refused"]
    assert (
        "immutorch WARNING immutorch: every-op backend: python (native unavailable: the native "
        "backend's dispatch key is taken (every candidate dispatch key has a fallback already: "
        "TESTING_ONLY_GenericMode, TESTING_ONLY_GenericWrapper, DeferredInit))"
    ) in done.stderr


@pytest.mark.parametrize(
    ("taken", "status"),
    [
        (
            ["TESTING_ONLY_GenericMode"],
            "native (C++ fallback on TESTING_ONLY_GenericWrapper for every op, DeferredInit for "
            "writes)",
        ),
        (
            ["TESTING_ONLY_GenericMode", "DeferredInit"],
            "native (C++ fallback on TESTING_ONLY_GenericWrapper for every op)",
        ),
    ],
)
def test_a_taken_key_is_skipped_for_a_free_one(taken: list[str], status: str) -> None:
    # With fewer keys free a key that sees every op serves the frames the missing ones would
    # (the others are an optimisation): a write under guard(x) is refused either way.
    _built_entry()
    code = f"""
        import torch
        {_TAKE_KEY}
        keep = []
        for key in {taken!r}:
            lib = torch.library.Library("_", "IMPL", key)
            take(lib)
            keep.append(lib)
        from immutorch._backends import native
        import immutorch
        assert native.available()
        print(native.status())
        x = torch.ones(2)
        with immutorch.guard(x):
            try:
                x.add_(1)
            except immutorch.ImmutableTensorError:
                print("refused")
        print(x.tolist())
    """
    done = _run(code, {"IMMUTORCH_BACKEND": "native"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [status, "refused", "[1.0, 1.0]"]


def test_no_compiler_falls_back_with_the_reason(tmp_path: Path) -> None:
    code = """
        import torch, immutorch
        from immutorch._backends import native
        x = torch.ones(2)
        with immutorch.guard(x):
            pass
        print(native.status())
    """
    env = {
        "IMMUTORCH_BACKEND": "native",
        "IMMUTORCH_CACHE_DIR": str(tmp_path / "c"),
        "CXX": "no-such-cxx",
        "PATH": "/nonexistent",
    }
    done = _run(code, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("python (native unavailable: ")


# -- the state the fallback mirrors -----------------------------------------------------------
@pytest.fixture
def native_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    _built_entry()
    monkeypatch.setenv("IMMUTORCH_BACKEND", "native")


@pytest.mark.usefixtures("native_backend")
def test_a_readonly_mark_made_before_the_backend_loaded_is_enforced() -> None:
    w = torch.ones(3)
    immutorch.readonly(w)
    try:
        with guard():
            with pytest.raises(ImmutableTensorError, match=r"marked read-only"):
                w[1:].mul_(2)
        with guard(torch.zeros(1)):  # a named guard too: the mark is not the block rule
            with pytest.raises(ImmutableTensorError, match=r"marked read-only"):
                w.zero_()
    finally:
        immutorch.writable(w)
    with guard(torch.zeros(1)):
        w.add_(1)
    assert torch.equal(w, torch.full((3,), 2.0))


@pytest.mark.usefixtures("native_backend")
def test_births_in_a_block_are_the_blocks_own() -> None:
    before = torch.ones(4)
    with guard():
        assert isinstance(STATE.mode_handle, NativeHandle)
        fresh = before * 2  # born in the block
        fresh.add_(1)
        fresh[1:].zero_()
        view = before.view(2, 2)  # not fresh: a view of outside memory
        with pytest.raises(ImmutableTensorError, match=r"a tensor from outside the block"):
            view.add_(1)
        with guard():  # an inner block: memory born in the outer one is outside it
            with pytest.raises(ImmutableTensorError, match=r"a tensor from outside the block"):
                fresh.add_(1)
            inner = fresh.clone()
            inner.add_(1)
        fresh.add_(1)
    assert torch.equal(before, torch.ones(4))
    assert torch.equal(fresh, torch.tensor([4.0, 1.0, 1.0, 1.0]))


@pytest.mark.usefixtures("native_backend")
def test_size_writes_go_to_python_only_for_protected_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write of size or strides is judged by the tensor object (ThreadState.object_hits):
    the fallback hands Python only those into a protected object, a tensor whose memory it
    cannot see, or (in a block) memory from outside it, not every one (conv1d's own
    ``as_strided_`` on its output cost ~13 us each)."""
    judged: list[str] = []
    write = native._write

    def spy(state: Any, name: str, *rest: Any) -> None:
        judged.append(name)
        write(state, name, *rest)

    monkeypatch.setattr(native, "_write", spy)
    x = torch.ones(3)
    with guard(x):
        assert isinstance(STATE.mode_handle, NativeHandle)
        torch.ones(2, 3).unsqueeze_(0)  # fresh memory
        x[1:].unsqueeze_(0)  # a view of protected memory changes only its own shape
        assert judged == []
        with pytest.raises(ImmutableTensorError, match=r"change the size or strides"):
            x.unsqueeze_(0)
    assert x.shape == (3,)
    judged.clear()
    with guard():
        torch.ones(2, 3).t_()
        assert judged == []
        with pytest.raises(ImmutableTensorError, match=r"change the size or strides"):
            x.t_()


@pytest.mark.both_backends
def test_a_protected_object_moved_to_other_memory_still_warns_at_a_size_write() -> None:
    """Warn mode lets ``set_`` move a protected tensor onto unprotected memory; the object
    is still protected, so changing its shape after warns too."""
    x = torch.ones(3)
    with pytest.warns(MutationWarning) as caught:
        with guard(x, mode="warn"):
            x.set_(torch.zeros(2))
            x.unsqueeze_(0)
    ops = [str(w.message).split()[1] for w in caught]
    assert ops == ["aten::set_", "aten::unsqueeze_"]


@pytest.mark.usefixtures("native_backend")
def test_a_refusal_keeps_its_type_through_autograd() -> None:
    x = torch.ones(3)

    class WritesInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):  # type: ignore[no-untyped-def, override]
            return a * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            x.add_(1)
            return g

    w = torch.ones(3, requires_grad=True)
    with guard(x):
        loss = WritesInBackward.apply(w).sum()
        with pytest.raises(ImmutableTensorError, match=r"aten::add_ would write into"):
            loss.backward()
    assert torch.equal(x, torch.ones(3))


@pytest.mark.both_backends
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")
def test_an_op_error_in_torchscript_is_not_replaced_by_an_earlier_refusal() -> None:
    # The front doors put back the exception TorchScript rewrapped, from the thread's record of
    # the last one raised through the backend: a refusal caught earlier must not stand in for
    # an op's own error later.
    @torch.jit.script
    def bad(t: torch.Tensor) -> torch.Tensor:
        return t.view(7)

    x = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"shape '\[7\]' is invalid") as info:
        with guard(x):
            with pytest.raises(ImmutableTensorError):
                x.add_(1)
            bad(torch.ones(3))
    assert not isinstance(info.value, ImmutableTensorError)


def _key_for(sees: str) -> str:
    return {s: key for key, s in native._keys or []}[sees]


# -- the keys and what falls through them ----------------------------------------------------------
# Annotated as returning an alias, but the result is the input itself or new memory: no view to
# join a copy-on-write group, so these fall through the views key (guard.cpp never_a_new_view).
NEVER_A_NEW_VIEW = {"resolve_conj", "resolve_neg", "contiguous"}


def test_never_a_new_view_holds() -> None:
    # The premise of the exemption, on real and complex, conjugated and negated tensors.
    z = torch.randn(3, 4, dtype=torch.complex64)
    for t in (torch.randn(3, 4), z, z.conj(), torch._neg_view(z), torch.randn(4, 3).t()):
        for op in (torch.resolve_conj, torch.resolve_neg, torch.Tensor.contiguous):
            out = op(t)
            assert out is t or out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


@pytest.mark.usefixtures("native_backend")
def test_each_key_lets_through_only_ops_its_frames_need_not_see() -> None:
    # What falls through each key is decided in C++ from the schemas; _schema.op_facts is the
    # one source of what an op writes, whether its outputs are fresh and what they view. No
    # overload with a write may fall through any key, nor one with fresh outputs through the
    # births key (a block's), nor a view through the views key (clone mode's).
    from immutorch._schema import op_facts

    assert native.available()
    keys = {sees: key for key, sees in native._keys or []}
    assert set(keys) == {"writes", "writes and fresh outputs", "writes and views"}, keys

    def falls(full: str, key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            full, key
        ) and torch._C._dispatch_kernel_for_dispatch_key_is_fallthrough(full, key)

    through = dict.fromkeys(keys, 0)
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith("aten::"):
            continue
        name, _, overload = full[len("aten::") :].partition(".")
        facts = op_facts(getattr(getattr(torch.ops.aten, name), overload or "default"))
        for sees, key in keys.items():
            falls_here = falls(full, key)
            through[sees] += falls_here
            if falls_here:
                assert not facts.writes, f"{full} writes, and falls through {key}"
                if sees == "writes and fresh outputs":
                    assert not facts.fresh_outputs, f"{full}: fresh, and falls through {key}"
                if sees == "writes and views" and name not in NEVER_A_NEW_VIEW:
                    assert facts.view_of is None, f"{full}: a view, and falls through {key}"
    # Most of aten falls through the writes-only key and the views key; through the births key
    # only the views (most ops have fresh outputs), which are most of the ops a model runs.
    assert through["writes"] > 1000, through
    assert through["writes and views"] > 1000, through
    assert 50 < through["writes and fresh outputs"] < through["writes and views"], through


class _KeysSeen(torch.nn.Module):
    def forward(self, t: torch.Tensor) -> dict[str, str]:
        def keys(u: torch.Tensor) -> str:
            return str(torch._C._dispatch_keys(u))

        return {"alias": keys(t), "view": keys(t[0]), "fresh": keys(t + 1)}


@pytest.mark.usefixtures("native_backend")
def test_the_key_that_serves_follows_the_frames() -> None:
    assert native.available()
    births, writes, views = (
        _key_for(s) for s in ("writes and fresh outputs", "writes", "writes and views")
    )
    # A block: the births key, or the writes key where births are dated by allocation
    # (tests/test_native_births.py).
    block = writes if native._module.births_by_allocation() else births
    x = torch.ones(2)
    with guard(x):
        assert native._module.serving() == writes  # named, raise: writes only
        with guard():
            assert native._module.serving() == block
        assert native._module.serving() == writes
        with guard(x, mode="clone"):
            # Clone mode: writes on the thread; the views key is in the key sets of the
            # copy-on-write group's members only (the alias handed over and its views).
            assert native._module.serving() == writes
            with guard(mode="clone"):
                assert native._module.serving() == block
        with pytest.raises(ImmutableTensorError):
            x.view(2, 1).add_(1)
    assert native._module.serving() == ""
    assert torch.equal(x, torch.ones(2))
    with guard(x, mode="clone"):  # the strictest frame is clone's: x is handed over
        seen = _KeysSeen()(x)
    assert views in seen["alias"] and views in seen["view"], seen
    assert views not in seen["fresh"], seen
    assert views not in str(torch._C._dispatch_keys(x))  # the caller's own tensor


@pytest.mark.usefixtures("native_backend")
def test_an_op_defined_after_the_backend_loaded_is_judged_on_the_writes_only_key() -> None:
    # Only aten's overloads known at install fall through: one defined later reaches the
    # fallback, and its declared write is refused before its kernel runs.
    assert native.available()
    lib = torch.library.Library("immutorch_test_late", "DEF")
    try:
        lib.define("bump(Tensor(a!) x) -> ()")
        ran: list[bool] = []

        def bump(x: torch.Tensor) -> None:
            ran.append(True)
            with torch.no_grad():
                x.data_ptr()  # the kernel would write here; it must not run at all

        lib.impl("bump", bump, "CPU")
        x = torch.ones(2)
        with guard(x):
            assert native._module.serving() == _key_for("writes")
            with pytest.raises(ImmutableTensorError, match=r"immutorch_test_late::bump"):
                torch.ops.immutorch_test_late.bump(x)
        assert ran == []
        torch.ops.immutorch_test_late.bump(x)  # unguarded: it runs
        assert ran == [True]
    finally:
        lib._destroy()


@pytest.mark.usefixtures("native_backend")
def test_an_op_defined_anew_with_a_write_is_judged_by_its_new_schema() -> None:
    # The fallback keeps what it read of each schema by the schema's address. An operator
    # destroyed and defined again under the same name and arguments, now writing, may get the
    # old schema's address: its facts must be read again, or the write would pass unseen.
    assert native.available()
    x = torch.ones(2)
    for writes in (False, True, False, True):
        lib = torch.library.Library("immutorch_test_anew", "DEF")
        try:
            lib.define("touch(Tensor(a!) x) -> ()" if writes else "touch(Tensor x) -> ()")

            def touch(t: torch.Tensor, writes: bool = writes) -> None:
                if writes:
                    t.add_(1)  # below the key: the declared write is what is judged

            lib.impl("touch", touch, "CPU")
            with guard(x):
                if writes:
                    with pytest.raises(ImmutableTensorError, match=r"immutorch_test_anew::touch"):
                        torch.ops.immutorch_test_anew.touch(x)
                else:
                    torch.ops.immutorch_test_anew.touch(x)
        finally:
            lib._destroy()
    assert torch.equal(x, torch.ones(2))


def test_data_of_other_tensors_is_torchs_while_clone_mode_watches_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the .data watch is on, tensors that belong to no copy-on-write group get torch's
    own ``.data`` (same storage, no grad, no group), setting ``.data`` still works, and a
    member read on a thread with no guard joins its group all the same."""
    import threading

    _built_entry()
    monkeypatch.setenv("IMMUTORCH_BACKEND", "native")
    weight = torch.nn.Parameter(torch.ones(2, 2))
    x = torch.ones(3)
    seen: list[torch.Tensor] = []

    class Reads(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            d = weight.data
            assert d.data_ptr() == weight.data_ptr() and not d.requires_grad
            assert group_of(d) is None
            weight.data = torch.full((2, 2), 3.0)
            worker = threading.Thread(target=lambda: seen.append(t.data))
            worker.start()
            worker.join()
            t.add_(1)  # the group moves onto its copy, the other thread's view with it
            return seen[0] * 1

    with guard(x, mode="clone"):
        assert native._module.data_watched(torch._C.TensorBase.__dict__["data"])  # type: ignore[union-attr]
        out = Reads()(x)
    assert torch.equal(weight.detach(), torch.full((2, 2), 3.0))
    assert torch.equal(out, torch.full((3,), 2.0)) and torch.equal(x, torch.ones(3))
