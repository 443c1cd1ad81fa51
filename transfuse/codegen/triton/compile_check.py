"""Compile every shipped Triton kernel configuration for sm_80 and sm_90, without a GPU.

Triton's GPU compiler runs on any machine: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` lowers a ``@triton.jit`` function to PTX and ptxas (it
ships in the triton wheel) assembles the cubin. This module does that for every
:class:`~transfuse.codegen.triton.kernels.spec.KernelSpec` the kernel modules ship
(``SHIPPED``) and checks what the hardware would refuse or punish:

- **shared memory** (static, from the cubin, + dynamic, ``metadata.shared``) within the
  per-block opt-in maximum of the CUDA C++ Programming Guide's table "Technical
  Specifications per Compute Capability": 163 KB = 166,912 B on 8.0 (A100), 99 KB =
  101,376 B on 8.6 / 8.9, 227 KB = 232,448 B on 9.0 (H100). Over it, the launch fails;
- **registers** at most 255 a thread, and the block's registers (allocated 256 a warp at a
  time) within the 64 K register file of one SM (same table);
- **no spills** (``ptxas -v``'s spill stores / loads: local memory traffic in the inner loop).

Registers, stack and static shared memory come from ``cuobjdump -res-usage`` on the cubin,
spills from ptxas's own ``-v`` log (Triton prints it with ``TRITON_DUMP_PTXAS_LOG=1``; if it
does not, ptxas is run again on the PTX).

**Alignment.** At launch Triton specialises every pointer that is 16-byte aligned and every
integer divisible by 16 (``tt.divisibility``); that is what makes loads vectorise and what
lets ``num_stages`` pipeline them through shared memory (``cp.async``). Measured on a
64x64x32 fp16 GEMM: 96 registers aligned, 166 without the hints. By default (``aligned``)
every pointer and integer argument is compiled as divisible by 16: the binary the GPU runs
at the shipped shapes, and the one with the most shared memory. ``aligned=False``
(``--unaligned``) checks the other specialisation.

**Processes.** ``@triton.jit`` decides at decoration time whether a function is compiled or
interpreted, and :mod:`transfuse.codegen.triton.env` sets ``TRITON_INTERPRET=1`` in a
process without a GPU. So the compiling happens in worker processes started with
``TRITON_INTERPRET=0``: ``jobs`` of them, each taking the next config nobody has claimed
and writing one JSON line per result; a worker that dies is replaced and the config it died
on is reported as an error. Successful results are cached on disk
(``$TRANSFUSE_CACHE_DIR/triton-compile-check``, see :mod:`transfuse.codegen.machine_cache`)
keyed by the sha256 of the kernel module's source (and of the ``transfuse.codegen.triton``
modules it imports), the spec, the triton version, the arch and ``CACHE_VERSION``: a rerun
with nothing changed compiles nothing.

A spec is compiled only for the asked architectures it ships for (``KernelSpec.archs``:
fp8 dots need sm_89+).

CLI: ``python -m transfuse.codegen.triton.compile_check [--arch 80,90] [--json out.json]``
prints a table and exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import pickle
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from transfuse.codegen.machine_cache import cache_root
from transfuse.codegen.triton.env import triton_unavailable
from transfuse.codegen.triton.kernels.spec import KernelSpec
from transfuse.errors import LoweringError

logger = logging.getLogger(__name__)

#: per-block opt-in maximum of shared memory, bytes, by compute capability (CUDA C++
#: Programming Guide, "Technical Specifications per Compute Capability")
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
#: registers a thread may use (every compute capability since 3.5)
MAX_REGISTERS = 255
#: 32-bit registers of one SM, the most one block can hold (8.x and 9.0)
REGISTER_FILE = 65_536
#: registers are allocated per warp in units of this many
REGISTER_UNIT = 256
#: the kernels package whose modules ship configurations
KERNELS_PACKAGE = "transfuse.codegen.triton.kernels"
#: bump when how a result is measured changes (it is part of every cache key)
CACHE_VERSION = 1
CACHE_DIRNAME = "triton-compile-check"
#: environment variables that change what Triton compiles (part of the cache key)
_COMPILE_ENV = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH", "PTXAS_OPTIONS",
                "TRITON_DEFAULT_FP_FUSION", "DISABLE_PTXAS_OPT")
_ERROR_CHARS = 3000
#: the argument types Triton specialises on divisibility by 16: pointers and integers
_DIVISIBLE = re.compile(r"^(\*.*|[iu](8|16|32|64))$")


@dataclasses.dataclass
class Result:
    """What compiling one spec for one arch gave."""

    kernel: str  # module:function
    name: str  # the spec's report name
    num_warps: int
    num_stages: int
    arch: int
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    stack: int | None = None  # bytes of stack frame a thread
    shared_static: int | None = None  # bytes
    shared_dynamic: int | None = None  # bytes (Triton's metadata.shared)
    seconds: float | None = None  # triton.compile's wall time
    error: str | None = None  # compilation failed: why
    cached: bool = False
    #: from the committed record (:func:`load_record`), not compiled in this run
    recorded: bool = False
    key: str | None = None  # cache_key of (spec, arch)

    @property
    def config(self) -> str:
        return f"w{self.num_warps} s{self.num_stages}"

    @property
    def shared(self) -> int | None:
        if self.shared_dynamic is None:
            return None
        return self.shared_dynamic + (self.shared_static or 0)

    @property
    def spills(self) -> int | None:
        if self.spill_stores is None and self.spill_loads is None:
            return None
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    def problems(self) -> list[str]:
        """What is wrong, in words (empty when the config is fine)."""
        if self.error is not None:
            return [f"does not compile for sm_{self.arch}: {_summary(self.error)}"]
        out = []
        limit = SHARED_LIMIT.get(self.arch)
        if limit is None:
            out.append(f"no shared-memory limit known for sm_{self.arch}")
        elif self.shared is None:
            out.append("shared memory unknown")
        elif self.shared > limit:
            out.append(f"uses {self.shared:,} B of shared memory, over sm_{self.arch}'s "
                       f"{limit:,} B a block")
        if self.registers is None:
            out.append("register count unknown")
        else:
            if self.registers > MAX_REGISTERS:
                out.append(f"uses {self.registers} registers a thread, over {MAX_REGISTERS}")
            per_warp = -(-self.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
            if per_warp * self.num_warps > REGISTER_FILE:
                out.append(f"{self.num_warps} warps x {self.registers} registers need "
                           f"{per_warp * self.num_warps:,}, over the {REGISTER_FILE:,} of an SM")
        if self.spills is None:
            out.append("spills unknown (no ptxas log)")
        elif self.spills:
            out.append(f"spills registers: {self.spill_stores} B stored, "
                       f"{self.spill_loads} B loaded a thread")
        return out

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _summary(error: str) -> str:
    """The first and the last line of a (multi-line) error: Triton's CompilationError puts
    the location first and the reason last, with the source in between."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) <= 1:
        return error.strip()
    return f"{lines[0]} ... {lines[-1]}"


