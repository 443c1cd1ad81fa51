"""Issue 2 acceptance: every reference model (tiny, small) and HF config (GPT-2, Llama,
BERT; eager and sdpa attention) at O0/O1/O2 against eager, three sequence lengths served by
one compiled model, plus compile time of gpt2-small at O2.

    python benchmarks/check_correctness.py [--quick]   # --quick: tiny presets only

Writes benchmarks/results/correctness-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import transfuse
from transfuse.models import get_model

SEQS = (7, 16, 40)
LEVELS = ("O0", "O1", "O2")


def _err(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    diff = (ref - out).abs()
    return diff.max().item(), (diff / ref.abs().clamp_min(1e-6)).max().item()


def _main_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _hf(family: str, attn: str):
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500,
                                      n_positions=128, bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    elif family == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=500, max_position_embeddings=128)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, vocab_size=500,
                                      max_position_embeddings=128)
        cls = transformers.BertModel
    cfg.use_cache = False
    return cls._from_config(cfg, attn_implementation=attn).eval()


def _inputs(with_mask: bool, vocab: int, seq: int, seed: int, as_kwargs: bool):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[:, seq - seq // 4:] = 0
    if as_kwargs:
        return (), ({"input_ids": ids, "attention_mask": mask} if with_mask else {"input_ids": ids})
    return ((ids, mask) if with_mask else (ids,)), {}


def run(quick: bool) -> list[dict]:
    rows = []
    cases = [(n, "ref") for n in ("gpt2-tiny", "llama-tiny", "bert-tiny")]
    if not quick:
        cases += [(n, "ref") for n in ("gpt2-small", "llama-small", "bert-small")]
    cases += [(f"hf-{f}-{a}", "hf") for f in ("gpt2", "llama", "bert") for a in ("eager", "sdpa")]
    for name, kind in cases:
        if kind == "ref":
            model, example, dynamic = get_model(name, seq=16)
            vocab, with_mask, as_kw = model.config.vocab_size, len(example) > 1, False
            args, kwargs = example, {}
        else:
            _, family, attn = name.split("-")
            model = _hf(family, attn)
            vocab, with_mask, as_kw = 500, family == "bert", True
            args, kwargs = _inputs(with_mask, vocab, 16, 0, True)
            dynamic = {"seq": (2, 128)}
        for level in LEVELS:
            t0 = time.perf_counter()
            compiled = transfuse.optimize(model, args, kwargs, dynamic=dynamic, level=level)
            compile_s = time.perf_counter() - t0
            worst_abs = worst_rel = 0.0
            ok = True
            with torch.inference_mode():
                for i, s in enumerate(SEQS):
                    a, kw = _inputs(with_mask, vocab, s, 100 + i, as_kw)
                    ref, out = _main_tensor(model(*a, **kw)), _main_tensor(compiled(*a, **kw))
                    e_abs, e_rel = _err(ref, out)
                    worst_abs, worst_rel = max(worst_abs, e_abs), max(worst_rel, e_rel)
                    ok &= torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
            rows.append({"model": name, "level": level, "seqs": list(SEQS),
                         "max_abs_err": worst_abs, "max_rel_err": worst_rel, "pass": bool(ok),
                         "compile_s": round(compile_s, 2), "nodes": len(compiled.graph)})
            print(f"{name:18s} {level}  seqs={SEQS}  max|err|={worst_abs:.2e}  "
                  f"{'PASS' if ok else 'FAIL'}  compile {compile_s:.2f}s  nodes {len(compiled.graph)}",
                  flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = run(args.quick)
    out = Path(__file__).parent / "results" / f"correctness-{datetime.date.today()}.json"
    out.write_text(json.dumps({"rtol": 1e-4, "atol": 1e-5, "threads": 1, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
