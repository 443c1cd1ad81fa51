"""Types of the IR: element types, symbolic dimensions and tensor types.

A dimension is either an ``int`` or a sympy expression over named symbols
(``batch``, ``seq``, ``seq + 1``). Symbols are positive integers; arithmetic on
them stays exact. ``TensorType(dtype, shape)`` is immutable and hashable.

Text form: ``f32[batch, seq, 768]``; a 0-d tensor is ``i64[]``. A quantized weight's type
carries a :class:`QuantType`: ``u8{int4 g64 asym k576}[576, 288]``.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import sympy
import torch

from transfuse.errors import IRVerifyError


class DType(enum.Enum):
    """Element types. The value is the short name used in the text form."""

    f64 = "f64"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f8e4m3 = "f8e4m3"
    f8e5m2 = "f8e5m2"
    i64 = "i64"
    i32 = "i32"
    i16 = "i16"
    i8 = "i8"
    u8 = "u8"
    bool = "bool"

    @property
    def torch(self) -> torch.dtype:
        return _TO_TORCH[self]

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize

    @property
    def is_float(self) -> bool:
        return self.torch.is_floating_point

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> DType:
        try:
            return _FROM_TORCH[dtype]
        except KeyError:
            raise IRVerifyError(f"torch dtype {dtype} has no IR element type") from None

    @classmethod
    def parse(cls, text: str) -> DType:
        try:
            return cls(text)
        except ValueError:
            valid = ", ".join(d.value for d in cls)
            raise IRVerifyError(f"unknown dtype {text!r} (valid: {valid})") from None

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


_TO_TORCH = {
    DType.f64: torch.float64,
    DType.f32: torch.float32,
    DType.f16: torch.float16,
    DType.bf16: torch.bfloat16,
    DType.f8e4m3: torch.float8_e4m3fn,
    DType.f8e5m2: torch.float8_e5m2,
    DType.i64: torch.int64,
    DType.i32: torch.int32,
    DType.i16: torch.int16,
    DType.i8: torch.int8,
    DType.u8: torch.uint8,
    DType.bool: torch.bool,
}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}


# ---------------------------------------------------------------------------
# Symbolic dimensions
# ---------------------------------------------------------------------------

Dim = Union[int, sympy.Expr]


def sym(name: str) -> sympy.Symbol:
    """The symbol for a named dimension (a positive integer)."""
    if not name.isidentifier():
        raise IRVerifyError(f"symbolic dim name {name!r} is not an identifier")
    return sympy.Symbol(name, integer=True, positive=True)


def normalize_dim(d: object) -> Dim:
    """Return ``d`` as an int when it is a known integer, else as a sympy expression."""
    if isinstance(d, bool):
        raise IRVerifyError(f"dimension {d!r} is a bool")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Basic):
        e = sympy.expand(d) if not d.is_Atom else d
        if e.is_Integer:
            return int(e)
        if not e.free_symbols:
            raise IRVerifyError(f"dimension {d} is not an integer")
        return e
    if isinstance(d, str):
        return parse_dim(d)
    raise IRVerifyError(f"dimension {d!r} is neither an int nor a symbolic expression")


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def dim_str(d: Dim) -> str:
    if isinstance(d, int):
        return str(d)
    return sympy.sstr(d).replace(" ", "")


def parse_dim(text: str) -> Dim:
    """Parse ``768``, ``seq`` or an expression such as ``2*seq + 1`` (no eval)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        tree = ast.parse(text, mode="eval")
        expr = _dim_from_ast(tree.body)
    except (SyntaxError, ValueError) as e:
        raise IRVerifyError(f"cannot parse dimension {text!r}: {e}") from None
    return normalize_dim(expr)


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: sympy.floor(a / b),
    ast.Div: lambda a, b: a / b,
    ast.Mod: lambda a, b: sympy.Mod(a, b),
    ast.Pow: lambda a, b: a**b,
}
_CALLS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Mod": sympy.Mod, "Max": sympy.Max, "Min": sympy.Min}


