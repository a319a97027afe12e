"""Building and loading the native backend (``guard.cpp``, ``frames.cpp``): once per torch,
Python and immutorch version and source, into a private per-user cache.

Loading compiled code is a way in, so a library is loaded only from a directory this user owns
that no one else can write (the cache is created 0700), and only if the stamp written beside it
at build time says it was built from this exact source for this torch and Python, and the
library's bytes still hash to what the stamp recorded. Two processes building at once (pytest-xdist)
serialise on a lock file; a build happens in a temporary directory renamed into place when
complete, so nothing half-built is ever found. Site-packages is never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

# guard.cpp: the fallback and its Python entry points; frames.cpp: reading a frame's local.
SOURCES = (Path(__file__).with_name("guard.cpp"), Path(__file__).with_name("frames.cpp"))
STAMP = "stamp.json"


class NativeUnavailable(RuntimeError):
    """The native backend cannot be built or loaded here; the message says why."""


class NotBuilt(NativeUnavailable):
    """No build for this installation is in the cache (and none was asked for)."""


def _immutorch_version() -> str:
    # The installed distribution's version, read without importing the package (the loader
    # sits below the front doors). Under an editable install of another checkout it can name
    # that checkout's version; the key's source hash still tells the builds apart.
    try:
        from importlib.metadata import version

        return version("immutorch")
    except Exception:  # not installed as a distribution (a bare checkout)
        return "0"


def source_hash() -> str:
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


def build_key() -> str:
    """The cache entry for this torch, Python, immutorch and source."""
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    torch_version = torch.__version__.replace("+", "_")
    return f"torch{torch_version}-{py}-immutorch{_immutorch_version()}-{source_hash()[:16]}"


def module_name() -> str:
    return "immutorch_native_" + source_hash()[:16]


def cache_root() -> Path:
    """``$IMMUTORCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/immutorch``, else ``~/.cache/immutorch``."""
    explicit = os.environ.get("IMMUTORCH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "immutorch"


def check_private(path: Path) -> None:
    """Refuse a directory that is not this user's own or that others can write."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise NativeUnavailable(f"{path} is not a plain directory; refusing to load code from it")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise NativeUnavailable(
            f"{path} belongs to another user (uid {info.st_uid}); refusing to load code from it. "
            "Set IMMUTORCH_CACHE_DIR to a directory of your own."
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeUnavailable(
            f"{path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"refusing to load code from it. Fix it with `chmod 700 {path}` or set "
            "IMMUTORCH_CACHE_DIR to a private directory."
        )


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(path)
    return path


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _library_in(entry: Path) -> Optional[Path]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = entry / (module_name() + suffix)
        if candidate.exists():
            return candidate
    return None


def verified_library(entry: Path) -> Path:
    """The library in cache ``entry``, after checking directory, stamp and bytes."""
    check_private(entry)
    stamp_path = entry / STAMP
    library = _library_in(entry)
    if library is None or not stamp_path.exists():
        raise NativeUnavailable(f"{entry} holds no complete build")
    stamp = json.loads(stamp_path.read_text())
    expected = {
        "source": source_hash(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "library": library.name,
    }
    for field, value in expected.items():
        if stamp.get(field) != value:
            raise NativeUnavailable(
                f"{entry}: the stamp's {field} is {stamp.get(field)!r}, not {value!r}; this "
                "library was not built by this installation from this source. Remove the "
                f"directory or run `python -m immutorch build-native`."
            )
    if stamp.get("sha256") != _file_hash(library):
        raise NativeUnavailable(
            f"{library} changed since it was built (its hash no longer matches the stamp); "
            "refusing to load it. Remove it or run `python -m immutorch build-native`."
        )
    return library


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _compile(into: Path, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        raise NativeUnavailable("no C++ compiler found (install g++ or clang, or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise NativeUnavailable("ninja is not installed (pip install 'immutorch[native]')")
    try:
        cpp_extension.load(
            name=module_name(),
            sources=[str(s) for s in SOURCES],
            build_directory=str(into),
            extra_cflags=["-O2"],
            verbose=verbose,
        )
    except Exception as err:
        raise NativeUnavailable(f"building {SOURCES[0].name} failed: {err}") from err
    library = _library_in(into)
    if library is None:
        raise NativeUnavailable(f"the build in {into} produced no library")
    return library


def build(*, verbose: bool = False) -> Path:
    """Build into the cache if no verified build is there; return the cache entry."""
    root = _private_dir(cache_root())
    entry = root / build_key()
    with contextlib.suppress(NativeUnavailable, OSError, ValueError):
        verified_library(entry)
        return entry
    with _locked(root / (build_key() + ".lock")):
        with contextlib.suppress(NativeUnavailable, OSError, ValueError):
            verified_library(entry)  # another process built it while we waited
            return entry
        temp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            started = time.perf_counter()
            library = _compile(temp, verbose)
            stamp = {
                "source": source_hash(),
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "library": library.name,
                "sha256": _file_hash(library),
                "build_seconds": round(time.perf_counter() - started, 1),
            }
            (temp / STAMP).write_text(json.dumps(stamp, indent=1))
            if entry.exists():  # an unverifiable leftover: replace it
                shutil.rmtree(entry)
            os.rename(temp, entry)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
    return entry


def load(*, build_if_missing: bool = True) -> ModuleType:
    """The native module, built first if needed; raises NativeUnavailable saying why not."""
    name = module_name()
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    try:
        entry = build() if build_if_missing else cache_root() / build_key()
        if not build_if_missing and not os.path.lexists(entry):
            raise NotBuilt(f"no build in {entry}")
        library = verified_library(entry)
    except OSError as err:
        raise NativeUnavailable(f"the native cache is not usable: {err}") from err
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise NativeUnavailable(f"{library} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        raise NativeUnavailable(f"{library} does not load: {err}") from err
    sys.modules[name] = module
    return module
