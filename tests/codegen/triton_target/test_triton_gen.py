"""Generated Triton kernels for fusion groups (codegen/triton/gen): partition, source, launch.

Every graph is checked against the reference interpreter (fp32: rel err <= 1e-4) with the
kernels' outputs poisoned with NaN first; shapes are tiny (the interpreter costs ~2 ms a
program) and have tails (lengths that are not powers of two, looped rows with a partial
last chunk).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton import compile_check as cc  # noqa: E402
from transfuse.codegen.triton import env  # noqa: E402
from transfuse.codegen.triton.gen import (  # noqa: E402
    Group,
    emit_group,
    fusion_groups,
    launch_config,
    partition,
    run,
)
from transfuse.codegen.triton.gen import cache as gen_cache  # noqa: E402
from transfuse.codegen.triton.gen.launch import compile_spec  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402
from transfuse.ir.interpret import bind_symbols, interpret  # noqa: E402
from transfuse.ir.ops import run_reference  # noqa: E402
from transfuse.ir.parser import parse_graph as _parse  # noqa: E402

DEV = env.device()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked lanes' inf/NaN


def parse_graph(text: str):
    """The graph of ``text`` with its constants on the kernels' device."""
    g = _parse(text)
    for c in g.constants.values():
        c.const = c.const.to(DEV)
    return g


