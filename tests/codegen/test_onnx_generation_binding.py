"""GenerationOrtProgram keeps its IO binding of the KV caches between steps
(codegen/onnx/generation.py): the caches are bound once and bound again only when the caller
passes other cache memory; the step's other inputs are bound every call. Checked against
the op's reference: two cache sets used in turn, a cache replaced by a new tensor, and a
call made while another holds the kept binding (it binds its own).
"""

from __future__ import annotations

import torch
from attention_steps import step_inputs

from transfuse.codegen.onnx.generation import GenerationOrtProgram
from transfuse.ir.opdefs.generation import cached_attention
from transfuse.ir.parser import parse_graph

H, HKV, D, SLOTS, LEN = 4, 2, 8, 2, 16
ATTRS = {"scale": None, "window": None, "kv_heads": HKV, "alibi": None, "softcap": None,
         "layout": "bhsd", "paged": False, "block_size": None, "cache_order": "token-major"}
CACHE = f"f32[{SLOTS}, {LEN}, {HKV}, {D}]"
GRAPH = "\n".join([
    f"graph g(%q: f32[1, {H}, n, {D}], %k: f32[1, {HKV}, n, {D}], %v: f32[1, {HKV}, n, {D}], "
    f"%kc: {CACHE}, %vc: {CACHE}, %pos: i64[n], %sot: i64[n], %lens: i64[b], %table: i64[b]) {{",
    f"  %a: f32[1, {H}, n, {D}] = cached_attention(%q, %k, %v, %kc, %vc, %pos, %sot, %lens, "
    f"%table) {{kv_heads={HKV}}}",
    "  return %a", "}"])


def _caches():
    return [torch.zeros(SLOTS, LEN, HKV, D) for _ in range(2)]


def _step(program, caches, ref, start: int, count: int, seed: int):
    """One step of one sequence in slot 1 through ``program`` and the reference."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, pos, sot, lens = step_inputs([start], [count], gen, heads=H, kv_heads=HKV,
                                          head_dim=D)
    table = torch.tensor([1])
    (got,) = program([q, k, v, *caches, pos, sot, lens, table])
    want = cached_attention([q, k, v, *ref, pos, sot, lens, table], ATTRS, {})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_two_cache_sets_in_turn_are_each_written_in_their_own_memory():
    program = GenerationOrtProgram(parse_graph(GRAPH), threads=1)
    a, b, ref_a, ref_b = _caches(), _caches(), _caches(), _caches()
    _step(program, a, ref_a, 0, 5, seed=0)
    key = program._bound_key
    _step(program, a, ref_a, 5, 1, seed=1)  # same caches: the kept binding
    assert program._bound_key == key
    _step(program, b, ref_b, 0, 3, seed=2)  # other memory: bound again
    assert program._bound_key != key
    _step(program, a, ref_a, 6, 2, seed=3)
    _step(program, b, ref_b, 3, 1, seed=4)
    for got, want in zip(a + b, ref_a + ref_b):
        torch.testing.assert_close(got, want)
    assert a[0][1, 8:].abs().sum() == 0 and b[0][1, 4:].abs().sum() == 0


def test_a_cache_replaced_by_a_new_tensor_is_bound_again():
    program = GenerationOrtProgram(parse_graph(GRAPH), threads=1)
    caches, ref = _caches(), _caches()
    _step(program, caches, ref, 0, 4, seed=0)
    caches = [c.clone() for c in caches]  # same values, new memory (the old is freed)
    _step(program, caches, ref, 4, 1, seed=1)
    for got, want in zip(caches, ref):
        torch.testing.assert_close(got, want)


def test_a_call_while_the_kept_binding_is_in_use_binds_its_own():
    program = GenerationOrtProgram(parse_graph(GRAPH), threads=1)
    caches, ref = _caches(), _caches()
    _step(program, caches, ref, 0, 4, seed=0)
    key = program._bound_key
    with program._lock:  # as if another thread were running a step
        _step(program, caches, ref, 4, 2, seed=1)
    assert program._bound_key == key
    _step(program, caches, ref, 6, 1, seed=2)
    for got, want in zip(caches, ref):
        torch.testing.assert_close(got, want)


def test_outputs_are_written_into_tensors_of_the_ir_shapes_else_ort_allocates():
    program = GenerationOrtProgram(parse_graph(GRAPH), threads=1)
    assert program._out_dims == [([1, H, (0, 2), D], torch.float32)]  # n: axis 2 of %q
    doubled = GRAPH.replace("  return %a", f"  %a2: f32[1, {H}, 2*n, {D}] = concat(%a, %a) "
                            "{axis=2}\n  return %a2")
    program = GenerationOrtProgram(parse_graph(doubled), threads=1)
    assert program._out_dims is None  # 2*n is no input's dim
    caches, ref = _caches(), _caches()
    gen = torch.Generator().manual_seed(0)
    q, k, v, pos, sot, lens = step_inputs([0], [3], gen, heads=H, kv_heads=HKV, head_dim=D)
    (got,) = program([q, k, v, *caches, pos, sot, lens, torch.tensor([1])])
    want = cached_attention([q, k, v, *ref, pos, sot, lens, torch.tensor([1])], ATTRS, {})
    torch.testing.assert_close(got, torch.cat([want, want], 2), atol=1e-5, rtol=1e-5)
