"""The compile check: every shipped Triton kernel config compiles for sm_80 and sm_90 with no
spills and shared memory within the limits, checked without a GPU (Triton's compiler and the
wheel's ptxas / cuobjdump).

The parsers are tested on captured tool output, ``check()`` on the tiny kernels of
``_compile_fixture_kernels`` (one clean, one over the shared-memory limit, one that spills,
one that does not compile, one that does not exist), and then on every ``SHIPPED`` config
of ``transfuse.codegen.triton.kernels``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import types
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import _compile_fixture_kernels as fx  # noqa: E402  (this folder is on sys.path)

from transfuse.codegen.triton import compile_check as cc  # noqa: E402
from transfuse.codegen.triton.kernels.spec import KernelSpec  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402

NO_TOOLS = cc.tools_unavailable()
needs_tools = pytest.mark.skipif(NO_TOOLS is not None, reason=f"no GPU compiler: {NO_TOOLS}")

# -- parsers, on captured output (cuobjdump 13.1 / ptxas 12.9 of the triton 3.9 wheel) --------

RES_USAGE_ONE = """
Resource usage:
 Common:
  GLOBAL:0
 Function pipelined_matmul:
  REG:202 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# a fatbin listing (headers per ELF) with a kernel and a device function
RES_USAGE_FATBIN = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:16
 Function k4_$_helper__Pfp32_Pfp32_i32:
  REG:24 STACK:8 SHARED:0 LOCAL:0 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function outer:REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:560 NEWFIELD:3
"""

PTXAS_LOG_SPILL = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm' for 'sm_80'
ptxas info    : Function properties for mm
    400 bytes stack frame, 416 bytes spill stores, 396 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cumulative stack size, 408 bytes cmem[0]
ptxas info    : Compile time = 250.359 ms
"""

PTXAS_LOG_TWO_FUNCTIONS = """ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function 'outer' for 'sm_90a'
ptxas-blackwell info    : Function properties for outer
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 12 registers, used 0 barriers
ptxas-blackwell info    : Compile time = 7.037 ms
ptxas-blackwell info    : Function properties for k4_$_helper__Pfp32_Pfp32_i32
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
"""


