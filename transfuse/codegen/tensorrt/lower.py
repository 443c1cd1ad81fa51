"""Lowering a graph to the ONNX TensorRT's parser takes: standard ops, strongly typed.

:func:`lower_tensorrt` is the ONNX backend's standard-op lowering (``fused=False``: no
``com.microsoft`` op) with the TensorRT flavour of a few ops, held in :data:`TRT_LOWERINGS` and
passed to the backend's node loop as overrides (every other op lowers exactly as for ONNX
Runtime):

- ``attention`` -> the ONNX ``Attention`` op (opset 23; TensorRT >= 10.14 imports it natively):
  q/k/v 4-D [B, H, S, D] (GQA through K/V's head count), ``is_causal`` for square causal
  attention, ``scale``; a bias, ALiBi, a key padding mask, a sliding window and causal masks
  with S != T become one additive ``attn_mask`` ([B|1, H|1, S|1, T]; masked keys -inf) and a
  row whose every key is masked is set to zeros as in the IR. ``softcap`` (TensorRT's parser
  refuses the attribute), opset < 23 or ``attention="decomposed"`` take MatMul-Softmax-MatMul
  with explicit masks (the backend's ``attention_std``);
- ``rms_norm`` -> ``RMSNormalization`` (opset 23; its computation in f32, ``stash_type=1``);
  ``layer_norm`` keeps the backend's ``LayerNormalization``; ``add_norm`` is Add + either;
- ``qlinear`` (weight-only int4/int8) -> signed INT4/INT8 initializer [K, N] (code - 2**(b-1))
  + ``DequantizeLinear`` (blocked: ``axis=0, block_size=group``, opset 21; INT4 so even per
  channel, ``block_size=K``, TensorRT's INT4 being block quantization; INT8 per output channel
  ``axis=1`` when group == K) + ``MatMul`` (+ bias, activation). TensorRT's parser wants a zero
  ``x_zero_point`` (operators.md; Torch-TensorRT's INT4 example says its IDequantizeLayer
  rejects asymmetric INT4), so an asymmetric weight's zero point z goes to
  an exact correction instead: ``w = (q - 2**(b-1)) s + (2**(b-1) - z) s``, the second term
  ``sum_g (sum of x over group g) * c[g, n]`` with ``c = (2**(b-1) - z) s`` (ReduceSum +
  MatMul, or Mul per channel). It holds for fractional zeros too; ``asymmetric="refuse"``
  raises instead. fp8 (e4m3) weights: FLOAT8E4M3FN initializer + DequantizeLinear (per channel)
  + MatMul;
- ``cached_attention`` (generation graphs) keeps the backend's standard form: each cache write
  is a ``ScatterND`` whose result becomes an extra output ``<cache>_present`` (the map is in
  the model's metadata under :data:`CACHE_OUTPUTS_KEY`); the caller makes it land in the cache
  (binds it to the cache's memory, or feeds it back next step);
- ``qmatmul`` (W8A8) is refused: the IR quantizes activations to u8 with a per-row/tensor zero
  point computed at run time, and TensorRT's QuantizeLinear takes only zero zero points.

Strong typing (TensorRT 11 has no weak typing): every lowering casts its inputs to the type
the ONNX op needs (the backend's rule); :func:`check_strongly_typed` runs ONNX shape inference
in strict mode and refuses a model where any value's element type is unknown. The result is
checked against TensorRT's operator list (``ops.py``). Glossary: B batch, H heads, Hkv kv heads,
S query length, T key length, D head dim, N output features, K input features, G groups.
"""

from __future__ import annotations

import contextlib
import json
import math

import onnx
import torch
from onnx import TensorProto, helper

from transfuse.codegen.lowering import Lowerings
from transfuse.codegen.onnx.attention import attention_dims, attention_std, relative_positions
from transfuse.codegen.onnx.builder import OnnxBuilder
from transfuse.codegen.onnx.elementwise import activation
from transfuse.codegen.onnx.export import describe, lower_nodes, output_names
from transfuse.codegen.onnx.fused import add_norm_std
from transfuse.codegen.onnx.generation import add_cache_outputs, recording_cache_writes
from transfuse.codegen.onnx.nn import norm_weight, rms_norm_std
from transfuse.codegen.onnx.registry import out_dtype
from transfuse.codegen.onnx.tensors import onnx_dtype
from transfuse.codegen.tensorrt.ops import support_for, unsupported_ops
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.quant import unpack_codes
from transfuse.ir.types import DType, dims_equal