def randn(*shape, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(device=DEV, dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_group(group: Group, values: dict, env: dict, max_block: int | None = None) -> list:
    """Launch ``group``'s kernel with NaN-poisoned outputs; returns them."""
    k = emit_group(group)
    outs = [torch.full(tuple(t.concrete(env)), float("nan"), dtype=t.dtype.torch, device=DEV)
            if t.dtype.is_float else
            torch.zeros(tuple(t.concrete(env)), dtype=t.dtype.torch, device=DEV)
            for t in k.output_types]
    res = run(k, [values[id(v)] for v in group.inputs], outs, env=env, max_block=max_block)
    assert all(r is o for r, o in zip(res, outs))
    return res


def run_partitioned(graph, inputs, max_block: int | None = None) -> list[torch.Tensor]:
    """What a host program does: the schedule's groups through their kernels, every other
    node through its reference implementation."""
    env = bind_symbols(graph, inputs)
    values = {id(v): t for v, t in zip(graph.inputs, inputs)}
    values.update({id(c): c.const for c in graph.constants.values()})
    for unit in partition(graph).schedule():
        if isinstance(unit, Group):
            for v, t in zip(unit.outputs, run_group(unit, values, env, max_block)):
                values[id(v)] = t
        else:
            outs = run_reference(unit, [None if v is None else values[id(v)]
                                        for v in unit.inputs], env)
            values.update({id(v): t for v, t in zip(unit.outputs, outs)})
    return [values[id(v)] for v in graph.outputs]


def check(graph, inputs, tol=1e-4, max_block=None) -> list[torch.Tensor]:
    want = interpret(graph, inputs)
    got = run_partitioned(graph, inputs, max_block)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert not torch.isnan(g).any() or torch.isnan(w).any(), "unwritten elements"
        if w.dtype.is_floating_point:
            assert rel_err(g, w) <= tol, rel_err(g, w)
        else:
            assert torch.equal(g, w)
    return got


# -- a pointwise chain with broadcasting ---------------------------------------------------

BIAS_GELU_RESIDUAL = """\
graph g(%x: f32[batch, seq, 24], %res: f32[batch, seq, 24]) {
  const %bias: f32[24]
  %h: f32[batch, seq, 24] = add(%x, %bias)
  %a: f32[batch, seq, 24] = gelu(%h)
  %y: f32[batch, seq, 24] = add(%a, %res)
  return %y
}
"""


def test_pointwise_chain_one_kernel_serves_two_lengths():
    g = parse_graph(BIAS_GELU_RESIDUAL)
    (grp,) = fusion_groups(g)
    assert grp.kind == "pointwise" and [n.op for n in grp.nodes] == ["add", "gelu", "add"]
    assert [v.name for v in grp.outputs] == ["y"]
    # unfused: 3 nodes write and read h and a; fused: x, bias, res in, y out
    assert str(grp.bytes_saved) == "384*batch*seq"
    k = emit_group(grp)
    assert k.name.startswith("fused_add_gelu_add_") and k.kind == "pointwise"
    assert "bias" not in k.source and "% 24" in k.source  # no IR names; the bias broadcast
    assert [n for n, _ in k.int_args] == ["d0"]  # numel: symbolic, a kernel argument
    fn = k.jit()
    for shape in ((2, 5, 24), (1, 9, 24)):  # tails: 240 and 216 elements, BLOCK 256
        check(g, [randn(*shape), randn(*shape)])
    assert emit_group(fusion_groups(parse_graph(BIAS_GELU_RESIDUAL))[0]).jit() is fn


# -- a softmax from primitive ops --------------------------------------------------------------

SOFTMAX = """\
graph g(%x: f32[batch, 3, seq]) {
  %m: f32[batch, 3, 1] = reduce_max(%x) {axes=[-1], keepdim=true}
  %s: f32[batch, 3, seq] = sub(%x, %m)
  %e: f32[batch, 3, seq] = exp(%s)
  %z: f32[batch, 3, 1] = reduce_sum(%e) {axes=[-1], keepdim=true}
  %y: f32[batch, 3, seq] = div(%e, %z)
  return %y
}
"""


@pytest.mark.parametrize("max_block", [None, 8])  # rows in registers / looped in 8s
def test_softmax_from_primitives(max_block):
    g = parse_graph(SOFTMAX)
    (grp,) = fusion_groups(g)
    assert grp.kind == "row" and grp.space.levels == 2
    assert str(grp.space.row_len) == "seq" and str(grp.space.rows) == "3*batch"
    k = emit_group(grp)
    assert k.name.startswith("fused_max_sub_exp_sum_div_")
    assert "s_seq" in dict(k.int_args)  # the row length is an argument, not specialised
    for shape in ((2, 3, 20), (1, 3, 7)):
        check(g, [randn(*shape, scale=4)], max_block=max_block)
    # specialised on the power-of-two bucket of the row, never on its length
    def consts(seq):
        return launch_config(k, {"batch": 2, "seq": seq})["constexprs"]

    assert consts(20) == consts(31) == {"ROWS": 8, "BLOCK": 32, "SINGLE": True, "IDX64": False}
    assert consts(33)["BLOCK"] == 64


def test_softmax_op_and_log_softmax_in_a_row_kernel():
    g = parse_graph("""\
graph g(%x: f32[4, 19]) {
  const %t: f32[] = 0.5
  %s: f32[4, 19] = mul(%x, %t)
  %p: f32[4, 19] = softmax(%s) {axis=-1}
  %l: f32[4, 19] = log_softmax(%s) {axis=-1}
  %y: f32[4, 19] = add(%p, %l)
  return %y
}
""")
    (grp,) = fusion_groups(g)
    assert grp.kind == "row" and len(grp.nodes) == 4
    for max_block in (None, 8):
        check(g, [randn(4, 19, scale=3)], max_block=max_block)


# -- norms from primitive ops ----------------------------------------------------------------

RMSNORM = """\
graph g(%x: f32[batch, 40]) {
  const %w: f32[40]
  const %two: f32[] = 2.0
  const %eps: f32[] = 1e-06
  %sq: f32[batch, 40] = pow(%x, %two)
  %ms: f32[batch, 1] = reduce_mean(%sq) {axes=[-1], keepdim=true}
  %me: f32[batch, 1] = add(%ms, %eps)
  %r: f32[batch, 1] = rsqrt(%me)
  %n: f32[batch, 40] = mul(%x, %r)
  %y: f32[batch, 40] = mul(%n, %w)
  return %y
}
"""

LAYERNORM = """\
graph g(%x: f32[2, seq, 40], %res: f32[2, seq, 40]) {
  const %w: f32[40]
  const %b: f32[40]
  const %eps: f32[] = 1e-05
  %s: f32[2, seq, 40] = add(%x, %res)
  %mu: f32[2, seq, 1] = reduce_mean(%s) {axes=[-1], keepdim=true}
  %c: f32[2, seq, 40] = sub(%s, %mu)
  %c2: f32[2, seq, 40] = mul(%c, %c)
  %var: f32[2, seq, 1] = reduce_mean(%c2) {axes=[-1], keepdim=true}
  %ve: f32[2, seq, 1] = add(%var, %eps)
  %r: f32[2, seq, 1] = rsqrt(%ve)
  %n: f32[2, seq, 40] = mul(%c, %r)
  %nw: f32[2, seq, 40] = mul(%n, %w)
  %y: f32[2, seq, 40] = add(%nw, %b)
  return %y, %s
}
"""


@pytest.mark.parametrize("max_block", [None, 16])
def test_rmsnorm_from_primitives(max_block):
    g = parse_graph(RMSNORM)
    (grp,) = fusion_groups(g)
    assert grp.kind == "row" and len(grp.nodes) == 6
    assert "two" not in emit_group(grp).source and "(x0 * x0)" in emit_group(grp).source
    check(g, [randn(5, 40)], max_block=max_block)


@pytest.mark.parametrize("max_block", [None, 16])
def test_add_layernorm_two_levels_and_a_second_output(max_block):
    g = parse_graph(LAYERNORM)
    (grp,) = fusion_groups(g)
    assert grp.space.levels == 2 and [v.name for v in grp.outputs] == ["s", "y"]
    check(g, [randn(2, 3, 40), randn(2, 3, 40)], max_block=max_block)


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("bf16", 2e-2)])
def test_mixed_dtypes_fp16_in_fp32_compute(dtype, tol):
    g = parse_graph("""\
graph g(%x: f16[batch, 40]) {
  const %w: f16[40]
  const %eps: f32[] = 1e-06
  %xf: f32[batch, 40] = cast(%x) {dtype=f32}
  %sq: f32[batch, 40] = mul(%xf, %xf)
  %ms: f32[batch, 1] = reduce_mean(%sq) {axes=[-1], keepdim=true}
  %me: f32[batch, 1] = add(%ms, %eps)
  %r: f32[batch, 1] = rsqrt(%me)
  %n: f32[batch, 40] = mul(%xf, %r)
  %h: f16[batch, 40] = cast(%n) {dtype=f16}
  %y: f16[batch, 40] = mul(%h, %w)
  %z: f16[batch, 40] = add(%y, %x)
  return %z
}
""".replace("f16", dtype))
    (grp,) = fusion_groups(g)
    src = emit_group(grp).source
    ty = {"f16": "float16", "bf16": "bfloat16"}[dtype]
    assert f".to(tl.{ty}).to(tl.float32)" in src  # values rounded to their dtype as torch does
    (out,) = check(g, [randn(3, 40, dtype=getattr(torch, ty))], tol=tol)
    assert out.dtype == getattr(torch, ty)


