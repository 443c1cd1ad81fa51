"""``transfuse serve`` as a subprocess: the ``openai`` client, raw HTTP errors, disconnects,
SIGTERM.

The served model is the ``llama-tiny`` preset (random weights, byte tokenizer); its answers are
checked against the same preset compiled in this process (greedy tokens, decoded).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from server_process import ServerProcess

from transfuse.serving.loading import load_served

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # a server start compiles the model (~10 s)

MODEL = "llama-tiny"
MAX_SEQ_LEN = 512
ARGS = ("--max-seq-len", str(MAX_SEQ_LEN), "--max-batch", "4")


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(MODEL, *ARGS)
    yield proc
    code = proc.terminate()
    log = proc.log()
    proc.close()
    assert code == 0, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def local():
    """The same preset compiled here: the oracle for greedy answers."""
    return load_served(MODEL, max_seq_len=MAX_SEQ_LEN, max_batch=4)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def expected(local, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """Greedy ids (up to and including EOS) and their text, computed in this process."""
    out = local.gen.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens)
    ids = out[0, len(prompt_ids):].tolist()
    eos = local.eos_token_ids()
    for i, tok in enumerate(ids):
        if tok in eos:
            ids = ids[:i + 1]
            break
    return ids, local.tokenizer.decode(ids)


# -- the openai client --------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_is_the_greedy_answer_streamed_or_not(client, local):
    prompt = "The quick brown fox"
    ids, text = expected(local, local.tokenizer.encode(prompt), 24)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("stop" if len(ids) < 24 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ids))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_of_token_ids_and_several_prompts(client, local):
    prompts = [local.tokenizer.encode("abc"), local.tokenizer.encode("hello there")]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for choice, ids in zip(r.choices, prompts):
        assert choice.text == expected(local, ids, 6)[1]


def test_chat_uses_the_plain_fallback_template(client, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = local.tokenizer.encode("system: Be brief.\nuser: Hi\nassistant:")
    _, text = expected(local, prompt, 16)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt)


def test_seeded_sampling_is_reproducible_and_top_p_is_taken(client):
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    assert client.completions.create(seed=1234, **kw).choices[0].text == a


def test_stop_string_ends_the_text_before_it(client, local):
    prompt = "The quick brown fox"
    _, text = expected(local, local.tokenizer.encode(prompt), 24)
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1)
                if "\ufffd" not in text[i:i + 2])
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_concurrent_requests_get_what_they_get_alone(client, local):
    prompts = [f"request number {i} " * (1 + i % 3) for i in range(8)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(prompts):
        assert answers[i] == expected(local, local.tokenizer.encode(prompt), 12)[1], i


# -- bad requests: OpenAI error bodies, and the server keeps serving ----------------------------

GOOD = {"model": MODEL, "prompt": "ok", "max_tokens": 2}
def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5


def test_completion_logprobs_greedy_streamed_or_not(client, local):
    """logprobs=3: per token its text, log-probability, top 3 and text offset; greedy picks
    the most likely token; the stream carries the same numbers."""
    prompt = "The quick brown fox"
    ids, text = expected(local, local.tokenizer.encode(prompt), 10)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and len(lp.tokens) == len(ids) == r.usage.completion_tokens
    assert lp.tokens == [local.tokenizer.decode([t]) for t in ids]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 3 and _close(max(top.values()), value)
        if tok in top:
            assert _close(top[tok], value)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                            temperature=0, logprobs=3, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices and c.choices[0].logprobs
              for v in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert all(_close(a, b) for a, b in zip(values, lp.token_logprobs))
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_with_logprobs_scores_the_prompt_as_loglikelihood_evaluations_do(client, local):
    """lm-eval-harness's loglikelihood request: echo, logprobs=1, max_tokens=1, temperature 0.
    The text is prompt + completion; the prompt tokens come first in the logprobs (the first
    one's null), each scored by the model; streamed the same."""
    prompt = "The capital of France is Paris"
    ids = local.tokenizer.encode(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    r = client.completions.create(**kw)
    c = r.choices[0]
    lp = c.logprobs
    new_ids, new_text = expected(local, ids, 1)
    assert c.text == prompt + new_text
    assert lp.tokens == [local.tokenizer.decode([t]) for t in ids + new_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and len(lp.top_logprobs[1]) == 1
    assert lp.text_offset[len(ids)] == len(prompt)
    assert r.usage.completion_tokens == 1
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    streamed = [v for ch in chunks if ch.choices and ch.choices[0].logprobs
                for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and all(_close(a, b) for a, b in zip(streamed[1:],
                                                                     lp.token_logprobs[1:]))
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                      echo=True)
    assert plain.choices[0].text == prompt + new_text and plain.choices[0].logprobs is None
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=0)  # the prompt alone, nothing generated
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.tokens == lp.tokens[:len(ids)]
    assert all(_close(a, b) for a, b in zip(scored.choices[0].logprobs.token_logprobs[1:],
                                            lp.token_logprobs[1:len(ids)]))
    with pytest.raises(openai.BadRequestError, match="needs echo and logprobs"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8")) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert _close(entry.top_logprobs[0].logprob, entry.logprob)  # greedy: the most likely
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(_close(a.logprob, b.logprob) for a, b in zip(streamed, content))
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=3,
        temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)


def test_n_choices_per_prompt(client, local):
    """n=3 sampled with a seed: choice j is what one request with seed + j gives; two prompts
    with n=2 give four choices, prompt by prompt; a prompt's tokens count once in usage."""
    prompt = "Once upon a time"
    kw = dict(model=MODEL, max_tokens=8, temperature=0.9)
    r = client.completions.create(prompt=prompt, n=3, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [client.completions.create(prompt=prompt, seed=11 + j, **kw).choices[0].text
             for j in range(3)]
    assert [c.text for c in r.choices] == alone
    assert r.usage.prompt_tokens == len(local.tokenizer.encode(prompt))
    two = ["The quick brown fox", "Hello"]
    r = client.completions.create(model=MODEL, prompt=two, n=2, max_tokens=5, temperature=0)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    want = [expected(local, local.tokenizer.encode(p), 5)[1] for p in two]
    assert texts == [want[0], want[0], want[1], want[1]]
    assert r.usage.prompt_tokens == sum(len(local.tokenizer.encode(p)) for p in two)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2,
        temperature=0.8, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]


def test_penalties_and_logit_bias(client, local):
    """logit_bias -100 on the greedy answer's first token moves the answer off it; penalties
    are taken (their arithmetic is checked against an oracle in test_engine.py)."""
    prompt = "The quick brown fox"
    ids, _ = expected(local, local.tokenizer.encode(prompt), 6)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                  logit_bias={str(ids[0]): -100}, logprobs=0)
    assert r.choices[0].logprobs.tokens[0] != local.tokenizer.decode([ids[0]])
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                  presence_penalty=1.5, frequency_penalty=-0.5)
    assert r.choices[0].finish_reason in ("stop", "length")


