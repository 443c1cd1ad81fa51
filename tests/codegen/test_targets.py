"""codegen/lowering.py and codegen/targets.py: the one registry class, the Target interface
that passes ask (passes.base.TargetInfo), and the table of targets by name."""

from __future__ import annotations

import inspect

import pytest

from transfuse.codegen import onnx as onnx_backend
from transfuse.codegen import python as python_backend
from transfuse.codegen.lowering import Lowering, Lowerings, Target
from transfuse.codegen.targets import TARGET_MODULES, get_target, target_names
from transfuse.errors import LoweringError
from transfuse.ir.parser import parse_graph
from transfuse.passes.base import TargetInfo

GRAPH = """
graph main(%x: f32[4, 8]) {
  %0: f32[4, 8] = relu(%x)
  %1: f32[4, 8] = tanh(%0)
  return %1
}"""


def _nodes():
    g = parse_graph(GRAPH)
    return g, list(g.nodes)


def test_registry_registers_refuses_with_reasons_and_rejects_duplicates():
    reg = Lowerings("toy")

    @reg.register("relu", supports=lambda n: "never on Tuesdays")
    def _relu(ctx, node):
        return "relu"

    assert reg.get("relu").fn is _relu and "relu" in reg and len(reg) == 1
    _, (relu, tanh) = _nodes()
    assert reg.supports(relu) == "never on Tuesdays"
    assert reg.supports(tanh) == "no toy lowering for op 'tanh'"
    assert reg.ops() == frozenset({"relu"}) and list(reg) == ["relu"]
    with pytest.raises(ValueError, match="toy lowering for relu registered twice"):
        reg.register("relu")(_relu)
    removed = reg.remove("relu")
    assert isinstance(removed, Lowering) and "relu" not in reg
    reg.add(removed)
    assert reg.get("relu") is removed
    with pytest.raises(LoweringError, match="no toy lowering for op 'gelu' to remove"):
        reg.remove("gelu")


def test_each_backend_has_one_registry_of_the_one_class():
    assert isinstance(python_backend.LOWERINGS, Lowerings)
    assert isinstance(onnx_backend.LOWERINGS, Lowerings)
    assert get_target("python").lowerings is python_backend.LOWERINGS
    assert get_target("onnxruntime").lowerings is onnx_backend.LOWERINGS
    assert python_backend.LOWERINGS.target == "python"
    assert onnx_backend.LOWERINGS.target == "onnxruntime"
    pytest.importorskip("triton", reason="the triton target needs triton")
    from transfuse.codegen.triton import host as triton_host

    assert get_target("triton").lowerings is triton_host.LOWERINGS
    assert triton_host.LOWERINGS.target == "triton"


def test_a_missing_backend_dependency_is_a_lowering_error(monkeypatch):
    import sys

    from transfuse.codegen import targets

    monkeypatch.setitem(targets.TARGET_MODULES, "needsdep", "transfuse_test_missing.target")
    monkeypatch.setitem(sys.modules, "transfuse_test_missing", None)
    with pytest.raises(LoweringError, match="needs the package 'transfuse_test_missing'"):
        get_target("needsdep")


def test_targets_by_name():
    assert target_names() == tuple(TARGET_MODULES) and target_names()[0] == "python"
    for name in target_names():
        t = get_target(name)
        assert isinstance(t, Target) and t.name == name and get_target(name) is t
    with pytest.raises(LoweringError, match="unknown target 'tvm'; available targets: python"):
        get_target("tvm")


def test_python_target_never_refuses_onnxruntime_says_why():
    g = parse_graph("""
graph main(%x: f32[4]) {
  %0: f32[4] = torch_fallback(%x) {target="aten::sin", args="[0]"}
  return %0
}""")
    (node,) = g.nodes
    assert get_target("python").supports(node) is None
    assert "torch_fallback of aten::sin" in get_target("onnxruntime").supports(node)


def _members(protocol) -> dict[str, object]:
    return {name: value for name, value in vars(protocol).items()
            if not name.startswith("_")} | {name: None for name in protocol.__annotations__}


@pytest.mark.parametrize("name", ["python", "onnxruntime"])
def test_targets_answer_everything_passes_may_ask(name):
    """Target (codegen) implements passes.base.TargetInfo with the same signatures, so a pass
    asking any target never meets an AttributeError or a surprise keyword."""
    target = get_target(name)
    for member, proto in _members(TargetInfo).items():
        assert hasattr(target, member), f"{name} target cannot answer {member}"
        if callable(proto):
            want = inspect.signature(proto)
            got = inspect.signature(getattr(type(target), member))
            assert list(got.parameters) == list(want.parameters), member
            assert [p.kind for p in got.parameters.values()] == \
                [p.kind for p in want.parameters.values()], member


def test_default_answers_say_there_is_nothing_to_choose():
    target = get_target("onnxruntime")
    assert target.gemm_libraries == ()
    assert "one GEMM library" in target.gemm_unavailable()
    assert "no native kernels" in target.native_kernels_unavailable()
    g = parse_graph("""
graph main(%x: f32[2, 8]) {
  const %w: f32[4, 8]
  %0: f32[2, 4] = linear(%x, %w, _)
  return %0
}""")
    w = g.constants["w"]
    assert not target.gemm_relayout_eligible(w) and not target.gemm_weight_relaid(w)
    with pytest.raises(LoweringError, match="no GEMM libraries to time"):
        target.time_gemm(4, [w.const], None, relayout=False)
    python = get_target("python")
    assert python.gemm_libraries == ("torch", "blas")
    assert python.gemm_relayout_eligible(w) and not python.gemm_weight_relaid(w)
