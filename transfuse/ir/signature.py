"""The calling convention of a compiled model.

A :class:`Signature` records, from capture, what the model takes (named
positional and keyword tensor inputs, their types with symbolic dims and the
range of each symbol) and the structure of what it returns (an output tree
whose leaves index the graph's flat outputs). It checks calls up front and
raises :class:`InputError` naming the input, what it got and what it expects.

It serialises to plain JSON: a loaded artifact rebuilds it without pickle.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from transfuse.errors import ArtifactError, InputError
from transfuse.ir.types import DType, TensorType, dim_str, eval_dim

#: modules whose dataclass output types a loaded artifact may rebuild (import only, no code run)
TRUSTED_OUTPUT_MODULES = ("transformers.", "torch.", "transfuse.")


@dataclasses.dataclass
class InputSpec:
    name: str
    type: TensorType | None  # None for a baked argument (not a graph input)
    keyword: bool = False  # passed as a keyword argument
    optional: bool = False  # captured as None (then not a graph input)
    value: Any = None  # baked arguments: the None/int/float/bool captured


@dataclasses.dataclass
class Signature:
    inputs: list[InputSpec]  # the graph inputs, in order
    symbols: dict[str, tuple[int, int]]  # name -> (min, max), inclusive
    output_tree: dict
    num_outputs: int
    #: arguments fixed at capture (None, int, float, bool): not graph inputs; a call may
    #: omit them or repeat the captured value, anything else is an InputError
    baked: list[InputSpec] = dataclasses.field(default_factory=list)
    #: names of the positional parameters in call order, baked ones included
    #: (None: the non-keyword entries of ``inputs``)
    positional: list[str] | None = None

    # -- calling -------------------------------------------------------------

    def flatten_inputs(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Match a call against the signature; return graph inputs in order, checked."""
        positional = self.positional
        if positional is None:
            positional = [s.name for s in self.inputs if not s.keyword]
        if len(args) > len(positional):
            raise InputError(f"expected at most {len(positional)} positional inputs "
                             f"({', '.join(positional)}), got {len(args)}")
        given: dict[str, Any] = dict(zip(positional, args))
        known = {s.name for s in self.inputs} | {s.name for s in self.baked}
        for k, a in kwargs.items():
            if k not in known:
                raise InputError(f"unexpected keyword input {k!r}; the model takes {sorted(known)}")
            if k in given:
                raise InputError(f"input {k!r} given both positionally and as a keyword")
            given[k] = a
        for spec in self.baked:
            if spec.name in given and not _same_value(given[spec.name], spec.value):
                raise InputError(f"input {spec.name!r} was {spec.value!r} when the model was captured, "
                                 f"got {_describe(given[spec.name])}; recompile to change it")
        flat: list[torch.Tensor] = []
        env: dict[str, int] = {}
        for spec in self.inputs:
            if spec.name not in given:
                raise InputError(f"missing input {spec.name!r} ({spec.type})")
            t = given[spec.name]
            self._check(spec, t, env)
            flat.append(t)
        return flat

    def _check(self, spec: InputSpec, t: Any, env: dict[str, int]) -> None:
        want = spec.type
        if not isinstance(t, torch.Tensor):
            raise InputError(f"input {spec.name!r}: expected a tensor {want}, got {type(t).__name__}")
        if t.dtype != want.dtype.torch:
            raise InputError(f"input {spec.name!r}: expected dtype {want.dtype} ({want.dtype.torch}), "
                             f"got {t.dtype}")
        if t.dim() != want.rank:
            raise InputError(f"input {spec.name!r}: expected rank {want.rank} {want}, "
                             f"got shape {list(t.shape)}")
        for i, (d, actual) in enumerate(zip(want.shape, t.shape)):
            if isinstance(d, int):
                if d != actual:
                    raise InputError(f"input {spec.name!r}: dim {i} must be {d} (static in {want}), "
                                     f"got {actual} in shape {list(t.shape)}")
                continue
            if d.is_Symbol:
                name = d.name
                lo, hi = self.symbols.get(name, (0, 2**63 - 1))
                if not lo <= actual <= hi:
                    raise InputError(f"input {spec.name!r}: dim {i} ({name}) = {actual} is outside "
                                     f"the compiled range [{lo}, {hi}]")
                prev = env.setdefault(name, int(actual))
                if prev != actual:
                    raise InputError(f"input {spec.name!r}: dim {i} ({name}) = {actual}, but {name} = "
                                     f"{prev} in an earlier input")
            else:
                try:
                    expect = eval_dim(d, env)
                except Exception:  # noqa: BLE001 - symbol bound by a later input
                    continue
                if expect != actual:
                    raise InputError(f"input {spec.name!r}: dim {i} must be {dim_str(d)} = {expect}, "
                                     f"got {actual}")

    def build_outputs(self, flat: Sequence[torch.Tensor]) -> Any:
        return _build(self.output_tree, flat)

    # -- serialisation ---------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "inputs": [{"name": s.name, "type": str(s.type), "keyword": s.keyword,
                        "optional": s.optional} for s in self.inputs],
            "symbols": {k: list(v) for k, v in self.symbols.items()},
            "output_tree": self.output_tree,
            "num_outputs": self.num_outputs,
            "baked": [{"name": s.name, "keyword": s.keyword, "optional": s.optional,
                       "value": s.value} for s in self.baked],
            "positional": self.positional,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        try:
            inputs = [InputSpec(d["name"], TensorType.parse(d["type"]), bool(d["keyword"]),
                                bool(d.get("optional", False))) for d in data["inputs"]]
            symbols = {k: (int(v[0]), int(v[1])) for k, v in data["symbols"].items()}
            baked = [InputSpec(d["name"], None, bool(d["keyword"]), bool(d.get("optional", False)),
                               d.get("value")) for d in data.get("baked", [])]
            positional = data.get("positional")
            return cls(inputs, symbols, data["output_tree"], int(data["num_outputs"]), baked,
                       None if positional is None else [str(n) for n in positional])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(f"signature in manifest is malformed: {e!r}") from None


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {list(v.shape)}"
    return repr(v)


