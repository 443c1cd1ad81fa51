"""What ``transfuse serve MODEL`` loads: presets, saved artifacts (+ tokenizer), HF directories."""

from __future__ import annotations

import shutil

import pytest
import torch

import transfuse
from transfuse.errors import ArtifactError, InputError
from transfuse.serving.byte_tokenizer import ByteTokenizer
from transfuse.serving.loading import (
    TOKENIZER_DIR,
    load_served,
    load_speculative,
    load_tokenizer,
    preset_names,
    save_served,
    save_tokenizer,
)

pytestmark = pytest.mark.slow  # each compiles a tiny model (~1-5 s)


def greedy(gen, ids: list[int], n: int = 8) -> list[int]:
    out = gen.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def gpt2_tiny():
    return load_served("gpt2-tiny", max_seq_len=64, max_batch=2)


def test_preset_is_a_seeded_reference_model_with_the_byte_tokenizer(gpt2_tiny):
    served = gpt2_tiny
    assert {"llama-tiny", "gpt2-tiny"} <= set(preset_names())
    assert (served.name, served.kind, served.max_seq_len, served.max_batch) == \
        ("gpt2-tiny", "preset", 64, 2)
    assert isinstance(served.tokenizer, ByteTokenizer) and served.gen.vocab_size == 258
    assert served.eos_token_ids() == [256]
    # the same weights as transfuse.models' preset with the same seed: same greedy tokens
    ref = transfuse.models.gpt2("tiny", seed=0, vocab_size=258, max_positions=64).eval()
    ids = served.tokenizer.encode("hello")
    with torch.inference_mode():
        want, ctx = [], list(ids)
        for _ in range(8):
            want.append(int(ref(torch.tensor([ctx]))[0, -1].argmax()))
            ctx.append(want[-1])
    assert greedy(served.gen, ids) == want


def test_saved_artifact_serves_with_its_tokenizer_and_geometry(gpt2_tiny, tmp_path):
    path = save_served(gpt2_tiny, tmp_path / "art")
    assert (path / TOKENIZER_DIR / "byte_tokenizer.json").is_file()
    back = load_served(path)
    assert (back.name, back.kind, back.max_seq_len, back.max_batch) == ("art", "artifact", 64, 2)
    assert isinstance(back.tokenizer, ByteTokenizer)
    ids = back.tokenizer.encode("abc")
    assert greedy(back.gen, ids) == greedy(gpt2_tiny.gen, ids)
    # the artifact's geometry and backend are fixed: asking for others is refused
    with pytest.raises(InputError, match="compiled with max_seq_len=64, 128 was asked"):
        load_served(path, max_seq_len=128)
    with pytest.raises(InputError, match="target='python', 'onnxruntime' was asked"):
        load_served(path, target="onnxruntime")
    assert load_served(path, max_batch=2, target="python").max_batch == 2
    # without its tokenizer the artifact cannot be served
    shutil.rmtree(path / TOKENIZER_DIR)
    with pytest.raises(ArtifactError, match="no tokenizer beside the artifact"):
        load_served(path)


def test_artifact_without_generation_is_refused(tmp_path):
    model = transfuse.models.gpt2("tiny", vocab_size=258)
    transfuse.optimize(model, (torch.arange(8)[None],)).save(tmp_path / "plain")
    with pytest.raises(ArtifactError, match="without generation"):
        load_served(tmp_path / "plain")


def test_unknown_models_are_refused_with_what_is_accepted(tmp_path):
    with pytest.raises(InputError, match="not a built-in preset.*llama-tiny"):
        load_served("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no manifest.json.*no config.json.*gguf"):
        load_served(tmp_path / "empty")
    with pytest.raises(InputError, match="max_batch must be a positive integer"):
        load_served("gpt2-tiny", max_batch=0)


