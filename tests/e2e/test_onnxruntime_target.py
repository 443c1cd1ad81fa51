"""End to end with ``target="onnxruntime"``: the reference models at O2 against eager at two
sequence lengths (one compile), fused-op counts in the pass log, a deployable export that
runs without transfuse, and save/load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

import transfuse
from transfuse.models import get_model

pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-4, 1e-5

#: fused ops each tiny model must get (2 layers each)
EXPECTED = {
    "gpt2-tiny": {"GroupQueryAttention": 2, "FastGelu": 2},
    "llama-tiny": {"GroupQueryAttention(rotary)": 2, "SkipSimplifiedLayerNormalization": 4,
                   "QuickGelu": 2},
    "bert-tiny": {"GroupQueryAttention": 2, "BiasGelu": 2},  # non-causal, with the pad bias
}


def _inputs(name: str, seq: int, seed: int):
    _, args, _ = get_model(name, seq=seq, seed=seed)
    return args


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def compiled(request):
    name = request.param
    model, args, dynamic = get_model(name, seq=16)
    return name, model, transfuse.optimize(model, args, dynamic=dynamic, level="O2",
                                           target="onnxruntime")


def test_matches_eager_at_two_lengths(compiled):
    name, model, c = compiled
    assert c.backend == "onnxruntime"
    with torch.inference_mode():
        for seq, seed in ((16, 1), (37, 2)):
            args = _inputs(name, seq, seed)
            ref, out = model(*args), c(*args)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_fused_counts_in_pass_log_and_source(compiled):
    name, _, c = compiled
    counts = c.program.fused_counts
    for op, n in EXPECTED[name].items():
        assert counts[op] == n, (op, counts)
    record = c.pass_log["lower.onnxruntime"]
    assert record.notes[0].startswith("fused ops: ")
    for op, n in EXPECTED[name].items():
        assert record.rules[f"onnxruntime/{op}"]["matched"] == n
    assert "lower.onnxruntime" in str(c.pass_log)
    assert "fused ops:" in c.source


def test_export_runs_in_plain_onnxruntime(compiled, tmp_path):
    name, model, c = compiled
    path = tmp_path / f"{name}.onnx"
    c.export_onnx(str(path))
    onnx.checker.check_model(str(path), full_check=False)
    args = _inputs(name, 21, 3)
    feeds = tmp_path / "feeds.json"
    feeds.write_text(json.dumps({s.name: a.tolist() for s, a in zip(c.signature.inputs, args)}))
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import onnxruntime as ort
        sess = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        feeds = {{k: np.array(v, dtype=np.int64) for k, v in
                 json.load(open({str(feeds)!r})).items()}}
        out = sess.run(None, feeds)[0]
        np.save({str(tmp_path / 'out.npy')!r}, out)
        assert "transfuse" not in sys.modules and "torch" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    import numpy as np

    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    with torch.inference_mode():
        torch.testing.assert_close(got, model(*args), rtol=RTOL, atol=ATOL)


def test_save_and_load(compiled, tmp_path):
    name, model, c = compiled
    c.save(str(tmp_path / "art"))
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime"
    assert "model.onnx" in manifest["files"]  # the deployable model, hashed like the rest
    loaded = transfuse.load(str(tmp_path / "art"))
    assert loaded.backend == "onnxruntime"
    args = _inputs(name, 11, 4)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(*args), c(*args), rtol=0, atol=0)
    assert [r.name for r in loaded.pass_log.records].count("lower.onnxruntime") == 1


def test_external_data_above_the_threshold(tmp_path):
    """Models above 2 GB keep their weights in <name>.data next to the model (the threshold is
    lowered here so a tiny model takes that path)."""
    from transfuse.codegen.onnx import export_graph, save_model

    model, args, dynamic = get_model("gpt2-tiny", seq=8)
    c = transfuse.optimize(model, args, dynamic=dynamic, target="onnxruntime")
    path = save_model(export_graph(c.graph, c.signature), tmp_path / "m.onnx",
                      external_threshold=1000)
    assert (tmp_path / "m.onnx.data").stat().st_size > 100_000
    assert path.stat().st_size < 100_000
    onnx.checker.check_model(str(path), full_check=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_ids": args[0].numpy()})[0]
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(out), model(*args), rtol=RTOL, atol=ATOL)


def test_logits_last(tmp_path):
    model, args, dynamic = get_model("gpt2-tiny", seq=12)
    c = transfuse.optimize(model, args, dynamic=dynamic, target="onnxruntime", logits="last")
    with torch.inference_mode():
        ref = model(*args)[:, -1:]
        torch.testing.assert_close(c(*args), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-small", "llama-small", "bert-base"])
def test_small_presets_fused_counts(name):
    """The benchmark models: every layer's attention, norm and activation fused."""
    model, args, dynamic = get_model(name, seq=16)
    c = transfuse.optimize(model, args, dynamic=dynamic, target="onnxruntime")
    layers = model.config.n_layer
    counts = c.program.fused_counts
    attn = counts["GroupQueryAttention"] + counts["GroupQueryAttention(rotary)"] + \
        counts["MultiHeadAttention"]
    assert attn == layers, counts
    with torch.inference_mode():
        torch.testing.assert_close(c(*args), model(*args), rtol=RTOL, atol=1e-4)
