"""The tensorrt target's package: the one import check, optimization profiles, the export
directory (model.onnx, profiles.json, build_engine.py, README.md + the artifact), load() of an
export, and the TensorRT API the build script and the engine runtime call.

No TensorRT here: the engine tests skip with ``tensorrt_unavailable()``'s reason; everything
else runs the exported ONNX in ONNX Runtime against the python target.
"""

from __future__ import annotations

import ast
import json
import py_compile
import shutil
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch

import transfuse
from transfuse.codegen.targets import get_target, target_names
from transfuse.codegen.tensorrt import build_template, tensorrt_unavailable
from transfuse.codegen.tensorrt import engine as trt_engine
from transfuse.codegen.tensorrt.profiles import (
    MAX_DIM,
    default_opt,
    profiles_document,
    read_profiles,
    select_profile,
    symbol_profiles,
)
from transfuse.codegen.tensorrt.target import NO_TRT, OnnxFallbackProgram, TensorRTTarget
from transfuse.errors import ArtifactError, LoweringError
from transfuse.ir.interpret import interpret
from transfuse.models import get_model

PKG = Path(build_template.__file__).parent
DYNAMIC = {"batch": (1, 8), "seq": (1, 64)}

#: every TensorRT Python API name build_engine.py (build_template.py) and engine.py use, with the
#: page of TensorRT's Python API documentation that defines it (TensorRT 10.x; "latest" pages
#: at https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/). The test below
#: fails on any TensorRT call not listed here.
_API = "https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/"
TRT_API = {
    "Logger": _API + "infer/Core/Logger.html", "VERBOSE": _API + "infer/Core/Logger.html",
    "WARNING": _API + "infer/Core/Logger.html",
    "Builder": _API + "infer/Core/Builder.html",
    "NetworkDefinitionCreationFlag": _API + "infer/Core/Builder.html",
    "STRONGLY_TYPED": _API + "infer/Core/Builder.html",
    "create_network": _API + "infer/Core/Builder.html",
    "create_builder_config": _API + "infer/Core/Builder.html",
    "create_optimization_profile": _API + "infer/Core/Builder.html",
    "build_serialized_network": _API + "infer/Core/Builder.html",
    "OnnxParser": _API + "parsers/Onnx/pyOnnx.html",
    "parse_from_file": _API + "parsers/Onnx/pyOnnx.html",
    "num_errors": _API + "parsers/Onnx/pyOnnx.html",
    "get_error": _API + "parsers/Onnx/pyOnnx.html",
    "num_inputs": _API + "infer/Graph/Network.html",
    "get_input": _API + "infer/Graph/Network.html",
    "set_memory_pool_limit": _API + "infer/Core/BuilderConfig.html",
    "MemoryPoolType": _API + "infer/Core/BuilderConfig.html",
    "WORKSPACE": _API + "infer/Core/BuilderConfig.html",
    "set_flag": _API + "infer/Core/BuilderConfig.html",
    "BuilderFlag": _API + "infer/Core/BuilderConfig.html",
    "VERSION_COMPATIBLE": _API + "infer/Core/BuilderConfig.html",
    "add_optimization_profile": _API + "infer/Core/BuilderConfig.html",
    "set_shape": _API + "infer/Core/OptimizationProfile.html",
    "Runtime": _API + "infer/Core/Runtime.html",
    "deserialize_cuda_engine": _API + "infer/Core/Runtime.html",
    # version-compatible plans embed the lean runtime: the runtime must allow host code
    "engine_host_code_allowed": "https://docs.nvidia.com/deeplearning/tensorrt/latest/"
                                "inference-library/advanced.html (Version Compatibility)",
    "num_io_tensors": _API + "infer/Core/Engine.html",
    "get_tensor_name": _API + "infer/Core/Engine.html",
    "get_tensor_mode": _API + "infer/Core/Engine.html",
    "TensorIOMode": _API + "infer/Core/Engine.html", "INPUT": _API + "infer/Core/Engine.html",
    "OUTPUT": _API + "infer/Core/Engine.html",
    "get_tensor_dtype": _API + "infer/Core/Engine.html",
    "create_execution_context": _API + "infer/Core/Engine.html",
    "set_optimization_profile_async": _API + "infer/Core/ExecutionContext.html",
    "set_input_shape": _API + "infer/Core/ExecutionContext.html",
    "set_tensor_address": _API + "infer/Core/ExecutionContext.html",
    "get_tensor_shape": _API + "infer/Core/ExecutionContext.html",
    "execute_async_v3": _API + "infer/Core/ExecutionContext.html",
}
#: the expressions whose attributes are TensorRT objects, per file
TRT_OBJECTS = {
    "build_template.py": {"trt", "builder", "network", "parser", "config", "profile",
                          "trt.Logger", "trt.BuilderFlag", "trt.MemoryPoolType",
                          "trt.NetworkDefinitionCreationFlag"},
    "engine.py": {"trt", "trt.TensorIOMode", "self._runtime", "self.engine", "self.context"},
}


