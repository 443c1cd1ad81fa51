"""The pass log: what every pass did, in a form users read to trust the compiler.

One :class:`PassRecord` per pass run: status (changed / unchanged / rolled
back / failed), time, node counts, op histogram delta, rule statistics, rewrite
events with the user's source, near misses with their reasons, the numeric
check against the graph before the pass, and the error when there was one.

:class:`PassLog` holds the records plus optional stage timings (capture,
lowering) and renders as a rich table (``print(log)`` gives the same table as
plain text), JSON (``to_json`` / ``from_json``), ``why_not(rule)``,
``ir_after(pass)`` and ``quant_report()`` (the quantization report, from the record's
``data``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping
from typing import Any

from transfuse.errors import PassError

CHANGED = "changed"
UNCHANGED = "unchanged"
ROLLED_BACK = "rolled back"
FAILED = "failed"
STATUSES = (CHANGED, UNCHANGED, ROLLED_BACK, FAILED)

_STATUS_STYLE = {CHANGED: "green", UNCHANGED: "dim", ROLLED_BACK: "yellow", FAILED: "red"}


@dataclasses.dataclass
class NodeRef:
    """A node as the log remembers it: op, output names, user source."""

    op: str
    outputs: str
    source: str = ""

    def __str__(self) -> str:
        where = f" @{self.source}" if self.source else ""
        return f"{self.outputs} = {self.op}{where}"


@dataclasses.dataclass
class RewriteEvent:
    """``rule`` replaced ``matched`` nodes by ``new`` ones."""

    rule: str
    matched: list[NodeRef]
    new: list[NodeRef]

    def __str__(self) -> str:
        old = "; ".join(str(n) for n in self.matched)
        new = "; ".join(str(n) for n in self.new) or "nothing"
        return f"{self.rule}: {old} -> {new}"


@dataclasses.dataclass
class NearMiss:
    """``rule`` almost matched at ``node`` but did not, because of ``reason``."""

    rule: str
    node: NodeRef | None
    reason: str

    @property
    def where(self) -> str:
        if self.node is None:
            return "graph"
        src = self.node.source or "?"
        return f"{src}, node {self.node.outputs} ({self.node.op})"

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason} ({self.where})"


@dataclasses.dataclass
class NumericCheck:
    """Outputs after a pass against before it, on sample inputs."""

    max_abs: float
    max_rel: float
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        text = f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}"
        return text + ("" if self.ok else f" FAILED: {self.detail}" if self.detail else " FAILED")


def _new_stats() -> dict[str, int]:
    return {"tried": 0, "matched": 0, "missed": 0, "events": 0}


@dataclasses.dataclass
class PassRecord:
    """What one pass run did."""

    name: str
    status: str = UNCHANGED
    ms: float = 0.0
    check_ms: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    op_delta: dict[str, int] = dataclasses.field(default_factory=dict)
    edits: dict[str, int] = dataclasses.field(default_factory=dict)
    rules: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    events: list[RewriteEvent] = dataclasses.field(default_factory=list)
    events_dropped: int = 0
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)
    numeric: NumericCheck | None = None
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: JSON-able results a pass hands to its readers by key (``"quant"``: the quantization
    #: report of ``quant.quantize-weights``)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def rule_stats(self, rule: str) -> dict[str, int]:
        return self.rules.setdefault(rule, _new_stats())

    @property
    def changed(self) -> bool:
        return self.status == CHANGED

    def matched(self, rule: str) -> int:
        return self.rules.get(rule, {}).get("matched", 0)

    # -- JSON ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["numeric"] is not None:  # strict JSON: no Infinity / NaN literals
            for k in ("max_abs", "max_rel"):
                if not math.isfinite(d["numeric"][k]):
                    d["numeric"][k] = str(d["numeric"][k])
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PassRecord:
        d = dict(d)
        d["events"] = [RewriteEvent(e["rule"], [NodeRef(**n) for n in e["matched"]],
                                    [NodeRef(**n) for n in e["new"]]) for e in d.get("events", [])]
        d["near_misses"] = [NearMiss(m["rule"], NodeRef(**m["node"]) if m["node"] else None,
                                     m["reason"]) for m in d.get("near_misses", [])]
        if d.get("numeric") is not None:
            num = dict(d["numeric"])
            for k in ("max_abs", "max_rel"):
                num[k] = float(num[k])
            d["numeric"] = NumericCheck(**num)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclasses.dataclass
class Stage:
    """A timed step outside the passes (capture, lowering)."""

    name: str
    ms: float


class PassLog:
    """The records of one pipeline run, with renderers and queries."""

    def __init__(self, level: str | None = None):
        self.level = level
        self.records: list[PassRecord] = []
        self.stages: list[Stage] = []
        # IR after each record: a graph snapshot (printed lazily) or its text;
        # None means "same as the one before" (index -1 is the input graph)
        self._ir: dict[int, Any] = {}

    # -- building ----------------------------------------------------------------

    def add(self, record: PassRecord, snapshot: Any = None) -> PassRecord:
        """Append a record; ``snapshot`` is the graph after it (a clone or IR text), if changed."""
        self.records.append(record)
        if snapshot is not None:
            self._ir[len(self.records) - 1] = snapshot
        return record

    def set_input_ir(self, snapshot: Any) -> None:
        self._ir[-1] = snapshot

    def add_stage(self, name: str, ms: float) -> None:
        self.stages.append(Stage(name, float(ms)))

    # -- queries -----------------------------------------------------------------

    @property
    def total_ms(self) -> float:
        return sum(s.ms for s in self.stages) + sum(r.ms + r.check_ms for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, key: int | str) -> PassRecord:
        if isinstance(key, int):
            return self.records[key]
        return self.records[self._index(key)]

    def _index(self, pass_name: str) -> int:
        for i in range(len(self.records) - 1, -1, -1):
            if self.records[i].name == pass_name:
                return i
        ran = ", ".join(dict.fromkeys(r.name for r in self.records)) or "none"
        raise PassError(f"no pass named {pass_name!r} in this log (passes run: {ran})")

    def rule_counts(self) -> dict[str, int]:
        """Matches per rule, summed over all records."""
        out: dict[str, int] = {}
        for r in self.records:
            for rule, st in r.rules.items():
                out[rule] = out.get(rule, 0) + st["matched"]
        return out

    def summary(self) -> dict[str, Any]:
        by = {s: [r.name for r in self.records if r.status == s] for s in STATUSES}
        return {
            "level": self.level,
            "passes": len(self.records),
            "changed": by[CHANGED],
            "unchanged": by[UNCHANGED],
            "rolled_back": by[ROLLED_BACK],
            "failed": by[FAILED],
            "nodes_before": self.records[0].nodes_before if self.records else None,
            "nodes_after": self.records[-1].nodes_after if self.records else None,
            "rules": {k: v for k, v in self.rule_counts().items() if v},
            "total_ms": round(self.total_ms, 3),
        }

    def ir_after(self, pass_name: str | int) -> str:
        """The text IR right after the (last run of the) named pass, or after record ``i``."""
        i = pass_name if isinstance(pass_name, int) else self._index(pass_name)
        if not -1 <= i < len(self.records):
            raise PassError(f"no record {i} in this log ({len(self.records)} records)")
        j = i
        while j >= -1 and j not in self._ir:
            j -= 1
        if j < -1:
            raise PassError("this log holds no IR (it was loaded from JSON without IR, or "
                            "built without snapshots); rerun with TRANSFUSE_DUMP_DIR to keep it")
        snap = self._ir[j]
        if not isinstance(snap, str):
            from transfuse.ir.printer import print_graph

            snap = print_graph(snap)
            self._ir[j] = snap
        return snap

    def why_not(self, rule: str) -> str:
        """Why ``rule`` (an id, or a prefix ending in ``/``) did not rewrite: near misses and stats."""
        prefix = rule.endswith("/")

        def hit(r: str) -> bool:
            return r.startswith(rule) if prefix else r == rule

        lines: list[str] = []
        misses = [(rec, m) for rec in self.records for m in rec.near_misses if hit(m.rule)]
        stats: dict[str, dict[str, int]] = {}
        passes: dict[str, list[str]] = {}
        for rec in self.records:
            for r, st in rec.rules.items():
                if hit(r):
                    agg = stats.setdefault(r, _new_stats())
                    for k in agg:
                        agg[k] += st.get(k, 0)
                    passes.setdefault(r, [])
                    if rec.name not in passes[r]:
                        passes[r].append(rec.name)
        if misses:
            lines.append(f"{rule}: {len(misses)} near miss{'es' if len(misses) != 1 else ''}")
            for rec, m in misses:
                lines.append(f"  - {m.rule} at {m.where}: {m.reason}  [{rec.name}]")
        for r, st in sorted(stats.items()):
            where = ", ".join(passes[r])
            if st["matched"]:
                lines.append(f"{r} matched {st['matched']} time{'s' if st['matched'] != 1 else ''}"
                             f" (in {where})")
            elif st["tried"] or st["missed"]:
                tried = max(st["tried"], st["missed"])
                lines.append(f"{r} was tried {tried} time{'s' if tried != 1 else ''} in {where} "
                             f"and never matched")
            else:
                lines.append(f"{r} never matched: {where} ran but found no candidate for it")
        if not lines:
            ran = ", ".join(dict.fromkeys(r.name for r in self.records)) or "none"
            lines.append(f"{rule} was never tried: no pass that ran has this rule "
                         f"(passes run: {ran})")
        return "\n".join(lines)

    def quant_report(self):
        """The :class:`~transfuse.passes.quant.report.QuantReport` of the (last) run of
        ``quant.quantize-weights`` that quantized the model, or None when the model was not
        quantized (``quantize=`` not given, or the pass did not run or failed)."""
        from transfuse.passes.quant.report import QuantReport

        for r in reversed(self.records):
            if r.name == "quant.quantize-weights" and "quant" in r.data and \
                    r.status not in (FAILED, ROLLED_BACK):
                return QuantReport.from_json(r.data["quant"])
        return None

    # -- JSON ----------------------------------------------------------------------

    def to_json(self, include_ir: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps(log.to_json())``); IR text only if asked."""
        d: dict[str, Any] = {
            "version": 1,
            "level": self.level,
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "records": [r.to_json() for r in self.records],
        }
        if include_ir:
            d["ir"] = {str(i): self.ir_after(i) for i in sorted(self._ir)}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | str) -> PassLog:
        if isinstance(d, str):
            d = json.loads(d)
        if d.get("version") != 1:
            raise PassError(f"unknown pass log version {d.get('version')!r} (expected 1)")
        log = cls(d.get("level"))
        log.stages = [Stage(**s) for s in d.get("stages", [])]
        log.records = [PassRecord.from_json(r) for r in d.get("records", [])]
        log._ir = {int(i): text for i, text in d.get("ir", {}).items()}
        return log

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PassLog):
            return NotImplemented
        return (self.level, self.stages, self.records) == (other.level, other.stages, other.records)

    # -- rendering -----------------------------------------------------------------

    def __rich__(self):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        title = "transfuse pass log" + (f" ({self.level})" if self.level else "")
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      show_edge=False)
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("pass", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("ms", justify="right", no_wrap=True)
        table.add_column("nodes", justify="right", no_wrap=True)
        table.add_column("ops Δ", overflow="fold")
        table.add_column("rules", overflow="fold")
        table.add_column("check", no_wrap=True)
        for i, r in enumerate(self.records, 1):
            table.add_row(
                str(i), r.name, Text(r.status, style=_STATUS_STYLE.get(r.status, "")),
                f"{r.ms:.1f}", f"{r.nodes_before}→{r.nodes_after}", _delta_text(r.op_delta),
                _rules_text(r.rules), "" if r.numeric is None else "ok" if r.numeric.ok else "FAIL",
            )
        lines = [f"{s.name}: {s.ms:.1f} ms" for s in self.stages]
        lines.append(f"total: {self.total_ms:.1f} ms")
        checked = [r.numeric for r in self.records if r.numeric is not None and r.numeric.ok]
        if checked:
            lines.append(f"numeric checks: {len(checked)} passed, largest max_abs "
                         f"{max(n.max_abs for n in checked):.2e}")
        for i, r in enumerate(self.records, 1):
            if r.error:
                lines.append(f"[{i}] {r.name} {r.status}: {r.error}")
            for note in r.notes:
                lines.append(f"[{i}] {r.name}: {note}")
            if r.events_dropped:
                lines.append(f"[{i}] {r.name}: {r.events_dropped} more rewrite events not kept")
        return Group(table, Text("\n".join(lines)))

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=120, color_system=None, force_terminal=False,
                          legacy_windows=False, no_color=True)
        console.print(self)
        return "\n".join(line.rstrip() for line in buf.getvalue().rstrip().splitlines()) + "\n"

    def __repr__(self) -> str:
        return f"<PassLog {len(self.records)} records, {self.total_ms:.1f} ms>"


def _delta_text(delta: Mapping[str, int], limit: int = 3) -> str:
    items = sorted(delta.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
    parts = [f"{v:+d} {k}" for k, v in items[:limit]]
    if len(items) > limit:
        parts.append(f"(+{len(items) - limit} more)")
    return "\n".join(parts)


def _rules_text(rules: Mapping[str, Mapping[str, int]], limit: int = 3) -> str:
    hits = sorted(((r, st["matched"]) for r, st in rules.items() if st["matched"]),
                  key=lambda kv: (-kv[1], kv[0]))
    parts = [f"{r}×{n}" for r, n in hits[:limit]]
    if len(hits) > limit:
        parts.append(f"(+{len(hits) - limit} more)")
    return "\n".join(parts)


__all__ = ["PassLog", "PassRecord", "RewriteEvent", "NearMiss", "NodeRef", "NumericCheck",
           "Stage", "CHANGED", "UNCHANGED", "ROLLED_BACK", "FAILED"]
