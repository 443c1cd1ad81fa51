"""Native CPU kernels for the python backend: fp32 attention, SwiGLU, add + RMSNorm, rotary.

Why: on the CPU the generated code runs torch's kernels one op at a time. Four places
lose most to that (measured on one EPYC core, llama-small shapes, seq 512, in-process and
interleaved against the torch path):

* causal attention: torch's flash kernel computes exp with a general-purpose routine
  and walks 512-key blocks; :c:func:`tf_attention_f32` visits only the visible key
  tiles of each block of 6 query rows, keeps the scores of a block in L1 and uses a
  short exp (~2 ulp); the K tile is shared by the query heads of a kv head: S=512, H=12,
  Hkv=4, D=64 0.72-0.79x the time of the query-blocked SDPA path (cpu_attention.py),
  S=128 0.56-0.59x;
* SwiGLU: ``F.silu(gate) * up`` is two passes and a 2 ns/element exp; one pass here
  (0.60-0.73x);
* residual add + RMSNorm: torch's rms_norm is pow, mean, add, rsqrt, mul, mul; one
  pass over each row here (0.52-0.56x);
* rotary embedding: neg, cat, two muls and an add in torch; one pass here (0.40x).

How: ``kernels.c`` (next to this file) is compiled on first use with the machine's C
compiler (``$CC``, else ``cc``/``gcc``/``clang``) as ``-O3 -march=native -shared``
into ``$TRANSFUSE_CACHE_DIR/native`` (default ``~/.cache/transfuse/native``), named by
a hash of the source, the flags, the compiler's version and the CPU, written to a
temporary name and renamed (safe with concurrent processes); later processes load the
cached library in ~1 ms. ``TRANSFUSE_CACHE_DIR=""`` builds into a per-process
temporary directory instead. ``TRANSFUSE_NATIVE=0`` turns the kernels off.

Nothing depends on them: :func:`library` returns None when there is no compiler, the
build fails, or the platform is not one we build for, and :func:`status` says why;
every caller then runs its torch path, which computes the same function. Results
match torch to fp32 rounding, not bit for bit (another summation order, another exp).

Threads: each kernel works on a range of independent rows or heads; with
``torch.get_num_threads() > 1`` a call is split into that many ranges run on a
thread pool (ctypes releases the GIL), so ``torch.set_num_threads`` governs these
kernels as it does torch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from transfuse.codegen.machine_cache import cache_root, cpuinfo

SOURCE = Path(__file__).with_name("kernels.c")
#: every C file compiled into the one library (kernels.c first); a new kernel family gets its
#: own file here and its signatures in :data:`_SIGNATURES`
SOURCES = (SOURCE, SOURCE.with_name("cached_attention.c"), SOURCE.with_name("gemm.c"))
#: headers the sources include (part of the build key: a changed header rebuilds the library)
HEADERS = (Path(__file__).with_name("vec8.h"),)
#: must equal tf_abi_version() in kernels.c: a stale library with another ABI is rebuilt
ABI_VERSION = 1
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared",
         "-fno-strict-aliasing")

_lock = threading.Lock()
_state: dict[str, object] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0

_P = ctypes.c_void_p
_L = ctypes.c_long
_I = ctypes.c_int
_F = ctypes.c_float
_SIGNATURES = {
    "tf_attention_f32": [_I, _I, _I, _I, _I, _F, _I, _P, _L, _L, _L, _P, _L, _L, _L,
                         _P, _L, _L, _L, _P, _L, _L, _L, _I, _I],
    "tf_attention_units": [_I, _I, _I],
    "tf_swiglu_f32": [_I, _P, _L, _P, _L, _P, _L, _I, _I],
    "tf_add_rms_norm_f32": [_I, _P, _L, _P, _L, _P, _F, _P, _L, _P, _L, _I, _I],
    "tf_rotary_f32": [_I, _I, _I, _I, _I, _P, _L, _L, _L, _P, _L, _L, _L, _P, _L, _L, _L,
                      _P, _L, _L, _L, _I, _I],
    "tf_linear_f32": [_I, _I, _I, _P, _L, _P, _L, _P, _P, _L, _I, _I],
    "tf_linear_units": [_I],
    "tf_linear_kn_f32": [_I, _I, _I, _P, _L, _P, _L, _P, _P, _L, _I, _I],
    "tf_linear_kn_units": [_I],
    "tf_cached_attention_f32": [_I, _I, _I, _I, _I, _F, _I, _F, _P, _P, _L, _L, _P, _L, _L, _L,
                                _P, _L, _L, _L, _L, _L, _P, _P, _I, _P, _L, _I, _P, _I, _I,
                                _P, _L, _L, _I, _I],
}


def compiler() -> str | None:
    """The C compiler the kernels are built with (``$CC``, else cc/gcc/clang), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = cache_root()
    if root is None:  # caching disabled: one private directory per process
        if "tmpdir" not in _state:
            _state["tmpdir"] = tempfile.mkdtemp(prefix="transfuse-native-")
        return Path(str(_state["tmpdir"]))
    return root / "native"


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("TRANSFUSE_NATIVE", "1") == "0":
        return None, "turned off by TRANSFUSE_NATIVE=0"
    if sys.platform not in ("linux", "darwin"):
        return None, f"native kernels are built on Linux and macOS only (this is {sys.platform})"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {cc} did not run: {e}"
    source = b"\0".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), repr(version).encode(),
                                     cpuinfo('model name', 'flags').encode(), platform.machine().encode()]))
    out_dir = _cache_dir()
    lib_path = out_dir / f"transfuse-kernels-{key.hexdigest()[:20]}.so"
    if not lib_path.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
            os.close(fd)
            proc = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                os.unlink(tmp)
                err = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                return None, f"{cc} failed to build {', '.join(p.name for p in SOURCES)}: {' | '.join(err)}"
            os.replace(tmp, lib_path)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"could not build {', '.join(p.name for p in SOURCES)} into {out_dir}: {e}"
    try:
        lib = ctypes.CDLL(str(lib_path))
        if lib.tf_abi_version() != ABI_VERSION:
            return None, f"{lib_path} has ABI {lib.tf_abi_version()}, expected {ABI_VERSION}"
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        return None, f"could not load {lib_path}: {e}"
    return lib, f"built with {version[0] if version else cc} as {lib_path}"


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None when unavailable (see status)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _build()
                _state["why"] = why
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """One line: where the library came from, or why the torch paths are used instead."""
    library()
    return str(_state["why"])