#: the attention forms :func:`lower_tensorrt` can write
ATTENTION_MODES = ("onnx", "decomposed")
#: what an asymmetric quantized weight becomes
ASYMMETRIC_MODES = ("correct", "refuse")
#: the opset of the ONNX Attention and RMSNormalization ops
ATTENTION_OPSET = 23
#: model metadata key of a generation graph's {cache input: written-cache output} (JSON)
CACHE_OUTPUTS_KEY = "transfuse.cache_outputs"

#: the TensorRT flavour of the ops it lowers differently from ONNX Runtime's standard form
TRT_LOWERINGS = Lowerings("tensorrt")


class TrtBuilder(OnnxBuilder):
    """The ONNX builder for TensorRT: standard ops only, opsets 21..23 (blocked
    DequantizeLinear needs 21, Attention / RMSNormalization 23), and initializers of types torch
    has no dtype for (INT4) kept as ready TensorProtos in :attr:`protos`."""

    OPSETS = range(21, 24)

    def __init__(self, graph: Graph, *, opset: int, attention: str, asymmetric: str):
        super().__init__(graph, fused=False, opset=opset)
        self.attention = attention
        self.asymmetric = asymmetric
        #: name -> TensorProto for initializers written directly (INT4 codes)
        self.protos: dict[str, TensorProto] = {}

    def proto(self, key, make, hint: str) -> str:
        """An initializer made once per ``key`` as a TensorProto by ``make(name)``."""
        def create() -> str:
            name = self.fresh(hint)
            self.protos[name] = make(name)
            return name
        return self.memo(("proto", key), create)


# -- attention -------------------------------------------------------------------------------


def onnx_attention_refuses(b: TrtBuilder, node: Node) -> str | None:
    """Why the ONNX Attention op (as TensorRT parses it) cannot compute this node."""
    if b.attention == "decomposed":
        return "attention='decomposed'"
    if b.opset < ATTENTION_OPSET:
        return f"opset {b.opset} < {ATTENTION_OPSET}"
    if node.attrs["softcap"] is not None:
        return "softcap (TensorRT's ONNX parser refuses Attention's softcap attribute)"
    (_, h, _, _), (hkv, _, _) = attention_dims(node)
    if h % hkv:
        return f"{h} query heads are not a multiple of {hkv} kv heads"
    return None


def _attention_mask(b: TrtBuilder, node: Node, dtype: DType, causal_op: bool):
    """(additive 4-D mask or "", whether it holds -inf): bias + ALiBi + causal/window/padding."""
    a = node.attrs
    (bb, h, s, _), (_, t, _) = attention_dims(node)
    parts: list[str] = []
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    kpm = node.inputs[4] if len(node.inputs) > 4 else None
    if bias is not None:
        x = b.input(node, 3, dtype)
        if bias.type.rank < 4:
            shape = (1,) * (4 - bias.type.rank) + tuple(bias.type.shape)
            x = b.add("Reshape", [x, b.reshape_target(shape)])
        parts.append(x)
    needs_rel = a["alibi"] is not None or a["window"] is not None or (a["causal"]
                                                                      and not causal_op)
    rel = b.memo(("trt-rel", str(s), str(t)), lambda: relative_positions(b, s, t)) if needs_rel else None
    if a["alibi"] is not None:
        slopes = b.const(torch.tensor(a["alibi"]).reshape(1, h, 1, 1), dtype, "alibi_slopes")
        parts.append(b.add("Mul", [slopes, b.cast(rel, DType.i64, dtype)]))
    zero, neg_inf = b.const(0.0, dtype, "zero"), b.const(float("-inf"), dtype, "neg_inf")
    infinite = False
    keep = None
    if a["causal"] and not causal_op:
        keep = b.add("LessOrEqual", [rel, b.const(0, DType.i64, "zero_i")])
    if a["window"] is not None:
        win = b.add("Greater", [rel, b.const(-a["window"], DType.i64, "window")])
        keep = win if keep is None else b.add("And", [keep, win])
    if keep is not None:
        parts.append(b.unsqueeze(b.add("Where", [keep, zero, neg_inf]), [0, 1]))
        infinite = True
    if kpm is not None:
        k4 = b.add("Reshape", [b.input(node, 4, DType.bool), b.reshape_target([bb, 1, 1, t])])
        parts.append(b.add("Where", [k4, zero, neg_inf]))
        infinite = True
    if not parts:
        return "", False
    mask = parts[0]
    for p in parts[1:]:
        mask = b.add("Add", [mask, p])
    if keep is None and not (bias is not None and bias.type.rank >= 2
                             and dims_equal(bias.type.shape[-2], s)):
        # ONNX Runtime wants the mask's S dim equal to Q's (no broadcast there)
        mask = b.add("Expand", [mask, b.shape([1, 1, s, 1])])
    return mask, infinite