def _dim_from_ast(node: ast.AST) -> sympy.Expr:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return sympy.Integer(node.value)
    if isinstance(node, ast.Name):
        return sym(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_dim_from_ast(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_dim_from_ast(node.left), _dim_from_ast(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        return _CALLS[node.func.id](*[_dim_from_ast(a) for a in node.args])
    raise ValueError(f"unsupported syntax {ast.dump(node)[:60]}")


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    """Evaluate a dimension given values for its symbols."""
    if isinstance(d, int):
        return d
    try:
        value = d.subs({s: env[s.name] for s in d.free_symbols})
    except KeyError as e:
        raise IRVerifyError(f"no value bound for symbolic dim {e.args[0]!r} in {dim_str(d)}") from None
    if not value.is_Integer:
        raise IRVerifyError(f"dimension {dim_str(d)} evaluated to non-integer {value}")
    return int(value)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:  # structurally identical (the common case): no need to simplify
        return True
    diff = sympy.expand(sympy.sympify(a) - sympy.sympify(b))
    if diff == 0:
        return True
    if diff.is_polynomial():  # a nonzero polynomial is not identically zero
        return False
    return sympy.simplify(diff) == 0


def resolve_min_max(d: Dim, ranges: Mapping[str, tuple[int, int]]) -> Dim:
    """``d`` with every ``Max``/``Min`` that the symbols' inclusive ``ranges`` decide replaced
    by the argument it selects (exact for every value in the ranges; a symbol without a range,
    or an argument difference that is not linear in the symbols, leaves that Max/Min as it is).

    torch.export writes the size of ``x[:, max(0, P - T):]`` as ``P - Max(0, P - T)``; with
    T <= P known from its range that is exactly T, and shape checks can see it."""
    if isinstance(d, int) or not d.has(sympy.Max, sympy.Min):
        return d
    return normalize_dim(_resolve(sympy.sympify(d), ranges))


def _resolve(e: sympy.Expr, ranges: Mapping[str, tuple[int, int]]) -> sympy.Expr:
    if e.is_Atom:
        return e
    args = [_resolve(a, ranges) for a in e.args]
    if isinstance(e, (sympy.Max, sympy.Min)):
        keep = list(args)
        for a in args:
            for b in args:
                if a is b or a not in keep or b not in keep:
                    continue
                lo, hi = _linear_bounds(sympy.expand(a - b), ranges)
                # Max keeps the larger: a >= b everywhere drops b; Min keeps the smaller
                if (lo is not None and lo >= 0) if isinstance(e, sympy.Max) else \
                        (hi is not None and hi <= 0):
                    keep.remove(b)
        return keep[0] if len(keep) == 1 else e.func(*keep)
    return e.func(*args)


def _linear_bounds(e: sympy.Expr, ranges: Mapping[str, tuple[int, int]]):
    """(min, max) of a linear integer expression over the box of symbol ranges; None for an
    unbounded side or an expression that is not linear over ranged symbols."""
    lo, hi = 0, 0
    for term, coef in e.as_coefficients_dict().items():
        if not coef.is_Integer:
            return None, None
        c = int(coef)
        if term == 1:
            lo, hi = (None if lo is None else lo + c), (None if hi is None else hi + c)
            continue
        if not (term.is_Symbol and term.name in ranges):
            return None, None
        r_lo, r_hi = ranges[term.name]
        r_hi = None if r_hi >= 2**62 else r_hi  # "unbounded" as the frontends write it
        a, b = (c * r_lo, None if r_hi is None else c * r_hi)
        if c < 0:
            a, b = b, a
        lo = None if lo is None or a is None else lo + a
        hi = None if hi is None or b is None else hi + b
    return lo, hi


def dim_product(dims: Iterable[Dim]) -> Dim:
    static, symbolic = 1, []
    for d in dims:
        if isinstance(d, int):
            static *= d
        else:
            symbolic.append(d)
    if not symbolic or static == 0:
        return static
    return normalize_dim(sympy.Mul(static, *symbolic))


def free_symbols(dims: Iterable[Dim]) -> set[str]:
    names: set[str] = set()
    for d in dims:
        if not isinstance(d, int):
            names |= {s.name for s in d.free_symbols}
    return names


# ---------------------------------------------------------------------------
# Quantization types
# ---------------------------------------------------------------------------

#: QuantType schemes: integer codes with scales (and zero points), or fp8 values with scales
QUANT_SCHEMES = ("int", "fp8e4m3")


@dataclasses.dataclass(frozen=True)
class QuantType:
    """How a quantized weight [N, K] is stored (DESIGN.md §8, issue 13).

    ``scheme`` "int": unsigned codes ``q`` in ``[0, 2**bits)``; the weight is
    ``w[n, k] = (q[n, k] - z[n, k // group]) * s[n, k // group]`` with ``scales`` s and, when
    not ``symmetric``, ``zeros`` z (f32, [N, K / group]); symmetric weights have the fixed zero
    point ``2**(bits - 1)`` and no zeros. 4-bit codes are packed two per byte along K, element
    2j in the low nibble of byte j (storage ``u8[N, K / 2]``); 8-bit codes one per byte.
    ``scheme`` "fp8e4m3": e4m3 values, storage ``f8e4m3[N, K]``, ``w = q * s`` with one scale
    per output channel (``group == k``, symmetric).

    ``group`` is the number of elements along K sharing a scale (``group == k``: per channel);
    ``k`` the weight's logical K. Text form: ``int4 g64 asym k576``.
    """

    scheme: str
    bits: int
    group: int
    symmetric: bool
    k: int

    def __post_init__(self):
        bad = self.problem()
        if bad:
            raise IRVerifyError(f"quant type {self.scheme}{self.bits} g{self.group} k{self.k}: {bad}")

    def problem(self) -> str | None:
        if self.scheme not in QUANT_SCHEMES:
            return f"scheme must be one of {list(QUANT_SCHEMES)}, got {self.scheme!r}"
        for name in ("bits", "group", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return f"{name} must be a positive int, got {v!r}"
        if self.scheme == "int" and self.bits not in (4, 8):
            return f"integer codes have 4 or 8 bits, got {self.bits}"
        if self.scheme == "fp8e4m3" and (self.bits != 8 or not self.symmetric or self.group != self.k):
            return "fp8e4m3 is 8 bits, symmetric, one scale per output channel (group == k)"
        if self.k % self.group:
            return f"group {self.group} does not divide K={self.k}"
        if self.scheme == "int" and self.bits == 4 and self.group % 2:
            return f"4-bit codes pack two per byte: the group ({self.group}) must be even"
        return None

    @property
    def groups(self) -> int:
        """Scales per output channel (K / group)."""
        return self.k // self.group

    @property
    def per_channel(self) -> bool:
        return self.group == self.k

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    @property
    def storage_dtype(self) -> DType:
        return DType.u8 if self.scheme == "int" else DType.f8e4m3

    @property
    def packed_k(self) -> int:
        """Columns of the stored weight: K * bits / 8 for integer codes, K for fp8."""
        return self.k * self.bits // 8 if self.scheme == "int" else self.k

    @property
    def default_zero(self) -> int | None:
        """The fixed zero point of symmetric integer codes (8 for 4-bit, 128 for 8-bit)."""
        return 2 ** (self.bits - 1) if self.scheme == "int" and self.symmetric else None

    @property
    def name(self) -> str:
        """``int4`` / ``int8`` / ``fp8e4m3``."""
        return f"int{self.bits}" if self.scheme == "int" else self.scheme

    def storage_type(self, n: int) -> TensorType:
        """The stored weight's type for N output channels (with this quant type)."""
        return TensorType(self.storage_dtype, (n, self.packed_k), quant=self)

    def __str__(self) -> str:
        return f"{self.name} g{self.group} {'sym' if self.symmetric else 'asym'} k{self.k}"

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> QuantType:
        """The inverse of ``str``: ``int4 g64 asym k576``."""
        parts = text.split()
        try:
            name, group, sym, k = parts
            if name.startswith("int"):
                scheme, bits = "int", int(name[3:])
            else:
                scheme, bits = name, 8
            if not (group.startswith("g") and k.startswith("k")) or sym not in ("sym", "asym"):
                raise ValueError
            return cls(scheme, bits, int(group[1:]), sym == "sym", int(k[1:]))
        except ValueError:
            raise IRVerifyError(f"cannot parse quant type {text!r}: expected like "
                                "'int4 g64 asym k576'") from None


# ---------------------------------------------------------------------------
# Tensor types
# ---------------------------------------------------------------------------


class TensorType:
    """An element type and a shape of ints and symbolic dims, and for a quantized weight its
    :class:`QuantType` (``quant``; the shape and dtype are then the stored ones). Immutable."""

    __slots__ = ("dtype", "shape", "quant")

    def __init__(self, dtype: DType, shape: Sequence[object], quant: QuantType | None = None):
        if not isinstance(dtype, DType):
            raise IRVerifyError(f"TensorType dtype must be a DType, got {dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", tuple(normalize_dim(d) for d in shape))
        if quant is not None:
            if not isinstance(quant, QuantType):
                raise IRVerifyError(f"TensorType quant must be a QuantType, got {quant!r}")
            if dtype != quant.storage_dtype or len(self.shape) != 2 or \
                    self.shape[1] != quant.packed_k:
                raise IRVerifyError(f"a {quant} weight is stored as {quant.storage_dtype.value}"
                                    f"[N, {quant.packed_k}], not {dtype.value}{list(self.shape)}")
        object.__setattr__(self, "quant", quant)

    def __setattr__(self, name, value):
        raise AttributeError("TensorType is immutable")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return dim_product(self.shape)

    def nbytes(self) -> Dim:
        n = self.numel()
        return n * self.dtype.itemsize

    def storage(self) -> TensorType:
        """This type without its quant type (what ``TensorType.of`` gives for the payload)."""
        return self if self.quant is None else TensorType(self.dtype, self.shape)

    def with_shape(self, shape: Sequence[object]) -> TensorType:
        return TensorType(self.dtype, shape)

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(dtype, self.shape)

    def concrete(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorType):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.quant == other.quant
            and len(self.shape) == len(other.shape)
            and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape))
        )

    def __hash__(self) -> int:
        return hash((self.dtype, tuple(dim_str(d) for d in self.shape), self.quant))

    def __str__(self) -> str:
        quant = "" if self.quant is None else f"{{{self.quant}}}"
        return f"{self.dtype.value}{quant}[{', '.join(dim_str(d) for d in self.shape)}]"

    __repr__ = __str__

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorType:
        return cls(DType.from_torch(t.dtype), tuple(t.shape))

    @classmethod
    def parse(cls, text: str) -> TensorType:
        text = text.strip()
        if "[" not in text or not text.endswith("]"):
            raise IRVerifyError(f"cannot parse tensor type {text!r}: expected like f32[batch, 768]")
        head, _, body = text.partition("[")
        body = body[:-1].strip()
        dims = [parse_dim(p) for p in _split_top(body)] if body else []
        head, quant = head.strip(), None
        if head.endswith("}") and "{" in head:  # u8{int4 g64 asym k576}
            head, _, qtext = head[:-1].partition("{")
            quant = QuantType.parse(qtext)
        return cls(DType.parse(head.strip()), dims, quant)


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """Numpy broadcasting over ints and symbols; raises IRVerifyError when incompatible."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dim: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if isinstance(d, int) and d == 1:
                continue
            if isinstance(dim, int) and dim == 1:
                dim = d
            elif not dims_equal(dim, d):
                raise IRVerifyError(
                    f"shapes {[tuple(dim_str(x) for x in s) for s in shapes]} do not broadcast "
                    f"(dim {i}: {dim_str(dim)} vs {dim_str(d)})"
                )
        out.append(dim)
    return tuple(out)


def promote(a: DType, b: DType) -> DType:
    return DType.from_torch(torch.promote_types(a.torch, b.torch))


def result_dtype(*types: TensorType) -> DType:
    """The dtype an op over tensors of ``types`` computes in: torch's promotion rules, 0-d
    tensors participating like torch's 0-d tensors (so ``f16 tensor * f32 scalar`` stays f16)."""
    probes = [torch.empty(() if t.rank == 0 else (1,) * t.rank, dtype=t.dtype.torch) for t in types]
    out = probes[0]
    for p in probes[1:]:
        out = torch.empty((), dtype=torch.result_type(out, p)) if out.dim() == 0 and p.dim() == 0 else \
            torch.empty((1,), dtype=torch.result_type(out, p))
    return DType.from_torch(out.dtype)