def _out(model_out):
    out = model_out[0] if isinstance(model_out, (tuple, list)) else model_out
    return getattr(out, "logits", out)


@pytest.fixture(scope="module")
def gpt2():
    """(python-target model, its inputs): tiny GPT-2 with dynamic batch and seq."""
    m, ex, _ = get_model("gpt2-tiny", batch=2, seq=8)
    return transfuse.optimize(m, ex, dynamic=DYNAMIC, target="python"), ex


@pytest.fixture(scope="module")
def gpt2_export(gpt2, tmp_path_factory):
    compiled, _ = gpt2
    path = tmp_path_factory.mktemp("trt") / "gpt2"
    compiled.export_tensorrt(str(path))
    return path


# -- the one import check ---------------------------------------------------------------------


def test_the_import_check_says_what_is_missing(monkeypatch):
    reason = tensorrt_unavailable()
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if not has_trt:
        assert reason is not None and "TensorRT is not installed" in reason
    tensorrt_unavailable.cache_clear()
    try:
        api = {"Builder": 1, "Runtime": 1, "OnnxParser": 1}
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.1"))
        assert "has no Builder/Runtime/OnnxParser" in tensorrt_unavailable()  # not TensorRT
        tensorrt_unavailable.cache_clear()
        monkeypatch.setitem(sys.modules, "tensorrt",
                            types.SimpleNamespace(__version__="8.6.1", **api))
        assert "TensorRT 8.6.1 is too old (need >= 10)" in tensorrt_unavailable()
        tensorrt_unavailable.cache_clear()
        monkeypatch.setitem(sys.modules, "tensorrt",
                            types.SimpleNamespace(__version__="10.14", **api))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert tensorrt_unavailable() == "TensorRT 10.14 is installed but there is no CUDA device"
    finally:
        tensorrt_unavailable.cache_clear()


def test_target_is_registered_and_answers_passes():
    from transfuse.api import TARGETS

    assert "tensorrt" in target_names() and "tensorrt" in TARGETS
    t = get_target("tensorrt")
    assert isinstance(t, TensorRTTarget)
    import inspect

    from transfuse.passes.base import TargetInfo

    members = {k: v for k, v in vars(TargetInfo).items() if not k.startswith("_")}
    for name in set(members) | set(TargetInfo.__annotations__):
        assert hasattr(t, name), name
        if callable(members.get(name)):
            want = inspect.signature(members[name]).parameters
            got = inspect.signature(getattr(type(t), name)).parameters
            assert [(p.name, p.kind) for p in got.values()] == \
                [(p.name, p.kind) for p in want.values()], name
    from transfuse.ir.types import QuantType

    assert t.quant_unsupported(QuantType("int", 4, 32, True, 64), "qlinear") is None
    assert t.quant_unsupported(QuantType("int", 8, 64, True, 64), "qlinear") is None
    assert t.quant_unsupported(QuantType("fp8e4m3", 8, 64, True, 64), "qlinear") is None
    assert "W8A8" in t.quant_unsupported(QuantType("int", 8, 64, True, 64), "qmatmul")
    from transfuse.ir.parser import parse_graph

    g = parse_graph("""
graph main(%x: f32[4]) {
  %0: f32[4] = torch_fallback(%x) {target="aten::sin", args="[0]"}
  %1: f32[4] = relu(%0)
  return %1
}""")
    fallback, relu = g.nodes
    assert "torch_fallback" in t.supports(fallback) and t.supports(relu) is None


# -- profiles -----------------------------------------------------------------------------------


def test_opt_rule():
    assert default_opt("batch", 1, 8) == 8 and default_opt("batch_size", 2, 3) == 3
    assert default_opt("seq", 1, 64) == 32 and default_opt("seq", 1, 2048) == 1024
    assert default_opt("seq", 100, 120) == 100  # 64 is below the range: clamped to min
    assert default_opt("seq", 5, 5) == 5 and default_opt("total", 1, 1) == 1


