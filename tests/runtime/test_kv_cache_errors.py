"""KVCache refuses bad input with a typed error naming what and the limit, and changes
nothing: bad steps and sequence calls, non-positive sizes, unknown dtypes/devices/layouts, a
cache that does not fit in memory (refused before allocating), a failed allocation."""

from __future__ import annotations

import pytest
import torch
from kv_reference import make, state, step

from transfuse.errors import InputError
from transfuse.runtime.kv_cache import KVCache


@pytest.mark.parametrize("items,match", [
    ([], "non-empty list"),
    ("ab", "non-empty list"),
    ([("a",)], r"each item is \(seq_id, n_new\)"),
    ([("a", 1, 2)], r"each item is \(seq_id, n_new\), got \('a', 1, 2\)"),
    ([{"a": 1}], r"each item is \(seq_id, n_new\)"),
    ([("zz", 1)], "unknown sequence 'zz'"),
    ([("a", 1), ("a", 1)], "'a' appears twice"),
    ([("a", 0)], "n_new of sequence 'a' must be a positive int, got 0"),
    ([("a", 1.0)], "must be a positive int"),
    ([("a", 31)], r"would hold 33 tokens \(2 \+ 31\), more than max_seq_len 32"),
])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_bad_steps_are_refused_without_change(layout, items, match):
    c = make(layout)
    c.add("a", 2)
    step(c, [("a", 2)])
    snap = state(c)
    with pytest.raises(InputError, match=match):
        c.prepare_step(items)
    assert state(c) == snap
    step(c, [("a", 1)])  # no step was left in flight


def test_bad_sequence_calls():
    c = make("paged")
    with pytest.raises(InputError, match="prompt of sequence 's' has 33 tokens, longer than "
                                         "max_seq_len 32"):
        c.add("s", 33)
    with pytest.raises(InputError, match="prompt_len of sequence 's' must be a positive int"):
        c.add("s", 0)
    c.add("s", 32)
    with pytest.raises(InputError, match="sequence 's' already exists"):
        c.add("s", 1)
    for call, name in ((lambda: c.length("t"), "length"), (lambda: c.free("t"), "free"),
                       (lambda: c.fork("t", "u"), "fork"), (lambda: c.extend("t", 1), "extend"),
                       (lambda: c.length([1]), "length")):
        with pytest.raises(InputError, match=f"KVCache.{name}: unknown sequence"):
            call()
    with pytest.raises(InputError, match="sequence 's' already exists"):
        c.fork("s", "s")
    with pytest.raises(InputError, match=r"KVCache.add: sequence id \[1\] is not hashable"):
        c.add([1], 1)
    with pytest.raises(InputError, match=r"KVCache.fork: sequence id \{\} is not hashable"):
        c.fork("s", {})
    step(c, [("s", 30)])
    with pytest.raises(InputError, match=r"would hold 33 tokens \(30 \+ 3\)"):
        c.extend("s", 3)
    with pytest.raises(InputError, match="a paged cache has block tables"):
        c.slot("s")
    with pytest.raises(InputError, match="a contiguous cache has slots"):
        make("contiguous").block_table("s")


@pytest.mark.parametrize("field", ["layers", "kv_heads", "head_dim", "max_seq_len", "max_batch",
                                   "block_size", "num_blocks"])
@pytest.mark.parametrize("value", [0, -2, 1.5, True, None])
def test_non_positive_sizes(field, value):
    args = dict(layers=1, kv_heads=1, head_dim=1, max_seq_len=8, max_batch=1, layout="paged")
    if field == "num_blocks" and value is None:
        return  # None is the default: sized from max_batch x max_seq_len
    args[field] = value
    with pytest.raises(InputError, match=f"{field} must be a positive int, got {value!r}"):
        KVCache(**args)


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="int8"), "dtype 'int8' unknown"),
    (dict(dtype=torch.int32), "must be a floating type"),
    (dict(dtype=3), "dtype 3 unknown"),
    (dict(device="gpu0"), "device 'gpu0' is not a device name"),
    (dict(device="cuda:7"), "this machine has"),
    (dict(device="mps"), "type not one of"),
    (dict(device=0), "must be a str or torch.device"),
    (dict(layout="blocked"), "layout must be one of"),
    (dict(order="bnsh"), "order must be one of"),
    (dict(layout="contiguous", num_blocks=4), "num_blocks is for layout='paged' only"),
])
def test_bad_options(kw, match):
    args = dict(max_seq_len=8, max_batch=1, layout="paged")
    args.update(kw)
    with pytest.raises(InputError, match=match):
        KVCache(1, 1, 4, **args)


def test_refuses_a_cache_that_does_not_fit_before_allocating(monkeypatch):
    import transfuse.runtime.kv_cache as kv
    import transfuse.runtime.kv_memory as kv_memory

    monkeypatch.setattr(kv_memory, "available_memory", lambda device: 1000)
    zeros = []
    monkeypatch.setattr(kv.torch, "zeros", lambda *a, **k: zeros.append(a))
    with pytest.raises(InputError, match=r"2048 bytes .*max_batch 2 x max_seq_len 8 x 128 bytes "
                                         r"per token\) do not fit in the 1000 bytes"):
        KVCache(2, 2, 4, max_seq_len=8, max_batch=2)
    assert zeros == []  # refused before any tensor was made
    monkeypatch.undo()
    huge = dict(max_seq_len=2**20, max_batch=2**10, layout="paged", block_size=2**10)
    with pytest.raises(InputError, match=r"1048576 blocks x 1024 tokens .* do not fit"):
        KVCache(64, 8, 128, **huge)  # 256 TiB: no machine here has that; nothing allocated


def test_available_memory_reads_the_machine():
    from transfuse.runtime.kv_memory import available_memory, human_bytes

    avail = available_memory(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < avail <= total
    assert available_memory(torch.device("meta")) is None  # no memory to check
    assert (human_bytes(512), human_bytes(3 * 2**29)) == ("512 B", "1.5 GiB")


def test_a_failed_allocation_is_a_typed_error(monkeypatch):
    import transfuse.runtime.kv_cache as kv

    made = []
    real_zeros = torch.zeros

    def zeros(*a, **k):
        if len(made) == 3:
            raise RuntimeError("out of memory (simulated)")
        made.append(real_zeros(*a, **k))
        return made[-1]

    monkeypatch.setattr(kv.torch, "zeros", zeros)
    with pytest.raises(InputError, match=r"allocating 768 bytes on cpu failed after the memory "
                                         r"check passed: out of memory \(simulated\)"):
        KVCache(2, 2, 3, max_seq_len=4, max_batch=2)
    assert len(made) == 3  # 1.5 layers were made when the constructor gave up
