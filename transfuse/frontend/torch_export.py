"""The torch frontend: ``torch.export`` (non-strict) -> IR :class:`Graph`.

    captured = capture(model, (input_ids,), {"attention_mask": mask}, dynamic={"seq": (1, 1024)})
    captured.graph, captured.signature, captured.example_inputs

How it works:

1. The call is bound to ``forward()``'s parameters. Tensors become graph
   inputs named after their parameter; ``None`` and int/float/bool arguments are
   baked into the capture (recorded in the signature, checked on every call);
   anything else is a :class:`CaptureError` naming the argument.
2. A thin wrapper module calls the model with the flat tensors and flattens
   whatever it returns (tensor, tuple, list, dict, dataclass such as Hugging
   Face's ``ModelOutput``) with :func:`output_tree`; the graph outputs are the
   leaves in order.
3. The dynamic spec (``dynamic.py``) becomes ``torch.export.Dim`` objects named
   after the user's symbols; torch's symbols (``s70``) are mapped back to ours
   (``seq``) and every SymInt expression (``FloorDiv``, ``Mod``, ...) to sympy.
4. Each aten node is converted by its entry in ``frontend/aten/`` (one file per op
   family); anything without one becomes ``torch_fallback`` (counted in
   ``graph.meta["fallbacks"]``).
   IR nodes are created without output types so inference runs, and the result
   is compared with torch's own FakeTensor type: a disagreement is a frontend
   bug and raises :class:`CaptureError` naming the aten op and module path.
5. Every IR node carries ``meta["source"]`` (module path, ``h.3.attn``; the
   root module is ``""``) and ``meta["loc"]`` (``file.py:123``, the innermost
   frame outside torch).

The model's state is never changed: a model in training mode is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx

from transfuse.errors import CaptureError, InputError, TransfuseError
from transfuse.frontend import aten
from transfuse.frontend.aten import Opaque
from transfuse.frontend.dynamic import DynamicSpec, resolve
from transfuse.ir.graph import Graph, Value
from transfuse.ir.ops import get_op
from transfuse.ir.signature import InputSpec, Signature, output_tree
from transfuse.ir.types import DType, TensorType, normalize_dim, resolve_min_max, sym
from transfuse.ir.verify import verify

log = logging.getLogger(__name__)

_WRAPPED = "model"  # attribute name of the user's model inside the capture wrapper
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


@dataclasses.dataclass
class Captured:
    """What capture produces: the graph, the calling convention and the example's flat inputs."""

    graph: Graph
    signature: Signature
    example_inputs: list[torch.Tensor]