def test_profiles_from_dynamic(gpt2):
    compiled, _ = gpt2
    doc = profiles_document(compiled.signature)
    (p,) = doc["profiles"]
    assert p["symbols"] == {"batch": [1, 8, 8], "seq": [1, 32, 64]}
    assert p["inputs"] == {"input_ids": {"min": [1, 1], "opt": [8, 32], "max": [8, 64]}}
    doc = profiles_document(compiled.signature, opt={"seq": 16},
                            profiles=[{"seq": (1, 16)}, {"seq": (17, 48, 64), "batch": (1, 2)}])
    a, b = doc["profiles"]
    assert a["inputs"]["input_ids"] == {"min": [1, 1], "opt": [8, 16], "max": [8, 16]}
    assert b["inputs"]["input_ids"] == {"min": [1, 17], "opt": [2, 48], "max": [2, 64]}
    assert select_profile(doc, {"input_ids": (4, 10)}) == 0
    assert select_profile(doc, {"input_ids": (2, 40)}) == 1
    assert select_profile(doc, {"input_ids": (4, 40)}) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"profiles": [{"seq": (9, 4)}]}, "needs min <= opt <= max, got \\(9, 9, 4\\)"),
    ({"profiles": [{"seq": (1, 80, 64)}]}, "needs min <= opt <= max"),
    ({"profiles": [{"seq": (1, 128)}]}, "range \\[1, 128\\] is outside the compiled range"),
    ({"profiles": [{"heads": (1, 2)}]}, "names symbol 'heads', which no input uses"),
    ({"profiles": [{"seq": "1..4"}]}, "needs \\(min, max\\) or \\(min, opt, max\\)"),
    ({"profiles": [{"seq": (1.0, 4)}]}, "min must be an int"),
    ({"profiles": []}, "profiles= is empty"),
    ({"opt": {"width": 3}}, "opt= names symbol 'width'"),
])
def test_bad_profiles_are_lowering_errors(kwargs, match):
    with pytest.raises(LoweringError, match=match):
        symbol_profiles({"batch": (1, 8), "seq": (1, 64)}, {"batch", "seq"}, **kwargs)


def test_unbounded_or_missing_ranges_are_lowering_errors():
    with pytest.raises(LoweringError, match="'seq' has no finite upper bound"):
        symbol_profiles({"seq": (1, MAX_DIM + 1)}, {"seq"})
    with pytest.raises(LoweringError, match="symbol\\(s\\) seq of the inputs have no range"):
        symbol_profiles({}, {"seq"})
    with pytest.raises(LoweringError, match="min -1 < 0"):
        symbol_profiles({"seq": (-1, 4)}, {"seq"})


# -- export ---------------------------------------------------------------------------------------


def test_export_directory(gpt2_export):
    path = gpt2_export
    names = {p.name for p in path.iterdir()}
    assert {"model.onnx", "profiles.json", "build_engine.py", "README.md", "manifest.json",
            "weights.safetensors", "graph.txt"} <= names
    assert "model.engine" not in names  # nothing here builds one
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt"
    assert {"model.onnx", "profiles.json", "build_engine.py", "README.md"} <= set(
        manifest["files"])
    meta = manifest["meta"]["tensorrt"]
    assert meta["attention"] == "onnx" and meta["opset"] == 23 and meta["profiles"] == 1
    model = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # no com.microsoft
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert read_profiles(path / "profiles.json")["profiles"][0]["inputs"]["input_ids"][
        "max"] == [8, 64]
    assert (path / "build_engine.py").read_text() == Path(build_template.__file__).read_text()
    readme = (path / "README.md").read_text()
    assert "python build_engine.py" in readme and "--version-compatible" in readme
    assert "batch 1..8 (opt 8)" in readme and "seq 1..64 (opt 32)" in readme


