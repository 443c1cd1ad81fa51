"""Parser of the text form written by :mod:`transfuse.ir.printer`.

Grammar (one statement per line; blank lines and ``#`` comment lines are skipped)::

    graph     := 'graph' NAME '(' [param (',' param)*] ')' '{' line* '}'
    param     := VALUE ':' TYPE
    line      := const | node | return
    const     := 'const' VALUE ':' TYPE ['=' literal] [comment]
    node      := [VALUE ':' TYPE (',' VALUE ':' TYPE)* '='] OP '(' [arg (',' arg)*] ')'
                 ['{' [attr (',' attr)*] '}'] [comment]
    return    := 'return' [VALUE (',' VALUE)*]
    arg       := VALUE | '_'
    attr      := NAME ['=' attr_value]        # bare NAME is a true bool
    comment   := '#' ['uses=' INT (',' INT)*] ['@' SOURCE] ['<-' ORIGIN]
    VALUE     := '%' [A-Za-z0-9_]+
    TYPE      := DTYPE '[' [dim (',' dim)*] ']'

Attribute values are read by their OpDef kind: ints, floats (``inf``, ``nan``
too), ``true``/``false``, JSON strings, dtype short names, dim expressions
(:func:`transfuse.ir.types.parse_dim`), ``[...]`` lists of those, ``none``.
Nothing is ever ``eval``-ed: artifacts are parsed on load.

Node output types are taken from the text (not inferred); run
:func:`transfuse.ir.verify.verify` to check them.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from transfuse.errors import ParseError, TransfuseError
from transfuse.ir.graph import Graph, Value
from transfuse.ir.ops import all_ops
from transfuse.ir.types import DType, TensorType, parse_dim

_VALUE = re.compile(r"%([A-Za-z0-9_]+)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.:]*")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_INT = re.compile(r"[+-]?\d+\Z")
_NESTING = re.compile(r'["(\[{]')


class _LineError(Exception):
    """A parse error inside one line; turned into ParseError with the line number."""


class _Cursor:
    """A position in one line of text with small scanning helpers."""

    __slots__ = ("text", "pos")

    def __init__(self, text: str, pos: int = 0):
        self.text, self.pos = text, pos

    def ws(self) -> None:
        t, p = self.text, self.pos
        while p < len(t) and t[p] in " \t":
            p += 1
        self.pos = p

    def peek(self) -> str:
        self.ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end(self) -> bool:
        return self.peek() in ("", "#")

    def eat(self, s: str) -> bool:
        self.ws()
        if self.text.startswith(s, self.pos):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str) -> None:
        if not self.eat(s):
            raise _LineError(f"expected {s!r} at column {self.pos + 1}, found {self._rest()!r}")

    def match(self, pattern: re.Pattern, what: str) -> re.Match:
        self.ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise _LineError(f"expected {what} at column {self.pos + 1}, found {self._rest()!r}")
        self.pos = m.end()
        return m

    def value_name(self) -> str:
        return self.match(_VALUE, "a value like %x").group(1)

    def balanced(self, stop: str) -> str:
        """Text up to (not including) the first ``stop`` char outside brackets and strings."""
        self.ws()
        t, p, depth, start = self.text, self.pos, 0, self.pos
        while p < len(t):
            ch = t[p]
            if ch == '"':
                p = _string_end(t, p)
                continue
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                if depth == 0 and ch in stop:
                    break
                depth -= 1
            elif depth == 0 and ch in stop:
                break
            p += 1
        self.pos = p
        return t[start:p].strip()

    def type(self) -> TensorType:
        self.ws()
        close = self.text.find("]", self.pos)
        if close < 0:
            raise _LineError(f"expected a type like f32[batch, 64] at column {self.pos + 1}")
        text = self.text[self.pos : close + 1]
        self.pos = close + 1
        return _parse_type(text)

    def _rest(self) -> str:
        rest = self.text[self.pos :]
        return rest if len(rest) <= 30 else rest[:30] + "..."


@functools.lru_cache(maxsize=4096)
def _parse_type(text: str) -> TensorType:
    """TensorType.parse, memoised (types are immutable; sympy parsing is slow)."""
    try:
        return TensorType.parse(text)
    except TransfuseError as e:
        raise _LineError(f"bad type {text!r}: {e}") from None


def _string_end(text: str, start: int) -> int:
    """Index just past the JSON string starting at ``start``."""
    p = start + 1
    while p < len(text):
        if text[p] == "\\":
            p += 2
            continue
        if text[p] == '"':
            return p + 1
        p += 1
    raise _LineError(f"unterminated string at column {start + 1}")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and strings; ``""`` gives ``[]``."""
    if not text.strip():
        return []
    if not _NESTING.search(text):  # fast path: a flat list
        return [p.strip() for p in text.split(",")]
    parts, depth, start, p = [], 0, 0, 0
    while p < len(text):
        ch = text[p]
        if ch == '"':
            p = _string_end(text, p)
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:p].strip())
            start = p + 1
        p += 1
    parts.append(text[start:].strip())
    return parts