def capture(
    model: torch.nn.Module,
    args: Sequence[Any] | torch.Tensor,
    kwargs: Mapping[str, Any] | None = None,
    dynamic: Mapping[str, Any] | None = None,
) -> Captured:
    """Capture ``model(*args, **kwargs)`` into an IR graph with ``torch.export`` (non-strict).

    ``dynamic`` maps symbol names to ranges (see ``transfuse.frontend.dynamic``).
    Raises :class:`CaptureError` for a model in training mode, a bad argument, a bad
    dynamic spec, an export failure, or a dim the model specialised.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise CaptureError(
            f"the model is in training mode ({training[0]!r} has training=True); dropout would be "
            "random. Call model.eval() before capturing"
        )
    if isinstance(args, torch.Tensor):
        args = (args,)
    call = _bind_call(model, tuple(args), dict(kwargs or {}))
    tensors = {p.name: p.value for p in call if p.is_tensor}
    spec = resolve(dynamic, tensors, [p.name for p in call] + _param_names(model))
    names = list(tensors)
    traced = spec.export_examples(tensors)
    trees: list[dict] = []
    wrapper = _FlatCall(model, call, trees)
    ep = _export(wrapper, tuple(traced[n] for n in names), names, spec)
    if not trees:
        raise CaptureError("torch.export did not run forward(); cannot record the output structure")
    graph = _Converter(ep, names, spec).run()
    by_name = {v.name: v for v in graph.inputs}
    inputs = [InputSpec(p.name, by_name[p.name].type, p.keyword) for p in call if p.is_tensor]
    baked = [
        InputSpec(p.name, None, p.keyword, optional=p.value is None, value=p.value)
        for p in call
        if not p.is_tensor
    ]
    positional = [p.name for p in call if not p.keyword] if baked else None
    log.debug(
        "captured %s: %d nodes, fallbacks %s, symbols %s",
        type(model).__name__,
        len(graph),
        graph.meta["fallbacks"],
        spec.ranges(),
    )
    signature = Signature(inputs, spec.ranges(), trees[-1], len(graph.outputs), baked, positional)
    return Captured(graph, signature, [tensors[n] for n in names])


# -- binding the call ------------------------------------------------------------


@dataclasses.dataclass
class _Param:
    name: str
    value: Any
    keyword: bool

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.value, torch.Tensor)


def _param_names(model: torch.nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def _bind_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[_Param]:
    """Name every argument after forward()'s parameters; check its kind."""
    try:
        sig = inspect.signature(model.forward)
        params = list(sig.parameters.values())
    except (TypeError, ValueError):
        params = []
    call: list[_Param] = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = next((p for p in params if p.kind == p.VAR_POSITIONAL), None)
    for i, a in enumerate(args):
        if i < len(positional):
            name = positional[i].name
        elif var_pos is not None:
            name = f"{var_pos.name}_{i - len(positional)}"
        elif params:
            raise CaptureError(
                f"{type(model).__name__}.forward takes {len(positional)} positional inputs "
                f"({', '.join(p.name for p in positional)}), got {len(args)}"
            )
        else:
            name = f"arg{i}"
        call.append(_Param(name, a, False))
    known = {p.name for p in params}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    taken = {p.name for p in call}
    for k, a in kwargs.items():
        if params and k not in known and not var_kw:
            raise CaptureError(
                f"{type(model).__name__}.forward has no parameter {k!r} "
                f"(parameters: {', '.join(p.name for p in params)})"
            )
        if k in taken:
            raise CaptureError(f"argument {k!r} given both positionally and as a keyword")
        call.append(_Param(k, a, True))
    for p in call:
        v = p.value
        if isinstance(v, torch.Tensor):
            if v.is_sparse or v.layout != torch.strided:
                raise CaptureError(
                    f"argument {p.name!r}: only dense (strided) tensors are supported"
                )
            try:
                DType.from_torch(v.dtype)
            except TransfuseError:
                raise CaptureError(
                    f"argument {p.name!r}: dtype {v.dtype} is not supported"
                ) from None
        elif v is not None and not isinstance(v, (bool, int, float)):
            raise CaptureError(
                f"argument {p.name!r} is a {type(v).__name__}; capture takes tensors, None and "
                "int/float/bool constants (pass nested tensors as separate arguments)"
            )
    return call


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _FlatCall(torch.nn.Module):
    """Calls the user's model with flat tensors; returns the flat output leaves.

    The output structure is recorded (with :func:`output_tree`) into ``trees``
    each time forward runs under export.
    """

    def __init__(self, model: torch.nn.Module, call: list[_Param], trees: list):
        super().__init__()
        setattr(self, _WRAPPED, model)
        slots, n = [], 0
        for p in call:
            if p.is_tensor:
                slots.append((p, _Slot(n)))
                n += 1
            else:
                slots.append((p, p.value))
        self._args = [v for p, v in slots if not p.keyword]
        self._kwargs = {p.name: v for p, v in slots if p.keyword}
        self._trees = trees

    def forward(self, *flat):
        args = [flat[a.index] if isinstance(a, _Slot) else a for a in self._args]
        kwargs = {k: flat[v.index] if isinstance(v, _Slot) else v for k, v in self._kwargs.items()}
        out = getattr(self, _WRAPPED)(*args, **kwargs)
        leaves: list = []
        try:
            tree = output_tree(out, leaves)
        except InputError as e:
            raise CaptureError(f"the model's output cannot be captured: {e}") from None
        self._trees.append(tree)
        return tuple(leaves)


# -- export ------------------------------------------------------------------------


def _export(wrapper: _FlatCall, flat: tuple, names: list[str], spec: DynamicSpec):
    dyn = spec.torch_dynamic_shapes(names)
    kwargs = {"dynamic_shapes": (dyn,)} if any(d is not None for d in dyn) else {}
    try:
        ep = torch.export.export(wrapper, flat, strict=False, **kwargs)
        if _has_mutation(ep.graph):
            # export's training IR keeps in-place ops (add_, zero_, ...); with an empty
            # decomposition table run_decompositions only functionalizes them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree notice
                ep = ep.run_decompositions({})
        return ep
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - every export failure becomes one CaptureError
        cause = e
        while cause is not None and not isinstance(cause, CaptureError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, CaptureError):
            raise cause from None
        raise CaptureError(_summarise_export_error(e, spec, names)) from e


