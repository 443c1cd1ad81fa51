"""Generation with the built-in reference models (issue 11: ``model`` may be "a built-in
reference model"): ``transfuse.optimize(transfuse.models.gpt2("tiny"), (ids,), generation=...)``.

The oracle is the model itself without a cache: greedy decoding by recomputing the full
forward pass every step (argmax of ``model(ids)[:, -1]`` appended each time), one prompt at
a time. The compiled step must give the same tokens for batches of prompts of different
lengths (left-padded with an attention mask), equal to each prompt run alone, on both
targets and both cache layouts. The presets' weights (std 0.02) make a 2-layer GPT-2 repeat
one token, which would hide position mistakes, so the models here are re-drawn with std 0.3.
Also: the models' new forward arguments (``position_ids``, ``attention_mask``,
``use_cache``), the presets up to their last position, and the refusals of a model whose
positions do not come from ``position_ids`` and of a cache longer than the position tables.
"""

from __future__ import annotations

import pytest
import torch
from prompt_batches import random_left_padded
from torch import nn

import transfuse
import transfuse.models as models
from transfuse.errors import InputError, PassError
from transfuse.models._common import init_weights
from transfuse.runtime.generation_model import GenerationModel

VOCAB = 1000  # the tiny presets' vocabulary
PAD = VOCAB - 1
LENGTHS = [5, 2, 7]
NEW = 10
OPTIONS = {"max_seq_len": 32, "max_batch": 4, "block_size": 4}
FAMILIES = ("gpt2", "llama")


def _model(family: str) -> nn.Module:
    model = getattr(models, family)("tiny", seed=0)
    init_weights(model, seed=1, std=0.3)
    return model


_COMPILED: dict = {}


def _compiled(family: str, kv: str, target: str = "python"):
    key = (family, kv, target)
    if key not in _COMPILED:
        model = _model(family)
        gen = transfuse.optimize(model, (torch.randint(0, VOCAB, (1, 8)),),
                                 generation={**OPTIONS, "kv": kv}, target=target)
        assert isinstance(gen, GenerationModel) and gen.backend == target
        _COMPILED[key] = model, gen
    return _COMPILED[key]


def _full_forward_greedy(model: nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The oracle: [1, S] -> [1, S + new], recomputing the whole prefix for every token."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# -- the models' generation interface ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_interface(family):
    model = getattr(models, family)("tiny")
    assert model.get_output_embeddings() is model.lm_head
    assert model.generation_config.to_dict()["eos_token_id"] is None
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids)
        arange = torch.arange(9).expand(2, 9)
        assert torch.equal(model(ids, position_ids=arange, use_cache=False), plain)
        assert torch.equal(model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long)),
                           plain)
        shifted = model(ids, position_ids=arange + 3)
    # positions are used: shifted positions change GPT-2's output; Llama's RoPE is relative,
    # so a uniform shift only moves it by rounding
    if family == "gpt2":
        assert not torch.allclose(shifted, plain, atol=1e-3)
    else:
        assert not torch.equal(shifted, plain)
        torch.testing.assert_close(shifted, plain, atol=1e-4, rtol=1e-4)
    # per-row positions: a row's position ids select its table rows
    rows = model(ids[:1], position_ids=arange[:1] + 3)
    torch.testing.assert_close(rows, shifted[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_rows_equal_their_prompts_alone(family):
    model = _model(family)
    ids, mask = random_left_padded(LENGTHS, high=PAD, pad=PAD, seed=3)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, position_ids=positions, attention_mask=mask)
        assert not batched.isnan().any()
        for row, n in enumerate(LENGTHS):
            alone = model(ids[row:row + 1, -n:])
            torch.testing.assert_close(batched[row, -n:], alone[0], atol=1e-4, rtol=1e-4)
        # without the mask, padding is attended: the short rows differ
        unmasked = model(ids, position_ids=positions)
    assert not torch.allclose(unmasked[1, -2:], batched[1, -2:], atol=1e-3)


# -- compiled generation = the full-forward oracle ---------------------------------------


def _check_greedy(family: str, kv: str, target: str) -> None:
    model, gen = _compiled(family, kv, target)
    ids, mask = random_left_padded(LENGTHS, high=PAD, pad=PAD, seed=0)
    kw = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=PAD)
    out = gen.generate(ids, mask, **kw)
    width = ids.shape[1]
    assert out.shape == (len(LENGTHS), width + NEW) and torch.equal(out[:, :width], ids)
    for row, n in enumerate(LENGTHS):
        prompt = ids[row:row + 1, -n:]
        want = _full_forward_greedy(model, prompt, NEW)
        assert torch.equal(out[row, width:], want[0, n:]), (family, kv, target, row)
        assert torch.equal(gen.generate(prompt, **kw), want), (family, kv, target, row)
    assert len(set(out[:, width:].flatten().tolist())) > 3  # not one repeated id
    assert len(gen.cache) == 0


