"""What the user asked to quantize, and how: ``parse_quantize(spec) -> QuantConfig``.

``spec`` is the ``quantize=`` option: a scheme name or a dict::

    "int4-awq"
    {"scheme": "int4-gptq", "group": 64, "act_order": True, "keep_float": ["lm_head"],
     "layers": {"*.mlp.down_proj": "int8-weight", "*.attn.*": {"group": 32}},
     "head": "int8-weight", "min_sqnr": 20}

Schemes (:data:`SCHEMES`): ``int8-weight`` (int8 asymmetric per channel with integer zero
points: SmolLM2-135M -0.4% perplexity vs +1.4% symmetric, HF eager, 2048 tokens),
``int4-weight`` (RTN, int4 asymmetric, group 128), ``int4-gptq`` (GPTQ), ``int4-awq`` (AWQ scale
and clip search), ``w8a8`` (qmatmul: int8 symmetric per-channel weights, activations quantized
per token / tensor at run time, SmoothQuant strength ``smoothquant``: searched per layer
on the calibration rows unless given) and ``fp8``
(e4m3 per channel). ``layers`` and ``head`` also take ``"float"`` (keep the layer in float).

Rounding: int8-weight and w8a8 round their (smoothed) weights with GPTQ when calibration data
is given, to nearest without it (``gptq=True/False`` forces either; GPTQ's ``damp`` and
``act_order`` apply); int4-awq takes ``gptq=True`` for GPTQ after AWQ's scales instead of its
clip search. See :meth:`LayerSpec.resolved`.

Layer patterns are :func:`fnmatch.fnmatchcase` globs on the layer's module path
(``layers.3.mlp.down_proj``, ``lm_head``; a merged q/k/v projection is named
``layers.3.attn.qkv_proj``) or on the source of the node. Precedence: ``keep_float`` wins,
then the first matching ``layers`` pattern, then ``head`` for the LM head (default
``int8-weight`` when the body is int4, else the body's scheme), then the body.

A ``layers`` / ``head`` dict without ``scheme`` refines the body's settings; one with another
scheme starts from that scheme's defaults. Top-level options belong to the body scheme.

Everything unknown or misplaced is a :class:`PassError` naming it and listing what is valid;
nothing here looks at a graph (the pass checks groups against each layer's K).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Any

from transfuse.errors import PassError

#: the scheme names ``quantize=`` takes
SCHEMES = ("int8-weight", "int4-weight", "int4-gptq", "int4-awq", "w8a8", "fp8")
#: ``layers`` / ``head`` may also keep a layer float
FLOAT = "float"
#: the quantization algorithm of each scheme
ALGORITHMS = {"int8-weight": "rtn", "int4-weight": "rtn", "int4-gptq": "gptq",
              "int4-awq": "awq", "w8a8": "smoothquant", "fp8": "rtn"}
#: default int4 group (and the largest default group)
DEFAULT_GROUP = 128
#: the smallest power-of-two group picked by default when K is not a multiple of 128
MIN_DEFAULT_GROUP = 16
DEFAULT_SMOOTHQUANT = 0.5
ACT_QUANTS = ("token", "tensor")
#: schemes whose rounding may be GPTQ's (``gptq=``; int4-gptq always is); the first two use it
#: by default whenever calibration data is given
GPTQ_OPTIONAL = ("int8-weight", "w8a8", "int4-awq")
GPTQ_WHEN_CALIBRATED = ("int8-weight", "w8a8")

#: options of one layer's scheme (top level, ``layers`` values, ``head``)
LAYER_KEYS = ("scheme", "group", "symmetric", "gptq", "act_order", "clip", "damp",
              "smoothquant", "act_quant")
#: options of the whole model
MODEL_KEYS = ("keep_float", "layers", "head", "min_sqnr")
KEYS = LAYER_KEYS + MODEL_KEYS


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One scheme with its options; ``None`` fields take the scheme's defaults."""

    scheme: str
    group: int | None = None
    symmetric: bool | None = None
    #: round with GPTQ (error compensation on the calibration Hessian); None: the scheme's
    #: default (:meth:`resolved`)
    gptq: bool | None = None
    act_order: bool | None = None
    clip: bool | None = None
    damp: float | None = None
    smoothquant: float | None = None
    act_quant: str | None = None

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise PassError(f"quantize: {problem}")

    # -- facts of the scheme -----------------------------------------------------------------

    @property
    def bits(self) -> int:
        return 4 if self.scheme.startswith("int4") else 8

    @property
    def algorithm(self) -> str:
        return ALGORITHMS[self.scheme]

    @property
    def uses_gptq(self) -> bool:
        """The weight is rounded by GPTQ (after any smoothing): int4-gptq, or ``gptq`` set
        (on a resolved spec: given, or calibration data present, see :meth:`resolved`)."""
        return self.scheme == "int4-gptq" or bool(self.gptq)

    def resolved(self, calibrated: bool) -> LayerSpec:
        """This spec with ``gptq=None`` decided: int8-weight and w8a8 round with GPTQ when
        calibration data is given (or GPTQ's ``damp`` / ``act_order`` is), to nearest
        otherwise (SmolLM2-135M, 11 windows of the shipped text, 8 calibration windows:
        int8-weight +0.87% -> +0.12% perplexity, w8a8 +2.9% -> +1.5%: llm-compressor's W8A8
        recipe is SmoothQuant then GPTQ too); int4-awq keeps AWQ's clip search."""
        if self.gptq is not None or self.scheme not in GPTQ_WHEN_CALIBRATED:
            return self
        want = calibrated or self.damp is not None or bool(self.act_order)
        return dataclasses.replace(self, gptq=want)

    @property
    def op(self) -> str:
        """The IR op that runs it: ``qmatmul`` for W8A8, ``qlinear`` otherwise."""
        return "qmatmul" if self.scheme == "w8a8" else "qlinear"

    @property
    def is_symmetric(self) -> bool:
        if self.symmetric is not None:
            return self.symmetric
        # w8a8 (its qmatmul kernels take zero point 128) and fp8 are symmetric; int8-weight
        # and int4 asymmetric
        return self.scheme in ("w8a8", "fp8")

    @property
    def smoothquant_alpha(self) -> float:
        """SmoothQuant migration strength (0: no smoothing); W8A8 only. Without
        ``smoothquant=`` it is searched per layer on the calibration rows
        (:attr:`smoothquant_search`); this is then the grid's midpoint, for planning."""
        if self.scheme != "w8a8":
            return 0.0
        return DEFAULT_SMOOTHQUANT if self.smoothquant is None else float(self.smoothquant)

    @property
    def smoothquant_search(self) -> bool:
        """W8A8 without an explicit ``smoothquant=``: α is searched per layer."""
        return self.scheme == "w8a8" and self.smoothquant is None

    @property
    def smooths(self) -> bool:
        """True when the layer's input is divided by per-channel scales (AWQ, SmoothQuant)."""
        return self.scheme == "int4-awq" or self.smoothquant_alpha > 0

    @property
    def needs_calibration(self) -> bool:
        return self.uses_gptq or self.algorithm == "awq" or self.smoothquant_alpha > 0

    @property
    def clip_search(self) -> bool:
        """AWQ's clipping search (for round-to-nearest: not with GPTQ's rounding)."""
        return self.scheme == "int4-awq" and self.clip is not False and not self.gptq

    def describe(self) -> str:
        """``int4-gptq g64 asym act_order`` (group given explicitly only)."""
        parts = [self.scheme]
        if self.group is not None:
            parts.append(f"g{self.group}")
        if self.symmetric is not None:
            parts.append("sym" if self.symmetric else "asym")
        if self.gptq is not None and self.scheme != "int4-gptq":
            parts.append("gptq" if self.gptq else "rtn")
        if self.act_order:
            parts.append("act_order")
        if self.smoothquant is not None:
            parts.append(f"smoothquant={self.smoothquant:g}")
        return " ".join(parts)

    # -- groups ------------------------------------------------------------------------------

    def group_for(self, k: int) -> tuple[int | None, str | None]:
        """(group, None) for a layer with K input features, or (None, why it cannot be).

        Per-channel schemes (int8-weight, w8a8, fp8) use ``group == k`` unless int8-weight got
        a group; int4 uses ``group`` when given, else 128, else the largest power of two below
        128 that divides K (at least :data:`MIN_DEFAULT_GROUP`).
        """
        if self.group is not None:
            if k % self.group:
                return None, (f"group {self.group} does not divide K={k}; groups that work: "
                              f"{', '.join(map(str, working_groups(k, self.bits)))}")
            if self.bits == 4 and self.group % 2:
                return None, f"4-bit codes pack two per byte: group {self.group} must be even"
            return self.group, None
        if self.bits == 8:
            return k, None
        if k % 2:
            return None, f"int4 needs an even K (two codes per byte), K={k}"
        g = DEFAULT_GROUP
        while g >= MIN_DEFAULT_GROUP and k % g:
            g //= 2
        if g < MIN_DEFAULT_GROUP:
            return None, (f"K={k} has no power-of-two group >= {MIN_DEFAULT_GROUP}; set group= "
                          f"to one of {', '.join(map(str, working_groups(k, 4)))}")
        return g, None

    # -- checks ------------------------------------------------------------------------------

    def problem(self) -> str | None:
        """Why this spec is invalid (None when it is fine)."""
        s = self.scheme
        if s not in SCHEMES:
            return f"unknown scheme {s!r}; valid schemes: {', '.join(SCHEMES)}"
        if self.group is not None:
            if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 2:
                return f"group must be an int >= 2, got {self.group!r}"
            if s in ("w8a8", "fp8"):
                return f"{s} is per channel: it takes no group (got group={self.group})"
        for name in ("symmetric", "gptq", "act_order", "clip"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                return f"{name} must be True or False, got {v!r}"
        if self.symmetric is False and s in ("w8a8", "fp8"):
            return f"{s} weights are symmetric (got symmetric=False)"
        if self.gptq is not None:
            if s == "int4-gptq" and not self.gptq:
                return "int4-gptq always rounds with GPTQ (gptq=False): use int4-weight for " \
                       "round-to-nearest"
            if s not in GPTQ_OPTIONAL + ("int4-gptq",):
                return (f"gptq applies to {', '.join(GPTQ_OPTIONAL)} (and int4-gptq), not {s}"
                        + ("; int4 with GPTQ is scheme int4-gptq" if s == "int4-weight" else ""))
        # GPTQ's own options: where GPTQ may run and is not switched off
        gptq_ok = s == "int4-gptq" or (s in GPTQ_OPTIONAL and self.gptq is not False and
                                        (s != "int4-awq" or self.gptq))
        if self.act_order and not gptq_ok:
            return f"act_order is GPTQ's: it applies where GPTQ rounds ({_gptq_where(s)})"
        if self.clip is not None and s != "int4-awq":
            return f"clip (AWQ's clipping search) applies to int4-awq only (scheme {s})"
        if self.clip and self.gptq:
            return "clip (AWQ's clipping search, for round-to-nearest) and gptq=True exclude " \
                   "each other"
        if self.damp is not None:
            if not gptq_ok:
                return f"damp is GPTQ's: it applies where GPTQ rounds ({_gptq_where(s)})"
            if not _is_number(self.damp) or not 0 < self.damp < 1:
                return f"damp must be a number in (0, 1), got {self.damp!r}"
        if self.smoothquant is not None:
            if s != "w8a8":
                return (f"smoothquant applies to w8a8 only (scheme {s}"
                        + ("; AWQ searches its own scales)" if s == "int4-awq" else ")"))
            if not _is_number(self.smoothquant) or not 0 <= self.smoothquant <= 1:
                return f"smoothquant must be an alpha in [0, 1], got {self.smoothquant!r}"
        if self.act_quant is not None:
            if s != "w8a8":
                return f"act_quant applies to w8a8 only (scheme {s})"
            if self.act_quant not in ACT_QUANTS:
                return (f"act_quant must be one of {', '.join(ACT_QUANTS)}, "
                        f"got {self.act_quant!r}")
        return None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The parsed ``quantize=`` option."""

    body: LayerSpec
    keep_float: tuple[str, ...] = ()
    #: (pattern, spec or None for float), first match wins
    layers: tuple[tuple[str, LayerSpec | None], ...] = ()
    #: the LM head's spec; None keeps it float; missing: the default (see :meth:`head_spec`)
    head: LayerSpec | None | str = "default"
    min_sqnr: float | None = None

    @property
    def scheme(self) -> str:
        return self.body.scheme

    def head_spec(self) -> LayerSpec | None:
        """The head's spec: as given, else int8-weight when the body is int4, else the body."""
        if self.head != "default":
            return self.head  # type: ignore[return-value]
        return LayerSpec("int8-weight") if self.body.bits == 4 else self.body

    def spec_for(self, names: Iterable[str], is_head: bool) -> tuple[LayerSpec | None, str]:
        """(spec or None for float, why) for a layer known by ``names``."""
        names = [n for n in names if n]
        for pattern in self.keep_float:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return None, f"keep_float pattern {pattern!r}"
        for pattern, spec in self.layers:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                why = f"layers pattern {pattern!r}"
                return spec, why + (" says float" if spec is None else "")
        if is_head:
            spec = self.head_spec()
            if self.head == "default":
                why = "LM head: int8-weight by default when the body is int4" \
                    if self.body.bits == 4 else "LM head"
            else:
                why = "head option"
            return spec, why + (" says float" if spec is None else "")
        return self.body, "body"

    def describe(self) -> str:
        parts = [self.body.describe()]
        if self.keep_float:
            parts.append(f"keep_float={list(self.keep_float)}")
        if self.layers:
            parts.append("layers={" + ", ".join(
                f"{p!r}: {s.describe() if s else FLOAT}" for p, s in self.layers) + "}")
        if self.head != "default":
            parts.append(f"head={self.head.describe() if self.head else FLOAT}")  # type: ignore
        if self.min_sqnr is not None:
            parts.append(f"min_sqnr={self.min_sqnr:g}")
        return ", ".join(parts)


def working_groups(k: int, bits: int) -> list[int]:
    """Groups that divide K: powers of two from 16 (and for int4 even divisors), then K."""
    out = [g for g in (16, 32, 64, 128, 256) if g < k and k % g == 0]
    if not out:
        out = [g for g in range(8, k) if k % g == 0 and (bits == 8 or g % 2 == 0)][:6]
    return [*out, k] if bits == 8 or k % 2 == 0 else out


def parse_quantize(spec: Any) -> QuantConfig:
    """The :class:`QuantConfig` of option ``quantize`` (a scheme name, a dict, or a config)."""
    if isinstance(spec, QuantConfig):
        return spec
    if isinstance(spec, str):
        return QuantConfig(_layer_spec(spec, None, "quantize"))
    if not isinstance(spec, Mapping):
        raise PassError(f"quantize must be a scheme name ({', '.join(SCHEMES)}) or a dict with "
                        f"'scheme', got {type(spec).__name__} {spec!r}")
    unknown = [k for k in spec if k not in KEYS]
    if unknown:
        raise PassError(f"quantize: unknown option(s) {', '.join(map(repr, unknown))}; valid "
                        f"options: {', '.join(KEYS)}")
    if "scheme" not in spec:
        raise PassError(f"quantize: the dict needs 'scheme' (one of {', '.join(SCHEMES)})")
    body = _layer_spec({k: v for k, v in spec.items() if k in LAYER_KEYS}, None, "quantize")
    keep = spec.get("keep_float") or ()
    if isinstance(keep, str):
        keep = (keep,)
    if not isinstance(keep, (list, tuple)) or not all(isinstance(p, str) for p in keep):
        raise PassError(f"quantize: keep_float must be a list of layer patterns, got {keep!r}")
    layers = spec.get("layers") or {}
    if not isinstance(layers, Mapping) or not all(isinstance(p, str) for p in layers):
        raise PassError("quantize: layers must be a dict {pattern: scheme or dict}, got "
                        f"{layers!r}")
    parsed = tuple((p, _layer_spec(v, body, f"quantize layers[{p!r}]"))
                   for p, v in layers.items())
    head: LayerSpec | None | str = "default"
    if spec.get("head") is not None:
        head = _layer_spec(spec["head"], body, "quantize head")
    min_sqnr = spec.get("min_sqnr")
    if min_sqnr is not None and (not _is_number(min_sqnr) or math.isnan(min_sqnr)):
        raise PassError(f"quantize: min_sqnr must be a number of dB, got {min_sqnr!r}")
    return QuantConfig(body, tuple(keep), parsed, head,
                       None if min_sqnr is None else float(min_sqnr))


def _layer_spec(value: Any, body: LayerSpec | None, where: str) -> LayerSpec | None:
    """A LayerSpec from a scheme name or a dict (``float`` -> None where a body exists)."""
    if isinstance(value, LayerSpec):
        return value
    if isinstance(value, str):
        if value == FLOAT and body is not None:
            return None
        if value not in SCHEMES:
            valid = ", ".join(SCHEMES) + (f", {FLOAT}" if body is not None else "")
            raise PassError(f"{where}: unknown scheme {value!r}; valid schemes: {valid}")
        return LayerSpec(value)
    if not isinstance(value, Mapping):
        raise PassError(f"{where}: expected a scheme name or a dict, got {value!r}")
    unknown = [k for k in value if k not in LAYER_KEYS]
    if unknown:
        raise PassError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; valid "
                        f"options: {', '.join(LAYER_KEYS)}")
    scheme = value.get("scheme")
    if scheme is None:
        if body is None:
            raise PassError(f"{where}: needs 'scheme' (one of {', '.join(SCHEMES)})")
        scheme = body.scheme
    if scheme == FLOAT and body is not None:
        if len(value) > 1:
            raise PassError(f"{where}: a float layer takes no options, got {dict(value)}")
        return None
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise PassError(f"{where}: unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    base = body if body is not None and body.scheme == scheme else LayerSpec(scheme)
    fields = {k: v for k, v in value.items() if k != "scheme"}
    try:
        return dataclasses.replace(base, **fields)
    except PassError as e:
        raise PassError(f"{where}: {str(e).removeprefix('quantize: ')}") from None


def _gptq_where(scheme: str) -> str:
    if scheme == "int4-awq":
        return "int4-awq with gptq=True"
    if scheme in GPTQ_OPTIONAL:
        return f"{scheme} unless gptq=False"
    return f"int4-gptq, or {', '.join(GPTQ_OPTIONAL)}; not {scheme}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


__all__ = ["QuantConfig", "LayerSpec", "parse_quantize", "working_groups", "SCHEMES", "FLOAT",
           "DEFAULT_GROUP", "DEFAULT_SMOOTHQUANT"]
