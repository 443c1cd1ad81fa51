"""Rotary Triton kernel vs the IR op's reference (interpreter on CPU).

Tiny shapes with tails: head dim 48 (24 pairs in a 32-wide tile), 80 with a partial rotary
dim of 32, 5-7 tokens, GQA (3 query heads, 1 kv head). cos/sin halves differ on purpose so
that reading the wrong member of a pair shows. Outputs are NaN-poisoned before each run.
"""

import pytest

# env first: it sets TRITON_INTERPRET, which triton reads when it is imported
from transfuse.codegen.triton import env

pytest.importorskip("triton", reason="the triton target needs triton (pip install 'triton>=3.6')")

import torch  # noqa: E402

from transfuse.codegen.triton.kernels import rotary as rot  # noqa: E402
from transfuse.errors import LoweringError  # noqa: E402

DEV = env.device()
# bf16 is loose: the interpreter truncates fp32 -> bf16 casts (round-to-nearest on a GPU)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(a, b):
    assert not torch.isnan(a).any(), "unwritten (NaN) elements"
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _tables(rows, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(rows, r // 2, generator=g) * 6.0
    cos = torch.cat([ang.cos(), (1.1 * ang).cos()], -1)
    sin = torch.cat([ang.sin(), (0.9 * ang).sin()], -1)
    return cos.to(dtype).to(DEV), sin.to(dtype).to(DEV)


def _randn(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEV)


def _nan_like(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_qk_bshd_positions_gqa(dtype, interleaved):
    """q [B, S, H, D] and k with fewer heads, one launch, from a table by position ids."""
    q, k = _randn(2, 5, 3, 48, dtype=dtype), _randn(2, 5, 1, 48, dtype=dtype, seed=2)
    cos, sin = _tables(9, 48, dtype)
    pos = torch.tensor([[3, 0, 8, 5, 1], [7, 7, 2, 4, 6]], device=DEV)[..., None]  # [B, S, 1]
    qo, ko = rot.rotary_qk(q, k, cos, sin, interleaved=interleaved, positions=pos,
                           q_out=_nan_like(q), k_out=_nan_like(k))
    for x, y in ((q, qo), (k, ko)):
        ref = rot.reference_rotary(x, cos, sin, interleaved=interleaved, positions=pos)
        assert y.dtype == dtype and _rel(y, ref) <= TOL[dtype]


def test_qk_several_programs_each():
    """D=256: 8 rows a program, so q (30 rows) takes 4 programs and k (10 rows) 2."""
    assert rot.choose_config(256, 256, in_place=True)["BLOCK_R"] == 8
    q, k = _randn(2, 5, 3, 256), _randn(2, 5, 1, 256, seed=2)
    cos, sin = _tables(5, 256)
    pos = torch.tensor([4, 2, 0, 1, 3], device=DEV)[:, None]  # [S, 1]
    qo, ko = q.clone(), k.clone()
    rot.rotary_qk(qo, ko, cos, sin, positions=pos, q_out=qo, k_out=ko)
    assert _rel(qo, rot.reference_rotary(q, cos, sin, positions=pos)) <= 1e-4
    assert _rel(ko, rot.reference_rotary(k, cos, sin, positions=pos)) <= 1e-4


@pytest.mark.parametrize("interleaved", [False, True])
def test_in_place_bhsd_broadcast_tables(interleaved):
    """[B, H, S, D] rotated in place with the IR's broadcast cos/sin [S, D]."""
    x = _randn(2, 3, 7, 48)
    cos, sin = _tables(7, 48)
    ref = rot.reference_rotary(x, cos, sin, interleaved=interleaved)
    y = x.clone()
    assert rot.rotary(y, cos, sin, interleaved=interleaved, out=y) is y
    assert _rel(y, ref) <= 1e-4


def test_partial_rotary_out_of_place_and_in_place():
    """R=32 of D=80: the other 48 elements copied out of place, untouched in place."""
    x = _randn(1, 6, 2, 80)
    cos, sin = _tables(6, 32)
    cos4, sin4 = cos[:, None], sin[:, None]  # [S, 1, R]: the IR's [B, S, H, D] form
    ref = rot.reference_rotary(x, cos4, sin4)
    assert _rel(rot.rotary(x, cos4, sin4, out=_nan_like(x)), ref) <= 1e-4
    y = x.clone()
    rot.rotary(y, cos4, sin4, out=y)
    assert _rel(y, ref) <= 1e-4 and torch.equal(y[..., 32:], x[..., 32:])


def test_strided_views_of_a_fused_qkv_and_per_batch_tables():
    """q and k as column slices of one [B, S, 3*H*D] tensor; cos [B, 1, S, D]; out=None."""
    b, s, h, d = 2, 5, 2, 48
    qkv = _randn(b, s, 3 * h * d)
    q = qkv[..., : h * d].view(b, s, h, d).transpose(1, 2)  # [B, H, S, D], strided
    k = qkv[..., h * d: 2 * h * d].view(b, s, h, d).transpose(1, 2)
    cos, sin = _tables(b * s, d)
    cos, sin = cos.view(b, 1, s, d), sin.view(b, 1, s, d)
    qo, ko = rot.rotary_qk(q, k, cos, sin)
    assert _rel(qo, rot.reference_rotary(q, cos, sin)) <= 1e-4
    assert _rel(ko, rot.reference_rotary(k, cos, sin)) <= 1e-4


def test_dtype_promotion_and_low_rank():
    """fp16 x with fp32 tables gives fp32 (the IR's type); a 2-D x [S, D]."""
    x = _randn(5, 48, dtype=torch.float16)
    cos, sin = _tables(5, 48)
    y = rot.rotary(x, cos, sin)
    assert y.dtype == torch.float32 and _rel(y, rot.reference_rotary(x, cos, sin)) <= 1e-4


def test_empty_x():
    x = torch.empty(0, 4, 2, 48, device=DEV)
    cos, sin = _tables(4, 48)
    assert rot.rotary(x, cos[:, None], sin[:, None]).shape == x.shape


def test_bad_inputs_name_the_argument():
    x = _randn(2, 5, 3, 48)
    cos, sin = _tables(9, 48)
    pos = torch.arange(5, device=DEV)[:, None]
    cases = [
        (lambda: rot.rotary(x.to(torch.int32), cos, sin, positions=pos), "x"),
        (lambda: rot.rotary(x[..., :46], cos, sin, positions=pos), "cos"),  # R > D
        (lambda: rot.rotary(x, cos[:, :47], sin[:, :47], positions=pos), "cos"),  # odd R
        (lambda: rot.rotary(x, cos, sin[:8], positions=pos), "sin"),
        (lambda: rot.rotary(x, cos, sin), "cos"),  # [9, 48] does not broadcast to [.., 5, 3, 48]
        (lambda: rot.rotary(x, cos, sin, positions=pos.float()), "positions"),
        (lambda: rot.rotary(x, cos, sin, positions=pos + 9), "positions"),  # out of the table
        (lambda: rot.rotary(x, cos, sin, positions=torch.zeros(4, 1, dtype=torch.long)),
         "positions"),
        (lambda: rot.rotary(x, cos, sin, positions=pos, out=torch.empty(2, 5, 3, 40)), "out"),
        (lambda: rot.rotary(x, cos, sin, positions=pos,
                            out=torch.empty(1, 1, 1, 48).expand(2, 5, 3, 48)), "out"),
        (lambda: rot.rotary(x[None], cos, sin), "x"),  # rank 5
        (lambda: rot.rotary_qk(x, x.half(), cos, sin, positions=pos), "k"),
        (lambda: rot.rotary_qk(x, None, cos, sin), "k"),
    ]
    for fn, name in cases:
        with pytest.raises(LoweringError, match=name):
            fn()


def test_shipped_and_bench():
    names = [s.name for s in rot.SHIPPED]
    assert len(names) == len(set(names))
    assert rot.choose_config(32, 80, in_place=False)["TAIL"] == 48
    res = rot.bench_rotary(DEV, batch=1, seq=2, heads=2, kv_heads=1, head_dim=16,
                           dtype=torch.float32)
    assert res["triton_ms"] > 0