@TRT_LOWERINGS.register("attention")
def _attention(b: TrtBuilder, node: Node):
    why = onnx_attention_refuses(b, node)
    if why is not None:
        b.memo(("trt-attention", why), lambda: b.notes.append(
            f"attention as MatMul-Softmax-MatMul: {why}") or why)
        return attention_std(b, node)
    a = node.attrs
    dtype = out_dtype(node)
    (_, _, s, d), (_, t, _) = attention_dims(node)
    q, k, v = (b.input(node, i, dtype) for i in range(3))
    if a["layout"] == "bshd":
        q, k, v = (b.add("Transpose", [x], perm=[0, 2, 1, 3]) for x in (q, k, v))
    causal_op = bool(a["causal"]) and a["window"] is None and dims_equal(s, t)
    mask, infinite = _attention_mask(b, node, dtype, causal_op)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    ins = [q, k, v] + ([mask] if mask else [])
    out = b.add("Attention", ins, is_causal=1 if causal_op else None, scale=float(scale))
    if infinite:  # a query whose every key is masked gives zeros in the IR, not NaN
        dead = b.add("Equal", [b.reduce("ReduceMax", mask, [-1], True),
                               b.const(float("-inf"), dtype, "neg_inf")])
        out = b.add("Where", [dead, b.const(0.0, dtype, "zero"), out])
    if a["layout"] == "bshd":
        out = b.add("Transpose", [out], perm=[0, 2, 1, 3])
    return out


# -- norms -----------------------------------------------------------------------------------


def _ones(b, x: str, x_type, nd: int, dtype: DType) -> str:
    """Ones of the normalized shape (the last ``nd`` dims of ``x``)."""
    shape = x_type.shape[x_type.rank - nd:]
    if all(isinstance(d, int) for d in shape):
        return b.const(torch.ones(shape), dtype, "ones")
    dims = b.add("Shape", [x], start=x_type.rank - nd)
    return b.add("ConstantOfShape", [dims],
                 value=helper.make_tensor("value", onnx_dtype(dtype), [1], [1.0]))


def rms_norm_trt(b: TrtBuilder, x: str, x_type, node: Node, w: Value | None) -> str:
    """``RMSNormalization`` (opset 23) computing what the IR's rms_norm does: normalized in f32
    (``stash_type=1``), cast back to x's dtype, times the weight (+ offset) in the output dtype;
    one op when those dtypes agree."""
    if b.opset < ATTENTION_OPSET:
        return rms_norm_std(b, x, x_type.dtype, node, w)
    a = node.attrs
    x_dtype, dtype = x_type.dtype, out_dtype(node)
    nd = a["normalized_ndim"]
    upcast = a["upcast"] and x_dtype not in (DType.f32, DType.f64)
    if w is not None and not upcast and x_dtype == dtype:
        scale = norm_weight(b, w, a["offset"], dtype)
        return b.add("RMSNormalization", [x, scale], axis=-nd, epsilon=a["eps"], stash_type=1)
    cdt = DType.f32 if upcast else x_dtype
    h = b.cast(x, x_dtype, cdt)
    h = b.add("RMSNormalization", [h, _ones(b, h, x_type, nd, cdt)], axis=-nd,
              epsilon=a["eps"], stash_type=1)
    h = b.cast(h, cdt, x_dtype)
    if w is None:
        return h
    return b.add("Mul", [b.cast(h, x_dtype, dtype), norm_weight(b, w, a["offset"], dtype)])


@TRT_LOWERINGS.register("rms_norm")
def _rms_norm(b, node):
    x = node.inputs[0]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return rms_norm_trt(b, b.name(x), x.type, node, w)


@TRT_LOWERINGS.register("add_norm")
def _add_norm(b, node):
    """(norm(x + residual), x + residual) as Add + LayerNormalization / RMSNormalization."""
    return add_norm_std(b, node, rms=rms_norm_trt)


# -- quantized linear layers -----------------------------------------------------------------


def _int4_proto(name: str, values: torch.Tensor) -> TensorProto:
    """An INT4 initializer of ``values`` (int8 in [-8, 7]): two per byte, the first element in
    the low nibble (the ONNX packing)."""
    flat = (values.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed = (flat[0::2] | (flat[1::2] << 4)).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), packed, raw=True)