def test_build_script_compiles_and_uses_only_documented_tensorrt_api(gpt2_export, tmp_path):
    script = gpt2_export / "build_engine.py"
    py_compile.compile(str(script), cfile=str(tmp_path / "b.pyc"), doraise=True)
    tree = ast.parse(script.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"argparse", "json", "sys", "time", "pathlib", "tensorrt"}, imported
    used: dict[str, set[str]] = {}
    for name, objects in TRT_OBJECTS.items():
        src = (PKG / name).read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in objects:
                used.setdefault(node.attr, set()).add(name)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" \
                    and isinstance(node.args[1], ast.Constant):
                used.setdefault(node.args[1].value, set()).add(name)
    used.pop("__version__", None)
    undocumented = sorted(set(used) - set(TRT_API))
    assert not undocumented, f"TensorRT names used but not in the documented table: {undocumented}"
    for must in ("STRONGLY_TYPED", "OnnxParser", "set_shape", "set_memory_pool_limit",
                 "VERSION_COMPATIBLE", "build_serialized_network", "execute_async_v3",
                 "set_tensor_address", "set_input_shape", "deserialize_cuda_engine"):
        assert must in used, must
    # a second witness where it is installed: polygraphy's TensorRT backend calls the same API
    try:
        import polygraphy
    except ImportError:
        return
    root = Path(polygraphy.__file__).parent
    trt_src = "\n".join(p.read_text() for d in ("backend/trt", "tools") for p in
                        (root / d).rglob("*.py"))
    assert not [n for n in used if n not in trt_src]


def test_build_script_drives_the_builder_as_documented(tmp_path):
    """build_serialized with a recording stand-in for the tensorrt module: strongly typed
    network, the parser's errors, one profile per entry, workspace and version flags."""
    calls = []

    class Rec:
        def __init__(self, name):
            self._name = name

        def __getattr__(self, attr):
            return Rec(f"{self._name}.{attr}")

        def __call__(self, *args):
            calls.append((self._name, args))
            return Rec(f"{self._name}()")

    class Network(Rec):
        num_inputs = 1

        def get_input(self, i):
            return types.SimpleNamespace(name="input_ids")

    class Parser(Rec):
        ok = True
        num_errors = 1

        def parse_from_file(self, path):
            calls.append(("parse_from_file", (path,)))
            return self.ok

        def get_error(self, i):
            return "node 3 (Foo): unsupported"

    class Builder(Rec):
        def create_network(self, flags):
            calls.append(("create_network", (flags,)))
            return Network("network")

        def create_builder_config(self):
            cfg = Rec("config")
            cfg.add_optimization_profile = lambda p: calls.append(("add_profile", (p,))) or 0
            return cfg

        def build_serialized_network(self, network, config):
            return b"PLAN"

    trt = types.SimpleNamespace(
        Logger=types.SimpleNamespace(WARNING=2, VERBOSE=4, __call__=None),
        Builder=lambda logger: Builder("builder"),
        OnnxParser=lambda net, logger: Parser("parser"),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WS"),
        BuilderFlag=types.SimpleNamespace(VERSION_COMPATIBLE="VC"))
    profiles = {"profiles": [
        {"inputs": {"input_ids": {"min": [1, 1], "opt": [8, 16], "max": [8, 16]},
                    "unused": {"min": [1], "opt": [1], "max": [1]}}},
        {"inputs": {"input_ids": {"min": [1, 17], "opt": [2, 48], "max": [2, 64]}}}]}
    plan = build_template.build_serialized(trt, "m.onnx", profiles, workspace_bytes=1 << 30,
                                           version_compatible=True, logger=object())
    assert plan == b"PLAN"
    assert ("create_network", (1 << 1,)) in calls
    assert ("parse_from_file", ("m.onnx",)) in calls
    assert ("config.set_memory_pool_limit", ("WS", 1 << 30)) in calls
    assert ("config.set_flag", ("VC",)) in calls
    shapes = [a for n, a in calls if n.endswith("set_shape")]
    assert shapes == [("input_ids", [1, 1], [8, 16], [8, 16]),
                      ("input_ids", [1, 17], [2, 48], [2, 64])]
    assert sum(n == "add_profile" for n, _ in calls) == 2
    Parser.ok = False
    with pytest.raises(RuntimeError, match="rejected m.onnx:\n  node 3 \\(Foo\\): unsupported"):
        build_template.build_serialized(trt, "m.onnx", profiles, logger=object())