def _hf_tokenizer(vocab: int):
    """A byte-level BPE trained here (no hub), as a Hugging Face fast tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the quick brown fox"] * 10, vocab_size=vocab,
                            min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(bpe.to_str()), eos_token="<|endoftext|>")


def test_hugging_face_directory_with_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer = _hf_tokenizer(300)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    served = load_served(tmp_path / "llm", max_batch=2)
    assert (served.name, served.kind, served.max_seq_len) == ("llm", "hf", 128)
    assert served.eos_token_ids() == [tokenizer.eos_token_id]
    ids = tokenizer.encode("hello world")
    want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                       eos_token_id=None)[0, len(ids):].tolist()
    assert greedy(served.gen, ids) == want
    with pytest.raises(InputError, match="max_seq_len 256 is over llm's position limit 128"):
        load_served(tmp_path / "llm", max_seq_len=256)
    with pytest.raises(InputError, match="draft:gpt2-tiny: the draft's tokenizer .* must share"):
        load_speculative("draft:gpt2-tiny", served)
    # a tokenizer with more tokens than the model's vocabulary does not belong to it
    big = _hf_tokenizer(300)
    big.add_tokens([f"<extra_{i}>" for i in range(100)])
    assert len(big) > 320
    save_tokenizer(big, tmp_path / "llm")
    with pytest.raises(InputError, match="tokenizer has .* tokens but the model's vocabulary"):
        load_served(tmp_path / "llm")


def test_tokenizer_save_and_load(tmp_path):
    with pytest.raises(InputError, match="cannot save a tokenizer of type object"):
        save_tokenizer(object(), tmp_path / "t")
    save_tokenizer(ByteTokenizer(), tmp_path / "b")
    assert isinstance(load_tokenizer(tmp_path / "b"), ByteTokenizer)
    (tmp_path / "junk").mkdir()
    with pytest.raises(ArtifactError, match="cannot read the tokenizer"):
        load_tokenizer(tmp_path / "junk")


def test_unreadable_gguf_and_model_directory_are_input_errors(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(InputError, match=r"GGUF file .*bad.gguf: transformers cannot load it"):
        load_served(tmp_path / "bad.gguf")
    d = tmp_path / "hf"
    d.mkdir()
    ByteTokenizer().save(d)  # no HF tokenizer files either
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InputError, match="model directory .*hf"):
        load_served(d)


def test_onnxruntime_target_gives_the_python_target_s_tokens(gpt2_tiny):
    served = load_served("gpt2-tiny", target="onnxruntime", max_seq_len=64, max_batch=2)
    assert served.gen.backend == "onnxruntime"
    ids = served.tokenizer.encode("hello")
    assert greedy(served.gen, ids) == greedy(gpt2_tiny.gen, ids)


def test_gguf_file_with_its_tokenizer(tmp_path):
    from tiny_gguf import write_tiny_gguf

    transformers = pytest.importorskip("transformers")
    path = write_tiny_gguf(tmp_path / "tiny-llm.gguf")
    served = load_served(path, max_batch=2)
    assert (served.kind, served.name, served.max_seq_len) == ("gguf", "tiny-llm", 128)
    tokenizer = served.tokenizer
    assert served.eos_token_ids() == [tokenizer.eos_token_id]
    ids = tokenizer.encode("hello world")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, local_files_only=True, dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                       eos_token_id=None)[0, len(ids):].tolist()
    assert greedy(served.gen, ids) == want


def test_speculative_option(gpt2_tiny):
    from transfuse.serving.draft import DraftModel

    assert load_speculative(None, gpt2_tiny) is None
    assert load_speculative("prompt-lookup", gpt2_tiny) == "prompt-lookup"
    for bad in ("bogus", "draft:"):
        with pytest.raises(InputError, match="expected 'prompt-lookup' or 'draft:MODEL'"):
            load_speculative(bad, gpt2_tiny)
    draft = load_speculative("draft:llama-tiny", gpt2_tiny)
    assert isinstance(draft, DraftModel) and draft.max_batch == gpt2_tiny.max_batch
    assert draft.gen.cache_spec["max_seq_len"] == gpt2_tiny.max_seq_len
