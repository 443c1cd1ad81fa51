"""Showing results: rich tables, results.json and a PNG chart.

The table has one row per contestant for each case: median ms, IQR, ratio to the
baseline, compile s, peak MB of one call, resident MB its build added, and the
correctness verdict (✓ / ✗ with the max relative error). The chart plots the
ratio to the baseline per case, one bar per contestant (lower is faster); a
contestant that was not timed gets no bar and a short mark saying why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

_MARK = {"wrong": "✗ wrong", "failed": "failed", "unsupported": "unsupported",
         "unavailable": "n/a"}


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _short(reason: str | None, width: int = 110) -> str:
    line = (reason or "").strip().splitlines()[0] if reason and reason.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def verdict(entry: dict[str, Any]) -> Text:
    status = entry["status"]
    if status == "ok":
        err = entry.get("max_rel_err")
        return Text("✓" if err is None else f"✓ {err:.1e}", style="green")
    if status == "wrong":
        return Text(f"✗ {_short(entry['reason'])}", style="bold red")
    return Text(f"{status}: {_short(entry['reason'])}", style="yellow")


def case_table(case: dict[str, Any], machine: dict[str, Any] | None = None) -> Table:
    threads = f"  threads={machine['threads']}" if machine else ""
    title = (f"{case['model']}  batch={case['batch']} seq={case['seq']}  {case['mode']}  "
             f"{case['device']} {case['dtype']}{threads}")
    table = Table(title=title, title_justify="left")
    base = case["baseline"]
    for col in ("contestant", "median ms", "IQR ms", f"ratio to {base}", "compile s",
                "peak MB", "build MB", "correct (max rel err)"):
        table.add_column(col, justify="left" if col.startswith(("contestant", "correct"))
                         else "right", overflow="fold")
    for e in case["results"]:
        ratio = e.get("ratio")
        ratio_text = Text(_num(ratio, ".2f"),
                          style="" if ratio is None else ("green" if ratio < 0.97 else
                                                          "red" if ratio > 1.03 else ""))
        table.add_row(e["contestant"], _num(e["median_ms"], ".2f"), _num(e["iqr_ms"], ".2f"),
                      ratio_text, _num(e["compile_s"], ".2f"), _num(e["peak_mb"], ".1f"),
                      _num(e["build_mb"], ".1f"), verdict(e))
    return table


def tables(results: dict[str, Any]) -> list[Table]:
    return [case_table(c, results.get("machine")) for c in results["cases"]]


def failures(results: dict[str, Any]) -> list[str]:
    """One line per contestant that was not timed: "case: name status: reason"."""
    out = []
    for case in results["cases"]:
        for e in case["results"]:
            if e["status"] != "ok":
                out.append(f"{case['label']}: {e['contestant']} {e['status']}: "
                           f"{_short(e['reason'], 300)}")
    return out


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path


def write_chart(results: dict[str, Any], path: str | Path) -> Path:
    """A grouped bar chart of the ratio to the baseline per case (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    names: list[str] = []
    for case in cases:
        names += [e["contestant"] for e in case["results"] if e["contestant"] not in names]
    n = max(len(names), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + len(cases) * (0.22 * n + 0.4)), 4.8))
    cmap = plt.get_cmap("tab10")
    top = 1.0
    labelled: set[str] = set()
    for j, name in enumerate(names):
        for i, case in enumerate(cases):
            e = next((r for r in case["results"] if r["contestant"] == name), None)
            x = i - 0.4 + width * (j + 0.5)
            if e is None:
                continue
            if e["ratio"] is None:
                ax.text(x, 0.02, _MARK.get(e["status"], e["status"]), rotation=90, ha="center",
                        va="bottom", fontsize=7, color="firebrick" if e["status"] == "wrong"
                        else "dimgray")
                continue
            ref = next(r for r in case["results"] if r["contestant"] == case["baseline"])
            lo, hi = e["q1_ms"] / ref["median_ms"], e["q3_ms"] / ref["median_ms"]
            top = max(top, e["ratio"], hi)
            ax.bar(x, e["ratio"], width, color=cmap(j % 10),
                   label=None if name in labelled else name,
                   yerr=[[max(0.0, e["ratio"] - lo)], [max(0.0, hi - e["ratio"])]],
                   error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": "0.25"})
            labelled.add(name)
            ax.text(x, e["ratio"], f"{e['ratio']:.2f}", ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c["label"] for c in cases], rotation=15, ha="right", fontsize=8)
    base = cases[0]["baseline"] if cases else "eager"
    ax.set_ylabel(f"median time / {base} (lower is faster)\nwhiskers: IQR", fontsize=8)
    ax.set_ylim(0, top * 1.15)
    m = results.get("machine", {})
    ax.set_title(f"transfuse bench — {m.get('cpu_model', '?')}, {m.get('threads', '?')} "
                 f"thread(s), {results['settings'].get('rounds')} rounds", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