def _qlinear_refuses(node: Node) -> str | None:
    qt = node.inputs[1].type.quant
    if qt is None:
        return "qlinear: the weight has no quant type"
    if qt.scheme not in ("int", "fp8e4m3"):
        return f"qlinear: {qt.name} has no TensorRT DequantizeLinear form"
    for i, what in ((1, "quantized weight"), (2, "scales"), (3, "zeros")):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and not v.is_const:
            return f"qlinear: the {what} must be a constant (an initializer for TensorRT)"
    return None


def _dequantized_weight(b: TrtBuilder, node: Node) -> str:
    """DequantizeLinear of the weight as [K, N] f32 (codes shifted to signed, no zero point)."""
    w, scales = node.inputs[1], node.inputs[2]
    qt = w.type.quant
    s = scales.const.to(torch.float32)  # [N, G]
    if qt.scheme == "fp8e4m3":
        codes = b.derived(("trt-fp8", id(w)), lambda: w.const.t().contiguous(), f"{w.name}_KN")
        sc = b.derived(("trt-s", id(scales)), lambda: s.reshape(-1).contiguous(),
                       f"{scales.name}_N")
        return b.add("DequantizeLinear", [codes, sc], axis=1, hint="w_dq")

    def signed() -> torch.Tensor:  # [K, N] in [-2**(bits-1), 2**(bits-1))
        q = unpack_codes(w.const, qt.bits, qt.k).to(torch.int16) - (1 << (qt.bits - 1))
        return q.to(torch.int8).t().contiguous()

    if qt.bits == 4:
        codes = b.proto(("trt-int4", id(w)), lambda name: _int4_proto(name, signed()),
                        f"{w.name}_int4_KN")
    else:
        codes = b.derived(("trt-int8", id(w)), signed, f"{w.name}_int8_KN")
    if qt.per_channel and qt.bits == 8:  # INT4 is written blocked even per channel
        sc = b.derived(("trt-s", id(scales)), lambda: s.reshape(-1).contiguous(),
                       f"{scales.name}_N")
        return b.add("DequantizeLinear", [codes, sc], axis=1, hint="w_dq")
    sc = b.derived(("trt-s", id(scales)), lambda: s.t().contiguous(), f"{scales.name}_GN")
    return b.add("DequantizeLinear", [codes, sc], axis=0, block_size=qt.group, hint="w_dq")


def _zero_correction(b: TrtBuilder, node: Node, x: str) -> str | None:
    """sum_g (sum of x over group g) * c[g, n], c = (2**(bits-1) - z) s: the part of an
    asymmetric weight the zero-point-free DequantizeLinear leaves out (None when nothing)."""
    w, scales = node.inputs[1], node.inputs[2]
    zeros = node.inputs[3] if len(node.inputs) > 3 else None
    qt = w.type.quant
    if qt.scheme != "int" or qt.symmetric or zeros is None:
        return None
    c = ((1 << (qt.bits - 1)) - zeros.const.to(torch.float32)) * scales.const.to(torch.float32)
    if not bool(c.any()):
        return None
    if b.asymmetric == "refuse":
        frac = "fractional " if not torch.equal(zeros.const.round(), zeros.const) else ""
        raise LoweringError(f"{describe(node)}: {qt} has {frac}zero points; TensorRT's "
                            "DequantizeLinear takes none (asymmetric='refuse')")
    xv = node.inputs[0]
    if qt.per_channel:
        cn = b.derived(("trt-zc", id(zeros)), lambda: c.reshape(-1).contiguous(),
                       f"{zeros.name}_corr_N")
        return b.add("Mul", [b.reduce("ReduceSum", x, [-1], True), cn])
    cg = b.derived(("trt-zc", id(zeros)), lambda: c.t().contiguous(), f"{zeros.name}_corr_GN")
    grouped = b.add("Reshape", [x, b.ints([0] * (xv.type.rank - 1) + [qt.groups, qt.group])])
    return b.add("MatMul", [b.reduce("ReduceSum", grouped, [-1], False), cg])


@TRT_LOWERINGS.register("qlinear", supports=_qlinear_refuses)
def _qlinear(b: TrtBuilder, node: Node):
    """x @ DequantizeLinear(W)[K, N] (+ zero-point correction) + bias, then the activation,
    computed in f32."""
    dtype = out_dtype(node)
    x = b.input(node, 0, DType.f32)
    y = b.add("MatMul", [x, _dequantized_weight(b, node)])
    fix = _zero_correction(b, node, x)
    if fix is not None:
        y = b.add("Add", [y, fix])
    bias = b.input(node, 4, DType.f32) if len(node.inputs) > 4 and node.inputs[4] is not None \
        else ""
    return b.cast(activation(b, node, y, bias, node.attrs["activation"], DType.f32),
                  DType.f32, dtype)


