"""runtime/generation_model.py: GenerationModel over a small hand-built step graph.

The step graph here is a position-aware bigram LM written in the IR (logits of a row =
``tok_table[token] + pos_table[position]`` at the row's ``logit_rows`` entry) with the
generation graph's inputs, so the wiring (input order, logit rows, per-row positions, the
cache spec, lazy allocation, save/load) is tested without the attention op; the compiled
transformer step is tests/e2e/test_generate_e2e.py's.
"""

from __future__ import annotations

import json

import pytest
import torch
from prompt_batches import left_padded
from transformers import GenerationConfig

import transfuse
from transfuse.errors import ArtifactError, InputError, LoweringError
from transfuse.ir.graph import Graph
from transfuse.ir.types import DType, TensorType, sym
from transfuse.runtime import artifact
from transfuse.runtime.compiled import CompiledModel, load
from transfuse.runtime.generation_model import GenerationModel, config_fields

VOCAB, MAX_LEN, MAX_BATCH, BLOCK = 16, 12, 3, 4


def bigram_step(layout: str = "contiguous", cache_shape: list[int] | None = None, *,
                max_len: int = MAX_LEN, max_batch: int = MAX_BATCH) -> Graph:
    """The bigram step; its position table has MAX_LEN rows whatever ``max_len`` says."""
    g = Graph("bigram_step")
    i64, f32 = DType.i64, DType.f32
    n, seqs, rows = sym("seq"), sym("seqs"), sym("rows")
    ids = g.add_input("input_ids", TensorType(i64, [1, n]), exact=True)
    pos = g.add_input("position_ids", TensorType(i64, [1, n]), exact=True)
    g.add_input("seq_of_token", TensorType(i64, [n]), exact=True)
    g.add_input("seq_lens", TensorType(i64, [seqs]), exact=True)
    paged = layout == "paged"
    table = [seqs, sym("table_blocks")] if paged else [seqs]
    g.add_input("cache_table", TensorType(i64, table), exact=True)
    rows_in = g.add_input("logit_rows", TensorType(i64, [rows]), exact=True)
    blocks = max_batch * -(-max_len // BLOCK)
    shape = cache_shape or ([blocks, BLOCK, 1, 2] if paged else [max_batch, max_len, 1, 2])
    for kv in ("k", "v"):
        g.add_input(f"{kv}_cache_0", TensorType(f32, shape), exact=True)
    gen = torch.Generator().manual_seed(0)
    tok_table = g.add_constant(torch.randn(VOCAB, VOCAB, generator=gen), "tok_table")
    pos_table = g.add_constant(torch.randn(MAX_LEN, VOCAB, generator=gen), "pos_table")
    last_tok = g.op("index", g.op("reshape", ids, shape=[n]), rows_in, axes=[0])
    last_pos = g.op("index", g.op("reshape", pos, shape=[n]), rows_in, axes=[0])
    logits = g.op("add", g.op("index", tok_table, last_tok, axes=[0]),
                  g.op("index", pos_table, last_pos, axes=[0]))
    g.set_outputs([logits])
    g.meta["generation"] = {"kv": layout, "max_seq_len": max_len, "max_batch": max_batch,
                            "block_size": BLOCK, "num_blocks": blocks,
                            "cache_order": "token-major", "layers": 1}
    return g


def reference(graph: Graph, prompt: list[int], new: int, eos: int | None = None) -> list[int]:
    """Greedy continuation of one unpadded prompt by the bigram tables."""
    tok, pos = graph.constants["tok_table"].const, graph.constants["pos_table"].const
    seq = list(prompt)
    for _ in range(new):
        nxt = int((tok[seq[-1]] + pos[len(seq) - 1]).argmax())
        seq.append(nxt)
        if nxt == eos:
            break
    return seq[len(prompt):]


def _batch(prompts: list[list[int]]):
    return left_padded(prompts, pad=0)


PROMPTS = [[3, 5, 7], [9], [1, 2, 4, 8, 15]]


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_generate_follows_each_rows_own_positions(layout):
    gen = GenerationModel(bigram_step(layout), generation_config={"eos_token_id": None})
    ids, mask = _batch(PROMPTS)
    out = gen.generate(ids, mask, max_new_tokens=6)
    for r, p in enumerate(PROMPTS):
        assert out[r, ids.shape[1]:].tolist() == reference(gen.graph, p, 6)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert len(gen.cache) == 0  # sequences freed, the cache is kept for the next call
    assert gen.cache_spec["layout"] == layout


def test_defaults_come_from_the_generation_config():
    ids, mask = _batch(PROMPTS)
    free = GenerationModel(bigram_step(), generation_config={"max_new_tokens": 5})
    out = free.generate(ids, mask, eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + 5
    eos = reference(free.graph, PROMPTS[0], 5)[1]  # row 0's second new token
    gen = GenerationModel(bigram_step(), generation_config=GenerationConfig(
        eos_token_id=eos, pad_token_id=0, max_new_tokens=5))
    out = gen.generate(ids, mask)
    for r, p in enumerate(PROMPTS):  # each row stops at its EOS, then is padded with 0
        want = reference(gen.graph, p, 5, eos)
        got = out[r, ids.shape[1]:].tolist()
        assert got[:len(want)] == want and set(got[len(want):]) <= {0}
    assert out[0, ids.shape[1] + 1] == eos
    assert gen.generation_config == {"eos_token_id": eos, "pad_token_id": 0, "max_new_tokens": 5}
    # stream: ints for one prompt
    ids1 = torch.tensor([PROMPTS[2]])
    assert list(gen.generate(ids1, max_new_tokens=4, eos_token_id=None, stream=True)) == \
        reference(gen.graph, PROMPTS[2], 4)


def test_the_cache_is_allocated_on_first_use_and_reported():
    gen = GenerationModel(bigram_step("paged"))
    before = gen.cache_report()
    assert before == {"allocated": False, "layout": "paged", "bytes": 2 * 9 * 4 * 2 * 4,
                      "bytes_per_token": 2 * 2 * 4}
    ids, mask = _batch(PROMPTS)
    with pytest.raises(InputError, match="exceeds the cache's max_seq_len 12"):
        gen.generate(ids, mask, max_new_tokens=10)
    with pytest.raises(InputError, match="max_batch 3"):
        gen.generate(torch.ones(4, 2, dtype=torch.long), max_new_tokens=1)
    assert not gen.cache_report()["allocated"]  # a refused call allocates nothing
    gen.generate(ids, mask, max_new_tokens=2)
    after = gen.cache_report()
    assert after["allocated"] and after["bytes"] == before["bytes"]
    assert after["bytes_per_token"] == before["bytes_per_token"]
    assert after["blocks_free"] == after["blocks_total"] == 9
    assert "not allocated" not in repr(gen) and "GenerationModel(" in repr(gen)
    stream = gen.generate(ids, mask, max_new_tokens=2, stream=True)
    next(stream)
    with pytest.raises(InputError, match="3 sequences are in its KV cache"):
        gen.to("cpu")
    stream.close()
    assert gen.to("cpu") is gen and not gen.cache_report()["allocated"]  # made again on use


def test_a_cache_that_does_not_fit_is_refused_before_allocating():
    gen = GenerationModel(bigram_step(max_len=2**20, max_batch=2**20))
    assert gen.cache_report()["bytes"] == 2**40 * 16  # 16 TiB
    with pytest.raises(InputError, match=r"KVCache: \d+ bytes .* do not fit"):
        gen.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
    assert not gen.cache_report()["allocated"]


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_save_and_load_round_trip(tmp_path, layout):
    gen = GenerationModel(bigram_step(layout), generation_config={"eos_token_id": 4,
                                                                  "max_new_tokens": 6})
    ids, mask = _batch(PROMPTS)
    want = gen.generate(ids, mask)
    gen.save(tmp_path / "g")
    manifest = json.loads((tmp_path / "g" / artifact.MANIFEST).read_text())
    assert manifest["generation"]["cache"] == gen.cache_spec
    assert manifest["generation"]["config"] == {"eos_token_id": 4, "max_new_tokens": 6}
    loaded = transfuse.load(tmp_path / "g")
    assert isinstance(loaded, GenerationModel)
    assert loaded.cache_spec == gen.cache_spec and loaded.generation_config == gen.generation_config
    assert torch.equal(loaded.generate(ids, mask), want)
    step = load(tmp_path / "g")  # runtime.compiled.load gives the step itself
    assert isinstance(step, CompiledModel) and step.graph.inputs[0].name == "input_ids"


def _rewrite_manifest(path, edit):
    mpath = path / artifact.MANIFEST
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
    mpath.write_text(json.dumps(manifest))


def test_load_refuses_a_bad_generation_field(tmp_path):
    GenerationModel(bigram_step()).save(tmp_path / "g")
    _rewrite_manifest(tmp_path / "g", lambda m: m["generation"]["cache"].update(layers="1"))
    with pytest.raises(ArtifactError, match="cache spec field 'layers'"):
        transfuse.load(tmp_path / "g")
    _rewrite_manifest(tmp_path / "g", lambda m: m["generation"]["cache"].update(
        layers=1, max_batch=5))
    with pytest.raises(ArtifactError, match=r"cannot rebuild.*k_cache_0 .* \[5, 12, 1, 2\]"):
        transfuse.load(tmp_path / "g")
    _rewrite_manifest(tmp_path / "g", lambda m: m.update(generation=[1]))
    with pytest.raises(ArtifactError, match="field 'generation' must be an object"):
        transfuse.load(tmp_path / "g")


def test_max_step_tokens_in_the_artifact(tmp_path):
    """An artifact from before max_step_tokens loads with max_batch x max_seq_len; one whose
    value is below max_batch (a decode could not run) or above that product is refused."""
    gen = GenerationModel(bigram_step())
    spec = gen.cache_spec
    assert spec["max_step_tokens"] == spec["max_batch"] * spec["max_seq_len"]
    gen.save(tmp_path / "g")
    _rewrite_manifest(tmp_path / "g", lambda m: m["generation"]["cache"].pop("max_step_tokens"))
    loaded = transfuse.load(tmp_path / "g")
    assert loaded.cache_spec == spec
    for bad in (spec["max_batch"] - 1, spec["max_batch"] * spec["max_seq_len"] + 1):
        _rewrite_manifest(tmp_path / "g", lambda m, bad=bad: m["generation"]["cache"].update(
            max_step_tokens=bad))
        with pytest.raises(ArtifactError, match=f"'max_step_tokens' is {bad}; expected "):
            transfuse.load(tmp_path / "g")


def test_a_graph_that_is_no_generation_step_is_refused():
    g = bigram_step()
    del g.meta["generation"]
    with pytest.raises(LoweringError, match="no meta\\['generation'\\]"):
        GenerationModel(g)
    with pytest.raises(LoweringError, match=r"cache input %k_cache_0 is f32\[2, 12, 1, 2\]"):
        GenerationModel(bigram_step(cache_shape=[2, MAX_LEN, 1, 2]))
    g = bigram_step()
    g.inputs[2], g.inputs[3] = g.inputs[3], g.inputs[2]
    with pytest.raises(LoweringError, match="expected \\['input_ids', 'position_ids', "
                                            "'seq_of_token', 'seq_lens'"):
        GenerationModel(g)


def test_config_fields_keeps_what_generate_reads():
    cfg = GenerationConfig(eos_token_id=[2, 3], pad_token_id=0, bos_token_id=1, top_k=7,
                           num_beams=1, output_scores=True)
    assert config_fields(cfg) == {"eos_token_id": [2, 3], "pad_token_id": 0,
                                  "bos_token_id": 1, "top_k": 7}
    assert config_fields(None) == {}


def test_onnxruntime_backend_and_no_plain_onnx_export(tmp_path):
    ids, mask = _batch(PROMPTS)
    want = GenerationModel(bigram_step()).generate(ids, mask, max_new_tokens=4)
    ort = GenerationModel(bigram_step(), backend="onnxruntime")
    assert torch.equal(ort.generate(ids, mask, max_new_tokens=4), want)
    with pytest.raises(LoweringError, match="no plain ONNX export"):
        ort.export_onnx(str(tmp_path / "m.onnx"))
    ort.save(tmp_path / "g")
    assert not (tmp_path / "g" / artifact.DEPLOY_ONNX).exists()
    assert transfuse.load(tmp_path / "g").backend == "onnxruntime"