def test_parse_res_usage():
    assert cc.parse_res_usage(RES_USAGE_ONE) == {"pipelined_matmul": {
        "REG": 202, "STACK": 0, "SHARED": 1024, "LOCAL": 0, "CONSTANT[0]": 584,
        "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}}
    funcs = cc.parse_res_usage(RES_USAGE_FATBIN)
    assert set(funcs) == {"k4_$_helper__Pfp32_Pfp32_i32", "outer"}  # GLOBAL is no function
    assert funcs["outer"]["REG"] == 12 and funcs["outer"]["NEWFIELD"] == 3
    assert funcs["k4_$_helper__Pfp32_Pfp32_i32"]["STACK"] == 8
    assert cc.parse_res_usage("") == {}
    assert cc.parse_res_usage("cuobjdump fatal   : Could not open input file 'x'") == {}


def test_parse_ptxas_log():
    assert cc.parse_ptxas_log(PTXAS_LOG_SPILL) == {
        "registers": 255, "spill_stores": 416, "spill_loads": 396, "stack": 400}
    # spills summed over the kernel and its noinline helpers
    assert cc.parse_ptxas_log(PTXAS_LOG_TWO_FUNCTIONS) == {
        "registers": 12, "spill_stores": 8, "spill_loads": 4, "stack": 16}
    assert cc.parse_ptxas_log("nothing here") == {}


def _result(**kw) -> cc.Result:
    base = dict(kernel="m:k", name="k[x]", num_warps=4, num_stages=2, arch=90, registers=100,
                spill_stores=0, spill_loads=0, stack=0, shared_static=0,
                shared_dynamic=65536, seconds=1.0)
    base.update(kw)
    return cc.Result(**base)


def test_result_problems():
    assert _result().problems() == []
    assert _result(arch=90, shared_dynamic=232_448).problems() == []  # the limit itself is fine
    (p,) = _result(arch=90, shared_static=1024, shared_dynamic=232_448).problems()
    assert "233,472 B of shared memory" in p and "232,448" in p
    (p,) = _result(arch=80, shared_dynamic=196_608).problems()
    assert "sm_80" in p and "166,912" in p
    (p,) = _result(spill_stores=32, spill_loads=28).problems()
    assert "spills" in p and "32 B stored" in p
    (p,) = _result(registers=255, num_warps=16).problems()  # 16 warps x 256 > 64 K registers
    assert "register" in p and "65,536" in p
    assert _result(registers=255, num_warps=8).problems() == []
    (p,) = _result(arch=75).problems()
    assert "no shared-memory limit known for sm_75" in p
    (p,) = _result(error="CompilationError: at 2:11:\n  src\n  ^\nbad range").problems()
    assert p == "does not compile for sm_90: CompilationError: at 2:11: ... bad range"
    back = cc.Result.from_json(json.loads(json.dumps(_result(spill_loads=4).to_json())))
    assert back == _result(spill_loads=4)


# -- finding the shipped specs ----------------------------------------------------------------


def test_shipped_specs_collects_and_refuses(tmp_path, monkeypatch):
    assert cc.shipped_specs(["_compile_fixture_kernels"]) == [fx.GOOD]
    with pytest.raises(LoweringError, match="must export SHIPPED"):
        cc.shipped_specs([types.ModuleType("kernels_without_shipped")])
    bad = types.ModuleType("kernels_with_junk")
    bad.SHIPPED = ["not a spec"]
    with pytest.raises(LoweringError, match="kernels_with_junk"):
        cc.shipped_specs([bad])
    # a kernel module that fails to import is an error naming it, not a skip
    (tmp_path / "broken_kernels_mod.py").write_text("raise ImportError('no such thing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LoweringError, match="broken_kernels_mod does not import"):
        cc.shipped_specs(["broken_kernels_mod"])
    monkeypatch.delitem(sys.modules, "broken_kernels_mod", raising=False)


def test_cache_key_follows_source_spec_and_arch(tmp_path, monkeypatch):
    (tmp_path / "keyed_kernels_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = KernelSpec("keyed_kernels_mod:k", "k", {"x": "*fp32"}, {}, 4, 2)
    key = cc.cache_key(spec, 90)
    assert key and key == cc.cache_key(spec, 90)
    assert key != cc.cache_key(spec, 80)
    assert key != cc.cache_key(dataclasses.replace(spec, num_stages=3), 90)
    assert key != cc.cache_key(spec, 90, aligned=False)
    (tmp_path / "keyed_kernels_mod.py").write_text("X = 2\n")
    assert key != cc.cache_key(spec, 90)
    assert cc.cache_key(KernelSpec("no_such_module_here:k", "k", {}, {}), 90) is None


def test_record_keeps_the_current_results_of_other_triton_versions(tmp_path, monkeypatch):
    (tmp_path / "recorded_kernels_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = KernelSpec("recorded_kernels_mod:k", "k[x]", {"x": "*fp32"}, {}, 4, 2)
    path = tmp_path / "record.json"

    def run(version: str) -> list[cc.Result]:  # what a --record run under `version` writes
        monkeypatch.setattr(cc, "_triton_version", lambda: version)
        return [_result(kernel=spec.kernel, name=spec.name, arch=a, key=cc.cache_key(spec, a))
                for a in spec.archs]

    assert cc.write_record(path, run("3.6.0"), [spec]) == 2
    assert cc.write_record(path, run("3.9.0"), [spec]) == 4  # 3.6's two are still current
    doc = json.loads(path.read_text())
    assert doc["triton"] == ["3.6.0", "3.9.0"]
    assert sorted(e["triton"] for e in doc["results"].values()) == ["3.6.0"] * 2 + ["3.9.0"] * 2
    record = cc.load_record(path)
    for version in ("3.6.0", "3.9.0"):
        for arch in spec.archs:
            assert record[cc.cache_key(spec, arch, triton=version)].arch == arch
    assert cc.write_record(path, run("3.9.0"), [spec]) == 4  # a rerun replaces its own
    (tmp_path / "recorded_kernels_mod.py").write_text("X = 2\n")  # the kernel changed:
    assert cc.write_record(path, run("3.9.0"), [spec]) == 2  # 3.6's results are stale
    assert json.loads(path.read_text())["triton"] == ["3.9.0"]
    assert cc.write_record(path, run("3.6.0")) == 2  # without specs: only this run's


# -- compiling the fixture kernels ------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_results():
    if NO_TOOLS is not None:
        pytest.skip(f"no GPU compiler: {NO_TOOLS}")
    only90 = [dataclasses.replace(s, archs=(90,)) for s in (fx.SPILLS, fx.BAD, fx.MISSING)]
    specs = [fx.GOOD, fx.OVER_SHARED, *only90]
    start = time.perf_counter()
    results = cc.check(specs, archs=(80, 90), jobs=2)
    seconds = time.perf_counter() - start
    print(f"\n{cc.format_table(results)}\ncheck() of the fixtures: {seconds:.1f} s")
    return {(r.name, r.arch): r for r in results}


@needs_tools
def test_check_reports_each_verdict(fixture_results):
    by = fixture_results
    assert len(by) == 2 + 2 + 3  # the only-sm_90 specs are not compiled for sm_80
    for arch in (80, 90):
        good = by[(fx.GOOD.name, arch)]
        assert good.problems() == [], good
        assert 0 < good.registers <= 64 and good.shared == 0 and good.spills == 0
        assert good.seconds > 0 and not good.cached
        over = by[(fx.OVER_SHARED.name, arch)]
        assert over.error is None and over.spills == 0
        assert over.shared > cc.SHARED_LIMIT[arch]
        (p,) = over.problems()
        assert f"over sm_{arch}'s {cc.SHARED_LIMIT[arch]:,} B" in p
    spills = by[(fx.SPILLS.name, 90)]
    assert spills.spill_stores > 0 and spills.spill_loads > 0 and spills.registers == 255
    assert any("spills registers" in p for p in spills.problems())
    bad = by[(fx.BAD.name, 90)]
    assert "power of 2" in bad.error and bad.registers is None
    assert "does not compile for sm_90" in bad.problems()[0]
    missing = by[(fx.MISSING.name, 90)]
    assert "no_such_kernel" in missing.error


@needs_tools
def test_check_reuses_cached_results(fixture_results):
    by = fixture_results
    again = cc.check([fx.GOOD, fx.OVER_SHARED], archs=(80, 90), jobs=2)
    assert all(r.cached for r in again)  # nothing compiled
    for r in again:
        assert dataclasses.replace(r, cached=False) == by[(r.name, r.arch)]


@needs_tools
def test_a_dying_compiler_process_is_an_error_not_a_crash(tmp_path, monkeypatch):
    (tmp_path / "dying_kernels_mod.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers get the caller's sys.path
    dying = KernelSpec("dying_kernels_mod:k", "dies", {}, {}, 4, 1)
    died, after = cc.check([dying, fx.BAD], archs=(90,), jobs=1, cache=False)
    assert "the compiler process died (exit code 3)" in died.error
    assert "power of 2" in after.error  # compiled by a fresh process after the death


@needs_tools
def test_cli_prints_table_and_writes_json(fixture_results, tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = cc.main(["--module", "_compile_fixture_kernels", "--arch", "80,sm_90",
                  "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "scaled_add[1024]" in text and "sm_80" in text and "sm_90" in text
    rows = json.loads(out.read_text())
    assert [(r["name"], r["arch"]) for r in rows] == [("scaled_add[1024]", 80),
                                                      ("scaled_add[1024]", 90)]


# -- the shipped kernels ----------------------------------------------------------------------

#: What compiling every shipped config gave, keyed by content (kernel source and the
#: transfuse.codegen.triton modules it imports, spec, triton version, arch): written by
#: ``python -m transfuse.codegen.triton.compile_check --record tests/data/triton_compile_record.json``.
#: A cold check is ~560 compiles (~6 CPU-minutes, over CI's budget): recorded configs are
#: taken from it, every other one (a kernel, spec or triton that changed) is compiled here.
#: It holds the results of triton 3.9 (here) and 3.6 (the GPU image): benchmarks/
#: triton36_check.sh refreshes both.
RECORD = Path(__file__).resolve().parents[2] / "data" / "triton_compile_record.json"
#: recorded configs compiled again to show that the record reproduces
RECOMPILED_SAMPLE = 4


@needs_tools
def test_every_shipped_config_compiles():
    specs = cc.shipped_specs()
    record = cc.load_record(RECORD)
    start = time.perf_counter()
    results = cc.check(specs, archs=(80, 90), jobs=min(os.cpu_count() or 2, 8), record=record)
    seconds = time.perf_counter() - start
    compiled = [r for r in results if not r.recorded]
    print(f"\n{cc.format_table(compiled)}\n{len(results)} configs: {len(results) - len(compiled)} "
          f"from the record, {len(compiled)} compiled in {seconds:.1f} s"
          + (f" (refresh the record: python -m transfuse.codegen.triton.compile_check "
             f"--record {RECORD.relative_to(Path.cwd()) if RECORD.is_relative_to(Path.cwd()) else RECORD})"
             if compiled else ""))
    bad = [f"{r.name} {r.config} sm_{r.arch}: {p}" for r in results for p in r.problems()]
    assert not bad, "\n".join(bad)
    assert len(results) >= 500  # every module's SHIPPED (562 when recorded)


@needs_tools
def test_the_compile_record_reproduces():
    """A sample of recorded configs (one per kernel module, the first four modules by name)
    compiles again to the recorded registers, spills and shared memory."""
    record = cc.load_record(RECORD)
    assert record, f"{RECORD} is missing or empty"
    by_key = {}
    for spec in cc.shipped_specs():
        for arch in spec.archs:
            key = cc.cache_key(spec, arch)
            if key in record:
                by_key.setdefault(spec.kernel.partition(":")[0], (spec, arch, key))
    sample = [by_key[m] for m in sorted(by_key)][:RECOMPILED_SAMPLE]
    assert len(sample) == RECOMPILED_SAMPLE, sorted(by_key)
    got_all = cc.check([dataclasses.replace(spec, archs=(arch,)) for spec, arch, _ in sample],
                       archs=(80, 90), jobs=2, cache=False)
    assert len(got_all) == len(sample)
    for (spec, arch, key), got in zip(sample, got_all):
        want = record[key]
        fields = ("registers", "spill_stores", "spill_loads", "stack", "shared_static",
                  "shared_dynamic", "error")
        assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}, \
            f"{spec.name} sm_{arch}"