def _qmatmul_refuses(node: Node) -> str:
    return ("qmatmul (W8A8): the IR quantizes activations to u8 with a zero point computed at "
            "run time; TensorRT's QuantizeLinear takes zero zero points and constant scales, so "
            "this form has no exact TensorRT equivalent (use int8/int4 weight-only or fp8)")


@TRT_LOWERINGS.register("qmatmul", supports=_qmatmul_refuses)
def _qmatmul(b, node):  # never called: supports() refuses every qmatmul
    raise LoweringError(_qmatmul_refuses(node))


# -- the model -------------------------------------------------------------------------------


def check_strongly_typed(model: onnx.ModelProto) -> None:
    """Strict ONNX shape inference (types checked) must give every value an element type;
    raises :class:`LoweringError` naming the values it cannot type.

    Without ``data_prop``: onnx 1.23's data propagation takes the values of a Range-made
    [1, T] - [S, 1] subtraction for shapes and reports a false broadcasting error."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # onnx raises InferenceError / ValidationError
        raise LoweringError(f"tensorrt: the ONNX model is not strongly typed: {e}") from None
    g = inferred.graph
    known = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        known[vi.name] = vi.type.tensor_type.elem_type
    missing = [o for n in g.node for o in n.output if o and not known.get(o)]
    if missing:
        raise LoweringError(f"tensorrt: no element type inferred for {len(missing)} values "
                            f"(first: {missing[:5]})")


def lower_tensorrt(graph: Graph, signature=None, *, opset: int = ATTENTION_OPSET,
                   attention: str = "onnx", trt_version: str = "10.14",
                   asymmetric: str = "correct") -> onnx.ModelProto:
    """``graph`` as a self-contained ONNX model for TensorRT ``trt_version``'s ONNX parser.

    ``attention``: "onnx" (the Attention op where it expresses the node; TensorRT >= 10.14,
    opset 23) or "decomposed" (MatMul-Softmax-MatMul everywhere). ``opset``: 21..23 (blocked
    DequantizeLinear needs 21; Attention and RMSNormalization 23, decomposed below).
    ``asymmetric``: "correct" (zero points as an exact correction term) or "refuse". Raises
    :class:`LoweringError` naming the node for what TensorRT cannot take.
    """
    if attention not in ATTENTION_MODES:
        raise LoweringError(f"tensorrt: attention must be one of {ATTENTION_MODES}, "
                            f"got {attention!r}")
    if asymmetric not in ASYMMETRIC_MODES:
        raise LoweringError(f"tensorrt: asymmetric must be one of {ASYMMETRIC_MODES}, "
                            f"got {asymmetric!r}")
    if opset not in TrtBuilder.OPSETS:
        raise LoweringError(f"tensorrt: opset {opset} is not supported (21..23: blocked "
                            "DequantizeLinear needs 21, Attention/RMSNormalization 23)")
    support = support_for(trt_version)
    if attention == "onnx" and "Attention" not in support.ops:
        raise LoweringError(f"tensorrt: TensorRT {trt_version} has no native ONNX Attention "
                            "(10.14+): use attention='decomposed'")
    if opset not in support.opsets:
        raise LoweringError(f"tensorrt: TensorRT {trt_version} parses opsets "
                            f"{support.opsets.start}..{support.opsets.stop - 1}, not {opset}")
    b = TrtBuilder(graph, opset=opset, attention=attention, asymmetric=asymmetric)
    generation = any(n.op == "cached_attention" for n in graph.nodes)
    with recording_cache_writes(graph) if generation else contextlib.nullcontext({}) as writes:
        lower_nodes(b, TRT_LOWERINGS)
    model, _ = b.build(output_names(signature, len(graph.outputs)))
    used = {i for n in model.graph.node for i in n.input}
    model.graph.initializer.extend(p for k, p in b.protos.items() if k in used)
    if writes:  # a generation graph: each written KV cache is an extra output
        entry = model.metadata_props.add()
        entry.key = CACHE_OUTPUTS_KEY
        entry.value = json.dumps(add_cache_outputs(model, writes))
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(
        list(model.opset_import)))
    check_strongly_typed(model)
    bad = unsupported_ops(model, trt_version)
    if bad:
        raise LoweringError(f"tensorrt: the lowered model uses what TensorRT {trt_version} "
                            f"does not parse: {bad}")
    return model


__all__ = ["lower_tensorrt", "CACHE_OUTPUTS_KEY", "check_strongly_typed", "onnx_attention_refuses", "rms_norm_trt",
           "TrtBuilder", "TRT_LOWERINGS", "ATTENTION_MODES", "ASYMMETRIC_MODES"]