# -- reading the tools' output --------------------------------------------------------

_FUNCTION = re.compile(r"^\s*Function\s+([^\s:]+)\s*:(.*)$")
_FIELD = re.compile(r"\b([A-Z_]+(?:\[\d+\])?)\s*:\s*(\d+)")


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``{function: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}`` from the output of
    ``cuobjdump -res-usage``. Fields after a ``Function name:`` line (on it or the lines
    below) belong to that function; headers (``Resource usage:``, ``Common:``, ``Fatbin ...``)
    and unknown fields are tolerated."""
    out: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), {})
            rest = m.group(2)
        elif line.strip().rstrip(":") in ("Common", "Resource usage") or line.startswith(
                ("Fatbin", "=")):
            current = None
            continue
        else:
            rest = line
        if current is not None:
            for key, value in _FIELD.findall(rest):
                current[key] = int(value)
    return out


def parse_ptxas_log(text: str) -> dict[str, int]:
    """``{"registers", "spill_stores", "spill_loads", "stack"}`` from ``ptxas -v``'s log
    (``ptxas info`` or ``ptxas-blackwell info`` lines). Spills are summed over the functions
    of the module, registers and stack frame are the maximum; keys whose lines are absent
    are left out."""
    out: dict[str, int] = {}

    def grab(pattern: str, key: str, combine) -> None:
        values = [int(v) for v in re.findall(pattern, text)]
        if values:
            out[key] = combine(values)

    grab(r"Used\s+(\d+)\s+registers", "registers", max)
    grab(r"(\d+)\s+bytes\s+spill\s+stores", "spill_stores", sum)
    grab(r"(\d+)\s+bytes\s+spill\s+loads", "spill_loads", sum)
    grab(r"(\d+)\s+bytes\s+stack\s+frame", "stack", max)
    return out


# -- finding the tools and the specs --------------------------------------------------


def tool_path(tool: str) -> str | None:
    """Where Triton finds ``ptxas`` / ``cuobjdump`` (``TRITON_<TOOL>_PATH``, else the wheel's
    ``backends/nvidia/bin``, else ``PATH``), or None."""
    spec = importlib.util.find_spec("triton")
    candidates = [os.environ.get(f"TRITON_{tool.upper().replace('-', '_')}_PATH")]
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / tool))
    candidates.append(shutil.which(tool))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def tools_unavailable() -> str | None:
    """Why the compile check cannot run here (None when it can)."""
    why = triton_unavailable()
    if why is not None:
        return why
    for tool in ("ptxas", "cuobjdump"):
        if tool_path(tool) is None:
            return f"{tool} not found (the triton wheel ships it in triton/backends/nvidia/bin)"
    return None


def shipped_specs(modules: Iterable[str | ModuleType] | None = None) -> list[KernelSpec]:
    """Every ``SHIPPED`` spec of the kernel modules: ``modules`` (names, absolute or relative
    to the kernels package, or modules), by default every module of
    ``transfuse.codegen.triton.kernels`` but ``spec`` and private (``_x``) ones. A module
    that fails to import, or has no ``SHIPPED`` list of KernelSpec, is a LoweringError
    naming it."""
    if modules is None:
        package = importlib.import_module(KERNELS_PACKAGE)
        modules = [f"{KERNELS_PACKAGE}.{info.name}"
                   for info in pkgutil.iter_modules(package.__path__)
                   if info.name != "spec" and not info.name.startswith("_")]
    specs: list[KernelSpec] = []
    for mod in modules:
        if isinstance(mod, str):
            name = mod  # "norms" is the kernels package's, else an absolute module name
            if "." not in mod and _module_file(f"{KERNELS_PACKAGE}.{mod}") is not None:
                name = f"{KERNELS_PACKAGE}.{mod}"
            try:
                mod = importlib.import_module(name)
            except Exception as e:
                raise LoweringError(f"kernel module {name} does not import: "
                                    f"{type(e).__name__}: {e}") from e
        shipped = getattr(mod, "SHIPPED", None)
        if not isinstance(shipped, (list, tuple)) or not all(
                isinstance(s, KernelSpec) for s in shipped):
            raise LoweringError(f"kernel module {mod.__name__} must export SHIPPED, a list of "
                                f"KernelSpec (the configurations its wrapper launches); "
                                f"found {type(shipped).__name__}")
        specs.extend(shipped)
    return specs


# -- the cache ------------------------------------------------------------------------


def _module_file(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.has_location else None


def _imported_modules(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """The modules a module's source imports (``from p import x`` gives ``p.x`` and ``p``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                anchor = parts[:len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _source_digest(module: str, within: str = "transfuse.codegen.triton") -> str | None:
    """sha256 of the source of ``module`` and, transitively, of the modules under ``within``
    it imports (where shared ``@triton.jit`` helpers live); None when it cannot be found."""
    h = hashlib.sha256()
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            if name == module:
                return None
            continue
        source = Path(path).read_bytes()
        h.update(name.encode() + b"\0" + source + b"\0")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        imported = _imported_modules(tree, name, path.endswith("__init__.py"))
        todo.extend(sorted(m for m in imported if m == within or m.startswith(within + ".")))
    return h.hexdigest()