NORM_OPS = """\
graph g(%x: f32[batch, 40], %res: f32[batch, 40]) {
  const %bias: f32[40]
  const %w: f32[40]
  const %b: f32[40]
  const %two: f32[] = 2.0
  %h: f32[batch, 40] = add(%x, %bias)
  %n: f32[batch, 40], %s: f32[batch, 40] = add_norm(%h, %res, %w) {kind="rms", eps=1e-06}
  %y: f32[batch, 40] = mul(%n, %two)
  %l: f32[batch, 40] = layer_norm(%y, %w, %b) {eps=1e-05}
  %r: f32[batch, 40] = rms_norm(%l, %w) {eps=1e-06, offset=1.0}
  %z: f32[batch, 40] = add(%r, %s)
  return %z, %s
}
"""


@pytest.mark.parametrize("max_block", [None, 16])
def test_norm_ops_with_prologue_and_epilogue(max_block):
    """add_norm (two outputs), layer_norm and rms_norm (with Gemma's offset) in one row
    kernel with the bias add before and the residual add after."""
    g = parse_graph(NORM_OPS)
    (grp,) = fusion_groups(g)
    assert grp.kind == "row" and grp.space.levels == 4
    assert [v.name for v in grp.outputs] == ["s", "z"]
    check(g, [randn(3, 40), randn(3, 40)], max_block=max_block)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_norm_ops_half(dtype):
    g = parse_graph(NORM_OPS.replace("f32", dtype))
    (grp,) = fusion_groups(g)
    check(g, [randn(3, 40, dtype=grp.inputs[0].dtype.torch)] * 2,
          tol=2e-3 if dtype == "f16" else 2e-2)


