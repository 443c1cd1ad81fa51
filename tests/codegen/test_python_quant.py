"""The python backend's qlinear / qmatmul lowering (codegen/python/quant*.py) against the
reference interpreter: every kernel forced once, the row-count dispatch, refusals with their
reasons, the measured plan and its cache, and the target's quantization answers.

Tolerances: the f32 paths (dequant_f32, int_mm, w8a8_reference) 1e-5 relative to the largest
output; the bf16 kernels (tinygemm_int4, int8pack) round activations and scales to bf16:
``BF16_TOL`` = 1.5e-2 of the largest output (measured 2.7-4.5e-3).
"""

from __future__ import annotations

import pytest
import torch

from transfuse.codegen.python import quant, quant_kernels, quant_timing
from transfuse.codegen.targets import get_target
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.quant import quantize_rtn
from transfuse.ir.types import QuantType, TensorType

F32_TOL = 1e-5
BF16_TOL = 1.5e-2


def _graph(text: str, n: int, *, op: str = "qlinear", rows: str = "batch", bias: bool = True,
           activation: str | None = None, act_quant: str = "token", seed: int = 0):
    qt = QuantType.parse(text)
    g = Graph("q")
    gen = torch.Generator().manual_seed(seed)
    q = quantize_rtn(torch.randn(n, qt.k, generator=gen) * 0.05, qt)
    x = g.add_input("x", TensorType.parse(f"f32[{rows}, {qt.k}]"))
    w = g.add_constant(q.qweight, "w", quant=qt)
    s = g.add_constant(q.scales, "s")
    b = g.add_constant(torch.randn(n, generator=gen), "b") if bias else None
    if op == "qlinear":
        z = g.add_constant(q.zeros, "z") if q.zeros is not None else None
        y = g.op("qlinear", x, w, s, z, b, activation=activation)
    else:
        y = g.op("qmatmul", x, w, s, b, act_quant=act_quant, activation=activation)
    g.set_outputs([y])
    return g, qt


def _rel_err(prog, g, x) -> float:
    ref = interpret(g, [x])[0]
    y = prog([x])[0]
    assert y.shape == ref.shape and y.dtype == ref.dtype
    return float((y - ref).abs().max() / ref.abs().max())


def _build(g):
    return get_target("python").build(g)


def _calls(name: str) -> int:
    return quant_kernels.CALLS[name]


@pytest.fixture
def force(monkeypatch):
    def set_(value: str):
        monkeypatch.setenv(quant.FORCE_ENV, value)

    return set_


# -- each kernel forced --------------------------------------------------------------------


@pytest.mark.parametrize("text", ["int4 g32 asym k128", "int4 g64 sym k128", "int4 g128 asym k256",
                                  "int8 g64 sym k128", "int8 g128 asym k128", "int4 g16 asym k64"])
def test_dequant_f32_is_the_reference(force, text):
    force("dequant_f32")
    g, _ = _graph(text, 48, activation="silu")
    prog = _build(g)
    assert "_qlinear" in prog.source and not prog.reference_ops
    for m in (1, 64):
        assert _rel_err(prog, g, torch.randn(m, g.inputs[0].type.shape[1])) < F32_TOL


@pytest.mark.parametrize("text", ["int4 g32 asym k128", "int4 g32 sym k128", "int4 g64 asym k192",
                                  "int4 g64 sym k128", "int4 g128 asym k256",
                                  "int4 g128 sym k256"])
@pytest.mark.parametrize("n", [48, 40])  # 40: not a multiple of tinygemm's 16, padded
def test_tinygemm_int4(force, text, n):
    force("tinygemm_int4")
    g, qt = _graph(text, n, activation="gelu")
    prog = _build(g)
    assert prog.quant_plans[0]["small"] == "tinygemm_int4"
    before = _calls("tinygemm_int4")
    for m in (1, 5):
        assert _rel_err(prog, g, torch.randn(m, qt.k)) < BF16_TOL
    assert _calls("tinygemm_int4") == before + 2
    assert any("bf16" in line for line in prog.lowering_notes())
    assert prog.quant_bytes["prepared"] > 0  # made at build time


