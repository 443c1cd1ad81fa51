"""The reference interpreter: numerics against direct torch, symbol binding, input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transfuse.errors import InputError, IRVerifyError
from transfuse.ir.interpret import bind_symbols, interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.verify import verify

BLOCK = """\
graph block(%x: f32[batch, seq, 16]) {
  const %ln_w: f32[16]
  const %ln_b: f32[16]
  const %w_qkv: f32[48, 16]
  const %w_o: f32[16, 16]
  %h: f32[batch, seq, 16] = layer_norm(%x, %ln_w, %ln_b)
  %qkv: f32[batch, seq, 48] = linear(%h, %w_qkv, _)
  %q, %k, %v = SPLIT
  %q4: f32[batch, seq, 2, 8] = reshape(%q) {shape=[batch, seq, 2, 8]}
  %k4: f32[batch, seq, 2, 8] = reshape(%k) {shape=[batch, seq, 2, 8]}
  %v4: f32[batch, seq, 2, 8] = reshape(%v) {shape=[batch, seq, 2, 8]}
  %a: f32[batch, seq, 2, 8] = attention(%q4, %k4, %v4) {causal, layout="bshd"}
  %a2: f32[batch, seq, 16] = reshape(%a) {shape=[batch, seq, 16]}
  %o: f32[batch, seq, 16] = linear(%a2, %w_o, _)
  %y: f32[batch, seq, 16] = add(%x, %o)
  %g: f32[batch, seq, 16] = gelu(%y) {approximate="tanh"}
  return %g
}
""".replace(
    "%q, %k, %v = SPLIT",
    "%q: f32[batch, seq, 16], %k: f32[batch, seq, 16], %v: f32[batch, seq, 16] = "
    "split(%qkv) {axis=-1, sizes=[16, 16, 16]}",
)


def block_reference(g, x):
    c = {n: v.const for n, v in g.constants.items()}
    b, s, _ = x.shape
    h = F.layer_norm(x, (16,), c["ln_w"], c["ln_b"])
    q, k, v = (h @ c["w_qkv"].T).split(16, dim=-1)
    q, k, v = (t.reshape(b, s, 2, 8).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = x + a.transpose(1, 2).reshape(b, s, 16) @ c["w_o"].T
    return F.gelu(y, approximate="tanh")


@pytest.mark.parametrize("shape", [(2, 5, 16), (1, 9, 16)])
def test_block_matches_direct_torch(shape):
    g = parse_graph(BLOCK)
    verify(g)
    x = torch.randn(shape)
    (out,) = interpret(g, [x])
    torch.testing.assert_close(out, block_reference(g, x), rtol=1e-5, atol=1e-5)


def test_symbolic_dims_bound_from_inputs():
    text = """\
graph g(%x: f32[batch, seq], %y: f32[seq], %c: f32[batch, 1]) {
  %0: f32[batch, seq+1] = concat(%x, %c) {axis=1}
  %r: f32[seq+1] = arange() {end=seq+1, dtype=f32}
  %1: f32[batch, seq+1] = add(%0, %r)
  %2: f32[batch, 2] = slice(%1) {axis=1, start=seq-1, end=seq+1}
  return %1, %2
}
"""
    g = parse_graph(text)
    verify(g)
    x, y, c = torch.randn(3, 4), torch.randn(4), torch.randn(3, 1)
    assert bind_symbols(g, [x, y, c]) == {"batch": 3, "seq": 4}
    out1, out2 = interpret(g, [x, y, c])
    ref = torch.cat([x, c], dim=1) + torch.arange(5, dtype=torch.float32)
    torch.testing.assert_close(out1, ref)
    torch.testing.assert_close(out2, ref[:, 3:5])


def test_inconsistent_symbol_raises_input_error():
    g = parse_graph("graph g(%x: f32[seq, 4], %y: f32[seq]) {\n  return %x, %y\n}\n")
    with pytest.raises(InputError, match=r"dim 0 \(seq\) is 5 but seq=3 elsewhere"):
        interpret(g, [torch.randn(3, 4), torch.randn(5)])


@pytest.mark.parametrize(
    "inputs,message",
    [
        ([torch.randn(3, 4)], "takes 2 inputs, got 1"),
        ([torch.randn(3, 5), torch.randn(3)], r"dim 1 must be 4"),
        ([torch.randn(3), torch.randn(3)], "expected rank 2"),
        ([torch.randn(3, 4), [1.0, 2.0, 3.0]], "expected a tensor"),
    ],
)
def test_bad_inputs_raise_input_error(inputs, message):
    g = parse_graph("graph g(%x: f32[seq, 4], %y: f32[seq]) {\n  return %x, %y\n}\n")
    with pytest.raises(InputError, match=message):
        interpret(g, inputs)


def test_declared_type_mismatch_is_caught_at_run_time():
    # parse keeps the (wrong) declared type; verify would also catch it
    g = parse_graph("graph g(%x: f32[4]) {\n  %0: f16[4] = neg(%x)\n  return %0\n}\n")
    with pytest.raises(IRVerifyError, match="declared f16"):
        interpret(g, [torch.randn(4)])
    (out,) = interpret(g, [torch.randn(4)], check_types=False)
    assert out.dtype == torch.float32


def test_failing_reference_names_the_node():
    g = parse_graph(
        "graph g(%x: f32[4]) {\n  %0: f32[4] = neg(%x)  # @mlp.fc\n"
        '  assert(%x) {message="x must be nonzero"}\n  return %0\n}\n'
    )
    with pytest.raises(IRVerifyError, match=r"interpreting .*assert.*x must be nonzero"):
        interpret(g, [torch.tensor([1.0, 0.0, 1.0, 1.0])])
    (out,) = interpret(g, [torch.ones(4)])
    assert torch.equal(out, -torch.ones(4))


def test_multi_output_and_constants():
    text = """\
graph g(%x: f32[seq, 6]) {
  const %s: f32[] = 2.0
  %a: f32[seq, 2], %b: f32[seq, 4] = split(%x) {axis=1, sizes=[2, 4]}
  %m: f32[seq, 2] = mul(%a, %s)
  %r: f32[seq] = reduce_sum(%b) {axes=[1]}
  return %m, %r
}
"""
    g = parse_graph(text)
    verify(g)
    x = torch.randn(3, 6)
    m, r = interpret(g, [x])
    torch.testing.assert_close(m, x[:, :2] * 2)
    torch.testing.assert_close(r, x[:, 2:].sum(1))
    assert math.isclose(g.constants["s"].const.item(), 2.0)
