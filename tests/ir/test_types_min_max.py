"""resolve_min_max: Max/Min of symbolic dims decided by the symbols' ranges, exactly or not
at all (MPT's ALiBi table slice ``P - Max(0, P - seq)`` is ``seq`` when seq <= P)."""

from __future__ import annotations

import itertools

import pytest

from transfuse.ir.types import dim_str, eval_dim, parse_dim, resolve_min_max

UNBOUNDED = 2**63 - 1


@pytest.mark.parametrize(("text", "ranges", "want"), [
    ("128-Max(0,128-seq)", {"seq": (2, 64)}, "seq"),
    ("128-Max(0,128-seq)", {"seq": (2, 128)}, "seq"),
    ("Min(seq,4096)", {"seq": (1, 4096)}, "seq"),
    ("Max(seq,2*seq)", {"seq": (1, 10)}, "2*seq"),
    ("Max(seq,batch)", {"seq": (1, 10), "batch": (20, 30)}, "batch"),
    ("Max(1,seq-1)+Min(seq,8)", {"seq": (2, 8)}, "2*seq-1"),
])
def test_decided_by_the_ranges(text, ranges, want):
    assert dim_str(resolve_min_max(parse_dim(text), ranges)) == want


@pytest.mark.parametrize(("text", "ranges"), [
    ("128-Max(0,128-seq)", {"seq": (2, 200)}),  # seq > 128 is possible: stays as it is
    ("128-Max(0,128-seq)", {"seq": (2, UNBOUNDED)}),
    ("Max(seq,batch)", {"seq": (1, 10)}),  # batch has no range
    ("Max(seq*seq,3)", {"seq": (1, 10)}),  # not linear: not decided
])
def test_undecided_stays_exact(text, ranges):
    d = parse_dim(text)
    assert resolve_min_max(d, ranges) == d


def test_equal_to_the_original_everywhere_in_the_range():
    d = parse_dim("Max(1,seq-3)+Min(2*seq,seq+5)-Max(0,16-seq)")
    ranges = {"seq": (4, 20)}
    r = resolve_min_max(d, ranges)
    assert dim_str(r) != dim_str(d)
    for seq in range(4, 21):
        assert eval_dim(r, {"seq": seq}) == eval_dim(d, {"seq": seq})
    for a, b in itertools.product(range(1, 5), range(6, 9)):
        e = parse_dim("Max(a,b)")
        assert eval_dim(resolve_min_max(e, {"a": (1, 5), "b": (6, 9)}), {"a": a, "b": b}) == b

