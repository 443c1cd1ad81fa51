"""End to end: every reference model and Hugging Face config, at every level,
served by one compiled model at several sequence lengths, matches eager."""

from __future__ import annotations

import time

import pytest
import torch

import transfuse
from transfuse.models import get_model
from transfuse.passes.pipelines import PIPELINES

RTOL, ATOL = 1e-4, 1e-5
LEVELS = ("O0", "O1", "O2")


def _ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _check_close(ref, out, what):
    if isinstance(ref, torch.Tensor):
        assert out.dtype == ref.dtype and out.shape == ref.shape, what
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    elif isinstance(ref, dict):
        assert type(out) is type(ref) and list(out.keys()) == list(ref.keys()), what
        for k in ref:
            _check_close(ref[k], out[k], f"{what}[{k}]")
    elif isinstance(ref, (tuple, list)):
        assert type(out) is type(ref) and len(out) == len(ref), what
        for i, (a, b) in enumerate(zip(ref, out)):
            _check_close(a, b, f"{what}[{i}]")
    else:
        assert out == ref, what


def _inputs_like(inputs, vocab: int, seq: int, seed: int):
    """Token ids (and, for encoders, an attention mask with the last quarter padded)."""
    ids = _ids(vocab, 1, seq, seed)
    rest = []
    for _ in inputs[1:]:
        mask = torch.ones_like(ids)
        mask[:, seq - seq // 4:] = 0
        rest.append(mask)
    return (ids, *rest), {}


def _run_seqs(model, compiled, make_inputs, seqs):
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            args, kwargs = make_inputs(s, i)
            _check_close(model(*args, **kwargs), compiled(*args, **kwargs), f"seq={s}")


#: what O2 fuses in each 2-layer tiny model (op -> count); softmax never survives O2
O2_FUSED = {
    "gpt2-tiny": {"attention": 2, "add_norm": 5},
    "llama-tiny": {"attention": 2, "rotary": 4, "swiglu": 2, "add_norm": 4, "rms_norm": 1},
    "bert-tiny": {"attention": 2, "add_norm": 5},
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_reference_tiny(name, level):
    model, inputs, dynamic = get_model(name, seq=16)
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level=level)
    vocab = model.config.vocab_size

    _run_seqs(model, compiled, lambda s, i: _inputs_like(inputs, vocab, s, 100 + i), [5, 16, 33])
    log = compiled.pass_log
    assert [r.name for r in log.records] == PIPELINES[level], str(log)  # every pass, in order
    assert {r.status for r in log.records} <= {"changed", "unchanged"}, str(log)
    hist = compiled.graph.op_histogram()
    if level == "O2":
        assert hist["softmax"] == 0, hist
        assert {op: hist[op] for op in O2_FUSED[name]} == O2_FUSED[name], hist
    else:  # capture and cleanup only: the attention math is still there, nothing fused
        assert hist["softmax"] == 2 and hist["attention"] == 0 and hist["add_norm"] == 0, hist


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-small", "llama-small", "bert-small"])
def test_reference_small(name):
    model, inputs, dynamic = get_model(name, seq=16)
    vocab = model.config.vocab_size
    for level in LEVELS:
        compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level=level)
        _run_seqs(model, compiled, lambda s, i: _inputs_like(inputs, vocab, s, 200 + i),
                  [7, 16, 40])


@pytest.mark.slow
def test_gpt2_small_compile_time():
    """Issue 2 target: optimize() on gpt2 small at O2 within 10 s on the CI machine."""
    model, inputs, dynamic = get_model("gpt2-small", seq=128)
    t0 = time.perf_counter()
    transfuse.optimize(model, inputs, dynamic=dynamic, level="O2")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, f"optimize(gpt2-small, O2) took {elapsed:.1f} s"


def test_verify_mode_no_rollbacks():
    model, inputs, dynamic = get_model("gpt2-tiny", seq=16)
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic, level="O2", verify=True)
    statuses = {r.status for r in compiled.pass_log.records}
    assert "rolled back" not in statuses and "failed" not in statuses, str(compiled.pass_log)
    assert any(r.numeric is not None for r in compiled.pass_log.records)


def test_save_load_roundtrip_bit_identical(tmp_path):
    model, inputs, dynamic = get_model("llama-tiny", seq=16)
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic)
    compiled.save(tmp_path / "art")
    loaded = transfuse.load(tmp_path / "art")
    ids = _ids(model.config.vocab_size, 1, 21, seed=7)
    with torch.inference_mode():
        a, b = compiled(ids), loaded(ids)
    assert torch.equal(a, b)


def test_input_errors_name_the_input():
    model, inputs, dynamic = get_model("gpt2-tiny", seq=16)
    compiled = transfuse.optimize(model, inputs, dynamic=dynamic)
    with pytest.raises(transfuse.InputError, match="input_ids"):
        compiled(inputs[0].float())
    with pytest.raises(transfuse.InputError, match="range"):
        compiled(torch.zeros(1, 100_000, dtype=torch.long))
    with pytest.raises(transfuse.InputError, match="rank"):
        compiled(torch.zeros(16, dtype=torch.long))
