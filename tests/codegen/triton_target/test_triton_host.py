"""The triton target's host side (codegen/triton/host): memory plan per bucket, the arena,
poisoning, the alias rule, CUDA-graph eligibility (the parts that need no GPU), errors."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import transfuse  # noqa: E402
from transfuse.codegen.triton.host import calls  # noqa: E402
from transfuse.codegen.triton.host.cuda_graphs import CudaGraphs  # noqa: E402
from transfuse.models import get_model  # noqa: E402


@pytest.fixture(scope="module")
def gpt2():
    model, args, dynamic = get_model("gpt2-tiny", seq=12)
    return model, args, transfuse.optimize(model, args, target="triton", dynamic=dynamic)


def _logits(y):
    return y.logits if hasattr(y, "logits") else y


def test_plans_per_power_of_two_bucket_share_one_arena(gpt2):
    model, _, tri = gpt2
    rt = tri.program.runtime
    for seq in (3, 4, 9, 16, 5):
        _, args, _ = get_model("gpt2-tiny", seq=seq, seed=seq)
        _logits(tri(*args))
    buckets = sorted(dict(k)["seq"] for k in rt.plans)
    assert buckets == [4, 8, 16, 128]  # 3 and 4 -> 4, 5 and 9 -> 8 and 16, the build hint
    for plan in rt.plans.values():
        plan.verify()
        assert [b.name for b in plan.buffers] and {b.name for b in plan.buffers} == set(rt.names)
    arena = rt.arena_tensor
    assert arena is not None and arena.numel() >= rt.plans[(("seq", 16),)].arena_bytes


def test_each_thread_has_its_own_arena(gpt2):
    _, args, tri = gpt2
    want = _logits(tri(*args))
    got, arenas = [], []

    def run():
        got.append(_logits(tri(*args)))
        arenas.append(tri.program.runtime.arena_tensor.data_ptr())

    for _ in range(2):  # one after the other: Triton's interpreter is not thread-safe
        t = threading.Thread(target=run)
        t.start()
        t.join()
    assert all(torch.equal(g, want) for g in got)
    assert len(set(arenas)) == 2 and tri.program.runtime.arena_tensor.data_ptr() not in arenas


def test_poisoning_catches_an_element_no_kernel_wrote(gpt2, monkeypatch):
    _, args, tri = gpt2
    prog = tri.program
    real = calls.HOST_CALLS["_t_linear"]

    def lazy_linear(x, w, b, out, activation):  # writes all but the last column
        full = real(x, w, b, torch.empty_like(out), activation)
        out[..., :-1] = full[..., :-1]
        return out

    monkeypatch.setitem(calls.HOST_CALLS, "_t_linear", lazy_linear)
    prog._forward = prog._bind()
    try:
        prog.poison = True
        y = _logits(tri(*args))
        assert torch.isnan(y).any()  # the unwritten column's NaN reaches the logits
        prog.poison = False
    finally:
        monkeypatch.undo()
        prog._forward = prog._bind()
    assert torch.isfinite(_logits(tri(*args))).all()


def test_graph_outputs_are_fresh_tensors_not_arena_views(gpt2):
    _, args, tri = gpt2
    a = _logits(tri(*args))
    b = _logits(tri(*args))
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    arena = tri.program.runtime.arena_tensor
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    assert not lo <= a.data_ptr() < hi


def test_cuda_graph_eligibility_without_a_gpu(monkeypatch):
    model, args, _ = get_model("llama-tiny", seq=8)
    gen = transfuse.optimize(model, args, target="triton",
                             generation={"max_seq_len": 32, "max_batch": 2, "kv": "paged",
                                         "block_size": 4})
    graph = gen.graph
    cg = CudaGraphs.for_graph(graph, program=None)
    assert cg is not None
    names = [v.name for v in graph.inputs]
    assert len(cg.mutated) == 2 * sum(1 for n in graph.nodes if n.op == "cached_attention")
    assert "cache" in " ".join(names[i] for i in cg.mutated)
    ids = [torch.zeros(20, dtype=torch.int64) if i == cg.tokens_input else torch.zeros(1)
           for i in range(len(names))]
    assert cg.run(ids) is None  # 20 tokens > the limit: eager, nothing captured
    monkeypatch.setenv("TRANSFUSE_CUDA_GRAPHS", "0")
    off = CudaGraphs.for_graph(graph, program=None)
    assert off.disabled and "off" in off.describe()
    assert CudaGraphs.for_graph(get_model_graph(), program=None) is None


def get_model_graph():
    model, args, dynamic = get_model("gpt2-tiny", seq=8)
    return transfuse.optimize(model, args, target="python", dynamic=dynamic).graph


def test_a_failure_names_the_host_line_and_ir_node(gpt2, monkeypatch):
    _, args, tri = gpt2
    prog = tri.program

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(calls.HOST_CALLS, "_t_attention", broken)
    prog._forward = prog._bind()
    try:
        with pytest.raises(RuntimeError, match="kernel exploded") as info:
            prog(list(args))
        note = "\n".join(getattr(info.value, "__notes__", []))
        assert "generated host code" in note and "_t_attention(" in note
        assert "attention" in note.split("IR node:")[1]
    finally:
        monkeypatch.undo()
        prog._forward = prog._bind()