_METADATA_ONLY_INPLACE = {"aten::detach_"}  # "mutable" in the schema, but values are unchanged


def _has_mutation(g: fx.Graph) -> bool:
    return any(
        isinstance(n.target, torch._ops.OpOverload)
        and n.target._schema.is_mutable
        and n.target._schema.name not in _METADATA_ONLY_INPLACE
        for n in g.nodes
        if n.op == "call_function"
    )


def _summarise_export_error(e: BaseException, spec: DynamicSpec, names: list[str]) -> str:
    text = re.sub(r"L\['flat'\]\[(\d+)\]", lambda m: _input_name(names, int(m.group(1))), str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Constraints violated" in text or "specialized it to be a constant" in text:
        names = [n for n in spec.symbols if re.search(rf"\b{re.escape(n)}\b", text)] or list(
            spec.symbols
        )
        where = "; ".join(
            f"{n!r} = " + ", ".join(f"{i}[{d}]" for i, d in spec.symbols[n].dims)
            for n in names
            if n in spec.symbols
        )
        reasons = [
            ln.lstrip("- ").split(" If you're using")[0].rstrip(".")
            for ln in lines
            if ln.startswith("- ")
        ]
        fixes = [ln for ln in lines if re.match(r"^\w+ = ", ln)]
        msg = (
            f"the model does not keep dynamic dim(s) {', '.join(map(repr, names))} ({where}) "
            f"dynamic: torch reported: {reasons[0] if reasons else lines[0]}"
        )
        if fixes:
            msg += f" (torch suggests: {'; '.join(fixes)})"
        return msg + ". Narrow the range, make the dim static, or remove the code that fixes it"
    first = lines[0] if lines else type(e).__name__
    where = _user_frame(e)
    msg = f"torch.export failed: {type(e).__name__}: {first}" + (f" (at {where})" if where else "")
    if spec.widened:
        sizes = ", ".join(f"{n} 1 -> {k}" for n, k in spec.widened.items())
        msg += (
            f". Note: torch specialises size-1 dims, so capture traced with the dynamic dims "
            f"widened ({sizes}); if another input shares such a dim, name it in 'dims', or give "
            "an example with sizes >= 2"
        )
    return msg


def _input_name(names: list[str], i: int) -> str:
    return names[i] if i < len(names) else f"input {i}"


def _user_frame(e: BaseException) -> str:
    """The innermost traceback frame outside torch and this file, as 'file.py:12: code'."""
    import traceback

    best = ""
    for fr in traceback.extract_tb(e.__traceback__):
        if _is_user_file(fr.filename):
            best = f"{os.path.basename(fr.filename)}:{fr.lineno}: {(fr.line or '').strip()}"
    return best


def _is_user_file(path: str) -> bool:
    path = os.path.abspath(path)
    return not path.startswith(_TORCH_DIR) and path != _THIS_FILE and "<" not in path


# -- symbols -----------------------------------------------------------------------

_FUNCS = {
    "FloorDiv": lambda a, b: sympy.floor(a / b),
    "CeilDiv": lambda a, b: sympy.ceiling(a / b),
    "CleanDiv": lambda a, b: a / b,
    "IntTrueDiv": lambda a, b: a / b,
    "PythonMod": sympy.Mod,
    "Mod": sympy.Mod,
    "ModularIndexing": lambda x, d, m: sympy.Mod(sympy.floor(x / d), m),
    "Max": sympy.Max,
    "Min": sympy.Min,
    "FloorToInt": sympy.floor,
    "CeilToInt": sympy.ceiling,
    "TruncToInt": sympy.floor,  # sizes are non-negative
    "PowByNatural": lambda a, b: a**b,
    "Identity": lambda a: a,
}


class SymbolMap:
    """torch's shape symbols -> the user's named symbols. ``ranges`` (the dynamic spec's
    inclusive ranges by our names, which the compiled model's input checks enforce) decide
    Max/Min exactly where they can (``resolve_min_max``)."""

    def __init__(self, ranges: Mapping[str, tuple[int, int]] | None = None):
        self.map: dict[sympy.Symbol, sympy.Symbol] = {}
        self.ranges = dict(ranges or {})

    def expr(self, e: Any, where: str = "") -> Any:
        """A torch SymInt / sympy expression as an IR dim (int or sympy over our symbols)."""
        if isinstance(e, torch.SymInt):
            e = e.node.expr
        if isinstance(e, bool):
            raise CaptureError(f"{where}: expected an int, got {e!r}")
        if isinstance(e, int):
            return e
        return resolve_min_max(normalize_dim(self._convert(sympy.sympify(e), where)),
                               self.ranges)

    def _convert(self, e, where):
        if e.is_Integer:
            return sympy.Integer(int(e))
        if e.is_Number:
            return e
        if e.is_Symbol:
            if e in self.map:
                return self.map[e]
            if e.name.startswith("u"):
                raise CaptureError(
                    f"{where}: a shape depends on tensor values (unbacked symbol {e.name}); "
                    "capture needs shapes that follow from the input shapes"
                )
            raise CaptureError(
                f"{where}: torch symbol {e.name} is not one of the declared dynamic dims"
            )
        args = [self._convert(a, where) for a in e.args]
        name = type(e).__name__
        if name in _FUNCS:
            return _FUNCS[name](*args)
        if isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow)):
            return e.func(*args)
        raise CaptureError(f"{where}: cannot represent the shape expression {e} ({name})")