# -- integers, bools, many unary ops -----------------------------------------------------------


def test_int_bool_and_unary_ops():
    g = parse_graph("""\
graph g(%x: f32[7, 13], %s: f32[]) {
  const %ten: f32[] = 10.0
  const %three: i64[] = 3
  const %slope: f32[] = 0.1
  const %half: f32[] = 0.5
  %pos: bool[7, 13] = gt(%x, %s)
  %lk: f32[7, 13] = mul(%x, %slope)
  %leaky: f32[7, 13] = where(%pos, %x, %lk)
  %x10: f32[7, 13] = mul(%x, %ten)
  %i: i64[7, 13] = cast(%x10) {dtype=i64}
  %q: i64[7, 13] = floor_div(%i, %three)
  %r: i64[7, 13] = remainder(%i, %three)
  %ax: f32[7, 13] = abs(%x)
  %t: f32[7, 13] = tanh(%x)
  %e: f32[7, 13] = erf(%x)
  %sq: f32[7, 13] = pow(%ax, %half)
  %lg: f32[7, 13] = log(%ax)
  %sg: f32[7, 13] = sigmoid(%x)
  %si: f32[7, 13] = silu(%x)
  %cl: f32[7, 13] = clamp(%x) {min=-0.5, max=0.75}
  %mx: f32[7, 13] = maximum(%t, %e)
  %sn: f32[7, 13] = sign(%x)
  %fl: f32[7, 13] = floor(%x10)
  %neg: bool[7, 13] = logical_not(%pos)
  %both: bool[7, 13] = logical_and(%neg, %pos)
  %a1: f32[7, 13] = add(%sq, %lg)
  %a2: f32[7, 13] = add(%a1, %sg)
  %a3: f32[7, 13] = sub(%a2, %si)
  %a4: f32[7, 13] = add(%a3, %cl)
  %a5: f32[7, 13] = add(%a4, %mx)
  %a6: f32[7, 13] = mul(%a5, %sn)
  %a7: f32[7, 13] = add(%a6, %fl)
  return %leaky, %q, %r, %a7, %both
}
""")
    (grp,) = fusion_groups(g)
    src = emit_group(grp).source
    assert "def _tanh" in src and "_floor_div_int" in src and "tl.load(in1)" in src  # 0-d in
    x = randn(7, 13, scale=2)
    x[0, :4] = torch.tensor([1e-6, -3e-4, 0.2, -0.3])  # tanh near 0: the series branch
    check(g, [x, torch.tensor(0.1, device=DEV)])


# -- what must not fuse, and why ----------------------------------------------------------------


