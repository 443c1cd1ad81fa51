import json
import logging

import pytest
import torch
from pass_helpers import canonical, sample_inputs

from transfuse.errors import PassError
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.printer import print_graph
from transfuse.ir.types import DType, TensorType
from transfuse.passes.base import Pass, PassContext
from transfuse.passes.log import PassLog
from transfuse.passes.manager import compare_outputs, run_passes, run_pipeline
from transfuse.passes.pipelines import PIPELINES, get_pipeline, pass_names

TEXT = """
graph main(%x: f32[batch, 4], %y: f32[batch, 4]) {
  const %one: f32[] = 1.0
  %0: f32[batch, 4] = dropout(%x) {p=0.1}
  %1: f32[batch, 4] = add(%0, %y)  # @h.0.mlp
  %2: f32[batch, 4] = mul(%1, %one)
  %3: f32[batch, 4] = exp(%x)
  return %2
}"""


class SwapAddToSub(Pass):
    """Deliberately wrong: rewrites every add into a sub."""

    name = "test.swap-add-sub"
    rules = ("test/add-to-sub",)

    def run(self, graph: Graph, ctx: PassContext) -> None:
        for node in graph.find("add"):
            new = graph.create("sub", node.inputs, before=node)
            ctx.rewrite("test/add-to-sub", [node], [new])
            graph.replace_all_uses(node.output, new.output)
            graph.erase(node)


class CrashHalfway(Pass):
    """Erases one node, then raises."""

    name = "test.crash-halfway"

    def run(self, graph: Graph, ctx: PassContext) -> None:
        graph.erase(graph.find("exp")[0])
        raise ValueError("boom")


class BreakTheIR(Pass):
    """Creates a node whose declared type contradicts its op's type inference."""

    name = "test.break-ir"

    def run(self, graph: Graph, ctx: PassContext) -> None:
        graph.create("exp", [graph.inputs[0]], out_types=[TensorType(DType.f32, [3])])


class Listener:
    def on_create(self, node):
        pass

    def on_erase(self, node):
        pass


def _graph():
    g = parse_graph(TEXT)
    return g, sample_inputs(g)


def test_wrong_pass_is_rolled_back_in_place_and_pipeline_goes_on():
    g, inputs = _graph()
    before_text, before_out = print_graph(g), interpret(g, inputs)
    g.listeners.append(marker := Listener())
    log = run_passes(g, [SwapAddToSub(), "cleanup.remove-noops"], verify=True,
                     sample_inputs=inputs)
    bad, noops = log.records
    assert bad.status == "rolled back"
    assert bad.numeric is not None and not bad.numeric.ok and bad.numeric.max_abs > 0.1
    assert PassLog.from_json(json.dumps(log.to_json(), allow_nan=False)) == log
    assert "outputs changed beyond" in bad.error and "max_abs=" in bad.error
    assert bad.nodes_after == bad.nodes_before and bad.op_delta == {}
    assert bad.events and bad.events[0].matched[0].source == "h.0.mlp"
    assert noops.status == "changed" and noops.numeric.ok
    assert g.listeners == [marker]
    assert all(v.graph is g for v in g.values()) and all(n.graph is g for n in g.nodes)
    assert not g.find("sub") and not g.find("dropout")
    assert torch.equal(interpret(g, inputs)[0], before_out[0])
    assert log.ir_after("test.swap-add-sub") == before_text
    assert "rolled back" in str(log)


def test_crashing_pass_is_failed_and_restored():
    g, inputs = _graph()
    before = print_graph(g)
    log = run_passes(g, [CrashHalfway(), BreakTheIR()], verify=True, sample_inputs=inputs)
    crash, broken = log.records
    assert crash.status == "failed" and crash.error == "ValueError: boom"
    assert crash.edits["erased"] == 1
    assert broken.status == "failed" and "IR verify failed" in broken.error
    assert print_graph(g) == before
    g.create("relu", [g.inputs[0]])  # the restored graph is fully usable
    assert "relu" in print_graph(g)


def test_crash_without_verify_raises_pass_error():
    g, _ = _graph()
    with pytest.raises(PassError, match="test.crash-halfway failed: ValueError: boom") as info:
        run_passes(g, ["cleanup.remove-noops", CrashHalfway()])
    assert [r.status for r in info.value.pass_log] == ["changed", "failed"]


def test_verify_without_sample_inputs_checks_ir_only():
    g, _ = _graph()
    log = run_pipeline(g, "O1", verify=True)
    assert all(r.numeric is None for r in log)
    assert log.summary()["changed"]