def test_build_script_without_tensorrt_says_so(gpt2_export):
    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT is installed here")
    r = subprocess.run([sys.executable, str(gpt2_export / "build_engine.py")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs the tensorrt package" in r.stderr
    assert not (gpt2_export / "model.engine").exists()


def _lint(model_path: Path, tmp_path: Path) -> None:
    """``polygraphy check lint`` passes on the file, with no failing node in its report."""
    pytest.importorskip("polygraphy", reason="polygraphy (the dev extra) is not installed")
    pytest.importorskip("onnx_graphsurgeon", reason="polygraphy's lint needs onnx-graphsurgeon")
    exe = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or "polygraphy"
    report = tmp_path / "lint.json"
    r = subprocess.run([exe, "check", "lint", str(model_path), "-o", str(report)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "PASSED" in r.stdout + r.stderr, r.stdout + r.stderr
    summary = json.loads(report.read_text())["summary"]
    assert not summary.get("failing") and len(summary["passing"]) > 10


def test_polygraphy_lint_passes(gpt2_export, tmp_path):
    _lint(gpt2_export / "model.onnx", tmp_path)


def test_bert_export_lints_and_loads(tmp_path):
    """Two dynamic inputs (input_ids, attention_mask) in one profile; padding exercised."""
    m, ex, _ = get_model("bert-tiny", batch=2, seq=8)
    c = transfuse.optimize(m, ex, dynamic={"batch": (1, 4), "seq": (2, 32)}, target="python")
    c.export_tensorrt(str(tmp_path / "bert"))
    (p,) = read_profiles(tmp_path / "bert" / "profiles.json")["profiles"]
    assert p["inputs"] == {name: {"min": [1, 2], "opt": [4, 16], "max": [4, 32]}
                           for name in ("input_ids", "attention_mask")}
    assert '"max": [4, 32]' in (tmp_path / "bert" / "profiles.json").read_text()
    _lint(tmp_path / "bert" / "model.onnx", tmp_path)
    a, b = _out(c(*ex)), _out(transfuse.load(str(tmp_path / "bert"))(*ex))
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_generation_without_tensorrt_writes_the_cache_and_matches_python(kv):
    """The step graph's ONNX returns each written cache as an extra output (lower.py); the
    fallback copies it into the caller's cache, so generate() equals the python target's."""
    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT is installed: the step runs as an engine (its own test)")
    m, ex, _ = get_model("llama-tiny", seq=8)
    ref = transfuse.optimize(m, ex, generation={"kv": kv}, target="python")
    g = transfuse.optimize(m, ex, generation={"kv": kv}, target="tensorrt")
    assert isinstance(g.program, OnnxFallbackProgram) and g.program.cache_outputs
    a = ref.generate(ex[0], max_new_tokens=10, do_sample=False)
    b = g.generate(ex[0], max_new_tokens=10, do_sample=False)
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_generation_step_profiles_from_the_cache_geometry(kv):
    """An engine of a generation step gets its profiles from the step's cache geometry: a
    decode profile (<= max_batch tokens) and a prefill one; every input shape monotone; the
    engine program (built where TensorRT is) copies the written caches back."""
    from transfuse.codegen.tensorrt.profiles import (
        generation_profiles,
        generation_ranges,
        profiles_document,
    )
    from transfuse.codegen.tensorrt.target import TensorRTProgram, lower_model
    from transfuse.runtime.generation_model import step_signature

    m, ex, _ = get_model("llama-tiny", seq=8)
    opts = {"kv": kv, "max_seq_len": 32, "max_batch": 4, "block_size": 8}
    g = transfuse.optimize(m, ex, generation=opts, target="python").graph
    ranges = generation_ranges(g)
    want = {"seq": (1, 128), "rows": (1, 128), "seqs": (1, 4)}
    if kv == "paged":
        want["table_blocks"] = (1, 4)
    assert ranges == want
    doc = profiles_document(step_signature(g), symbols=ranges, profiles=generation_profiles(g))
    decode, prefill = doc["profiles"]
    assert decode["symbols"]["seq"] == [1, 2, 4] and prefill["symbols"]["seq"][2] == 128
    assert decode["inputs"]["input_ids"]["max"] == [1, 4]
    assert prefill["inputs"]["input_ids"]["max"] == [1, 128]
    program = TensorRTProgram(g, lower_model(g), device="cpu")  # no engine until bound
    assert len(program.cache_outputs) == 2 * 2 and program._returned == 1
    g.meta["generation"]["max_step_tokens"] = 40  # a bounded step: the prefill profile too
    assert generation_ranges(g)["seq"] == (1, 40) == generation_ranges(g)["rows"]
    g.meta.pop("generation")
    with pytest.raises(LoweringError, match="not a generation step"):
        generation_ranges(g)


# -- running without TensorRT --------------------------------------------------------------------


def test_load_of_export_runs_onnx_runtime_and_equals_python(gpt2, gpt2_export):
    compiled, ex = gpt2
    loaded = transfuse.load(str(gpt2_export))
    assert loaded.backend == "tensorrt"
    if tensorrt_unavailable() is not None:
        assert isinstance(loaded.program, OnnxFallbackProgram)
        assert loaded.meta["runs"].startswith(NO_TRT)
        assert "TensorRT is not installed" in loaded.meta["runs"]
        assert NO_TRT in loaded.source and "engine" not in loaded.program.runner
    ref = _out(compiled(*ex))
    got = _out(loaded(*ex))
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    other = torch.randint(0, 100, (3, 21))  # another point in the profile's ranges
    ref, got = _out(compiled(other)), _out(loaded(other))
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_asking_for_the_engine_without_one_is_an_artifact_error(gpt2_export):
    from transfuse.runtime.compiled import load

    with pytest.raises(ArtifactError, match="the TensorRT engine was asked for but cannot run"):
        load(str(gpt2_export), engine=True)
    assert isinstance(load(str(gpt2_export), engine=False).program, OnnxFallbackProgram)


def test_optimize_for_tensorrt_runs_and_says_no_engine(tmp_path):
    m, ex, _ = get_model("llama-tiny", batch=1, seq=8)
    ref = transfuse.optimize(m, ex, dynamic={"seq": (2, 32)}, target="python")
    c = transfuse.optimize(m, ex, dynamic={"seq": (2, 32)}, target="tensorrt")
    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT is installed: the engine test covers this")
    assert isinstance(c.program, OnnxFallbackProgram)
    (rec,) = [r for r in c.pass_log.records if r.name == "lower.tensorrt"]
    assert any(NO_TRT in n for n in rec.notes) and any("no engine was built" in n
                                                      for n in rec.notes)
    a, b = _out(ref(*ex)), _out(c(*ex))
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    c.save(str(tmp_path / "saved"))  # a tensorrt model saves as its export
    assert (tmp_path / "saved" / "build_engine.py").is_file()
    assert torch.equal(_out(transfuse.load(str(tmp_path / "saved"))(*ex)), b)


def test_int4_weight_export_loads_and_equals_python(tmp_path):
    m, ex, _ = get_model("llama-tiny", batch=1, seq=8)
    q = transfuse.optimize(m, ex, dynamic={"seq": (2, 32)}, target="python",
                           quantize="int4-weight")
    assert any(n.op == "qlinear" for n in q.graph.nodes)
    q.export_tensorrt(str(tmp_path / "q"))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    _lint(tmp_path / "q" / "model.onnx", tmp_path)
    loaded = transfuse.load(str(tmp_path / "q"))
    got = _out(loaded(*ex))
    # the IR's reference (dequantized weights, f32 GEMM: what TensorRT's weight-only GEMM does)
    ref = interpret(q.graph, list(ex))[0]
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # the python target runs int4 through tinygemm on bf16 activations: 6e-3 off the reference
    py = _out(q(*ex))
    assert ((got - py).abs().max() / py.abs().max()).item() < 2e-2


def test_bad_profiles_fail_the_export_with_nothing_written(gpt2, tmp_path):
    compiled, _ = gpt2
    with pytest.raises(LoweringError, match="outside the compiled range"):
        compiled.export_tensorrt(str(tmp_path / "bad"), profiles=[{"seq": (1, 4096)}])
    assert not (tmp_path / "bad").exists()


# -- the engine (needs TensorRT and a GPU) -------------------------------------------------------


def test_engine_build_and_run(gpt2, gpt2_export, tmp_path):
    reason = tensorrt_unavailable()
    if reason is not None:
        pytest.skip(reason)
    compiled, ex = gpt2
    out = tmp_path / "gpt2"
    shutil.copytree(gpt2_export, out)
    r = subprocess.run([sys.executable, str(out / "build_engine.py")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    from transfuse.runtime.compiled import load

    loaded = load(str(out), device="cuda", engine=True)
    assert isinstance(loaded.program, trt_engine.EngineProgram)
    ref = _out(compiled(*ex))
    got = _out(loaded(*(t.cuda() for t in ex))).float().cpu()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-3
