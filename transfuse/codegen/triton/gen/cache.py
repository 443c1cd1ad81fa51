"""Generated kernels on disk, named by the sha256 of their source, imported once per process.

``@triton.jit`` reads a function's source with ``inspect`` (and the interpreter runs it from
there), so a generated kernel must live in a real file: ``load_kernel(source, name)`` writes
``tf_<sha256[:32]>.py`` into :func:`cache_dir` (a temporary name, then an atomic rename: safe
with concurrent processes; an existing file whose text differs is rewritten), imports it
with importlib under the module name ``tf_<sha256[:32]>`` and returns the function ``name``.
The same source is imported once per process (later calls return the same function object,
so Triton compiles it once per specialisation); identical groups of different layers emit
identical source and share one file and one compile.

Where: ``$TRANSFUSE_CACHE_DIR/triton`` (default ``~/.cache/transfuse/triton``, see
:mod:`transfuse.codegen.machine_cache`); ``TRANSFUSE_CACHE_DIR=""`` keeps the files in a
per-process temporary directory. The directory is appended to ``sys.path`` so the modules
are importable by name (``tf_<hash>:<kernel>``) by other processes too, e.g. the compile
check's workers (:func:`transfuse.codegen.triton.gen.launch.compile_spec`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from transfuse.codegen.machine_cache import cache_root
from transfuse.codegen.triton import env  # noqa: F401  (the mode before triton is imported)
from transfuse.errors import LoweringError

_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType] = {}
_TMP: dict[str, str] = {}


def cache_dir() -> Path:
    """Where kernel files go (created on first use)."""
    root = cache_root()
    if root is None:
        if "dir" not in _TMP:
            _TMP["dir"] = tempfile.mkdtemp(prefix="transfuse-triton-")
        return Path(_TMP["dir"])
    return root / "triton"


def module_name(source: str) -> str:
    """The module a kernel source is imported as: ``tf_<sha256[:32]>``."""
    return "tf_" + hashlib.sha256(source.encode()).hexdigest()[:32]


def _write(path: Path, source: str) -> None:
    try:
        if path.read_text() == source:
            return
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_module(source: str) -> ModuleType:
    """The module of ``source``, written to the cache and imported once per process."""
    name = module_name(source)
    with _LOCK:
        mod = _MODULES.get(name)
        if mod is not None:
            return mod
        folder = cache_dir()
        path = folder / f"{name}.py"
        try:
            _write(path, source)
        except OSError as e:
            raise LoweringError(f"triton gen: cannot write the kernel file {path}: {e} "
                                f"(set TRANSFUSE_CACHE_DIR to a writable directory)") from e
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception:
            del sys.modules[name]
            raise
        _MODULES[name] = mod
        return mod


def load_kernel(source: str, name: str):
    """The ``@triton.jit`` function ``name`` of ``source`` (see the module docstring)."""
    mod = load_module(source)
    try:
        return getattr(mod, name)
    except AttributeError:
        raise LoweringError(f"triton gen: the kernel source defines no {name!r}") from None


def loaded() -> int:
    """How many kernel modules this process imported (one per distinct source)."""
    return len(_MODULES)


__all__ = ["cache_dir", "module_name", "load_module", "load_kernel", "loaded"]