def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(spec: KernelSpec, arch: int, aligned: bool = True,
              digests: dict[str, str | None] | None = None,
              triton: str | None = None) -> str | None:
    """The cache key of compiling ``spec`` for ``arch`` with ``triton`` (a version string;
    default: the installed one), or None when the kernel's module cannot be found (then
    nothing is cached)."""
    module = spec.kernel.partition(":")[0]
    digests = {} if digests is None else digests
    if module not in digests:
        digests[module] = _source_digest(module)
    if digests[module] is None:
        return None
    what = {
        "version": CACHE_VERSION, "source": digests[module],
        "triton": triton or _triton_version(),
        "arch": arch, "aligned": aligned,
        "spec": [spec.kernel, spec.name, spec.signature,
                 {k: repr(v) for k, v in spec.constexprs.items()},
                 spec.num_warps, spec.num_stages],
        "env": {k: os.environ.get(k) for k in _COMPILE_ENV},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()


def default_cache_dir() -> Path | None:
    """``$TRANSFUSE_CACHE_DIR/triton-compile-check`` (None when the caches are off)."""
    root = cache_root()
    return None if root is None else root / CACHE_DIRNAME


def _cache_load(folder: Path | None, key: str | None) -> Result | None:
    if key is None or folder is None:
        return None
    try:
        data = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    result = Result.from_json(data)
    result.cached = True
    return result


def _cache_store(folder: Path | None, key: str | None, result: Result) -> None:
    if key is None or folder is None or result.error is not None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(result.to_json(), f)
        os.replace(tmp, folder / f"{key}.json")
    except OSError as e:
        logger.warning("could not write compile-check cache %s: %s", folder, e)


# -- compiling (in the worker processes) ------------------------------------------------


def _load_function(kernel: str):
    import triton

    module_name, _, function = kernel.partition(":")
    fn = getattr(importlib.import_module(module_name), function)
    while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # autotuner / heuristics wrappers
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(f"{kernel} is a {type(fn).__name__}, not a @triton.jit function "
                        f"(was it decorated with TRITON_INTERPRET=1?)")
    return fn


def _run_ptxas_v(ptx: str, arch: int) -> str:
    """ptxas -v's log for a PTX text (when Triton did not print its own)."""
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    ptxas = tool_path("ptxas-blackwell" if arch >= 90 else "ptxas") or tool_path("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [ptxas, "-v", f"--gpu-name={target.group(1) if target else f'sm_{arch}'}",
             str(src), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    return done.stdout + done.stderr


def compile_one(spec: KernelSpec, arch: int, aligned: bool = True) -> Result:
    """Compile one spec for one arch in this process (which must have been started with
    ``TRITON_INTERPRET=0``) and read its resources. Errors are returned, not raised."""
    result = Result(spec.kernel, spec.name, spec.num_warps, spec.num_stages, arch)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = _load_function(spec.kernel)
        signature = dict(spec.signature)
        for name in spec.constexprs:
            signature.setdefault(name, "constexpr")
        missing = [a for a in fn.arg_names if a not in signature]
        unknown = [a for a in signature if a not in fn.arg_names]
        if missing or unknown:
            raise TypeError(f"the spec does not match {spec.kernel}{tuple(fn.arg_names)}: "
                            f"missing {missing}, unknown {unknown}")
        constexprs = {(fn.arg_names.index(k),): v for k, v in spec.constexprs.items()}
        attrs = {}
        if aligned:
            attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                     if _DIVISIBLE.match(signature.get(name, ""))}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps,
                                               "num_stages": spec.num_stages})
        result.seconds = round(time.perf_counter() - start, 3)
        result.shared_dynamic = int(compiled.metadata.shared)
        ptxas = parse_ptxas_log(log.getvalue())
        if "spill_stores" not in ptxas:
            ptxas = parse_ptxas_log(_run_ptxas_v(compiled.asm["ptx"], arch))
        result.spill_stores = ptxas.get("spill_stores")
        result.spill_loads = ptxas.get("spill_loads")
        usage = _res_usage(compiled.asm["cubin"], getattr(compiled.metadata, "name", None))
        result.registers = usage.get("REG", ptxas.get("registers"))
        result.stack = usage.get("STACK", ptxas.get("stack"))
        result.shared_static = usage.get("SHARED")
    except Exception as e:
        text = f"{type(e).__name__}: {e}".strip()
        result.error = text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS] + " ..."
    return result


