"""TensorRT optimization profiles from the captured signature's symbol ranges.

A TensorRT engine with dynamic input dims needs, per optimization profile, a (min, opt, max)
shape of every dynamic input: the engine runs any shape between min and max, and its kernels
are tuned for opt. transfuse knows each symbol's inclusive range (``signature.symbols``, from
``optimize(dynamic=...)``), so a profile is chosen per *symbol* and every input shape follows
from it (a dim that is an expression of symbols is evaluated at the symbols' min / opt / max).

The opt rule (:func:`default_opt`): a symbol whose name contains ``batch`` is tuned at its max
(an engine is sized for full batches); any other symbol (sequence lengths) at the largest power
of two not above the middle of its range, kept inside the range. ``opt=`` overrides it per
symbol, ``profiles=`` gives several profiles (TensorRT picks one per call).

``profiles.json`` (:func:`profiles_document`)::

    {"format": "transfuse-tensorrt-profiles", "version": 1, "opt_rule": "...",
     "profiles": [{"symbols": {"batch": [1, 8, 8], "seq": [1, 32, 64]},
                   "inputs": {"input_ids": {"min": [1, 1], "opt": [8, 32], "max": [8, 64]}}}]}

Bad ranges (min > max, opt outside, negative, unbounded, a symbol without a range, an unknown
symbol) are a :class:`LoweringError` naming the symbol and the profile.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transfuse.errors import LoweringError
from transfuse.ir.types import dim_str, eval_dim, free_symbols

FORMAT = "transfuse-tensorrt-profiles"
VERSION = 1
PROFILES_FILE = "profiles.json"
#: the largest dim we write: a symbol whose range reaches past it has no usable bound
MAX_DIM = 2**31 - 1
OPT_RULE = ("opt = max for a symbol whose name contains 'batch'; otherwise the largest power of "
            "two <= (min + max) // 2, kept within [min, max]; opt= overrides per symbol")

#: one profile: symbol -> (min, opt, max)
SymbolProfile = dict[str, tuple[int, int, int]]


def default_opt(name: str, lo: int, hi: int) -> int:
    """The opt point of symbol ``name`` with inclusive range [lo, hi] (module docstring)."""
    if "batch" in name.lower():
        return hi
    mid = (lo + hi) // 2
    p = 1
    while p * 2 <= mid:
        p *= 2
    return min(max(p, lo), hi)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoweringError(f"tensorrt profiles: {what} must be an int, got {value!r}")
    return value


def _check(name: str, lo: int, opt: int, hi: int, where: str) -> tuple[int, int, int]:
    lo, opt, hi = (_int(v, f"{where}: symbol {name!r} {k}")
                   for k, v in (("min", lo), ("opt", opt), ("max", hi)))
    if lo < 0:
        raise LoweringError(f"tensorrt profiles: {where}: symbol {name!r} has min {lo} < 0")
    if hi > MAX_DIM:
        raise LoweringError(f"tensorrt profiles: {where}: symbol {name!r} has no finite upper "
                            f"bound (max {hi}); give optimize(dynamic={{{name!r}: (min, max)}})")
    if not lo <= opt <= hi:
        raise LoweringError(f"tensorrt profiles: {where}: symbol {name!r} needs min <= opt <= "
                            f"max, got ({lo}, {opt}, {hi})")
    return lo, opt, hi


def symbol_profiles(symbols: Mapping[str, tuple[int, int]], needed: set[str] | None = None,
                    profiles: Sequence[Mapping[str, Sequence[int]]] | None = None,
                    opt: Mapping[str, int] | None = None) -> list[SymbolProfile]:
    """Checked (min, opt, max) per symbol, one dict per profile.

    ``symbols``: the signature's ranges. ``needed``: the symbols the inputs use (each must end
    up with a range). ``profiles``: explicit profiles, each symbol -> (min, max) or
    (min, opt, max); a symbol a profile leaves out takes the signature's range. ``opt``:
    symbol -> opt point, overriding :func:`default_opt` (for profiles without their own opt).
    A profile range must lie inside the signature's range (the compiled graph is only valid
    there).
    """
    needed = set(symbols) if needed is None else set(needed)
    opt = dict(opt or {})
    known = set(symbols) | needed
    for name in opt:
        if name not in known:
            raise LoweringError(f"tensorrt profiles: opt= names symbol {name!r}, which no input "
                                f"uses (symbols: {', '.join(sorted(known)) or 'none'})")
    missing = sorted(needed - set(symbols))
    if missing:
        raise LoweringError(f"tensorrt profiles: symbol(s) {', '.join(missing)} of the inputs "
                            "have no range; give optimize(dynamic=...) ranges for them")
    requested = list(profiles) if profiles is not None else [{}]
    if not requested:
        raise LoweringError("tensorrt profiles: profiles= is empty; give at least one profile")
    out: list[SymbolProfile] = []
    for i, given in enumerate(requested):
        where = f"profile {i}"
        if not isinstance(given, Mapping):
            raise LoweringError(f"tensorrt profiles: {where} must be a dict symbol -> (min, max) "
                                f"or (min, opt, max), got {type(given).__name__}")
        for name in given:
            if name not in known:
                raise LoweringError(f"tensorrt profiles: {where} names symbol {name!r}, which "
                                    f"no input uses (symbols: {', '.join(sorted(known))})")
        prof: SymbolProfile = {}
        for name in sorted(needed):
            slo, shi = symbols[name]
            rng = given.get(name)
            if rng is None:
                lo, hi = slo, shi
                o = opt.get(name)
            elif isinstance(rng, (list, tuple)) and len(rng) in (2, 3):
                lo, hi = rng[0], rng[-1]
                o = rng[1] if len(rng) == 3 else opt.get(name)
            else:
                raise LoweringError(f"tensorrt profiles: {where}: symbol {name!r} needs "
                                    f"(min, max) or (min, opt, max), got {rng!r}")
            _int(lo, f"{where}: symbol {name!r} min")
            _int(hi, f"{where}: symbol {name!r} max")
            if o is None:
                o = default_opt(name, lo, hi) if lo <= hi else lo
            lo, o, hi = _check(name, lo, o, hi, where)
            if lo < slo or hi > shi:
                raise LoweringError(f"tensorrt profiles: {where}: symbol {name!r} range "
                                    f"[{lo}, {hi}] is outside the compiled range [{slo}, {shi}]")
            prof[name] = (lo, o, hi)
        out.append(prof)
    return out


def input_shapes(inputs: Sequence[tuple[str, Sequence[Any]]], prof: SymbolProfile
                 ) -> dict[str, dict[str, list[int]]]:
    """input name -> {"min", "opt", "max"} shapes of one profile (static inputs included: TensorRT
    takes min == opt == max for them)."""
    out = {}
    for name, shape in inputs:
        entry = {}
        for k, idx in (("min", 0), ("opt", 1), ("max", 2)):
            env = {s: v[idx] for s, v in prof.items()}
            dims = []
            for d in shape:
                try:
                    dims.append(eval_dim(d, env))
                except Exception as e:  # a dim the ranges do not decide
                    raise LoweringError(f"tensorrt profiles: input {name!r} dim {dim_str(d)} "
                                        f"cannot be evaluated at the {k} point: {e}") from None
            entry[k] = dims
        for a, b, c in zip(entry["min"], entry["opt"], entry["max"]):
            if not (0 <= a <= b <= c):
                raise LoweringError(f"tensorrt profiles: input {name!r} of shape "
                                    f"[{', '.join(dim_str(d) for d in shape)}] is not monotone "
                                    f"in its symbols: min {entry['min']}, opt {entry['opt']}, "
                                    f"max {entry['max']}")
        out[name] = entry
    return out


def profiles_document(signature: Any, *, profiles: Sequence[Mapping[str, Sequence[int]]] | None
                      = None, opt: Mapping[str, int] | None = None,
                      symbols: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """The ``profiles.json`` document of ``signature`` (a transfuse.ir.signature.Signature);
    ``symbols``: ranges to use instead of the signature's (a generation step's,
    :func:`generation_ranges`)."""
    inputs = [(s.name, list(s.type.shape)) for s in signature.inputs]
    needed = free_symbols(d for _, shape in inputs for d in shape)
    ranges = signature.symbols if symbols is None else symbols
    symbols = {k: (int(v[0]), int(v[1])) for k, v in ranges.items()}
    profs = symbol_profiles(symbols, needed, profiles, opt)
    return {
        "format": FORMAT,
        "version": VERSION,
        "opt_rule": OPT_RULE,
        "profiles": [{"symbols": {k: list(v) for k, v in p.items()},
                      "inputs": input_shapes(inputs, p)} for p in profs],
    }


def generation_ranges(graph: Any) -> dict[str, tuple[int, int]]:
    """The symbol ranges of a generation step graph (``graph.meta["generation"]``, the cache
    geometry ``generation.insert-kv-cache`` records): ``seq`` (the step's tokens) and ``rows``
    (the logit rows) 1 .. max_step_tokens (default max_batch x max_seq_len), ``seqs``
    1 .. max_batch, ``table_blocks``
    (paged) 1 .. ceil(max_seq_len / block_size). A symbol it does not know is an error."""
    geo = getattr(graph, "meta", {}).get("generation")
    if not geo:
        raise LoweringError(f"tensorrt profiles: graph {getattr(graph, 'name', '?')} is not a "
                            "generation step (no meta['generation'])")
    b, length = int(geo["max_batch"]), int(geo["max_seq_len"])
    tokens = int(geo.get("max_step_tokens") or b * length)
    known = {"seq": (1, tokens), "rows": (1, tokens), "seqs": (1, b)}
    if geo.get("kv") == "paged":
        known["table_blocks"] = (1, -(-length // int(geo["block_size"])))
    out = {}
    for sym in sorted(graph.symbols()):
        if sym not in known:
            raise LoweringError(f"tensorrt profiles: the generation step's symbol {sym!r} has no "
                                f"known range (known: {', '.join(sorted(known))})")
        out[sym] = known[sym]
    return out


def generation_profiles(graph: Any) -> list[dict[str, tuple[int, int]]]:
    """Two profiles of a generation step: decode (at most max_batch tokens and logit rows, so
    its kernels are tuned for small steps) and prefill (the whole range)."""
    ranges = generation_ranges(graph)
    b = ranges["seqs"][1] if "seqs" in ranges else 1
    decode = {s: (1, min(b, hi)) for s, (_, hi) in ranges.items() if s in ("seq", "rows")}
    return [decode, {}]


def write_profiles(doc: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``doc`` as indented JSON with each shape on one line."""
    path = Path(path)
    text = json.dumps(doc, indent=1, sort_keys=True)
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_profiles(path: str | os.PathLike) -> dict[str, Any]:
    """A checked ``profiles.json`` (LoweringError naming the file and the problem)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoweringError(f"{path}: cannot read the TensorRT profiles: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise LoweringError(f"{path}: not a {FORMAT} version {VERSION} document")
    profs = doc.get("profiles")
    if not isinstance(profs, list) or not profs:
        raise LoweringError(f"{path}: 'profiles' must be a non-empty list")
    for i, p in enumerate(profs):
        inputs = p.get("inputs") if isinstance(p, dict) else None
        if not isinstance(inputs, dict):
            raise LoweringError(f"{path}: profile {i} has no 'inputs' object")
        for name, e in inputs.items():
            ok = isinstance(e, dict) and all(
                isinstance(e.get(k), list) and all(isinstance(x, int) for x in e[k])
                for k in ("min", "opt", "max"))
            if not ok or not len(e["min"]) == len(e["opt"]) == len(e["max"]) or not all(
                    0 <= a <= b <= c for a, b, c in zip(e["min"], e["opt"], e["max"])):
                raise LoweringError(f"{path}: profile {i} input {name!r}: needs int lists min "
                                    f"<= opt <= max of one rank, got {e!r}")
    return doc


def select_profile(doc: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The index of the first profile whose ranges hold every input shape, else None."""
    for i, p in enumerate(doc["profiles"]):
        ok = True
        for name, shape in shapes.items():
            e = p["inputs"].get(name)
            if e is None or len(e["min"]) != len(shape) or not all(
                    a <= int(s) <= c for a, s, c in zip(e["min"], shape, e["max"])):
                ok = False
                break
        if ok:
            return i
    return None


__all__ = ["PROFILES_FILE", "OPT_RULE", "default_opt", "symbol_profiles", "input_shapes",
           "profiles_document", "write_profiles", "read_profiles", "select_profile"]