@pytest.mark.parametrize("text", ["int8 g128 sym k128", "int8 g128 asym k128"])
def test_int8pack(force, text):
    force("int8pack")
    g, qt = _graph(text, 40)
    prog = _build(g)
    before = _calls("int8pack")
    x = torch.randn(2, 3, qt.k)  # leading dims are flattened to rows
    g2, _ = _graph(text, 40, rows="2, 3")
    assert _rel_err(_build(g2), g2, x) < BF16_TOL
    assert _rel_err(prog, g, torch.randn(3, qt.k)) < BF16_TOL
    assert _calls("int8pack") == before + 2


@pytest.mark.parametrize("act_quant", ["token", "tensor"])
@pytest.mark.parametrize("kernel", ["int_mm", "w8a8_reference"])
def test_qmatmul(force, act_quant, kernel):
    force(kernel)
    g, qt = _graph("int8 g96 sym k96", 40, op="qmatmul", act_quant=act_quant,
                   activation="relu")
    prog = _build(g)
    inexact = quant_kernels.int_mm_inexact() if kernel == "int_mm" else None
    if inexact is not None:  # an AVX2 CPU: _int_mm saturates; refused, the reference runs
        plan = prog.quant_plans[0]
        assert plan["small"] == "w8a8_reference", plan
        assert plan["refused"].get("int_mm") == inexact, plan
        kernel = "w8a8_reference"
    else:
        assert prog.quant_plans[0]["small"] == kernel and not prog.reference_ops
    before = _calls(kernel)
    for m in (1, 64):
        x = torch.randn(m, qt.k) * torch.linspace(0.1, 3, qt.k)  # uneven channels
        assert _rel_err(prog, g, x) < F32_TOL  # int_mm: exact integers, f32 rounding only
    assert _calls(kernel) == before + 2


def test_int_mm_exactness_check_sees_saturation(monkeypatch):
    """The check compares _int_mm with an exact product on +-128 pairs: a saturating kernel
    (simulated: pair sums clamped to int16, as AVX2's vpmaddubsw does) is refused."""
    def saturating(a, b):
        pairs = (a.to(torch.int64).reshape(a.shape[0], -1, 2)[:, :, :, None] *
                 b.to(torch.int64).reshape(-1, 2, b.shape[1])[None]).sum(2)  # [M, K/2, N]
        return pairs.clamp(-32768, 32767).sum(1).to(torch.int32)

    monkeypatch.setattr(quant_kernels.aten, "_int_mm", saturating, raising=False)
    quant_kernels.int_mm_inexact.cache_clear()
    try:
        why = quant_kernels.int_mm_inexact()
        assert why is not None and "not exact on this CPU" in why
        qt = QuantType("int", 8, 96, True, 96)
        assert quant_kernels.refuses("int_mm", qt, 40) == why
    finally:
        quant_kernels.int_mm_inexact.cache_clear()


# -- the row-count dispatch ------------------------------------------------------------------


def test_dispatch_on_run_time_rows(force):
    force("tinygemm_int4:4:dequant_f32")
    g, qt = _graph("int4 g32 asym k128", 48)
    prog = _build(g)
    assert "'tinygemm_int4', 4, 'dequant_f32'" in prog.source
    before = _calls("tinygemm_int4"), _calls("dequant_f32")
    assert _rel_err(prog, g, torch.randn(1, qt.k)) < BF16_TOL
    assert _rel_err(prog, g, torch.randn(64, qt.k)) < F32_TOL  # the f32 kernel beyond 4 rows
    assert (_calls("tinygemm_int4"), _calls("dequant_f32")) == (before[0] + 1, before[1] + 1)


def test_static_rows_resolve_to_one_kernel(force):
    force("tinygemm_int4:4:dequant_f32")
    g1, _ = _graph("int4 g32 asym k128", 48, rows="1")
    g64, _ = _graph("int4 g32 asym k128", 48, rows="64")
    assert "'tinygemm_int4', None, 'tinygemm_int4'" in _build(g1).source
    assert "'dequant_f32', None, 'dequant_f32'" in _build(g64).source


