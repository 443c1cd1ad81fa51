"""The quantization report: what each layer became, what it cost in accuracy and bytes.

:class:`QuantReport` is written by ``quant.quantize-weights`` into ``graph.meta["quant"]`` and
the pass record (``record.data["quant"]``) as JSON, and read back by
``PassLog.quant_report()``. Per layer (:class:`LayerReport`): module path, op (``qlinear`` /
``qmatmul``, or ``linear`` when kept float), scheme, bits, group, symmetric, SQNR in dB
(``sqnr_on``: ``output`` = on calibration rows, ``weight`` = of the weight alone), why it was
kept float, bytes before and after. Totals: the model's constant bytes before and after and
the seconds quantization took. End to end (on ``measured_on``): the cosine of the first
outputs per position; when that output is an LM head's logits, KL(float || quantized) of the
softmax averaged over positions, top-1 agreement, and perplexity of next-token prediction
(float and quantized) when the first input is token ids.

``str(report)`` is a plain-text table; ``report.__rich__()`` the same for rich consoles.
This module imports nothing from passes (the pass log imports it).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping
from typing import Any

from transfuse.errors import PassError

#: the version of the JSON form
VERSION = 1


@dataclasses.dataclass
class LayerReport:
    """One layer: what it became (or why it stayed float) and what that cost."""

    name: str
    op: str
    scheme: str
    shape: list[int]  # [N, K]
    bits: int | None = None
    group: int | None = None
    symmetric: bool | None = None
    sqnr_db: float | None = None
    sqnr_on: str = ""
    kept_float: str | None = None
    float_bytes: int = 0
    quant_bytes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.kept_float is None


@dataclasses.dataclass
class QuantReport:
    """The whole model's quantization (see the module docstring)."""

    scheme: str
    config: str = ""
    layers: list[LayerReport] = dataclasses.field(default_factory=list)
    float_bytes: int = 0
    quant_bytes: int = 0
    seconds: float = 0.0
    calibrate_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    calibration_batches: int = 0
    calibration_rows: int = 0
    cosine: float | None = None
    kl: float | None = None
    top1: float | None = None
    ppl_float: float | None = None
    ppl_quant: float | None = None
    tokens: int = 0
    measured_on: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    # -- queries -------------------------------------------------------------------------

    def layer(self, name: str) -> LayerReport:
        for lr in self.layers:
            if lr.name == name:
                return lr
        raise PassError(f"no layer {name!r} in the quantization report (layers: "
                        f"{', '.join(lr.name for lr in self.layers)})")

    @property
    def quantized(self) -> list[LayerReport]:
        return [lr for lr in self.layers if lr.quantized]

    @property
    def kept_float(self) -> list[LayerReport]:
        return [lr for lr in self.layers if not lr.quantized]

    @property
    def compression(self) -> float:
        """Model bytes before / after."""
        return self.float_bytes / self.quant_bytes if self.quant_bytes else math.nan

    @property
    def ppl_increase(self) -> float | None:
        """Quantized perplexity / float perplexity - 1 (None when not measured)."""
        if self.ppl_float is None or self.ppl_quant is None:
            return None
        return self.ppl_quant / self.ppl_float - 1.0

    # -- JSON ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite floats as strings)."""
        return _finite(dataclasses.asdict(self) | {"version": VERSION})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QuantReport:
        d = dict(d)
        if d.pop("version", VERSION) != VERSION:
            raise PassError(f"unknown quantization report version (expected {VERSION})")
        d["layers"] = [LayerReport(**_floats(lr, ("sqnr_db",))) for lr in d.get("layers", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        d = _floats(d, ("cosine", "kl", "top1", "ppl_float", "ppl_quant", "seconds"))
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- rendering -----------------------------------------------------------------------

    def summary(self) -> str:
        """The end-to-end lines of the report."""
        q = self.quantized
        lines = [f"quantized {len(q)} of {len(self.layers)} layers ({self.config or self.scheme})"
                 f"; {len(self.layers) - len(q)} kept float"]
        lines.append(f"model bytes: {_mb(self.float_bytes)} float -> {_mb(self.quant_bytes)} "
                     f"({self.compression:.2f}x smaller); quantization took "
                     f"{self.seconds:.2f} s (calibration {self.calibrate_seconds:.2f} s, "
                     f"evaluation {self.evaluate_seconds:.2f} s)")
        if self.calibration_batches:
            lines.append(f"calibration: {self.calibration_batches} batches, "
                         f"{self.calibration_rows} rows")
        if self.kl is not None:
            text = (f"end to end on {self.measured_on}: KL(float||quant) {self.kl:.4g} nats/token,"
                    f" top-1 agreement {self.top1:.1%}, cosine {self.cosine:.6f} "
                    f"({self.tokens} positions)")
            if self.ppl_float is not None:
                text += (f", perplexity {self.ppl_float:.4g} float -> {self.ppl_quant:.4g} "
                         f"quantized ({self.ppl_increase:+.2%})")
            lines.append(text)
        elif self.cosine is not None:
            lines.append(f"end to end on {self.measured_on}: cosine of the first output "
                         f"{self.cosine:.6f} ({self.tokens} positions; not logits of an LM head:"
                         f" no KL / top-1 / perplexity)")
        else:
            lines.append(f"end to end: {self.measured_on or 'not measured'}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __rich__(self):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="transfuse quantization report", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for col, right in (("layer", False), ("op", False), ("scheme", False), ("N×K", True),
                           ("bits", True), ("group", True), ("sym", False), ("SQNR dB", True),
                           ("KiB", True), ("note", False)):
            table.add_column(col, justify="right" if right else "left",
                             overflow="fold", no_wrap=col != "note")
        for lr in self.layers:
            sqnr = "" if lr.sqnr_db is None else f"{lr.sqnr_db:.1f}" + (
                "w" if lr.sqnr_on == "weight" else "")
            note = f"float: {lr.kept_float}" if lr.kept_float else "; ".join(lr.notes)
            kib = (_kib(lr.float_bytes) if lr.kept_float else
                   f"{_kib(lr.float_bytes)}→{_kib(lr.quant_bytes)}")
            table.add_row(lr.name, lr.op, lr.scheme, f"{lr.shape[0]}×{lr.shape[1]}",
                          "" if lr.bits is None else str(lr.bits),
                          "" if lr.group is None else str(lr.group),
                          "" if lr.symmetric is None else ("sym" if lr.symmetric else "asym"),
                          sqnr, kib, note)
        footer = self.summary()
        if any(lr.sqnr_on == "weight" for lr in self.layers):
            footer += "\n(SQNR marked w: of the weight alone, no calibration rows)"
        return Group(table, Text(footer))

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=140, color_system=None, force_terminal=False,
                          legacy_windows=False, no_color=True)
        console.print(self)
        return "\n".join(line.rstrip() for line in buf.getvalue().rstrip().splitlines()) + "\n"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}" if n < 10240 else f"{n / 1024:.0f}"


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _floats(d: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = dict(d)
    for k in keys:
        if isinstance(out.get(k), str):
            out[k] = float(out[k])
    return out


__all__ = ["QuantReport", "LayerReport"]
