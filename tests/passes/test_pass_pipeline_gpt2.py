"""O1 on a captured gpt2-tiny: fewer nodes, same numbers, a readable log."""

import pytest

from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.ir.verify import verify
from transfuse.passes.manager import compare_outputs, run_pipeline


@pytest.fixture(scope="module")
def captured():
    from transfuse.models import get_model

    model, inputs, dynamic = get_model("gpt2-tiny", seq=8)
    return capture(model, inputs, dynamic=dynamic)


def test_o1_on_gpt2_tiny(captured):
    graph, inputs = captured.graph.clone(), captured.example_inputs
    before = interpret(graph, inputs)
    n_before = len(graph)
    log = run_pipeline(graph, "O1", verify=True, sample_inputs=inputs)
    verify(graph)
    assert not [r.name for r in log if r.status in ("failed", "rolled back")], str(log)
    assert len(graph) < n_before
    assert log.records[0].nodes_before == n_before and log.records[-1].nodes_after == len(graph)
    check = compare_outputs(before, interpret(graph, inputs), rtol=1e-5, atol=1e-6)
    assert check.ok, check
    assert all(r.numeric is not None and r.numeric.ok for r in log if r.status == "changed")
    assert "transfuse pass log (O1)" in str(log)
    # every surviving node still knows where it came from
    assert all("source" in n.meta for n in graph.nodes)