def test_greedy_equals_full_forward_llama_paged_python():
    _check_greedy("llama", "paged", "python")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["python", "onnxruntime"])
@pytest.mark.parametrize("kv", ["contiguous", "paged"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_full_forward(family, kv, target):
    _check_greedy(family, kv, target)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_caches_every_layer(family):
    model, gen = _compiled(family, "contiguous")
    layers = model.config.n_layer
    assert len(gen.graph.find("cached_attention")) == layers
    assert not gen.graph.find("attention")
    assert gen.cache_spec["layers"] == layers
    assert gen.cache_spec["kv_heads"] == getattr(model.config, "n_kv_head", model.config.n_head)
    assert gen.pass_log.rule_counts()["generation/cached-attention"] == layers


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_as_shipped_up_to_its_last_position(family):
    """The presets as built (std 0.02), max_seq_len = their 256 positions: the last step
    reads the tables' last row; the tokens are the oracle's."""
    model = getattr(models, family)("tiny")
    limit = model.config.max_positions
    prompt = torch.randint(0, VOCAB, (1, limit - 6), generator=torch.Generator().manual_seed(5))
    gen = transfuse.optimize(model, (prompt,), generation={"max_seq_len": limit, "max_batch": 1})
    assert torch.equal(gen.generate(prompt, max_new_tokens=6),
                       _full_forward_greedy(model, prompt, 6))
    with pytest.raises(InputError, match="max_seq_len"):
        gen.generate(prompt, max_new_tokens=7)


# -- refusals ------------------------------------------------------------------------------


class _IgnoresPositions(nn.Module):
    """A causal LM that takes position_ids but computes positions from the token count."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.lm_head

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.inner(input_ids)


@pytest.mark.parametrize("family,what", [("gpt2", "arange over the token axis"),
                                         ("llama", "cut by the token count")])
def test_positions_from_the_token_count_are_refused(family, what):
    model = _IgnoresPositions(getattr(models, family)("tiny")).eval()
    with pytest.raises(PassError, match=what) as err:
        transfuse.optimize(model, (torch.randint(0, VOCAB, (1, 8)),), generation=OPTIONS)
    assert "position_ids" in str(err.value)


@pytest.mark.parametrize("family,table", [("gpt2", "wpe_weight"), ("llama", "rope_cos")])
def test_position_table_shorter_than_the_cache_is_refused(family, table):
    """max_seq_len 1024 asked of a tiny preset (256 positions): refused at compile time, naming
    the table and the limit, instead of indexing past it mid-generation."""
    model = getattr(models, family)("tiny")
    with pytest.raises(PassError, match=f"%{table}.* 256 rows .*max_seq_len <= 256"):
        transfuse.optimize(model, (torch.randint(0, VOCAB, (1, 8)),),
                           generation={"max_seq_len": 1024})


def test_bert_has_no_lm_head():
    with pytest.raises(InputError, match="no causal LM head"):
        transfuse.optimize(models.bert("tiny"), (torch.randint(0, VOCAB, (1, 8)),),
                           generation=OPTIONS)


def test_generation_true_takes_the_models_own_position_limit():
    """generation=True: max_seq_len defaults to min(1024, the config's positions), 256 here."""
    model = models.llama("tiny")
    gen = transfuse.optimize(model, (torch.ones(1, 8, dtype=torch.long),), generation=True)
    assert gen.cache_report()["bytes"] == 256 * 8 * gen.cache_report()["bytes_per_token"]
    ids = torch.ones(1, 250, dtype=torch.long)
    assert gen.generate(ids, max_new_tokens=6, eos_token_id=None).shape == (1, 256)
    with pytest.raises(InputError, match="max_seq_len"):
        gen.generate(ids, max_new_tokens=7, eos_token_id=None)