def test_o1_statistics_json_round_trip_and_table():
    g, inputs = _graph()
    log = run_pipeline(g, "O1", verify=True, sample_inputs=inputs)
    assert [r.name for r in log] == PIPELINES["O1"]
    assert [n.op for n in g.nodes] == ["add"]
    s = log.summary()
    assert s["nodes_before"] == 4 and s["nodes_after"] == 1
    assert s["rules"]["noop/dropout"] == 1 and s["rules"]["dce/node"] == 1
    log.add_stage("capture", 12.5)
    d = json.loads(json.dumps(log.to_json()))
    back = PassLog.from_json(d)
    assert back == log and back.to_json() == log.to_json()
    assert PassLog.from_json(json.dumps(d)).summary() == log.summary()
    text = str(log)
    assert "cleanup.remove-noops" in text and "noop/dropout×1" in text and "capture" in text
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "\x1b[" not in text


def test_why_not_and_ir_after():
    g, inputs = _graph()
    log = run_pipeline(g, "O1", verify=True, sample_inputs=inputs)
    assert "noop/dropout matched 1 time" in log.why_not("noop/dropout")
    assert "never matched" in log.why_not("noop/permute")
    assert "was never tried" in log.why_not("attention/sdpa")
    assert "noop/mul-one matched" in log.why_not("noop/")
    log.records[0].near_misses.append(
        _near_miss("attention/sdpa", "mask is not provably causal", "h.3.attn"))
    text = log.why_not("attention/")
    assert "mask is not provably causal" in text and "h.3.attn" in text
    after_noops = log.ir_after("cleanup.remove-noops")
    assert "dropout" not in after_noops and "exp" in after_noops
    assert log.ir_after("cleanup.eliminate-dead-code") == print_graph(g)
    assert canonical(parse_graph(after_noops)) != canonical(g)
    with pytest.raises(PassError, match="no pass named"):
        log.ir_after("attention.fuse-sdpa")
    with pytest.raises(PassError, match="holds no IR"):
        PassLog.from_json(log.to_json()).ir_after("cleanup.remove-noops")
    assert PassLog.from_json(log.to_json(include_ir=True)).ir_after(
        "cleanup.remove-noops") == after_noops


def _near_miss(rule, reason, source):
    from transfuse.passes.log import NearMiss, NodeRef

    return NearMiss(rule, NodeRef("softmax", "%41", source), reason)


def test_env_dump_dir_and_log(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("TRANSFUSE_DUMP_DIR", str(tmp_path / "dump"))
    monkeypatch.setenv("TRANSFUSE_LOG", "stderr")
    g, _ = _graph()
    with caplog.at_level(logging.INFO, logger="transfuse.passes.manager"):
        run_pipeline(g, "O1")
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["00_input.txt", "01_cleanup.remove-noops.txt", "02_cleanup.fold-constants.txt",
                     "03_cleanup.fold-views.txt",
                     "04_cleanup.eliminate-common-subexpressions.txt",
                     "05_cleanup.eliminate-dead-code.txt"]
    assert parse_graph((tmp_path / "dump" / "00_input.txt").read_text()).find("dropout")
    assert (tmp_path / "dump" / "05_cleanup.eliminate-dead-code.txt").read_text() == print_graph(g)
    assert "cleanup.remove-noops" in caplog.text
    assert "transfuse pass log" in capsys.readouterr().err


def test_levels_and_registry():
    assert get_pipeline("O0") == []
    assert [p.name for p in get_pipeline("O1")] == PIPELINES["O1"]
    with pytest.raises(PassError, match="valid levels: O0, O1, O2"):
        get_pipeline("O3")
    with pytest.raises(PassError, match="registered passes: .*cleanup.eliminate-dead-code"):
        run_passes(Graph(), ["cleanup.no-such-pass"])
    assert set(PIPELINES["O1"]) <= set(pass_names())
    g, _ = _graph()
    log = run_passes(g, ["cleanup.eliminate-dead-code"])
    assert log[0].matched("dce/node") == 1 and not g.find("exp")


def test_compare_outputs():
    a = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
    assert compare_outputs([a], [a.clone()], rtol=0, atol=0).ok
    b = a.clone()
    b[0] = 1.00001
    assert compare_outputs([a], [b]).ok and not compare_outputs([a], [b], rtol=0, atol=0).ok
    b[1] = 0.0
    assert not compare_outputs([a], [b]).ok
    assert "dtype" in compare_outputs([a], [a.double()]).detail
    assert "shape" in compare_outputs([a], [a[:2]]).detail
    ints = torch.tensor([1, 2, 3])
    assert not compare_outputs([ints], [ints + 1]).ok


def test_pipeline_from_a_list_of_names():
    g, inputs = _graph()
    log = run_pipeline(g, ["cleanup.remove-noops", "cleanup.eliminate-dead-code"],
                       verify=True, sample_inputs=inputs)
    assert log.level == "custom" and [n.op for n in g.nodes] == ["add"]


def test_json_is_strict_even_with_infinite_errors():
    from transfuse.passes.log import PassRecord

    a = torch.ones(2)
    log = PassLog("O1")
    log.add(PassRecord("x", status="rolled back", numeric=compare_outputs([a], [a.double()])))
    assert log[0].numeric.max_abs == float("inf")
    assert PassLog.from_json(json.dumps(log.to_json(), allow_nan=False)) == log
