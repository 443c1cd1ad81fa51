"""Per-op emitters of the python backend: one small function per IR op.

An emitter turns one node into the right-hand side of one Python statement
made of direct torch calls (``F.layer_norm(x, (768,), w, b, 1e-05)``). It is
registered with ``@emitter("op", supports=...)``; ``supports(node)`` returns a
reason when this emitter cannot express the node faithfully, and the backend
then calls the op's reference implementation instead (counted, never an
error). An op with no emitter at all takes the same road.

Emitters only read the node. Everything that becomes source text goes through
:class:`EmitContext` (value names, dims, literals), which guarantees that no
string from the graph reaches the source other than as a ``repr()`` literal.

Attention glossary: B batch, H query heads, Hkv key/value heads, S query
length, T key length, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from transfuse.errors import LoweringError, TransfuseError
from transfuse.ir.graph import Node, Value
from transfuse.ir.opdefs.misc import resolve_aten
from transfuse.ir.opdefs.nn import alibi_bias, attention_mask
from transfuse.ir.opdefs.shape import INT64_MAX
from transfuse.ir.types import Dim, DType, dims_equal

# -- the context an emitter writes through ------------------------------------------


class EmitContext:
    """Source-text services for emitters; implemented by the generator in ``python.py``."""

    def name(self, v: Value | None) -> str:
        """The Python name of a value (``"None"`` for a missing optional input)."""
        raise NotImplementedError

    def dim(self, d: Dim) -> str:
        """A dimension as a Python expression over the bound symbols."""
        raise NotImplementedError

    def hoist(self, expr: str, hint: str) -> str:
        """Bind ``expr`` to a local once, in a statement before this node's; return its name.

        The same expression text hoisted again (a later node) reuses the local, so e.g. one
        attention mask serves every layer of a call.
        """
        raise NotImplementedError

    # -- helpers built on the two above ----------------------------------------------

    def dims(self, ds: Sequence[Dim]) -> str:
        """``(a, b, seq)`` — a tuple expression (``()`` when empty)."""
        items = [self.dim(d) for d in ds]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"

    def args(self, ds: Sequence[Dim]) -> str:
        """``a, b, seq`` for varargs methods (``reshape``/``expand``); ``()`` when empty."""
        return ", ".join(self.dim(d) for d in ds) if ds else "()"

    @staticmethod
    def lit(value: Any) -> str:
        """A Python literal for an attribute value (never raw text from the graph)."""
        return literal(value)


def literal(value: Any) -> str:
    """Python source for a plain attribute value: numbers, bools, None, strings, dtypes, tuples."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        if math.isfinite(value):
            return repr(value)
        return f"float({repr(str(value))})"  # float('inf'), float('nan')
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, DType):
        return dtype_literal(value)
    if isinstance(value, torch.dtype):
        return dtype_literal(DType.from_torch(value))
    if isinstance(value, (tuple, list)):
        items = [literal(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    raise LoweringError(f"python backend: cannot write attribute value {value!r} "
                        f"({type(value).__name__}) as a literal")


def dtype_literal(d: DType) -> str:
    return "torch." + str(d.torch).removeprefix("torch.")


# -- the registry ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Emitter:
    op: str
    emit: Callable[[EmitContext, Node], str]
    supports: Callable[[Node], str | None] | None = None

    def refuses(self, node: Node) -> str | None:
        return self.supports(node) if self.supports is not None else None


EMITTERS: dict[str, Emitter] = {}


def emitter(*ops: str, supports: Callable[[Node], str | None] | None = None) -> Callable:
    """Register ``fn(ctx, node) -> str`` (an expression) as the emitter of ``ops``."""

    def deco(fn: Callable[[EmitContext, Node], str]) -> Callable:
        for op in ops:
            if op in EMITTERS:
                raise ValueError(f"python emitter for {op} registered twice")
            EMITTERS[op] = Emitter(op, fn, supports)
        return fn

    return deco


def get_emitter(op: str) -> Emitter | None:
    return EMITTERS.get(op)


def _x(ctx: EmitContext, node: Node, i: int = 0) -> str:
    return ctx.name(node.inputs[i]) if i < len(node.inputs) else "None"


# -- elementwise ---------------------------------------------------------------------------

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "remainder": "%",
          "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_CALL2 = {"maximum": "torch.maximum", "minimum": "torch.minimum",
          "logical_and": "torch.logical_and", "logical_or": "torch.logical_or",
          "logical_xor": "torch.logical_xor"}
_CALL1 = {"exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "rsqrt": "torch.rsqrt",
          "reciprocal": "torch.reciprocal", "tanh": "torch.tanh", "erf": "torch.erf",
          "sigmoid": "torch.sigmoid", "sin": "torch.sin", "cos": "torch.cos",
          "abs": "torch.abs", "relu": "torch.relu", "floor": "torch.floor", "ceil": "torch.ceil",
          "sign": "torch.sign", "logical_not": "torch.logical_not"}


def _infix(symbol: str) -> Callable[[EmitContext, Node], str]:
    return lambda ctx, node: f"{_x(ctx, node, 0)} {symbol} {_x(ctx, node, 1)}"


def _call(fn: str, arity: int) -> Callable[[EmitContext, Node], str]:
    return lambda ctx, node: f"{fn}({', '.join(_x(ctx, node, i) for i in range(arity))})"


for _op, _sym in _INFIX.items():
    emitter(_op)(_infix(_sym))
for _op, _fn in _CALL2.items():
    emitter(_op)(_call(_fn, 2))
for _op, _fn in _CALL1.items():
    emitter(_op)(_call(_fn, 1))


@emitter("floor_div")
def _floor_div(ctx, node):
    return f"torch.div({_x(ctx, node, 0)}, {_x(ctx, node, 1)}, rounding_mode='floor')"


@emitter("silu")
def _silu(ctx, node):
    x = _x(ctx, node)
    return f"F.silu({x})" if node.inputs[0].type.dtype.is_float else f"F.silu({x}.float())"


@emitter("neg")
def _neg(ctx, node):
    return f"-{_x(ctx, node)}"


@emitter("gelu")
def _gelu(ctx, node):
    approx = node.attrs["approximate"]
    extra = "" if approx == "none" else f", approximate={ctx.lit(approx)}"
    return f"F.gelu({_x(ctx, node)}{extra})"


@emitter("cast")
def _cast(ctx, node):
    return f"{_x(ctx, node)}.to({ctx.lit(node.attrs['dtype'])})"


@emitter("where")
def _where(ctx, node):
    return f"torch.where({_x(ctx, node, 0)}, {_x(ctx, node, 1)}, {_x(ctx, node, 2)})"


@emitter("clamp")
def _clamp(ctx, node):
    lo, hi = node.attrs["min"], node.attrs["max"]
    if not node.inputs[0].type.dtype.is_float:  # integer stays integer: bounds rounded inward
        lo = math.ceil(lo) if lo is not None and math.isfinite(lo) else lo
        hi = math.floor(hi) if hi is not None and math.isfinite(hi) else hi
    return f"torch.clamp({_x(ctx, node)}, {ctx.lit(lo)}, {ctx.lit(hi)})"


# -- linear algebra -------------------------------------------------------------------------


@emitter("matmul")
def _matmul(ctx, node):
    return f"torch.matmul({_x(ctx, node, 0)}, {_x(ctx, node, 1)})"


@emitter("linear")
def _linear(ctx, node):
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    tail = f", {ctx.name(bias)}" if bias is not None else ""
    w = node.inputs[1].type.shape
    if node.attrs.get("gemm") == "blas":
        expr = f"_gemm_linear({_x(ctx, node, 0)}, {_x(ctx, node, 1)}{tail or ', None'}, True)"
    elif isinstance(w[0], int) and w[0] >= WIDE_LINEAR_COLUMNS:
        # LM-head-like: the result may be big enough to want huge pages (codegen/blas.py)
        expr = f"_gemm_linear({_x(ctx, node, 0)}, {_x(ctx, node, 1)}{tail})"
    else:
        expr = f"F.linear({_x(ctx, node, 0)}, {_x(ctx, node, 1)}{tail})"
    return _LINEAR_ACTIVATIONS[node.attrs.get("activation")].format(expr)


#: a linear with at least this many output columns goes through ``_gemm_linear``, whose large
#: results are mapped with huge pages (one call per layer of Python is all it costs)
WIDE_LINEAR_COLUMNS = 8192

#: linear's ``activation`` attribute -> the call around F.linear
_LINEAR_ACTIVATIONS = {
    None: "{}",
    "gelu": "F.gelu({})",
    "gelu_tanh": "F.gelu({}, approximate='tanh')",
    "silu": "F.silu({})",
    "relu": "torch.relu({})",
}


# -- structure ---------------------------------------------------------------------------------


@emitter("identity")
def _identity(ctx, node):
    return _x(ctx, node)


@emitter("dropout")
def _dropout(ctx, node):
    if not node.attrs["train"]:
        return _x(ctx, node)  # inference: the identity
    return f"F.dropout({_x(ctx, node)}, {ctx.lit(node.attrs['p'])}, True)"


@emitter("assert")
def _assert(ctx, node):
    xs = ", ".join(ctx.name(v) for v in node.inputs)
    return f"_assert([{xs}], {ctx.lit(node.attrs['message'])})"


# -- normalisation -------------------------------------------------------------------------------


def _norm_shape(ctx: EmitContext, node: Node, x_expr: str | None = None) -> str:
    """The normalized shape (the last dims of the normalized output): a literal when static,
    else ``x.shape[-nd:]`` of ``x_expr`` (the node's first input unless given)."""
    out = node.outputs[0].type
    nd = node.attrs["normalized_ndim"]
    dims = out.shape[out.rank - nd:]
    if all(isinstance(d, int) for d in dims):
        return ctx.dims(dims)
    return f"{x_expr or ctx.name(node.inputs[0])}.shape[-{nd}:]"


@emitter("layer_norm")
def _layer_norm(ctx, node):
    a = node.attrs
    return (f"F.layer_norm({_x(ctx, node)}, {_norm_shape(ctx, node)}, {_x(ctx, node, 1)}, "
            f"{_x(ctx, node, 2)}, {ctx.lit(a['eps'])})")


@emitter("rms_norm")
def _rms_norm(ctx, node):
    """Reference: normalise (in fp32 when ``upcast``), cast back, then times (offset + weight)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return rms_norm_expr(ctx, node, ctx.name(node.inputs[0]), node.inputs[0].type.dtype, w)


def rms_norm_expr(ctx: EmitContext, node: Node, xs: str, x_dtype: DType, w: Value | None) -> str:
    """rms_norm of the expression ``xs`` (of ``x_dtype``) with ``node``'s attributes."""
    a = node.attrs
    shape, eps = _norm_shape(ctx, node, xs), ctx.lit(a["eps"])
    upcast = a["upcast"] and x_dtype not in (DType.f32, DType.f64)
    weight = None
    if w is not None:
        weight = ctx.name(w) if not a["offset"] else f"({ctx.name(w)} + {ctx.lit(a['offset'])})"
    if (x_dtype == DType.f32 and a["normalized_ndim"] == 1 and not a["offset"]
            and (w is None or w.type.dtype == DType.f32)):
        # one pass per row in C when available (native/ops.py), else F.rms_norm
        return f"_rms_norm({xs}, {weight}, {eps})"
    if not upcast and weight is not None and w.type.dtype == x_dtype:
        return f"F.rms_norm({xs}, {shape}, {weight}, {eps})"
    core = (f"F.rms_norm({xs}.float(), {shape}, None, {eps}).to({xs}.dtype)" if upcast
            else f"F.rms_norm({xs}, {shape}, None, {eps})")
    return core if weight is None else f"{core} * {weight}"


# -- attention ------------------------------------------------------------------------------------


def _bhsd(t, layout: str):
    b, x1, x2, d = t.shape
    return (b, x2, x1, d) if layout == "bshd" else (b, x1, x2, d)


def _attention_supports(node: Node) -> str | None:
    if node.attrs["softcap"] is not None:
        return ("softcap applies tanh to the scores before masking; "
                "scaled_dot_product_attention has no hook for it")
    return None


def attn_position_mask(s: int, t: int, causal: bool, window: int | None,
                       alibi: tuple[float, ...] | None, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """The mask a backend passes for causal / window / ALiBi attention, as the reference builds it.

    Without ALiBi: bool [S, T] (True = attend). With ALiBi: float [H, S, T], the ALiBi bias
    with -inf where the position mask forbids. Generated code memoises it per shape.
    """
    keep = attention_mask(s, t, causal, window, device)
    if alibi is None:
        return keep
    bias = alibi_bias(list(alibi), s, t, dtype, device)
    return bias if keep is None else bias.masked_fill(~keep, float("-inf"))


@emitter("attention", supports=_attention_supports)
def _attention(ctx, node):
    """``F.scaled_dot_product_attention``; masks other than a square causal one become attn_mask.

    SDPA's ``is_causal`` is top-left aligned; the IR's causal is bottom-right aligned (query i
    sits at i + T - S), so ``is_causal`` is used only when S == T is provable. A query row whose
    every key is masked gives zeros in the reference, as SDPA's CPU kernels do.
    """
    a = node.attrs
    layout = a["layout"]
    q, k, v = (ctx.name(x) for x in node.inputs[:3])
    if layout == "bshd":
        q, k, v = (f"{x}.transpose(1, 2)" for x in (q, k, v))
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    kpm = node.inputs[4] if len(node.inputs) > 4 else None
    qt = node.inputs[0].type
    _, h, s, _ = _bhsd(qt, layout)
    _, hkv, t, _ = _bhsd(node.inputs[1].type, layout)
    square = dims_equal(s, t)
    is_causal = (a["causal"] and square and a["alibi"] is None and bias is None and kpm is None)
    # square causal with a sliding window: _causal_attention takes the window (native kernel)
    window = a["window"] if is_causal else None
    q0 = ctx.name(node.inputs[0])
    bool_masks: list[str] = []
    float_masks: list[str] = []
    if (not is_causal and (a["causal"] or a["window"] is not None)) or a["alibi"] is not None:
        # no value names in here: the same text in every layer is hoisted and built once
        pos = (f"_attn_mask({ctx.dim(s)}, {ctx.dim(t)}, {ctx.lit(a['causal'])}, "
               f"{ctx.lit(a['window'])}, {ctx.lit(a['alibi'])}, {ctx.lit(qt.dtype)}, _dev)")
        (float_masks if a["alibi"] is not None else bool_masks).append(pos)
    if bias is not None:
        b = ctx.name(bias)
        if bias.type.dtype == DType.bool:
            raise LoweringError(f"attention bias %{bias.name} is bool; the IR adds bias to scores")
        if bias.type.dtype != qt.dtype:
            b = f"{b}.to({q0}.dtype)"
        float_masks.insert(0, b)
    if kpm is not None:
        bool_masks.append(f"{ctx.name(kpm)}.bool()[:, None, None, :]")
    mask = None
    if float_masks:
        mask = " + ".join(float_masks)
        for m in bool_masks:
            mask = f"({mask}).masked_fill(~{m}, float('-inf'))"
    elif bool_masks:
        mask = " & ".join(bool_masks)
    args = [q, k, v]
    if mask is not None:
        args.append(f"attn_mask={ctx.hoist(mask, 'attn_mask')}")
    if is_causal:
        # square causal, no other mask: query blocks skip the masked half (cpu_attention.py)
        fn = "_causal_attention"
    else:
        fn = "F.scaled_dot_product_attention"
    if a["scale"] is not None:
        args.append(f"scale={ctx.lit(a['scale'])}")
    if hkv != h:
        args.append("enable_gqa=True")
    if window is not None:
        args.append(f"window={ctx.lit(window)}")
    out = f"{fn}({', '.join(args)})"
    return f"{out}.transpose(1, 2)" if layout == "bshd" else out


# -- reductions -----------------------------------------------------------------------------------


def _axes(node: Node) -> tuple[int, ...]:
    return tuple(node.attrs["axes"]) or tuple(range(node.inputs[0].type.rank))


def _reduce(fn: str) -> Callable[[EmitContext, Node], str]:
    def emit(ctx, node):
        keep = ", keepdim=True" if node.attrs["keepdim"] else ""
        return f"{fn}({_x(ctx, node)}, dim={ctx.lit(_axes(node))}{keep})"

    return emit


for _op, _fn in {"reduce_sum": "torch.sum", "reduce_mean": "torch.mean",
                 "reduce_max": "torch.amax", "reduce_min": "torch.amin"}.items():
    emitter(_op)(_reduce(_fn))


@emitter("argmax")
def _argmax(ctx, node):
    keep = ", keepdim=True" if node.attrs["keepdim"] else ""
    return f"torch.argmax({_x(ctx, node)}, dim={node.attrs['axis']}{keep})"


@emitter("softmax", "log_softmax")
def _softmax(ctx, node):
    return f"torch.{node.op}({_x(ctx, node)}, dim={node.attrs['axis']})"


@emitter("cumsum")
def _cumsum(ctx, node):
    dtype = node.attrs["dtype"]
    extra = f", dtype={ctx.lit(dtype)}" if dtype is not None else ""
    return f"torch.cumsum({_x(ctx, node)}, dim={node.attrs['axis']}{extra})"


# -- shapes and data movement -----------------------------------------------------------------------


@emitter("reshape")
def _reshape(ctx, node):
    return f"{_x(ctx, node)}.reshape({ctx.args(node.attrs['shape'])})"


@emitter("expand")
def _expand(ctx, node):
    return f"{_x(ctx, node)}.expand({ctx.args(node.attrs['shape'])})"


@emitter("permute")
def _permute(ctx, node):
    return f"{_x(ctx, node)}.permute({ctx.args(node.attrs['perm'])})"


@emitter("concat")
def _concat(ctx, node):
    xs = ", ".join(ctx.name(v) for v in node.inputs)
    return f"torch.cat([{xs}], dim={node.attrs['axis']})"


@emitter("split")
def _split(ctx, node):
    sizes = "[" + ", ".join(ctx.dim(d) for d in node.attrs["sizes"]) + "]"
    return f"torch.split({_x(ctx, node)}, {sizes}, dim={node.attrs['axis']})"


@emitter("slice")
def _slice(ctx, node):
    a = node.attrs
    rank = node.inputs[0].type.rank
    axis = a["axis"] % rank
    start = "" if a["start"] == 0 else ctx.dim(a["start"])
    end = "" if isinstance(a["end"], int) and a["end"] >= INT64_MAX // 2 else ctx.dim(a["end"])
    step = "" if a["step"] == 1 else f":{a['step']}"
    index = [":"] * axis + [f"{start}:{end}{step}"]
    return f"{_x(ctx, node)}[{', '.join(index)}]"


@emitter("index_select")
def _index_select(ctx, node):
    x, idx, axis = _x(ctx, node, 0), node.inputs[1], node.attrs["axis"]
    if idx.type.rank == 0:
        return f"{x}.select({axis}, int({ctx.name(idx)}))"
    return f"torch.index_select({x}, {axis}, {ctx.name(idx)})"


@emitter("gather")
def _gather(ctx, node):
    return f"torch.gather({_x(ctx, node, 0)}, {node.attrs['axis']}, {_x(ctx, node, 1)})"


@emitter("embedding")
def _embedding(ctx, node):
    return f"F.embedding({_x(ctx, node, 1)}, {_x(ctx, node, 0)})"


@emitter("arange")
def _arange(ctx, node):
    a = node.attrs
    dtype = f"dtype={ctx.lit(a['dtype'])}, device=_dev"
    if a["start"] == 0 and a["step"] == 1:
        return f"torch.arange({ctx.dim(a['end'])}, {dtype})"
    return f"torch.arange({ctx.dim(a['start'])}, {ctx.dim(a['end'])}, {a['step']}, {dtype})"


@emitter("full")
def _full(ctx, node):
    a = node.attrs
    return (f"torch.full({ctx.dims(a['shape'])}, {ctx.lit(a['value'])}, "
            f"dtype={ctx.lit(a['dtype'])}, device=_dev)")


@emitter("tril", "triu")
def _tri(ctx, node):
    return f"torch.{node.op}({_x(ctx, node)}, {node.attrs['diagonal']})"


@emitter("shape_of")
def _shape_of(ctx, node):
    # a host scalar, as the reference makes it: shape arithmetic never waits on a device
    return f"torch.tensor({_x(ctx, node)}.shape[{node.attrs['axis']}], dtype=torch.int64)"


def _aten_returns(node: Node) -> int | None:
    """How many results the aten op of a ``torch_fallback`` returns (None: a single tensor)."""
    returns = resolve_aten(node.attrs["target"])._schema.returns
    if len(returns) == 1 and str(returns[0].type) == "Tensor":
        return None
    return len(returns)


def _torch_fallback_supports(node: Node) -> str | None:
    try:
        resolve_aten(node.attrs["target"])
    except TransfuseError as e:
        return str(e)
    return None


@emitter("torch_fallback", supports=_torch_fallback_supports)
def _torch_fallback(ctx, node):
    """The aten op through ``call_fallback`` (same path as the reference), counted by the backend."""
    xs = ", ".join(ctx.name(v) for v in node.inputs)
    call = (f"call_fallback({ctx.lit(node.attrs['target'])}, {ctx.lit(node.attrs['args'])}, "
            f"[{xs}])")
    if len(node.outputs) == 1 and _aten_returns(node) is not None:
        return f"{call}[0]"  # a one-element tuple/list result, as run_reference unpacks it
    return call


__all__ = ["EMITTERS", "Emitter", "EmitContext", "emitter", "get_emitter", "literal",
           "attn_position_mask"]


# emitters of the fused ops the recognition passes make (swiglu, rotary, add_norm)
from transfuse.codegen import python_fused  # noqa: E402,F401
