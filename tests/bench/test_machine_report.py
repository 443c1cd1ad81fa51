"""Machine facts, the slug used in result file names, and the chart/table rendering."""

from __future__ import annotations

import socket

from rich.console import Console

from transfuse.bench import machine
from transfuse.bench.report import case_table, failures, write_chart


def test_slug_is_short_clean_and_hostname_free(monkeypatch):
    monkeypatch.setattr(machine, "cpu_model",
                        lambda: "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz")
    assert machine.machine_slug() == "intel-xeon-platinum-8480"
    monkeypatch.setattr(machine, "cpu_model", lambda: "AMD EPYC 7B13 64-Core Processor")
    assert machine.machine_slug() == "amd-epyc-7b13"
    monkeypatch.undo()
    slug = machine.machine_slug()
    assert slug and len(slug) <= 40 and socket.gethostname().lower() not in slug


def test_machine_info_fields():
    info = machine.machine_info(threads=1)
    assert info["threads"] == 1 and info["logical_cores"] >= 1
    assert all(f.startswith(("avx", "amx", "fma", "f16c")) for f in info["cpu_flags"])
    assert info["versions"]["torch"]


def _doc():
    def entry(name, status, ratio=None, reason=None):
        return {"contestant": name, "status": status, "reason": reason, "ratio": ratio,
                "median_ms": ratio and ratio * 10, "iqr_ms": 0.1 if ratio else None,
                "q1_ms": ratio and ratio * 10 - 0.05, "q3_ms": ratio and ratio * 10 + 0.05,
                "compile_s": 1.0, "peak_mb": 2.0, "build_mb": 3.0, "max_rel_err": 1e-6}

    cases = [{"model": "m", "batch": 1, "seq": s, "mode": "prefill", "device": "cpu",
              "dtype": "float32", "baseline": "eager", "label": f"m b1 s{s}",
              "results": [entry("eager", "ok", 1.0), entry("fast", "ok", 0.5),
                          entry("bad", "wrong", reason="max rel err 1e+00 (tolerance 1e-04)"),
                          entry("crash", "failed", reason="IndexError: list index out of range")]}
             for s in (16, 128)]
    return {"cases": cases, "machine": {"cpu_model": "X", "threads": 1},
            "settings": {"rounds": 10}}


def test_table_shows_verdicts_and_chart_is_a_png(tmp_path):
    doc = _doc()
    console = Console(width=200, record=True)
    console.print(case_table(doc["cases"][0], doc["machine"]))
    text = console.export_text()
    assert "✓" in text and "✗" in text and "failed: IndexError" in text and "0.50" in text
    assert len(failures(doc)) == 4
    png = write_chart(doc, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