# -- literals --------------------------------------------------------------------


def _parse_int(text: str) -> int:
    if not _INT.match(text):
        raise _LineError(f"expected an integer, got {text!r}")
    return int(text)


def _parse_float(text: str) -> float:
    if _INT.match(text):
        return float(int(text))
    try:
        return float(text)
    except ValueError:
        raise _LineError(f"expected a float, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    if text == "true":
        return True
    if text == "false":
        return False
    raise _LineError(f"expected true or false, got {text!r}")


def _parse_str(text: str) -> str:
    if not text.startswith('"'):
        raise _LineError(f"expected a quoted string, got {text!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _LineError(f"bad string {text!r}: {e}") from None
    if not isinstance(value, str):
        raise _LineError(f"expected a quoted string, got {text!r}")
    return value


@functools.lru_cache(maxsize=4096)
def _parse_dim(text: str) -> Any:
    try:
        return parse_dim(text)
    except TransfuseError as e:
        raise _LineError(str(e)) from None


def _parse_dtype(text: str) -> DType:
    try:
        return DType.parse(text)
    except TransfuseError as e:
        raise _LineError(str(e)) from None


_SCALAR_KINDS = {
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "str": _parse_str,
    "dim": _parse_dim,
    "dtype": _parse_dtype,
}


def _list_items(text: str) -> list[str]:
    if not (text.startswith("[") and text.endswith("]")):
        raise _LineError(f"expected a list [...], got {text!r}")
    return _split_top(text[1:-1])


def parse_attr_value(kind: str, text: str) -> Any:
    """Read one attribute value of OpDef kind ``kind``."""
    if kind.endswith("?"):
        if text == "none":
            return None
        kind = kind[:-1]
    if kind in _SCALAR_KINDS:
        return _SCALAR_KINDS[kind](text)
    if kind in ("ints", "floats", "dims"):
        item = _SCALAR_KINDS[kind[:-1]]
        return tuple(item(t) for t in _list_items(text))
    return parse_literal(text)


def parse_literal(text: str) -> Any:
    """A generic literal: none, true/false, int, float, JSON string, list, dim expression."""
    if text == "none":
        return None
    if text in ("true", "false"):
        return text == "true"
    if text.startswith('"'):
        return _parse_str(text)
    if text.startswith("["):
        return [parse_literal(t) for t in _list_items(text)]
    if _INT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        pass
    if text in {d.value for d in DType}:
        return DType(text)
    return _parse_dim(text)


# -- constants -------------------------------------------------------------------


def _literal_tensor(text: str, t: TensorType) -> torch.Tensor:
    value = parse_literal(text)
    flat: list = []
    shape = _nested_shape(value, flat)
    if t.dtype == DType.bool:
        if not all(isinstance(x, bool) for x in flat):
            raise _LineError(f"inline value of a {t} constant must hold true/false")
    elif t.dtype.is_float:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
            raise _LineError(f"inline value of a {t} constant must hold numbers")
    elif not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise _LineError(f"inline value of a {t} constant must hold integers")
    if not t.is_static:
        raise _LineError(f"constant type {t} must be static")
    if shape != t.shape and not (len(flat) == 0 and 0 in t.shape):
        raise _LineError(f"inline value has shape {list(shape)}, but the type says {t}")
    if t.dtype == DType.bool:
        out = torch.tensor(flat, dtype=torch.bool)
    elif t.dtype.is_float:
        out = torch.tensor(flat, dtype=torch.float64).to(t.dtype.torch)
    else:
        info = torch.iinfo(t.dtype.torch)
        if not all(info.min <= x <= info.max for x in flat):
            raise _LineError(f"inline value out of range for a {t} constant")
        out = torch.tensor(flat, dtype=torch.int64).to(t.dtype.torch)
    return out.reshape(t.shape)


def _nested_shape(value: Any, flat: list) -> tuple[int, ...]:
    if not isinstance(value, list):
        flat.append(value)
        return ()
    shapes = {_nested_shape(v, flat) for v in value}
    if len(shapes) > 1:
        raise _LineError("inline value is a ragged list")
    inner = shapes.pop() if shapes else ()
    return (len(value),) + inner


def random_constant(name: str, t: TensorType) -> torch.Tensor:
    """A deterministic random tensor of type ``t`` seeded from ``name`` (for tests)."""
    if not t.is_static:
        raise ParseError(f"constant %{name}: type {t} must be static")
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = t.shape
    if t.dtype == DType.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if t.dtype.is_float:
        return (torch.randn(shape, generator=gen) * 0.5).to(t.dtype.torch)
    return torch.randint(0, 4, shape, generator=gen).to(t.dtype.torch)


# -- the parser ------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, constants: Mapping[str, torch.Tensor] | None):
        self.lines = text.splitlines()
        self.constants = constants
        self.values: dict[str, Value] = {}
        self.graph: Graph | None = None
        self.lineno = 0

    def error(self, msg: str, lineno: int | None = None) -> ParseError:
        n = self.lineno if lineno is None else lineno
        line = self.lines[n - 1].strip() if 0 < n <= len(self.lines) else ""
        return ParseError(f"line {n}: {msg}\n  {n} | {line}")

    def run(self) -> Graph:
        state = "header"
        for lineno, raw in enumerate(self.lines, 1):
            self.lineno = lineno
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if state == "header":
                    self.header(_Cursor(line))
                    state = "body"
                elif state == "body":
                    if line == "}":
                        raise _LineError("missing 'return' before '}'")
                    if line.startswith("return") and (len(line) == 6 or line[6] in " \t%#"):
                        self.ret(_Cursor(line, 6))
                        state = "close"
                    elif line.startswith("const") and line[5:6] in (" ", "\t"):
                        self.const(_Cursor(line, 5))
                    else:
                        self.node(_Cursor(line))
                elif state == "close":
                    if line != "}":
                        raise _LineError(f"expected '}}' after return, got {line!r}")
                    state = "done"
                else:
                    raise _LineError("text after the end of the graph")
            except _LineError as e:
                raise self.error(str(e)) from None
        if state != "done":
            missing = {
                "header": "a 'graph NAME(...) {' header",
                "body": "'return' and '}'",
                "close": "'}'",
            }[state]
            raise self.error(f"unexpected end of text: expected {missing}", len(self.lines))
        return self.graph

    # -- statements --------------------------------------------------------------

    def header(self, c: _Cursor) -> None:
        c.expect("graph")
        c.ws()
        if c.peek() == '"':
            start = c.pos
            end = _string_end(c.text, start)
            name = _parse_str(c.text[start:end])
            c.pos = end
        else:
            name = c.match(_NAME, "a graph name").group(0)
        self.graph = Graph(name)
        c.expect("(")
        if not c.eat(")"):
            while True:
                vname = c.value_name()
                c.expect(":")
                t = c.type()
                self.define(vname, functools.partial(self.graph.add_input, vname, t, exact=True))
                if c.eat(")"):
                    break
                c.expect(",")
        c.expect("{")
        self.end_of_line(c)

    def const(self, c: _Cursor) -> None:
        name = c.value_name()
        c.expect(":")
        t = c.type()
        if not t.is_static:
            raise _LineError(f"constant %{name} has symbolic type {t}; constants are static")
        if c.eat("="):
            tensor = _literal_tensor(c.balanced("#"), t)
        elif self.constants is None:
            tensor = random_constant(name, t)
        else:
            if name not in self.constants:
                raise _LineError(
                    f"constant %{name} has no inline value and is not in the given constants"
                )
            tensor = self.constants[name]
            if not isinstance(tensor, torch.Tensor):
                raise _LineError(
                    f"constant %{name}: payload is a {type(tensor).__name__}, not a tensor"
                )
            try:
                actual = TensorType.of(tensor)
            except TransfuseError as e:
                raise _LineError(f"constant %{name}: {e}") from None
            if actual != t.storage():
                raise _LineError(f"constant %{name} is declared {t} but its payload is {actual}")
        self.end_of_line(c)
        self.define(name, functools.partial(self.graph.add_constant, tensor, name, exact=True,
                                            quant=t.quant))

    def node(self, c: _Cursor) -> None:
        outs: list[tuple[str, TensorType]] = []
        if c.peek() == "%":
            while True:
                name = c.value_name()
                c.expect(":")
                outs.append((name, c.type()))
                if c.eat("="):
                    break
                c.expect(",")
        op = c.match(_IDENT, "an op name").group(0)
        opdef = all_ops().get(op)
        if opdef is None:
            raise _LineError(f"unknown op {op!r}")
        c.expect("(")
        inputs = [self.use(a) for a in _split_top(c.balanced(")"))]
        c.expect(")")
        attrs: dict[str, Any] = {}
        if c.eat("{"):
            for item in _split_top(c.balanced("}")):
                key, eq, raw = item.partition("=")
                key, raw = key.strip(), raw.strip()
                spec = opdef.attrs.get(key)
                if spec is None:
                    raise _LineError(
                        f"op {op} has no attribute {key!r} "
                        f"(known: {', '.join(opdef.attrs) or 'none'})"
                    )
                if key in attrs:
                    raise _LineError(f"attribute {key!r} given twice")
                if not eq:
                    if spec.kind != "bool":
                        raise _LineError(f"attribute {key!r} of {op} needs a value ({spec.kind})")
                    attrs[key] = True
                else:
                    try:
                        attrs[key] = parse_attr_value(spec.kind, raw)
                    except _LineError as e:
                        raise _LineError(f"attribute {key!r} of {op}: {e}") from None
            c.expect("}")
        meta = self.comment(c)
        names = [name for name, _ in outs]
        for i, name in enumerate(names):
            if name in self.values or name in names[:i]:
                raise _LineError(f"value %{name} is defined twice")
        try:
            node = self.graph.create(op, inputs, attrs, out_types=[t for _, t in outs], meta=meta)
        except TransfuseError as e:
            raise _LineError(str(e)) from None
        self.rename(node.outputs, names)

    def ret(self, c: _Cursor) -> None:
        outs = []
        if not c.at_end():
            while True:
                outs.append(self.use(c.match(_VALUE, "a value like %x").group(0)))
                if not c.eat(","):
                    break
        self.end_of_line(c)
        self.graph.set_outputs(outs)

    # -- helpers -----------------------------------------------------------------

    def comment(self, c: _Cursor) -> dict[str, Any]:
        c.ws()
        if c.pos >= len(c.text):
            return {}
        c.expect("#")
        text = c.text[c.pos :].strip()
        meta: dict[str, Any] = {}
        if text.startswith("uses="):
            uses, _, text = text.partition(" ")
            if not all(_INT.match(u) for u in uses[5:].split(",")):
                raise _LineError(f"bad use count {uses!r}")
            text = text.strip()
        origin_at = text.find("<-")
        if origin_at >= 0:
            origin = text[origin_at + 2 :].strip()
            if origin:
                meta["origin"] = origin
            text = text[:origin_at].strip()
        if text.startswith("@"):
            if text[1:].strip():
                meta["source"] = text[1:].strip()
        elif text:
            raise _LineError(
                f"unexpected comment text {text!r} (expected uses=, @source, <- origin)"
            )
        return meta

    def end_of_line(self, c: _Cursor) -> None:
        c.ws()
        if c.pos < len(c.text) and c.text[c.pos] != "#":
            raise _LineError(f"unexpected text {c._rest()!r} at column {c.pos + 1}")

    def use(self, text: str) -> Value | None:
        if text == "_":
            return None
        m = _VALUE.fullmatch(text)
        if not m:
            raise _LineError(f"expected a value like %x or _, got {text!r}")
        v = self.values.get(m.group(1))
        if v is None:
            raise _LineError(f"value {text} is not defined (before this line)")
        return v

    def define(self, name: str, make: Callable[[], Value]) -> Value:
        """Define %name as the value ``make()`` adds to the graph (named exactly ``name``)."""
        if name in self.values:
            raise _LineError(f"value %{name} is defined twice")
        try:
            v = make()
        except TransfuseError as e:
            raise _LineError(str(e)) from None
        self.values[name] = v
        return v

    def rename(self, outputs: tuple[Value, ...], names: list[str]) -> None:
        """Give freshly created node outputs the names from the text."""
        try:
            self.graph.rename_values(outputs, names)
        except TransfuseError as e:
            raise _LineError(str(e)) from None
        for v, name in zip(outputs, names):
            self.values[name] = v


def parse_graph(text: str, constants: Mapping[str, torch.Tensor] | None = None) -> Graph:
    """Read a graph from its text form.

    A ``const`` without an inline value takes its payload from ``constants`` by
    name; with ``constants=None`` it gets a deterministic random tensor seeded
    from its name. Raises :class:`ParseError` with the line number.
    """
    return _Parser(text, constants).run()


__all__ = ["parse_graph", "parse_attr_value", "parse_literal", "random_constant"]
