"""benchmarks/gpu.py: the whole script on --quick shapes (Triton's interpreter without a GPU).

Checks that every section runs, writes the results json with the expected structure, that
every contestant was checked against its reference before it was timed, and that a run
without a GPU claims no GPU figure (no target evaluated). The target logic itself is checked
on synthetic GPU figures.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.targets import target_names  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
TARGETS = ("attention_hd128_vs_sdpa_flash", "window_vs_dense_mask_sdpa",
           "prefill_vs_torch_compile", "decode_attention_hbm_fraction")


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _results(out: Path) -> dict:
    files = sorted(out.glob("gpu-*.json"))
    assert len(files) == 1, files
    assert files[0].name.endswith(f"-{datetime.date.today().isoformat()}.json")
    return json.loads(files[0].read_text())


def _assert_checked(entry: dict, where: str) -> None:
    """An ``ok`` contestant passed its check and has a time; others say why."""
    status = entry["status"]
    if status == "ok":
        assert entry["check"]["ok"], (where, entry)
        assert entry["check"]["max_rel_err"] <= entry["check"]["tolerance"], (where, entry)
        assert ("ms" in entry or "ms_per_step" in entry) and entry.get("first_call_s") is not None
    else:
        assert status == "unavailable" and entry["reason"], (where, entry)


def test_quick_run_writes_every_section(gpu_bench, tmp_path):
    assert gpu_bench.main(["--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
    res = _results(tmp_path)
    gpu = torch.cuda.is_available()
    assert res["schema"] == "transfuse.bench.gpu/1"
    assert res["date"] == datetime.date.today().isoformat() and res["finished"]
    dev = res["device"]
    assert dev["torch"] == torch.__version__ and dev["triton"] and dev["gpu"] == gpu
    if not gpu:
        assert dev["slug"] == "cpu-interpreter" and dev["interpreter"]
    assert res["settings"]["quick"] and res["machine"]["versions"]["torch"]
    secs = res["sections"]
    assert list(secs) == list(gpu_bench.SECTIONS)
    assert {name: s["status"] for name, s in secs.items()} == dict.fromkeys(secs, "ok"), secs

    assert secs["bandwidth"]["gbps"] > 0

    rows = secs["attention"]["rows"]
    assert [(r["seq"], r["causal"]) for r in rows] == [(32, False), (32, True), (64, False),
                                                       (64, True)]
    for r in rows:
        cs = r["contestants"]
        assert set(cs) == {"transfuse", "sdpa-flash", "sdpa-cudnn", "flex"}
        assert cs["transfuse"]["status"] == "ok" and r["checked_rows"] > 0
        assert r["flops"] == 4 * r["batch"] * r["heads"] * r["seq"] ** 2 * r["head_dim"] / (
            2 if r["causal"] else 1)
        for name, e in cs.items():
            _assert_checked(e, f"attention {r['seq']} {name}")
        assert cs["flex"]["check"]["ok"]  # run eagerly for its check without a GPU
        if not gpu:
            assert "CUDA" in cs["sdpa-flash"]["reason"] and r["ratio_vs_sdpa_flash"] is None

    win = secs["window"]
    assert win["window"] == 16 and win["causal"]
    for name, e in win["contestants"].items():
        _assert_checked(e, f"window {name}")
    assert win["contestants"]["transfuse"]["status"] == "ok"
    assert win["contestants"]["sdpa-dense-mask"]["status"] == "ok"
    assert win["contestants"]["flex"]["check"]["ok"]
    assert win["speedup_vs_dense_mask"] > 0

    drows = secs["decode"]["rows"]
    assert [(r["layout"], r["cache_len"]) for r in drows] == [
        ("paged", 32), ("paged", 64), ("contiguous", 32), ("contiguous", 64)]
    for r in drows:
        for name in ("transfuse", "sdpa"):
            e = r["contestants"][name]
            assert e["status"] == "ok", (r, name)
            _assert_checked(e, f"decode {r['layout']} {r['cache_len']} {name}")
            assert e["gbps"] > 0 and e["hbm_fraction"] > 0
    assert secs["bandwidth"]["after"]["gbps"] > 0

    e2e = secs["e2e"]
    pre, dec = e2e["prefill"]["contestants"], e2e["decode"]["contestants"]
    assert e2e["params"] > 0 and e2e["dtype"] == "bfloat16"
    assert pre["eager"]["status"] == "ok" and dec["eager"]["status"] == "ok"
    assert e2e["prefill"]["tolerance"] >= 3e-2
    assert set(pre) == set(dec) == {"eager", "torch.compile", "transfuse-triton"}
    for name, e in pre.items():  # logits checked against the fp32 model
        _assert_checked(e, f"prefill {name}")
    for name, e in dec.items():  # tokens compared with eager's, not gated
        assert e["status"] in ("ok", "unavailable"), (name, e)
        assert e["status"] != "ok" or e["ms_per_step"] > 0
    assert dec["eager"]["agreement_with_eager"]["identical_sequences"] == e2e["decode"]["batch"]
    if "triton" in target_names():  # the target runs end to end, prefill checked
        assert pre["transfuse-triton"]["status"] == "ok", pre["transfuse-triton"]
        ours = dec["transfuse-triton"]
        assert ours["status"] == "ok", ours
        assert ours["steps"] == e2e["decode"]["new_tokens"]
        assert ours["agreement_with_eager"]["sequences"] == e2e["decode"]["batch"]
    if not gpu:
        assert pre["torch.compile"]["status"] == "unavailable"
        assert set(res["targets"]) == set(TARGETS)
        assert all(t["pass"] is None and "not a GPU run" in t["reason"]
                   for t in res["targets"].values())


def test_budget_skips_cases_and_still_writes(gpu_bench, tmp_path):
    args = ["--quick", "--sections", "attention,decode", "--budget-s", "0", "--out",
            str(tmp_path)]
    assert gpu_bench.main(args) == 0
    res = _results(tmp_path)
    assert list(res["sections"]) == ["attention", "decode"]
    for sec in res["sections"].values():
        assert sec["status"] == "ok" and sec["rows"]
        assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in sec["rows"])


def _gpu_sections(ratio: float, speedup: float, prefill: float, fractions: list[float]) -> dict:
    attention = {"rows": [{"head_dim": hd, "seq": s, "causal": c, "ratio_vs_sdpa_flash": ratio}
                          for hd in (64, 128) for s in (512, 16384) for c in (False, True)]}
    decode = {"rows": [{"layout": "paged", "cache_len": 4096 * (i + 1),
                        "contestants": {"transfuse": {"hbm_fraction": f}}}
                       for i, f in enumerate(fractions)]}
    return {"attention": attention, "window": {"speedup_vs_dense_mask": speedup},
            "e2e": {"prefill": {"ratio_vs_torch_compile": prefill}}, "decode": decode}


def test_targets_from_gpu_figures(gpu_bench):
    t = gpu_bench.evaluate_targets(_gpu_sections(0.95, 6.0, 1.1, [0.8, 0.75]), gpu=True)
    assert set(t) == set(TARGETS) and all(v["pass"] is True for v in t.values()), t
    assert len(t["attention_hd128_vs_sdpa_flash"]["figures"]) == 4  # hd 128 only
    assert t["decode_attention_hbm_fraction"]["min"] == 0.75

    t = gpu_bench.evaluate_targets(_gpu_sections(0.85, 4.0, 0.9, [0.8, 0.6]), gpu=True)
    assert all(v["pass"] is False for v in t.values()), t

    sections = _gpu_sections(0.95, 6.0, 1.1, [0.8])
    sections["attention"]["rows"][-1]["ratio_vs_sdpa_flash"] = None  # SDPA-flash did not run
    del sections["e2e"]
    t = gpu_bench.evaluate_targets(sections, gpu=True)
    assert t["attention_hd128_vs_sdpa_flash"]["pass"] is None
    assert "seq16384-causal" in t["attention_hd128_vs_sdpa_flash"]["reason"]
    assert t["prefill_vs_torch_compile"]["pass"] is None
    assert t["window_vs_dense_mask_sdpa"]["pass"] is True

    t = gpu_bench.evaluate_targets(_gpu_sections(0.95, 6.0, 1.1, [0.8]), gpu=False)
    assert all(v["pass"] is None for v in t.values())


def test_helpers(gpu_bench):
    assert gpu_bench.device_slug(False) == "cpu-interpreter"
    assert gpu_bench.attention_flops(2, 3, 8, 8, 4, causal=True) == 4 * 2 * 3 * 8 * 8 * 4 / 2
    rows = gpu_bench.query_rows(100, 8)
    assert rows[0] == 0 and rows[-1] == 99 and len(rows) <= 8
    x = torch.randn(4, 5)
    assert gpu_bench.rel_err(x, x) == 0.0
    assert gpu_bench.rel_err(x.clone().fill_(float("nan")), x) == math.inf
    assert gpu_bench.rel_err(x[:2], x) == math.inf