def test_cycle_through_a_linear_is_refused():
    g = parse_graph("""\
graph g(%x: f32[4, 8]) {
  const %w: f32[8, 8]
  const %one: f32[] = 1.0
  %a: f32[4, 8] = add(%x, %one)
  %b: f32[4, 8] = linear(%a, %w, _)
  %c: f32[4, 8] = mul(%a, %b)
  %d: f32[4, 8] = tanh(%c)
  return %d
}
""")
    part = partition(g)
    nodes = {n.outputs[0].name: n for n in g.nodes}
    assert part.why_not(nodes["b"]) == "op 'linear' is not pointwise"
    assert "would create a cycle via %b (linear)" in part.why_not(nodes["c"])
    assert [[n.outputs[0].name for n in grp.nodes] for grp in part.groups] == [["a"], ["c", "d"]]
    first = part.groups[0]
    assert (nodes["b"], "op 'linear' is not pointwise") in first.why_not
    assert any("cycle" in r for n, r in first.why_not if n is nodes["c"])
    assert [u.outputs[0].name if not isinstance(u, Group) else u.label
            for u in part.schedule()] == ["fused_add", "b", "fused_mul_tanh"]
    check(g, [randn(4, 8)])


def test_non_trailing_broadcast_and_reordering_views_break_groups():
    g = parse_graph("""\
graph g(%x: f32[2, 1, 8], %z: f32[2, 5, 8]) {
  const %two: f32[] = 2.0
  %t: f32[2, 1, 8] = mul(%x, %two)
  %u: f32[2, 5, 8] = add(%t, %z)
  %p: f32[2, 8, 5] = permute(%u) {perm=[0, 2, 1]}
  %q: f32[2, 8, 5] = exp(%p)
  %m: f32[2, 1, 5] = reduce_max(%q) {axes=[1], keepdim=true}
  %r: f32[10, 8] = reshape(%u) {shape=[10, 8]}
  %v: f32[10, 8] = sigmoid(%r)
  return %q, %m, %v
}
""")
    part = partition(g)
    nodes = {n.outputs[0].name: n for n in g.nodes}
    assert "broadcast into %u [2, 5, 8] along a non-trailing dim" in part.why_not(nodes["u"])
    assert part.why_not(nodes["p"]).startswith("view 'permute' reorders")
    assert "only the last dim is reduced" in part.why_not(nodes["m"])
    # the reshape between two pointwise ops is contiguous-compatible: u, r, v are one kernel
    assert [[n.outputs[0].name for n in grp.nodes] for grp in part.groups] == \
        [["t"], ["u", "r", "v"], ["q"]]
    check(g, [randn(2, 1, 8), randn(2, 5, 8)])


def test_mixed_graph_through_the_schedule():
    """A small MLP block: kernels around two linears, a reshape into a row group."""
    g = parse_graph("""\
graph g(%x: f32[batch, seq, 16]) {
  const %w1: f32[32, 16]
  const %b1: f32[32]
  const %w2: f32[16, 32]
  const %eps: f32[] = 1e-06
  %sq: f32[batch, seq, 16] = mul(%x, %x)
  %ms: f32[batch, seq, 1] = reduce_mean(%sq) {axes=[-1], keepdim=true}
  %me: f32[batch, seq, 1] = add(%ms, %eps)
  %rs: f32[batch, seq, 1] = rsqrt(%me)
  %n: f32[batch, seq, 16] = mul(%x, %rs)
  %h: f32[batch, seq, 32] = linear(%n, %w1, _)
  %hb: f32[batch, seq, 32] = add(%h, %b1)
  %a: f32[batch, seq, 32] = gelu(%hb) {approximate="tanh"}
  %o: f32[batch, seq, 16] = linear(%a, %w2, _)
  %y: f32[batch, seq, 16] = add(%o, %x)
  %y2: f32[batch, seq2, 8] = reshape(%y) {shape=[batch, seq2, 8]}
  %m: f32[batch, seq2, 1] = reduce_max(%y2) {axes=[-1], keepdim=true}
  %d: f32[batch, seq2, 8] = sub(%y2, %m)
  return %d
}
""".replace("seq2", "2*seq"))
    part = partition(g)
    kinds = [(u.label, u.kind) for u in part.schedule() if isinstance(u, Group)]
    assert kinds == [("fused_mul_mean_add_rsqrt_mul", "row"), ("fused_add_gelu", "pointwise"),
                     ("fused_add_max_sub", "row")]
    for shape in ((2, 3, 16), (1, 5, 16)):
        check(g, [randn(*shape)])


