#!/usr/bin/env python
"""Which Hugging Face architectures transfuse compiles, and with what result.

    python benchmarks/hf_coverage.py                        # the lists below, both parts
    python benchmarks/hf_coverage.py --part generation --families llama,mpt

Each architecture is built from its config class's defaults made tiny (2 layers, hidden 32, 4
heads, vocabulary 96, 64 positions; seeded random weights of std 0.2, since HF's 0.02 makes a
2-layer model repeat one token) and run in eager attention. Nothing is downloaded.

- ``generation`` (causal LMs): ``transfuse.optimize(model, (ids,), generation={"max_seq_len":
  48, "max_batch": 2})`` on the python target, then greedy ``generate()`` of 10 new tokens for
  a batch of two 9-token prompts, compared token for token with ``model.generate`` (EOS off).
  ``ok`` = identical, ``mismatch`` = differs, ``fail`` = an error (its type and first line).
  ``distinct`` counts the distinct new ids (a model that repeats one id proves little).
- ``encoders``: ``transfuse.optimize(model, (ids, mask))`` with a right-padded batch of two
  11-token rows, the first output compared with eager's at the real tokens (max abs error /
  max abs value), and the fused ``attention`` ops counted.

A ``fail`` whose error is the model's own (transformers cannot build it from a tiny config)
is marked ``"model": true``; the others are transfuse's. Writes
``benchmarks/results/hf-coverage-<YYYY-MM-DD>.json`` with the transformers and torch versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

#: causal LMs (AutoConfig model types)
GENERATION = ("gpt2,gpt_neo,gptj,gpt_neox,gpt_bigcode,llama,mistral,ministral,mixtral,qwen2,"
              "qwen2_moe,qwen3,qwen3_moe,gemma,gemma2,gemma3_text,phi,phi3,falcon,bloom,mpt,"
              "opt,codegen,stablelm,starcoder2,olmo,olmo2,cohere,granite,persimmon,biogpt,"
              "xglm,nemotron,helium,glm,glm4,exaone4,smollm3,ernie4_5,arcee,seed_oss,apertus,"
              "hunyuan_v1_dense,falcon_h1").split(",")
#: encoders (AutoModel), and the encoder half of T5 / BART
ENCODERS = ("bert,roberta,distilbert,albert,electra,deberta,deberta-v2,xlm-roberta,mpnet,"
            "camembert,ernie,modernbert,t5,bart,nomic_bert,roformer,squeezebert,mobilebert,"
            "esm,megatron-bert,data2vec-text,rembert,luke,jina_embeddings_v3").split(",")
#: tiny values for whichever of these names a config has
TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, head_dim=8,
            n_embd=32, n_layer=2, n_head=4, n_positions=64, d_model=32, n_layers=2, n_heads=4,
            ffn_dim=64, num_layers=2, n_inner=64, rotary_dim=4, moe_intermediate_size=32,
            num_experts=4, num_local_experts=4, num_experts_per_tok=2,
            shared_expert_intermediate_size=32, max_seq_len=64, pad_token_id=0, dim=32,
            hidden_dim=64, embedding_size=32, num_hidden_groups=1, num_heads=4, d_kv=8,
            d_ff=64, global_attn_every_n_layers=1, local_attention=8, position_buckets=16,
            max_relative_positions=16, use_cache=False)


def tiny_config(model_type: str):
    import transformers as tr

    config = tr.AutoConfig.for_model(model_type)
    for name, value in TINY.items():
        if hasattr(config, name):
            try:
                setattr(config, name, value)
            except (AttributeError, TypeError, ValueError):
                pass  # a derived property: its config computes it
    if model_type == "gpt_neo":
        config.attention_types, config.window_size = [[["global", "local"], 1]], 8
    return config


def _seeded(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _build(model_type: str, auto: str):
    import transformers as tr

    config = tiny_config(model_type)
    cls = getattr(tr, auto)
    try:
        model = cls.from_config(config, attn_implementation="eager")
    except (ValueError, TypeError):  # no eager switch for this architecture
        model = cls.from_config(config)
    if auto == "AutoModel" and model_type in ("t5", "bart"):
        model = model.get_encoder()
    model.eval()
    _seeded(model)
    return model


def _fail(e: BaseException, model: bool) -> dict:
    return {"status": "fail", "model": model, "error": type(e).__name__,
            "message": str(e).splitlines()[0][:300] if str(e) else ""}


def generation_case(model_type: str) -> dict:
    import transfuse

    try:
        model = _build(model_type, "AutoModelForCausalLM")
    except Exception as e:  # noqa: BLE001 - the model's own failure is a result here
        return _fail(e, model=True)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    try:
        with torch.no_grad():
            want = model.generate(ids, **kw)
    except Exception as e:  # noqa: BLE001
        return _fail(e, model=True)
    t0 = time.perf_counter()
    try:
        gen = transfuse.optimize(model, (ids,), generation={"max_seq_len": 48, "max_batch": 2})
        compile_s = time.perf_counter() - t0
        got = gen.generate(ids, **kw)
    except Exception as e:  # noqa: BLE001
        return _fail(e, model=False)
    new = got[:, ids.shape[1]:]
    return {"status": "ok" if torch.equal(got, want) else "mismatch",
            "distinct": len(set(new.flatten().tolist())), "compile_s": round(compile_s, 2),
            "max_step_tokens": gen.cache_spec["max_step_tokens"]}


def encoder_case(model_type: str) -> dict:
    import transfuse

    try:
        model = _build(model_type, "AutoModel")
        ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        with torch.no_grad():
            ref = model(ids, mask)[0]
    except Exception as e:  # noqa: BLE001
        return _fail(e, model=True)
    t0 = time.perf_counter()
    try:
        compiled = transfuse.optimize(model, (ids, mask))
        compile_s = time.perf_counter() - t0
        out = compiled(ids, mask)
    except Exception as e:  # noqa: BLE001
        return _fail(e, model=False)
    out = getattr(out, "last_hidden_state", None) if not isinstance(out, (tuple, list, torch.Tensor)) \
        else out
    out = out[0] if isinstance(out, (tuple, list)) else out
    real = mask.bool()
    err = float((out - ref)[real].abs().max() / ref[real].abs().max())
    attention = sum(1 for n in compiled.graph.nodes if n.op == "attention")
    return {"status": "ok" if err <= 1e-4 else "mismatch", "rel_err": err,
            "attention_ops": attention, "compile_s": round(compile_s, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("generation", "encoders", "both"), default="both")
    ap.add_argument("--families", help="comma-separated model types (default: the part's list)")
    ap.add_argument("--out", help="result file (default: benchmarks/results/hf-coverage-DATE.json)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    parts = ("generation", "encoders") if args.part == "both" else (args.part,)
    results: dict[str, dict] = {}
    for part in parts:
        names = args.families.split(",") if args.families else \
            (GENERATION if part == "generation" else ENCODERS)
        case = generation_case if part == "generation" else encoder_case
        results[part] = {}
        for name in names:
            t0 = time.perf_counter()
            try:
                r = case(name)
            except Exception as e:  # noqa: BLE001 - a harness bug is reported, not fatal
                r = _fail(e, model=False) | {"trace": traceback.format_exc()[-600:]}
            r["seconds"] = round(time.perf_counter() - t0, 2)
            results[part][name] = r
            print(f"{part:10s} {name:18s} {r['status']:8s} "
                  f"{r.get('error', '')} {r.get('message', '')[:150]}", flush=True)
    summary = {part: {s: sum(1 for r in rs.values() if r["status"] == s)
                      for s in ("ok", "mismatch", "fail")} for part, rs in results.items()}
    print(json.dumps(summary))
    day = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else \
        Path(__file__).parent / "results" / f"hf-coverage-{day}.json"
    out.write_text(json.dumps({"command": ["benchmarks/hf_coverage.py", *(argv or sys.argv[1:])],
                               "created": day, "transformers": transformers.__version__,
                               "torch": torch.__version__, "summary": summary,
                               "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