def reset() -> None:
    """Forget the loaded library (tests; a rebuild happens on the next call)."""
    with _lock:
        _state.pop("lib", None)
        _state.pop("why", None)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go to a native kernel: fp32, CPU, innermost dim contiguous,
    no autograd history wanted, and the library is available."""
    for t in tensors:
        if (t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1
                or (t.requires_grad and torch.is_grad_enabled())):
            return False
    return library() is not None


def run_split(fn, units: int, *args) -> None:
    """``fn(*args, u0, u1)`` over [0, units), in ``torch.get_num_threads()`` ranges at once;
    a nonzero return means the kernel refused its arguments (a bug in the caller)."""
    global _pool, _pool_size
    n = min(torch.get_num_threads(), units)
    if n <= 1:
        rc = fn(*args, 0, units)
        if rc:
            raise RuntimeError(f"native kernel {fn.__name__} refused its arguments (code {rc})")
        return
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="transfuse-native")
            _pool_size = n
        pool = _pool
    bounds = [units * i // n for i in range(n + 1)]
    futures = [pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(n)]
    codes = [f.result() for f in futures]
    if any(codes):
        raise RuntimeError(f"native kernel {fn.__name__} refused its arguments (codes {codes})")


__all__ = ["library", "status", "reset", "compiler", "usable", "run_split", "SOURCE", "SOURCES", "HEADERS", "ABI_VERSION"]
