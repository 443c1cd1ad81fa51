"""Run a benchmark with a rich progress bar, print its tables, write its files.

Shared by ``transfuse bench`` and ``benchmarks/run_all.py`` so both follow the
same protocol and write the same results.json schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from transfuse.bench.harness import Settings, contestants_for, run_benchmark, work_units
from transfuse.bench.report import failures, tables, write_chart, write_json


def run_and_report(settings: Settings, json_path: str | Path, png_path: str | Path,
                   console: Console) -> dict[str, Any]:
    """Run ``settings`` under a progress bar, print the tables, write results.json and the PNG."""
    settings.validate()
    total = work_units(settings, lambda m: len(contestants_for(settings, m)[0]))
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("bench", total=total)

        def step(description: str, n: int) -> None:
            bar.update(task, description=description, advance=n)

        results = run_benchmark(settings, progress=step)
    for table in tables(results):
        console.print(table)
    problems = failures(results)
    if problems:
        console.print("[bold]not timed:[/bold]")
        for line in problems:
            console.print(f"  {line}", markup=False, highlight=False)
    json_file = write_json(results, json_path)
    png_file = write_chart(results, png_path)
    console.print(f"wrote {json_file} and {png_file}  ({results['wall_s']:.0f} s)")
    return results