@pytest.mark.parametrize("max_block", [None, 2])
def test_reshapes_inside_row_groups(max_block):
    """Members are computed in flat order: a reshape before or after the reduction (another
    row length than the member's last dim) stays in the row kernel."""
    before = parse_graph("""\
graph g(%x: f32[4, 6]) {
  const %b: f32[6]
  %e: f32[4, 6] = add(%x, %b)
  %r: f32[4, 2, 3] = reshape(%e) {shape=[4, 2, 3]}
  %s: f32[4, 2, 1] = reduce_sum(%r) {axes=[-1], keepdim=true}
  %d: f32[4, 2, 3] = div(%r, %s)
  return %d
}
""")
    after = parse_graph("""\
graph g(%x: f32[4, 6]) {
  %m: f32[4, 1] = reduce_max(%x) {axes=[-1], keepdim=true}
  %d: f32[4, 6] = sub(%x, %m)
  %r: f32[4, 2, 3] = reshape(%d) {shape=[4, 2, 3]}
  %e: f32[4, 2, 3] = exp(%r)
  return %e
}
""")
    for g in (before, after):
        (grp,) = fusion_groups(g)
        assert grp.kind == "row" and len(grp.nodes) == 4
        check(g, [randn(4, 6)], max_block=max_block)
    (grp,) = fusion_groups(before)
    assert "(rows * 3 + cols) % 6" in emit_group(grp).source  # the bias through the reshape


# -- launching and the cache --------------------------------------------------------------------


def test_run_checks_its_inputs_and_the_cache_is_by_source():
    g = parse_graph(BIAS_GELU_RESIDUAL)
    k = emit_group(fusion_groups(g)[0])
    x = randn(2, 3, 24)
    with pytest.raises(LoweringError, match=r"input 0 \(%x: f32\[batch, seq, 24\]\) has shape "
                                            r"\(2, 3, 24\) dtype torch.float16"):
        run(k, [x.half(), g.constants["bias"].const, x])
    with pytest.raises(LoweringError, match="takes 3 inputs"):
        run(k, [x])
    with pytest.raises(LoweringError, match=r"out\[0\]"):
        run(k, [x, g.constants["bias"].const, x], [torch.empty(2, 3, 23, device=DEV)])
    path = gen_cache.cache_dir() / f"{gen_cache.module_name(k.source)}.py"
    assert path.read_text() == k.source
    n = gen_cache.loaded()
    assert gen_cache.load_kernel(k.source, k.name) is k.jit() and gen_cache.loaded() == n


@pytest.mark.skipif(cc.tools_unavailable() is not None, reason="no GPU compiler (ptxas)")
def test_generated_kernels_compile_for_gpus():
    """The GPU compiler (no GPU needed) takes what the interpreter ran: a pointwise kernel, a
    row kernel held whole and one looped, a symbolic row, bf16 norms; at realistic sizes: no
    spills, registers within the file, shared memory within the limits."""
    specs = []
    g = parse_graph(LAYERNORM.replace("40", "4096"))
    k = emit_group(fusion_groups(g)[0])
    specs += [compile_spec(k, {"seq": 512}), compile_spec(k, {"seq": 512}, max_block=1024)]
    k = emit_group(fusion_groups(parse_graph(SOFTMAX))[0])
    specs.append(compile_spec(k, {"batch": 8, "seq": 1000}))
    k = emit_group(fusion_groups(parse_graph(BIAS_GELU_RESIDUAL))[0])
    specs.append(compile_spec(k, {"batch": 8, "seq": 512}))
    k = emit_group(fusion_groups(parse_graph(NORM_OPS.replace("f32", "bf16")))[0])
    specs.append(compile_spec(k, {"batch": 4096}))
    results = cc.check(specs, archs=(80, 90), jobs=2, cache=False)
    assert len(results) == 2 * len(specs)
    assert [r.problems() for r in results] == [[]] * len(results), cc.format_table(results)