# -- conversion ----------------------------------------------------------------------


class _Converter:
    """Walks the exported fx graph and builds the IR graph through the ``frontend.aten`` table."""

    def __init__(self, ep, input_names: list[str], spec: DynamicSpec):
        self.ep = ep
        self.input_names = input_names
        self.spec = spec
        self.graph = Graph("main")
        self.symbols = SymbolMap(spec.ranges())
        self.env: dict[fx.Node, Any] = {}
        self.fallbacks: Counter = Counter()
        self.fallback_reasons: list[str] = []
        self.dropped_asserts = 0
        self._consts: dict[tuple, Value] = {}

    # -- driver ------------------------------------------------------------------------

    def run(self) -> Graph:
        sig = self.ep.graph_signature
        placeholders = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        self._bind_symbols(placeholders)
        specs = list(zip(placeholders, sig.input_specs))
        user = iter(self.input_names)
        for n, ispec in specs:  # user inputs first: they keep their names
            if ispec.kind.name == "USER_INPUT":
                self.env[n] = self.graph.add_input(next(user), self.meta_type(n, n.meta["val"]))
        for n, ispec in specs:
            kind = ispec.kind.name
            if kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                self.env[n] = self._constant(ispec.target)
            elif kind != "USER_INPUT":
                raise CaptureError(
                    f"exported graph has an input of kind {kind} ({ispec.target}); not supported"
                )
        for spec in sig.output_specs:
            if spec.kind.name != "USER_OUTPUT":
                raise CaptureError(
                    f"the model mutates {spec.target!r} during forward ({spec.kind.name}); "
                    "capture needs a forward without side effects"
                )
        self.convert_graph(self.ep.graph)
        self._dead_code()
        self.graph.remove_unused_constants()
        for node in self.graph.nodes:
            if node.op == "torch_fallback":
                self.fallbacks[node.attrs["target"]] += 1
        self.graph.meta["fallbacks"] = dict(self.fallbacks)
        if self.fallback_reasons:
            self.graph.meta["fallback_reasons"] = list(self.fallback_reasons)
        self.graph.meta["dropped_asserts"] = self.dropped_asserts
        try:
            verify(self.graph)
        except TransfuseError as e:
            raise CaptureError(f"frontend bug: the captured graph does not verify: {e}") from e
        return self.graph

    def convert_graph(self, g: fx.Graph, outputs_to: list | None = None) -> None:
        for n in g.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outs = n.args[0]
                vals = [self.lookup(o) for o in outs]
                if outputs_to is not None:
                    outputs_to.extend(vals)
                    return
                for o, v in zip(outs, vals):
                    if not isinstance(v, Value):
                        raise CaptureError(f"output {o} of the model is not a tensor ({v!r})")
                self.graph.set_outputs(vals)
                return
            if n.op == "get_attr":
                self.env[n] = _get_attr(self.ep.graph_module, n.target)
                continue
            if n.op != "call_function":
                raise CaptureError(f"unexpected fx node {n.op} {n.target}")
            self.current = n
            self.env[n] = self._convert_node(n)

    def _convert_node(self, n: fx.Node) -> Any:
        target = n.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return aten.convert_higher_order(self, n)
        if not isinstance(target, torch._ops.OpOverload):
            # python operators on SymInts (operator.mul, sym_max, getitem on lists, ...)
            if target.__name__ == "getitem" and isinstance(self.env.get(n.args[0]), (list, tuple)):
                return self.env[n.args[0]][n.args[1]]
            return self.meta_scalar(n)
        fn = aten.lookup(target)
        a = normalize_args(target, n)
        result = fn(self, a) if fn is not None else None
        if fn is None or result is aten.FALLBACK:
            result = self.fallback(n)
        self._check(n, result)
        return result

    def _check(self, n: fx.Node, result: Any) -> None:
        val = n.meta.get("val")
        pairs = []
        if isinstance(val, torch.Tensor):
            pairs = [(result, val)]
        elif isinstance(val, (list, tuple)) and isinstance(result, (list, tuple)):
            pairs = [
                (r, v) for r, v in zip(result, val) if isinstance(v, torch.Tensor) and r is not None
            ]
        for r, v in pairs:
            if not isinstance(r, Value):
                raise CaptureError(
                    f"frontend bug: {self.op_name(n)} at {self.where(n)} produced {r!r}, not a tensor"
                )
            want = self.meta_type(n, v)
            if r.type != want:
                raise CaptureError(
                    f"frontend bug: {self.op_name(n)} at {self.where(n)}: the IR infers {r.type} "
                    f"but torch says {want}"
                )

    def _dead_code(self) -> None:
        outputs = {id(v) for v in self.graph.outputs}
        for node in reversed(self.graph.nodes):
            if not get_op(node.op).pure:
                continue
            if any(v.uses or id(v) in outputs for v in node.outputs):
                continue
            self.graph.erase(node)

    def _bind_symbols(self, placeholders: list[fx.Node]) -> None:
        user = [
            n
            for n, s in zip(placeholders, self.ep.graph_signature.input_specs)
            if s.kind.name == "USER_INPUT"
        ]
        by_name = dict(zip(self.input_names, user))
        for (inp, d), name in self.spec.dim_names().items():
            size = by_name[inp].meta["val"].shape[d]
            expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
            if not expr.is_Symbol:
                raise CaptureError(
                    f"dynamic dim {name!r} ({inp}[{d}]) came out of export as {expr}; the model "
                    "fixes it. Make it static or remove the code that specialises it"
                )
            ours = sym(name)
            prev = self.symbols.map.setdefault(expr, ours)
            if prev != ours:
                raise CaptureError(
                    f"torch found dynamic dims {prev.name!r} and {name!r} to be equal in the model; "
                    "declare them as one symbol"
                )

    def _constant(self, target: str) -> Value:
        tensor = self.ep.state_dict.get(target)
        if tensor is None:
            tensor = self.ep.constants.get(target)
        if tensor is None:
            raise CaptureError(f"no payload found for exported constant {target!r}")
        name = target[len(_WRAPPED) + 1 :] if target.startswith(_WRAPPED + ".") else target
        try:
            DType.from_torch(tensor.dtype)
        except TransfuseError:
            raise CaptureError(f"constant {name!r} has unsupported dtype {tensor.dtype}") from None
        return self.graph.add_constant(tensor.detach(), name)

    # -- helpers for the aten converters -------------------------------------------------

    current: fx.Node

    def op_name(self, n: fx.Node | None = None) -> str:
        t = (n or self.current).target
        if isinstance(t, torch._ops.OpOverload):
            s = t._schema
            return f"{s.name}.{s.overload_name or 'default'}"
        return getattr(t, "__name__", str(t))

    def where(self, n: fx.Node | None = None) -> str:
        src, loc = node_source(n or self.current), node_loc(n or self.current)
        return f"{src or '<root>'}" + (f" ({loc})" if loc else "")

    def meta_type(self, n: fx.Node, val: torch.Tensor) -> TensorType:
        where = f"{self.op_name(n) if n.op == 'call_function' else n.name} at {self.where(n)}"
        try:
            dtype = DType.from_torch(val.dtype)
        except TransfuseError:
            raise CaptureError(f"{where}: dtype {val.dtype} is not supported") from None
        return TensorType(dtype, [self.symbols.expr(d, where) for d in val.shape])

    def out_val(self):
        return self.current.meta.get("val")

    def out_type(self) -> TensorType:
        return self.meta_type(self.current, self.out_val())

    def lookup(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            if x not in self.env:
                raise CaptureError(f"frontend bug: {x.name} used before it was converted")
            return self.env[x]
        return x

    def value(self, x: Any) -> Value:
        v = self.lookup(x)
        if not isinstance(v, Value):
            raise CaptureError(f"{self.op_name()} at {self.where()}: expected a tensor, got {v!r}")
        return v

    def scalar(self, x: Any) -> Any:
        """A non-tensor argument as a python value or IR dim (sympy) for SymInts."""
        v = self.lookup(x)
        if isinstance(v, Opaque):
            raise CaptureError(
                f"{self.op_name()} at {self.where()}: uses a scalar that {v.reason} "
                f"({self.op_name(v.node)} at {self.where(v.node)})"
            )
        if isinstance(v, (list, tuple)):
            return type(v)(self.scalar(e) for e in v)
        return v

    def dim(self, x: Any) -> Any:
        d = self.scalar(x)
        if isinstance(d, bool) or not isinstance(d, (int, sympy.Basic)):
            raise CaptureError(f"{self.op_name()} at {self.where()}: expected an int, got {d!r}")
        return normalize_dim(d)

    def meta_scalar(self, n: fx.Node) -> Any:
        """The value of a node that computes a python scalar (sym_size, operator.mul, ...)."""
        val = n.meta.get("val")
        where = f"{self.op_name(n)} at {self.where(n)}"
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            expr = val.node.expr
            if any(s.name.startswith("u") for s in getattr(expr, "free_symbols", ())):
                return Opaque(n, "is read from tensor values; capture needs it static")
            if isinstance(val, torch.SymInt):
                return self.symbols.expr(val, where)
            if not expr.free_symbols:
                return float(expr) if isinstance(val, torch.SymFloat) else bool(expr)
            return Opaque(n, f"is a symbolic {type(val).__name__} ({expr}) the IR cannot hold")
        if val is None or isinstance(val, (bool, int, float)):
            return val
        return Opaque(n, f"is a {type(val).__name__}")

    def emit(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict | None = None,
        out_types: Sequence[TensorType] | None = None,
    ) -> Any:
        """Create an IR node carrying the current source; its value, or its values when it
        has several outputs. Types are inferred unless ``out_types`` is given."""
        meta = {"source": node_source(self.current), "loc": node_loc(self.current)}
        try:
            node = self.graph.create(op, list(inputs), attrs or {}, meta=meta, out_types=out_types)
        except TransfuseError as e:
            raise CaptureError(
                f"frontend bug: converting {self.op_name()} at {self.where()} to {op}: {e}"
            ) from e
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def op(self, op: str, *inputs: Value | None, **attrs) -> Value:
        return self.emit(op, inputs, attrs)

    def const(self, value: Any, dtype: DType) -> Value:
        """A shared 0-d constant (one per value and dtype)."""
        key = (repr(value), dtype)
        if key not in self._consts:
            self._consts[key] = self.graph.add_constant(torch.tensor(value, dtype=dtype.torch), "c")
        return self._consts[key]

    def fallback_because(self, reason: str) -> Any:
        """A converter's way to keep the current node as ``torch_fallback`` with a reason:
        logged, and listed in ``graph.meta["fallback_reasons"]``; returns FALLBACK."""
        msg = f"{self.op_name()} at {self.where()} stays a torch fallback: {reason}"
        log.info(msg)
        self.fallback_reasons.append(msg)
        return aten.FALLBACK

    def fallback(self, n: fx.Node) -> Any:
        """Keep ``n`` as a ``torch_fallback`` node (output types from torch's meta)."""
        return aten.emit_fallback(self, n)

    def drop_assert(self) -> None:
        self.dropped_asserts += 1


def normalize_args(target: torch._ops.OpOverload, n: fx.Node) -> dict[str, Any]:
    """Args of an aten call by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(target._schema.arguments):
        if i < len(n.args) and not arg.kwarg_only:
            out[arg.name] = n.args[i]
        elif arg.name in n.kwargs:
            out[arg.name] = n.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# -- provenance ------------------------------------------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def node_source(n: fx.Node) -> str:
    """The user's module path of an fx node (``h.3.attn``; ``""`` for the root module)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if not isinstance(path, str) or path.startswith("_empty_nn_module_stack"):
        return ""
    path = re.sub(r"@\d+$", "", path)
    if path == _WRAPPED:
        return ""
    if path.startswith(_WRAPPED + "."):
        return path[len(_WRAPPED) + 1 :]
    return path


def node_loc(n: fx.Node) -> str:
    """``file.py:123`` of the innermost frame of the node's stack trace outside torch."""
    trace = n.meta.get("stack_trace") or ""
    best = ""
    for m in _FRAME.finditer(trace):
        if _is_user_file(m.group(1)):
            best = f"{os.path.basename(m.group(1))}:{m.group(2)}"
    return best


__all__ = ["Captured", "capture", "node_source", "node_loc"]