def _res_usage(cubin: bytes, name: str | None) -> dict[str, int]:
    """cuobjdump -res-usage's fields for the kernel ``name`` of a cubin ({} without the tool)."""
    cuobjdump = tool_path("cuobjdump")
    if cuobjdump is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True,
                              text=True)
    functions = parse_res_usage(done.stdout)
    if name in functions:
        return functions[name]
    if len(functions) == 1:
        return next(iter(functions.values()))
    # several functions and none named like the kernel: the worst of each field
    merged: dict[str, int] = {}
    for fields in functions.values():
        for k, v in fields.items():
            merged[k] = max(merged.get(k, 0), v)
    return merged


def worker_main(argv: Sequence[str] | None = None) -> None:
    """A worker process: ``worker_main([jobs.pickle, out.jsonl, claims/])`` compiles the
    jobs of the pickle (``(id, kernel, name, signature, constexprs, num_warps, num_stages,
    arch, aligned)``) that no other worker has claimed (a file ``claims/<id>`` created
    exclusively), writing ``{"start": id}`` before and ``{"done": id, "result": {...}}``
    after each, one JSON line each, flushed."""
    jobs_path, out_path, claims = argv if argv is not None else sys.argv[1:4]
    with open(jobs_path, "rb") as f:
        jobs = pickle.load(f)
    with open(out_path, "a") as out:
        for job_id, kernel, name, signature, constexprs, warps, stages, arch, aligned in jobs:
            try:
                os.close(os.open(os.path.join(claims, str(job_id)),
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # another worker has it
            out.write(json.dumps({"start": job_id}) + "\n")
            out.flush()
            spec = KernelSpec(kernel, name, signature, constexprs, warps, stages)
            result = compile_one(spec, arch, aligned)
            out.write(json.dumps({"done": job_id, "result": result.to_json()}) + "\n")
            out.flush()


# -- running the workers ----------------------------------------------------------------

_WORKER = "from transfuse.codegen.triton.compile_check import worker_main; worker_main()"


def _worker_env(triton_cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"  # compile, even without a GPU (see the module docstring)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["TRITON_CACHE_DIR"] = triton_cache  # fresh: ptxas runs, so its log is printed
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, without its warning
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # the caller's import path: kernels of test fixtures import in the worker too
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _read_worker_output(path: Path) -> tuple[set[int], dict[int, Result]]:
    started: set[int] = set()
    done: dict[int, Result] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if "start" in msg:
                started.add(msg["start"])
            elif "done" in msg:
                done[msg["done"]] = Result.from_json(msg["result"])
    return started, done


def _run_workers(jobs: list[tuple[int, KernelSpec, int, bool]], workers: int
                 ) -> dict[int, Result]:
    """Compile ``jobs`` in ``workers`` processes, which take the next unclaimed job as they
    finish one. A config a worker died on is an error; the configs nobody started go to
    fresh workers (unless no worker compiled anything: then each is an error)."""
    results: dict[int, Result] = {}
    pending = list(jobs)

    def failed(job: tuple[int, KernelSpec, int, bool], why: str) -> Result:
        _, spec, arch, _ = job
        return Result(spec.kernel, spec.name, spec.num_warps, spec.num_stages, arch, error=why)

    with tempfile.TemporaryDirectory(prefix="transfuse-compile-check-") as tmp:
        for round_ in range(len(jobs) + 1):
            if not pending:
                break
            folder = Path(tmp) / f"round{round_}"
            (folder / "claims").mkdir(parents=True)
            plain = [(job_id, s.kernel, s.name, dict(s.signature), dict(s.constexprs),
                      s.num_warps, s.num_stages, arch, aligned)
                     for job_id, s, arch, aligned in pending]  # the worker needs no spec class
            (folder / "jobs.pickle").write_bytes(pickle.dumps(plain))
            procs = []
            for w in range(max(1, min(workers, len(pending)))):
                out, err = folder / f"w{w}.jsonl", folder / f"w{w}.err"
                with open(err, "w") as err_file:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", _WORKER, str(folder / "jobs.pickle"), str(out),
                         str(folder / "claims")],
                        env=_worker_env(str(folder / f"triton-cache-{w}")),
                        stdout=subprocess.DEVNULL, stderr=err_file)
                procs.append((proc, out, err))
            started: dict[int, str] = {}  # job -> why it would have failed
            tails = []
            for proc, out, err in procs:
                rc = proc.wait()
                tail = err.read_text()[-_ERROR_CHARS:].strip() if err.exists() else ""
                tails.append(f"exit code {rc}: {tail}")
                began, done = _read_worker_output(out)
                results.update(done)
                started.update((j, f"the compiler process died (exit code {rc}): {tail}")
                               for j in began - set(done))
            for job in pending:
                if job[0] in started:
                    results[job[0]] = failed(job, started[job[0]])
            untouched = [job for job in pending if job[0] not in results]
            if untouched and len(untouched) == len(pending):  # nobody got anywhere
                why = "the compiler processes failed before compiling anything: " + tails[0]
                results.update((job[0], failed(job, why)) for job in untouched)
                untouched = []
            pending = untouched
    return results


def check(specs: Iterable[KernelSpec], archs: Sequence[int] = (80, 90), jobs: int = 2,
          aligned: bool = True, cache: bool | Path = True,
          record: dict[str, Result] | None = None) -> list[Result]:
    """Compile every spec for each of ``archs`` it ships for (``spec.archs``), spec-major,
    in ``jobs`` worker processes and return a :class:`Result` each. ``cache``: True for
    :func:`default_cache_dir`, a folder, or False; results found there are reused,
    successes are stored. ``record`` (:func:`load_record`): results keyed by the same
    content-addressed key, taken before the cache (``Result.recorded``)."""
    folder = default_cache_dir() if cache is True else Path(cache) if cache else None
    use_keys = folder is not None or record is not None
    wanted = [(spec, arch) for spec in specs for arch in archs if arch in spec.archs]
    results: list[Result | None] = [None] * len(wanted)
    keys: dict[int, str | None] = {}
    digests: dict[str, str | None] = {}
    todo = []
    for i, (spec, arch) in enumerate(wanted):
        keys[i] = cache_key(spec, arch, aligned, digests) if use_keys else None
        if record is not None and keys[i] in record:
            results[i] = dataclasses.replace(record[keys[i]], recorded=True, cached=False)
        else:
            results[i] = _cache_load(folder, keys[i])
        if results[i] is not None:
            results[i].key = keys[i]
        else:
            todo.append((i, spec, arch, aligned))
    if todo:
        logger.info("compiling %d configs (%d cached) in %d processes", len(todo),
                    len(wanted) - len(todo), jobs)
        for i, result in _run_workers(todo, jobs).items():
            result.key = keys[i]
            results[i] = result
            _cache_store(folder, keys[i], result)
    return [r for r in results if r is not None]


# -- the committed record ---------------------------------------------------------------
#
# A cold check of every shipped config is ~560 compiles (~6 CPU-minutes): too much for CI's
# budget on every run. The record (tests/data/triton_compile_record.json, written by
# ``--record``) holds the results under the same content-addressed key as the cache (kernel
# source, spec, triton version, arch): a config whose kernel, spec or triton changed has a
# new key, is not in the record and is compiled. The test recompiles a sample of recorded
# configs and requires the same registers, spills and shared memory (the record reproduces).
# One record serves every triton version the kernels support (3.9 here, 3.6 in the GPU
# image): ``--record`` under one version replaces that version's results and keeps the other
# versions' results that are still current (their keys, computed for that version, are those
# of shipped configs of today's sources); each entry names its ``triton``.


def load_record(path: str | Path) -> dict[str, Result]:
    """The record's results by key ({} when the file does not exist)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise LoweringError(f"compile record {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        raise LoweringError(f"compile record {path}: expected version {CACHE_VERSION}")
    return {k: Result.from_json(v) for k, v in data["results"].items()}


def write_record(path: str | Path, results: Iterable[Result],
                 specs: Iterable[KernelSpec] | None = None, aligned: bool = True) -> int:
    """Write the successful results that have a key, as the installed triton's; returns how
    many. With ``specs`` (the shipped configs) the results of other triton versions already
    in the file are kept where they are current: their key is that of one of ``specs``
    compiled, for an arch it ships for, with that version of triton and today's sources
    (a result of a kernel edited since is dropped). Without ``specs`` the file holds only
    ``results``."""
    version = _triton_version()
    keep = {r.key: {**{k: v for k, v in r.to_json().items()
                       if k not in ("cached", "recorded", "key", "seconds")},
                    "triton": version}
            for r in results if r.key is not None and r.error is None}
    old: dict[str, Any] = {}
    if specs is not None:
        try:
            old = json.loads(Path(path).read_text()).get("results", {})
        except (OSError, ValueError, AttributeError):
            old = {}
    others = {e.get("triton") for e in old.values() if isinstance(e, dict)} - {version, None}
    if others:
        digests: dict[str, str | None] = {}
        current = {cache_key(spec, arch, aligned, digests, triton=v)
                   for v in others for spec in specs for arch in spec.archs}
        keep.update((k, e) for k, e in old.items()
                    if k in current and e.get("triton") in others)
    versions = sorted({e["triton"] for e in keep.values()})
    doc = {"version": CACHE_VERSION, "triton": versions, "results": dict(sorted(keep.items()))}
    Path(path).write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")
    return len(keep)


# -- reporting ----------------------------------------------------------------------------


def format_table(results: Iterable[Result]) -> str:
    """One line per result: kernel, config, arch, registers, spills, shared, seconds and
    what is wrong."""
    def show(v: object) -> str:
        return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)

    rows = [("kernel", "config", "arch", "regs", "spills", "shared", "seconds", "problems")]
    for r in results:
        seconds = "-" if r.seconds is None else f"{r.seconds:.2f}{' (cached)' if r.cached else ''}"
        problems = "; ".join(p.splitlines()[0] for p in r.problems()) or "ok"
        rows.append((r.name, r.config, f"sm_{r.arch}", show(r.registers), show(r.spills),
                     show(r.shared), seconds, problems))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transfuse.codegen.triton.compile_check",
        description="Compile every shipped Triton kernel config for GPUs, without one.")
    parser.add_argument("--arch", default="80,90",
                        help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 2, 8),
                        help="compiler processes (default: the CPUs, at most 8)")
    parser.add_argument("--module", action="append",
                        help="only this kernel module (repeatable; default: all)")
    parser.add_argument("--unaligned", action="store_true",
                        help="compile without the 16-divisibility hints of aligned launches")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything")
    parser.add_argument("--record", help="write the results to this record file (see "
                        "load_record; tests/data/triton_compile_record.json), keeping the "
                        "still-current results of other triton versions")
    args = parser.parse_args(argv)
    why = tools_unavailable()
    if why is not None:
        print(f"compile check impossible: {why}", file=sys.stderr)
        return 2
    archs = [int(a.strip().removeprefix("sm_")) for a in args.arch.split(",") if a.strip()]
    start = time.perf_counter()
    specs = shipped_specs(args.module)
    results = check(specs, archs, jobs=args.jobs, aligned=not args.unaligned,
                    cache=not args.no_cache)
    print(format_table(results))
    bad = [r for r in results if r.problems()]
    not_shipped = len(specs) * len(archs) - len(results)
    print(f"\n{len(results)} compiles, {sum(r.cached for r in results)} cached, "
          f"{len(bad)} with problems, {time.perf_counter() - start:.1f} s"
          + (f"; {not_shipped} (config, arch) pairs not shipped (KernelSpec.archs)"
             if not_shipped else ""))
    for r in bad:
        for p in r.problems():
            print(f"{r.name} {r.config} sm_{r.arch}: {p}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=1))
    if args.record and not bad:
        n = write_record(args.record, results, specs, aligned=not args.unaligned)
        print(f"recorded {n} results in {args.record} (triton {_triton_version()}'s and the "
              f"still-current ones of other versions)")
    return 1 if bad else 0


__all__ = ["Result", "SHARED_LIMIT", "MAX_REGISTERS", "REGISTER_FILE", "check",
           "shipped_specs", "compile_one", "parse_res_usage", "parse_ptxas_log",
           "format_table", "cache_key", "load_record", "write_record", "default_cache_dir", "tool_path", "tools_unavailable", "worker_main",
           "main"]


if __name__ == "__main__":
    sys.exit(main())
