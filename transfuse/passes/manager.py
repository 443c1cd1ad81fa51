"""Running passes: ordering, timing, change detection, verification and rollback.

``run_pipeline(graph, "O2")`` runs the level's passes (``passes/pipelines.py``)
in place and returns a :class:`~transfuse.passes.log.PassLog`. For each pass:

1. the manager listens to the graph (``Graph.listeners``: nodes created,
   erased, inputs rewired) and times the pass; "changed" means the graph saw
   an edit or its constants changed;
2. with ``verify=True``: the IR verifier runs after every pass; after a
   changing one the reference interpreter on ``sample_inputs`` is compared with the
   outputs before the pass (``|after - before| <= atol + rtol * |before|``
   elementwise, same dtypes and shapes). A pass that raises or breaks the IR
   is ``failed``, one that changes numerics is ``rolled back``; either way the
   graph is restored in place from a snapshot and the pipeline goes on;
3. with ``verify=False`` a pass that raises stops the pipeline with a
   :class:`PassError` naming it.

Environment (no code changes needed): ``TRANSFUSE_LOG=1`` logs the table at
INFO at the end (``=stderr`` also writes it to stderr); ``TRANSFUSE_DUMP_DIR=dir``
writes ``00_input.txt`` and ``NN_<pass>.txt`` (the IR after each pass).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from transfuse.errors import PassError
from transfuse.ir.graph import Graph, Node
from transfuse.ir.interpret import interpret
from transfuse.ir.verify import verify as verify_ir
from transfuse.passes.base import Pass, PassContext
from transfuse.passes.log import (
    CHANGED,
    FAILED,
    ROLLED_BACK,
    UNCHANGED,
    NumericCheck,
    PassLog,
    PassRecord,
)
from transfuse.passes.pipelines import get_pipeline, resolve_passes

logger = logging.getLogger(__name__)

def run_pipeline(
    graph: Graph,
    level: str | Sequence[str | Pass | type[Pass]] = "O2",
    *,
    verify: bool = False,
    sample_inputs: Sequence[torch.Tensor] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    options: Mapping[str, Any] | None = None,
    keep_ir: bool = True,
) -> PassLog:
    """Run the passes of optimization ``level`` (``O0``, ``O1``, ``O2``) on ``graph`` in place.

    ``level`` may also be a list of passes (names or Pass objects); see :func:`run_passes`.
    """
    if isinstance(level, str):
        passes, name = get_pipeline(level), level
    else:
        passes, name = resolve_passes(level), "custom"
    return run_passes(graph, passes, verify=verify, sample_inputs=sample_inputs,
                      rtol=rtol, atol=atol, options=options, keep_ir=keep_ir, level=name)


def run_passes(
    graph: Graph,
    passes: Sequence[str | Pass | type[Pass]],
    *,
    verify: bool = False,
    sample_inputs: Sequence[torch.Tensor] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    options: Mapping[str, Any] | None = None,
    keep_ir: bool = True,
    level: str | None = None,
) -> PassLog:
    """Run ``passes`` (names such as ``"cleanup.eliminate-dead-code"`` or Pass objects) in order.

    ``keep_ir`` keeps a snapshot of the graph after each changing pass so that
    ``log.ir_after(name)`` works (clones share the constants' tensors).
    Numeric checks need ``verify=True`` and ``sample_inputs`` (the flat graph
    inputs); without sample inputs only the IR verifier runs.
    """
    pass_objs = resolve_passes(passes)
    log = PassLog(level)
    dump_dir = _dump_dir()
    # the graph as it is now; the rollback point and the IR shown by ir_after
    snapshot: Graph | None = graph.clone() if (keep_ir or verify) else None
    if keep_ir:
        log.set_input_ir(snapshot)
    if dump_dir is not None:
        _dump(dump_dir, 0, "input", graph)

    reference: list[torch.Tensor] | None = None
    if verify:
        verify_ir(graph)  # a broken input is not the first pass's fault
        if sample_inputs is not None:
            reference = interpret(graph, sample_inputs)

    for k, p in enumerate(pass_objs, 1):
        record = PassRecord(p.name, nodes_before=len(graph))
        hist_before = graph.op_histogram()
        consts_before = list(graph.constants)
        tracker = _ChangeTracker()
        ctx = PassContext(p, record, options)
        graph.listeners.append(tracker)
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            p.run(graph, ctx)
        except Exception as e:  # noqa: BLE001 - a pass failure is logged or re-raised below
            error = e
        finally:
            record.ms = (time.perf_counter() - t0) * 1e3
            graph.listeners.remove(tracker)
        record.edits = tracker.counts()
        changed = tracker.changed or ctx.changed or list(graph.constants) != consts_before

        if error is not None and not verify:
            record.status, record.error = FAILED, f"{type(error).__name__}: {error}"
            record.nodes_after = len(graph)
            log.add(record)
            exc = PassError(
                f"pass {p.name} failed: {type(error).__name__}: {error}. The graph may be "
                f"partly rewritten; run with verify=True to roll failing passes back and go on"
            )
            exc.pass_log = log  # what ran before, for the curious
            raise exc from error

        keep = True
        t1 = time.perf_counter()
        if error is not None:
            record.status, record.error = FAILED, f"{type(error).__name__}: {error}"
            keep = False
        elif verify:
            try:
                verify_ir(graph)
            except Exception as e:  # noqa: BLE001 - reported in the record
                record.status, record.error = FAILED, f"IR verify failed after the pass: {e}"
                keep = False
            if keep and changed and reference is not None:
                try:
                    outputs = interpret(graph, sample_inputs)
                except Exception as e:  # noqa: BLE001 - reported in the record
                    record.status = FAILED
                    record.error = f"the graph after the pass does not run: {e}"
                    keep = False
                else:
                    record.numeric = compare_outputs(reference, outputs, rtol=rtol, atol=atol)
                    if p.changes_function:
                        # an opt-in pass that changes the model on purpose (logits="last",
                        # MHA->GQA, sparse attention) reports its own error; its outputs
                        # are the reference from here on
                        record.notes.append(f"changes the model's function on purpose; "
                                            f"difference to before: {record.numeric}")
                        record.numeric = None
                        reference = outputs
                    elif record.numeric.ok:
                        reference = outputs
                    else:
                        record.status = ROLLED_BACK
                        n = record.numeric
                        record.error = (f"outputs changed beyond rtol={rtol:g}, atol={atol:g}: "
                                        f"{n.detail} (max_abs={n.max_abs:.3g}, "
                                        f"max_rel={n.max_rel:.3g})")
                        keep = False
        if not keep:
            if snapshot is None:  # only reachable with verify=False, which re-raises above
                raise PassError(f"pass {p.name} failed and no snapshot to roll back to")
            graph.restore(snapshot)
            logger.warning("pass %s %s: %s", p.name, record.status, record.error)
        else:
            record.status = CHANGED if changed else UNCHANGED
        record.check_ms = (time.perf_counter() - t1) * 1e3 if verify else 0.0
        record.nodes_after = len(graph)
        record.op_delta = _delta(hist_before, graph.op_histogram()) if keep else {}

        new_snapshot = None
        if keep and changed and (keep_ir or verify):
            snapshot = new_snapshot = graph.clone()
        log.add(record, new_snapshot if keep_ir else None)
        logger.debug("pass %s: %s, %d -> %d nodes, %.1f ms", p.name, record.status,
                     record.nodes_before, record.nodes_after, record.ms)
        if dump_dir is not None:
            _dump(dump_dir, k, p.name, graph)

    _report(log)
    return log


# -- change detection ----------------------------------------------------------


class _ChangeTracker:
    """A Graph listener that counts edits."""

    def __init__(self):
        self.created = self.erased = self.rewired = 0

    def on_create(self, node: Node) -> None:
        self.created += 1

    def on_erase(self, node: Node) -> None:
        self.erased += 1

    def on_rewire(self, node: Node | None) -> None:
        self.rewired += 1

    @property
    def changed(self) -> bool:
        return bool(self.created or self.erased or self.rewired)

    def counts(self) -> dict[str, int]:
        return {"created": self.created, "erased": self.erased, "rewired": self.rewired}


def _delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    ops = set(before) | set(after)
    return {op: after.get(op, 0) - before.get(op, 0) for op in sorted(ops)
            if after.get(op, 0) != before.get(op, 0)}


# -- numeric check -------------------------------------------------------------


def compare_outputs(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], *,
                    rtol: float = 1e-4, atol: float = 1e-5) -> NumericCheck:
    """Elementwise ``|after - before| <= atol + rtol * |before|``; dtypes and shapes must match.

    ``max_rel`` is ``|after - before| / max(|before|, atol)``. NaNs must sit in
    the same places; equal infinities count as equal.
    """
    if len(before) != len(after):
        return NumericCheck(math.inf, math.inf, False,
                            f"{len(before)} outputs before, {len(after)} after")
    max_abs = max_rel = 0.0
    problems: list[str] = []
    floor = atol if atol > 0 else 1e-30
    for i, (b, a) in enumerate(zip(before, after)):
        if a.dtype != b.dtype:
            problems.append(f"output {i} dtype {b.dtype} -> {a.dtype}")
            max_abs = max_rel = math.inf
            continue
        if a.shape != b.shape:
            problems.append(f"output {i} shape {list(b.shape)} -> {list(a.shape)}")
            max_abs = max_rel = math.inf
            continue
        if a.numel() == 0:
            continue
        bf, af = b.detach().double(), a.detach().double()
        same = (af == bf) | (torch.isnan(af) & torch.isnan(bf))
        diff = torch.where(same, torch.zeros_like(af), (af - bf).abs())
        diff = torch.nan_to_num(diff, nan=math.inf)
        bad = diff > atol + rtol * bf.abs().nan_to_num(nan=0.0)
        out_abs = float(diff.max())
        out_rel = float((diff / bf.abs().clamp_min(floor)).nan_to_num(nan=math.inf).max())
        max_abs, max_rel = max(max_abs, out_abs), max(max_rel, out_rel)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            problems.append(f"output {i}: {n_bad} of {a.numel()} elements differ "
                            f"(max_abs={out_abs:.3g})")
    return NumericCheck(max_abs, max_rel, not problems, "; ".join(problems))


# -- environment: log and dumps ------------------------------------------------


def _dump_dir() -> Path | None:
    d = os.environ.get("TRANSFUSE_DUMP_DIR")
    if not d:
        return None
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dump(dump_dir: Path, k: int, name: str, graph: Graph) -> None:
    from transfuse.ir.printer import print_graph

    safe = "".join(c if (c.isalnum() or c in "._-") else "_" for c in name)
    (dump_dir / f"{k:02d}_{safe}.txt").write_text(print_graph(graph))


def _report(log: PassLog) -> None:
    mode = os.environ.get("TRANSFUSE_LOG", "").strip().lower()
    if mode in ("", "0", "false", "no", "off"):
        return
    text = str(log)
    logger.info("\n%s", text)
    if mode == "stderr":
        sys.stderr.write(text)


__all__ = ["run_pipeline", "run_passes", "compare_outputs"]
