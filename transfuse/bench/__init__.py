"""Benchmarking (the protocol of ../shared/BENCHMARKING.md).

    transfuse bench --model gpt2-small --seq 16,128 --batch 1 --threads 1

- :mod:`~transfuse.bench.contestants` — what runs a model (eager, torch.compile, ORT,
  ORT + its optimizer, transfuse per target and level) and the registry;
- :mod:`~transfuse.bench.workloads` — built-in, Hugging Face (config JSON) and ONNX-file
  models with their inputs per case;
- :mod:`~transfuse.bench.harness` — build, check against the baseline, measure memory,
  time interleaved; the results.json document;
- :mod:`~transfuse.bench.timing`, :mod:`~transfuse.bench.memory`,
  :mod:`~transfuse.bench.correctness`, :mod:`~transfuse.bench.machine` — the pieces;
- :mod:`~transfuse.bench.report` and :mod:`~transfuse.bench.console` — tables, chart, files.
"""