BAD = [  # (name, path, body bytes, status, param or None, code or None)
    ("malformed JSON", "/v1/completions", b'{"model": "llama-tiny", "prompt": ', 400, None,
     None),
    ("invalid UTF-8", "/v1/completions", b'{"model": "llama-tiny", "prompt": "\xff\xfe"}', 400,
     None, None),
    ("unknown model", "/v1/completions", json.dumps({**GOOD, "model": "gpt-4"}).encode(), 404,
     "model", "model_not_found"),
    ("negative max_tokens", "/v1/completions", json.dumps({**GOOD, "max_tokens": -5}).encode(),
     400, "max_tokens", None),
    ("prompt over the context", "/v1/completions",
     json.dumps({**GOOD, "prompt": "x" * (MAX_SEQ_LEN + 10)}).encode(), 400, "prompt",
     "context_length_exceeded"),
    ("completion over the context", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
         "max_tokens": MAX_SEQ_LEN}).encode(), 400, "messages", "context_length_exceeded"),
    ("unknown field", "/v1/completions", json.dumps({**GOOD, "frobnicate": 1}).encode(), 400,
     "frobnicate", None),
    ("negative seed", "/v1/completions", json.dumps({**GOOD, "seed": -1}).encode(), 400,
     "seed", None),
    ("n over 16", "/v1/completions", json.dumps({**GOOD, "n": 17}).encode(), 400, "n", None),
    ("embeddings of a generation model", "/v1/embeddings",
     json.dumps({"model": MODEL, "input": "hi"}).encode(), 400, "model", "unsupported_task"),
    ("logprobs over 5", "/v1/completions", json.dumps({**GOOD, "logprobs": 6}).encode(), 400,
     "logprobs", None),
    ("presence_penalty over 2", "/v1/completions",
     json.dumps({**GOOD, "presence_penalty": 2.5}).encode(), 400, "presence_penalty", None),
    ("logit_bias over 100", "/v1/completions",
     json.dumps({**GOOD, "logit_bias": {"5": 101}}).encode(), 400, "logit_bias.5", None),
    ("logit_bias key no token", "/v1/completions",
     json.dumps({**GOOD, "logit_bias": {"x": 1}}).encode(), 400, None, None),
    ("top_logprobs without logprobs", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
         "top_logprobs": 2}).encode(), 400, "top_logprobs", None),
    ("bad role", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400,
     "messages.0.role", None),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None, None),
    ("empty body", "/v1/completions", b"", 400, None, None),
    ("no such route", "/v1/images/generations", b"{}", 404, None, None),
]


@pytest.mark.parametrize("name,path,body,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_a_4xx_openai_error_and_the_server_keeps_serving(
        server, name, path, body, status, param, code):
    r = httpx.post(server.url + path, content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)
    ok = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="y" * MAX_SEQ_LEN, max_tokens=1)
    assert info.value.code == "context_length_exceeded"


# -- disconnects --------------------------------------------------------------------------------


def _stats(server) -> dict:
    return httpx.get(server.url + "/stats", timeout=10).json()