def test_generation_shaped_input(force):
    force("tinygemm_int4:4:dequant_f32")
    g, qt = _graph("int4 g64 sym k128", 32, rows="batch, seq")
    prog = _build(g)
    assert _rel_err(prog, g, torch.randn(1, 1, qt.k)) < BF16_TOL
    assert _rel_err(prog, g, torch.randn(2, 32, qt.k)) < F32_TOL


# -- refusals: fall back with a reason -------------------------------------------------------


@pytest.mark.parametrize("text,kernel,why", [
    ("int4 g16 asym k64", "tinygemm_int4", "groups 32/64/128/256"),
    ("int8 g40 sym k40", "int8pack", "K % 16"),
    ("int8 g32 sym k128", "int8pack", "one scale per channel"),
    ("int4 g32 asym k64", "int8pack", "int8 weights"),
])
def test_refused_kernel_falls_back_with_reason(force, text, kernel, why):
    force(kernel)
    g, qt = _graph(text, 32)
    prog = _build(g)
    p = prog.quant_plans[0]  # another kernel, measured (the reference when it is the only one)
    assert p["small"] != kernel and p["large"] != kernel and why in p["refused"][kernel]
    assert any(why in line for line in prog.lowering_notes())
    bf16 = quant_kernels.KERNELS[p["small"]].bf16 or quant_kernels.KERNELS[p["large"]].bf16
    assert _rel_err(prog, g, torch.randn(3, qt.k)) < (BF16_TOL if bf16 else F32_TOL)


def test_fp8_refused_by_the_target():
    t = get_target("python")
    why = t.quant_unsupported(QuantType.parse("fp8e4m3 g64 sym k64"), "qlinear")
    assert why and "GPU" in why and "_scaled_mm" in why
    assert t.quant_unsupported(QuantType.parse("int4 g64 asym k64"), "qlinear") is None
    assert t.quant_unsupported(QuantType.parse("int8 g64 sym k64"), "qmatmul") is None
    assert t.qmatmul_act_quant == ("token", "tensor")


def test_bad_force_value(force):
    force("tinygemm_int4:x:dequant_f32")
    g, _ = _graph("int4 g32 asym k64", 16)
    with pytest.raises(ValueError, match="SMALL:ROWS:LARGE"):
        _build(g)


# -- the measured plan -----------------------------------------------------------------------


def test_measured_plan_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(quant.FORCE_ENV, raising=False)
    quant.forget()
    g, qt = _graph("int4 g32 asym k64", 32, seed=1)
    prog = _build(g)
    p = prog.quant_plans[0]
    assert p["how"] == "measured"
    assert {t["rows"] for t in p["timings"]} == set(quant.ROWS)
    assert {t["kernel"] for t in p["timings"]} == {"tinygemm_int4", "dequant_f32"}
    assert all(t["ms"] > 0 and t["f32_ms"] > 0 for t in p["timings"])
    assert _rel_err(prog, g, torch.randn(2, qt.k)) < BF16_TOL  # whichever kernel won
    quant.forget()  # a new process: the timings come from the disk cache
    _, _, source = quant_timing.measure(["tinygemm_int4", "dequant_f32"], "qlinear", qt, 32, 1)
    assert source == "cache"
    quant.forget()


def test_fp8_graph_still_runs_on_the_reference():
    g, qt = Graph("f8"), QuantType.parse("fp8e4m3 g64 sym k64")
    q = quantize_rtn(torch.randn(32, 64) * 0.05, qt)
    x = g.add_input("x", TensorType.parse("f32[batch, 64]"))
    y = g.op("qlinear", x, g.add_constant(q.qweight, "w", quant=qt),
             g.add_constant(q.scales, "s"))
    g.set_outputs([y])
    prog = _build(g)
    p = prog.quant_plans[0]
    assert p["small"] == "dequant_f32" and set(p["refused"]) == {"tinygemm_int4", "int8pack"}
    assert _rel_err(prog, g, torch.randn(3, 64)) < F32_TOL