# -- output trees ----------------------------------------------------------------


def output_tree(obj: Any, leaves: list) -> dict:
    """Describe ``obj``'s structure; tensors are appended to ``leaves`` and referenced by index."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return {"kind": "tensor", "index": len(leaves) - 1}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"kind": "const", "value": obj}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        keys = [f.name for f in dataclasses.fields(obj)]
        cls = type(obj)
        return {"kind": "dataclass", "cls": f"{cls.__module__}.{cls.__qualname__}", "keys": keys,
                "items": [output_tree(getattr(obj, k), leaves) for k in keys]}
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        if not all(isinstance(k, str) for k in keys):
            raise InputError(f"output dict keys must be strings, got {keys!r}")
        return {"kind": "dict", "keys": keys, "items": [output_tree(obj[k], leaves) for k in keys]}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        raise InputError(f"namedtuple outputs ({type(obj).__name__}) are not supported; return a tuple")
    if isinstance(obj, (tuple, list)):
        return {"kind": "tuple" if isinstance(obj, tuple) else "list",
                "items": [output_tree(o, leaves) for o in obj]}
    raise InputError(f"unsupported output type {type(obj).__name__}; return tensors in "
                     "tuples, lists, dicts or dataclasses")


def _build(tree: Mapping[str, Any], flat: Sequence[torch.Tensor]) -> Any:
    kind = tree["kind"]
    if kind == "tensor":
        return flat[tree["index"]]
    if kind == "const":
        return tree["value"]
    items = [_build(t, flat) for t in tree.get("items", [])]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    if kind == "dict":
        return dict(zip(tree["keys"], items))
    if kind == "dataclass":
        cls = _import_output_class(tree["cls"])
        values = dict(zip(tree["keys"], items))
        if cls is None:
            return values
        return cls(**values)
    raise ArtifactError(f"unknown output tree kind {kind!r}")


def _import_output_class(qualname: str):
    """Import a dataclass output type by name, only from trusted packages; else None (dict)."""
    if not qualname.startswith(TRUSTED_OUTPUT_MODULES):
        return None
    module, _, name = qualname.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if dataclasses.is_dataclass(obj) else None


def example_dtype(t: torch.Tensor) -> DType:
    return DType.from_torch(t.dtype)
