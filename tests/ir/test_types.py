"""IR types: dtypes, symbolic dims, tensor types, broadcasting."""

from __future__ import annotations

import pytest
import sympy
import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.types import (
    DType,
    TensorType,
    broadcast_shapes,
    dim_product,
    dim_str,
    dims_equal,
    eval_dim,
    free_symbols,
    normalize_dim,
    parse_dim,
    promote,
    sym,
)

B, S = sym("batch"), sym("seq")


def test_dtype_names_and_torch_mapping():
    for d in DType:
        assert DType.parse(d.value) is d
        assert DType.from_torch(d.torch) is d
        assert str(d) == d.value
    assert DType.f32.itemsize == 4 and DType.bf16.itemsize == 2
    assert DType.f16.is_float and not DType.i64.is_float
    assert promote(DType.f16, DType.f32) is DType.f32
    with pytest.raises(IRVerifyError, match="unknown dtype 'f33'"):
        DType.parse("f33")
    with pytest.raises(IRVerifyError, match="no IR element type"):
        DType.from_torch(torch.complex64)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("768", 768),
        ("-1", -1),
        ("seq", S),
        ("seq+1", S + 1),
        ("2*seq + 1", 2 * S + 1),
        ("batch*seq", B * S),
        ("seq//2", sympy.floor(S / 2)),
        ("floor(seq/2)", sympy.floor(S / 2)),
        ("Max(seq, 4)", sympy.Max(S, 4)),
        ("(seq+1)*2", 2 * S + 2),
    ],
)
def test_parse_dim(text, expected):
    d = parse_dim(text)
    assert dims_equal(d, expected)
    assert dims_equal(parse_dim(dim_str(d)), d)  # printing reads back


def test_dim_str_and_normalisation():
    assert dim_str(S + 1) == "seq+1"
    assert dim_str(2 * S) == "2*seq"
    assert dim_str(B * S) == "batch*seq"
    assert normalize_dim(S - S + 3) == 3 and isinstance(normalize_dim(S - S + 3), int)
    assert normalize_dim(sympy.Integer(5)) == 5
    assert normalize_dim("seq") == S
    assert dim_product([B, S, 4]) == 4 * B * S
    assert dim_product([2, 3]) == 6
    assert free_symbols([B, S + 1, 4]) == {"batch", "seq"}


@pytest.mark.parametrize(
    "bad",
    ["seq +", "__import__('os')", "seq.real", "f(seq)", "seq[0]", "lambda: 1", "1.5", "a b"],
)
def test_parse_dim_rejects_bad_text(bad):
    with pytest.raises(IRVerifyError):
        parse_dim(bad)


def test_normalize_dim_rejects_non_dims():
    with pytest.raises(IRVerifyError, match="bool"):
        normalize_dim(True)
    with pytest.raises(IRVerifyError):
        normalize_dim(1.5)
    with pytest.raises(IRVerifyError, match="not an integer"):
        normalize_dim(sympy.Rational(1, 2))
    with pytest.raises(IRVerifyError, match="not an identifier"):
        sym("2x")


def test_eval_dim():
    env = {"batch": 2, "seq": 7}
    assert eval_dim(5, env) == 5
    assert eval_dim(S, env) == 7
    assert eval_dim(2 * S + B, env) == 16
    assert eval_dim(parse_dim("seq//2"), env) == 3
    with pytest.raises(IRVerifyError, match="no value bound for symbolic dim 'seq'"):
        eval_dim(S + 1, {"batch": 2})


def test_tensor_type_parse_print_and_equality():
    t = TensorType.parse("f32[batch, seq, 768]")
    assert t == TensorType(DType.f32, [B, S, 768])
    assert str(t) == "f32[batch, seq, 768]"
    assert t.rank == 3 and not t.is_static
    assert t.numel() == 768 * B * S
    assert t.nbytes() == 4 * 768 * B * S
    assert t.concrete({"batch": 2, "seq": 3}) == (2, 3, 768)
    assert str(TensorType.parse("i64[]")) == "i64[]"
    assert TensorType.parse("i64[]").numel() == 1
    e = TensorType.parse("bf16[Max(seq, 4), seq+1]")
    assert str(e) == "bf16[Max(4,seq), seq+1]"
    assert TensorType.parse(str(e)) == e
    # equality is by value, hashing agrees
    assert hash(TensorType.parse("f32[seq+1]")) == hash(TensorType(DType.f32, [S + 1]))
    assert TensorType(DType.f32, [S]) != TensorType(DType.f16, [S])
    assert TensorType(DType.f32, [S]) != TensorType(DType.f32, [S, 1])
    assert t.with_dtype(DType.f16).dtype is DType.f16
    assert t.with_shape([1]).shape == (1,)
    assert TensorType.of(torch.zeros(2, 3, dtype=torch.int8)) == TensorType.parse("i8[2, 3]")
    with pytest.raises(AttributeError):
        t.dtype = DType.f16


@pytest.mark.parametrize(
    "bad", ["f32", "f32[2", "q8[2]", "f32[2, seq +]", "f32[2.5]", "[2]", "f32[True]"]
)
def test_tensor_type_parse_errors(bad):
    with pytest.raises(IRVerifyError):
        TensorType.parse(bad)


def test_tensor_type_rejects_bad_dtype():
    with pytest.raises(IRVerifyError, match="must be a DType"):
        TensorType("f32", [1])


@pytest.mark.parametrize(
    "shapes,expected",
    [
        (((2, 3), (3,)), (2, 3)),
        (((2, 1), (1, 3)), (2, 3)),
        (((), (4,)), (4,)),
        (((B, S, 4), (4,)), (B, S, 4)),
        (((B, 1, S), (1, S, 1)), (B, S, S)),
        (((B, S), (1, 1)), (B, S)),
        (((S + 1,), (S + 1,)), (S + 1,)),
        (((1,), (S,), (B, 1)), (B, S)),
    ],
)
def test_broadcast_shapes(shapes, expected):
    out = broadcast_shapes(*shapes)
    assert len(out) == len(expected)
    assert all(dims_equal(a, b) for a, b in zip(out, expected))
    if all(isinstance(d, int) for s in shapes for d in s):
        assert out == tuple(torch.broadcast_shapes(*shapes))


@pytest.mark.parametrize("shapes", [((2, 3), (4,)), ((B,), (S,)), ((S,), (S + 1,)), ((3,), (S,))])
def test_broadcast_shapes_incompatible(shapes):
    with pytest.raises(IRVerifyError, match="do not broadcast"):
        broadcast_shapes(*shapes)