def _wait_idle(server, cancelled: int) -> dict:
    deadline = time.monotonic() + 30
    while True:
        s = _stats(server)
        if s["cancelled"] >= cancelled and s["running"] == 0 and s["waiting"] == 0:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.1)


def test_client_disconnect_cancels_a_streaming_request(server):
    before = _stats(server)["cancelled"]
    body = {"model": MODEL, "prompt": "go", "max_tokens": MAX_SEQ_LEN - 8, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the stream runs; then the client goes away
    s = _wait_idle(server, before + 1)
    assert s["blocks_free"] == s["blocks_total"]


def test_client_disconnect_cancels_a_plain_request(server):
    before = _stats(server)["cancelled"]
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": MAX_SEQ_LEN - 8,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while _stats(server)["running"] == 0:  # wait until it runs, then hang up
            assert time.monotonic() < deadline
            time.sleep(0.02)
    s = _wait_idle(server, before + 1)
    assert s["blocks_free"] == s["blocks_total"]


# -- shutdown -----------------------------------------------------------------------------------


def test_sigterm_during_a_stream_ends_it_and_exits_cleanly(tmp_path, local):
    proc = ServerProcess(MODEL, *ARGS, "--save", str(tmp_path / "saved"))
    try:
        body = {"model": MODEL, "prompt": "go", "max_tokens": MAX_SEQ_LEN - 8, "temperature": 0,
                "stream": True}
        events = []
        with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    break
            proc.proc.send_signal(15)
            events += [json.loads(line[6:]) if line != "data: [DONE]" else "DONE"
                       for line in lines if line.startswith("data: ")]
        assert events[-1] == "DONE"
        assert events[-2]["choices"][0]["finish_reason"] == "cancelled"
        assert proc.terminate(timeout=60) == 0
        log = proc.log()
        assert "Traceback" not in log and "0 requests finished, 1 cancelled, 0 failed" in log, log
        with pytest.raises(httpx.TransportError):
            httpx.get(proc.url + "/health", timeout=2)
    finally:
        proc.close()
    # --save wrote an artifact with its tokenizer: it serves the same answers without compiling
    saved = load_served(tmp_path / "saved")
    assert (saved.kind, saved.max_seq_len, saved.max_batch) == ("artifact", MAX_SEQ_LEN, 4)
    ids = saved.tokenizer.encode("abc")
    assert saved.gen.generate(torch.tensor([ids]), max_new_tokens=8).tolist() == \
        local.gen.generate(torch.tensor([ids]), max_new_tokens=8).tolist()


# -- speculative decoding from the command line -------------------------------------------------


def test_speculative_draft_model_keeps_the_greedy_answers(local):
    proc = ServerProcess(MODEL, *ARGS, "--speculative", "draft:gpt2-tiny")
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
        for prompt in ("The quick brown fox", "abcabcabcabc"):
            _, text = expected(local, local.tokenizer.encode(prompt), 24)
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                          temperature=0)
            assert r.choices[0].text == text
        spec = httpx.get(proc.url + "/stats").json()["spec"]
        assert spec["proposed"] > 0, spec
    finally:
        code = proc.terminate()
        log = proc.log()
        proc.close()
    assert code == 0 and "Traceback" not in log, log


# -- a real tokenizer: SmolLM2's (chat template, byte-level BPE) over a tiny random Llama ---------


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    from transfuse.models.real import smollm2_gguf_path, smollm2_unavailable

    if (why := smollm2_unavailable()) is not None:
        pytest.skip(why)
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                           local_files_only=True)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=MAX_SEQ_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False)  # tied, a random tiny model repeats its last token
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("smol") / "smol-tiny"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer


def _hf_greedy(model, tokenizer, ids: list[int], n: int) -> str:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_hf_directory_with_smollm2_tokenizer_chat_template_and_detokenization(smol_dir):
    path, model, tokenizer = smol_dir
    proc = ServerProcess(str(path), *ARGS)
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smol-tiny"]
        messages = [{"role": "user", "content": "Résumé in two words? 🙂"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        assert text.startswith("<|im_start|>system")  # the template adds SmolLM2's system turn
        ids = tokenizer.encode(text, add_special_tokens=False)
        want = _hf_greedy(model, tokenizer, ids, 40)
        r = client.chat.completions.create(model="smol-tiny", messages=messages, max_tokens=40,
                                           temperature=0)
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == want
        chunks = list(client.chat.completions.create(model="smol-tiny", messages=messages,
                                                     max_tokens=40, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        # completions: real byte-level BPE pieces streamed one token at a time
        prompt = "Naïve café, 日本語 and emoji 🎉:"
        ids = tokenizer.encode(prompt)
        want = _hf_greedy(model, tokenizer, ids, 40)
        chunks = list(client.completions.create(model="smol-tiny", prompt=prompt, max_tokens=40,
                                                temperature=0, stream=True))
        got = [c.choices[0].text for c in chunks]
        assert "".join(got) == want
        assert not any("\ufffd" in g for g in got) or "\ufffd" in want
    finally:
        code = proc.terminate()
        log = proc.log()
        proc.close()
    assert code == 0 and "Traceback" not in log, log
