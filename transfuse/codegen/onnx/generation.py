"""``cached_attention`` on the onnxruntime target, and the program that keeps caches in place.

The op writes the step's K/V into per-layer caches and attends over each sequence's
visible cache (GEN_DESIGN.md; the oracle is ``transfuse.ir.opdefs.generation``). ONNX has
no in-place writes and onnxruntime never writes a graph input, so the lowering makes the
write a value and the program makes it land in the cache's own memory:

- write: ``ScatterND(cache, indices, new rows)`` -> the written cache, a new graph output
  (``present``). A token's cache row is its sequence's slot (contiguous) or the block
  ``table[s, p // K]`` at ``p % K`` (paged); token-major caches ``[rows, L|K, Hkv, D]`` are
  indexed by ``(row, position)``, head-major ``[rows, Hkv, L|K, D]`` by
  ``(row, head, position)``.
- in place: :class:`GenerationOrtProgram` runs the session with IO binding and binds each
  ``present`` output to the memory of its cache input (what onnxruntime-genai does with
  ``past_present_share_buffer``). ORT's ScatterND copies its input to its output only when
  the two buffers differ, so a bound step writes the new rows and copies nothing (measured:
  a 268 MB cache, 2 rows: 0.01 ms bound to itself vs 22 ms into a fresh buffer).
- read, standard ops: each step sequence's first T = max(seq_lens) entries are gathered
  (contiguous: the slots cut to T; paged: the first ceil(T / K) blocks of each block table,
  laid end to end and cut to T; -1 table padding past them is never read) into
  [B, T, Hkv, D]; every query token scores all B*T entries and a mask keeps those of its
  own sequence with ``max(0, p - window + 1) <= j <= p`` (softcap before the mask, ALiBi
  ``slope*(j - p)``); GQA without repeating K/V (query heads grouped per K/V head). Exact
  for every mix of prefill chunks and decode tokens; it computes B*T scores per token,
  which is what one sequence needs and B times that for a batch.

GroupQueryAttention where it maps (:func:`gqa_refuses`): its past/present buffers
``[B, Hkv, L, D]`` are indexed by batch row, so a step maps onto it only when the step's
sequences are the cache's slots 0..B-1 in order with equal new-token counts. That is a
property of each step's metadata, except in one case fixed by the graph: one cache slot in
head-major order (``max_batch=1, cache_order="head-major"``), where every step is one
sequence (B = 1, S = N: a prompt, a chunk or a decode token) and the cache input is GQA's
past buffer; its present output, bound to the same memory, is the written cache, and
``seqlens_k = seq_lens - 1``, ``total_sequence_length = max(seq_lens)``. Everything else
(batches of slots, token-major or paged caches, ALiBi, head sizes the CPU kernel refuses)
takes the standard ops, with the reason in the lowering notes.

Refused, with the reason: a plain ``OrtProgram`` (it would drop the writes); the
onnxruntime target builds generation graphs with :class:`GenerationOrtProgram`.

Glossary: N tokens of the step, B sequences, H query heads, Hkv K/V heads, G = H / Hkv,
D / Dv head dims, L cache length per slot, K block size, W blocks per table row, T visible
length of the step.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
from onnx import helper

from transfuse.codegen.onnx.contrib_limits import GQA_HEAD_SIZE
from transfuse.codegen.onnx.export import lower_graph
from transfuse.codegen.onnx.program import open_session, ort_providers
from transfuse.codegen.onnx.registry import LOWERINGS, fusable, out_dtype
from transfuse.codegen.onnx.rotary import unflatten
from transfuse.errors import ExecutionError, LoweringError
from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.types import DType

#: graph id -> {cache input ONNX name: the ONNX name holding its latest written value};
#: present only while GenerationOrtProgram lowers that graph
_WRITES: dict[int, dict[str, str]] = {}


@contextlib.contextmanager
def recording_cache_writes(graph: Graph) -> Iterator[dict[str, str]]:
    """While lowering ``graph``: collect every cache write (cache input -> written value)."""
    writes: dict[str, str] = {}
    _WRITES[id(graph)] = writes
    try:
        yield writes
    finally:
        del _WRITES[id(graph)]


def _flat(b, v: Value, layout: str, heads_last: bool = False) -> str:
    """A q/k/v value ([1, H, N, D] bhsd or [1, N, H, D] bshd) as [N, H, D], or as its
    [1, N, H*D] projection when ``heads_last`` (that form itself when the builder has it:
    no node)."""
    flat = (b.heads_first if layout == "bhsd" else b.split_heads).get(id(v))
    h, d = v.type.shape[1 if layout == "bhsd" else 2], v.type.shape[3]
    if flat is not None and heads_last:
        return flat
    x = flat if flat is not None else b.name(v)
    if flat is None and layout == "bhsd":
        x = b.add("Transpose", [x], perm=[0, 2, 1, 3])
    return b.add("Reshape", [x, b.ints([1, -1, h * d] if heads_last else [-1, h, d])])


def _cache_now(b, node: Node, which: int) -> tuple[dict[str, str], str, str]:
    """(the graph's writes, cache input ``which``'s name, the name of its latest value): a
    second writer of one cache reads what the first wrote."""
    writes = _WRITES[id(b.graph)]
    source = b.name(node.inputs[which])
    return writes, source, writes.get(source, source)


def _write(b, node: Node, which: int, rows: str, row: str, at: str) -> str:
    """ScatterND of ``rows`` ([N, Hkv, D]) into cache input ``which`` at cache row ``row``
    (slot or block, [N]) and position ``at`` in it ([N]); returns the written cache."""
    writes, source, current = _cache_now(b, node, which)
    hkv = node.inputs[which].type.shape[1 if node.attrs["cache_order"] == "head-major" else 2]
    if node.attrs["cache_order"] == "head-major":  # (row, head, position) per token and head
        shape = b.add("Concat", [b.add("Shape", [row]), b.ints([hkv, 1])], axis=0)
        heads = b.const(torch.arange(hkv).reshape(1, hkv, 1), DType.i64, "heads")
        parts = [b.add("Expand", [b.unsqueeze(x, [1, 2]) if x != heads else x, shape])
                 for x in (row, heads, at)]
        index = b.add("Concat", parts, axis=2)  # [N, Hkv, 3]
    else:  # (row, position) per token
        index = b.add("Concat", [b.unsqueeze(row, [1]), b.unsqueeze(at, [1])], axis=1)
    written = b.add("ScatterND", [current, index, rows], hint="present")
    writes[source] = written
    return written


def _visible(b, node: Node, cache: str, table: str, length: str, hkv: int, d: int) -> str:
    """The first T entries of each step sequence's cache as [Hkv, B*T, D]."""
    head_major = node.attrs["cache_order"] == "head-major"
    axis = 2 if head_major else 1  # the position axis
    if node.attrs["paged"]:  # the blocks holding positions < T, laid end to end
        k = node.attrs["block_size"]
        nblocks = b.add("Div", [b.add("Add", [length, b.ints([k - 1])]), b.ints([k])])
        blocks = b.add("Slice", [table, b.ints([0]), nblocks, b.ints([1])])
        rows = b.add("Gather", [cache, blocks], axis=0)  # [B, W', K, Hkv, D] | [B, W', Hkv, K, D]
        if head_major:
            rows = b.add("Transpose", [rows], perm=[0, 2, 1, 3, 4])
        rows = b.add("Reshape", [rows, b.ints([0, hkv, -1, d] if head_major else [0, -1, hkv, d])])
        rows = b.add("Slice", [rows, b.ints([0]), length, b.ints([axis])])
    else:
        cut = b.add("Slice", [cache, b.ints([0]), length, b.ints([axis])])
        rows = b.add("Gather", [cut, table], axis=0)  # [B, T, Hkv, D] or [B, Hkv, T, D]
    perm = [1, 0, 2, 3] if head_major else [2, 0, 1, 3]
    return b.add("Reshape", [b.add("Transpose", [rows], perm=perm), b.ints([hkv, -1, d])])


def _where(b, node: Node, table: str, sot: str, pos: str) -> tuple[str, str]:
    """(slot or block [N], position in it [N]) of every token's cache row."""
    if not node.attrs["paged"]:
        return b.add("Gather", [table, sot], axis=0), pos
    k = b.const(node.attrs["block_size"], DType.i64, "block_size")
    which = b.add("Concat", [b.unsqueeze(sot, [1]), b.unsqueeze(b.add("Div", [pos, k]), [1])],
                  axis=1)
    return b.add("GatherND", [table, which]), b.add("Mod", [pos, k], fmod=0)


def _mask_and_bias(b, node: Node, sot: str, pos: str, lens: str, length: str):
    """(keep [N, B*T] bool, alibi bias [H, N, B*T] or None) for the step's tokens."""
    a = node.attrs
    zero, one = b.const(0, DType.i64, "zero"), b.const(1, DType.i64, "one")
    nseq = b.add("Shape", [lens])
    j = b.unsqueeze(b.add("Range", [zero, b.add("Squeeze", [length]), one]), [0, 1])  # [1,1,T]
    s = b.unsqueeze(b.add("Range", [zero, b.add("Squeeze", [nseq]), one]), [0, 2])  # [1,B,1]
    p = b.unsqueeze(pos, [1, 2])  # [N, 1, 1]
    keep = b.add("And", [b.add("Equal", [s, b.unsqueeze(sot, [1, 2])]),
                         b.add("LessOrEqual", [j, p])])
    if a["window"] is not None:
        keep = b.add("And", [keep, b.add("Greater", [j, b.add("Sub", [
            p, b.const(a["window"], DType.i64, "window")])])])
    flat = b.ints([0, -1])
    keep = b.add("Reshape", [keep, flat])
    if a["alibi"] is None:
        return keep, None
    dtype = out_dtype(node)
    full = b.add("Concat", [b.add("Shape", [pos]), nseq, length], axis=0)
    rel = b.add("Reshape", [b.add("Expand", [b.add("Sub", [j, p]), full]), flat])  # [N, B*T]
    slopes = b.const(torch.tensor(a["alibi"]).reshape(-1, 1, 1), dtype, "slopes")
    return keep, b.add("Mul", [slopes, b.cast(rel, DType.i64, dtype)])


def gqa_refuses(b, node: Node) -> str | None:
    """Why GroupQueryAttention cannot compute this node with its cache in place (None: it
    can): it needs one cache slot in head-major order ([1, Hkv, L, D] is GQA's BNSH past and
    present buffer, and a step is then one sequence: B = 1, S = N), f32, no ALiBi, and head
    sizes its CPU kernel takes."""
    a = node.attrs
    if not fusable(b, node):
        return "not f32 or fused ops disabled"
    if a["paged"]:
        return "paged caches"
    if a["cache_order"] != "head-major":
        return "token-major caches (GroupQueryAttention's past/present are [B, Hkv, L, D])"
    if node.inputs[3].type.shape[0] != 1:
        return "more than one cache slot (GroupQueryAttention's batch rows would be the slots)"
    if a["alibi"] is not None:
        return "ALiBi"
    d, dv = node.inputs[0].type.shape[3], node.inputs[2].type.shape[3]
    if d != dv:
        return "different q/k and v head dims"
    return GQA_HEAD_SIZE.refuses(d, dv)


def _gqa(b, node: Node, h: int, hkv: int, d: int) -> str:
    """GroupQueryAttention over the one-slot head-major caches, whose present outputs are
    the written caches; returns the output as [1, N, H*D]. q, k, v go in as their
    [1, N, H*D] projections (no Reshape where the builder has them)."""
    a = node.attrs
    lens = b.name(node.inputs[7])
    seqlens = b.memo(("gen-seqlens_k", lens), lambda: b.cast(
        b.add("Sub", [lens, b.const(1, DType.i64, "one")]), DType.i64, DType.i32))
    total = b.memo(("gen-total", lens), lambda: b.cast(
        b.reduce("ReduceMax", lens, [0], False), DType.i64, DType.i32))
    flat = [_flat(b, node.inputs[i], a["layout"], heads_last=True) for i in range(3)]
    writes, k_source, k_past = _cache_now(b, node, 3)
    _, v_source, v_past = _cache_now(b, node, 4)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    out, k_present, v_present = b.ms(
        "GroupQueryAttention", [*flat, k_past, v_past, seqlens, total], 3, num_heads=h,
        kv_num_heads=hkv, scale=scale, softcap=a["softcap"],
        local_window_size=a["window"] if a["window"] is not None else None)
    writes[k_source], writes[v_source] = k_present, v_present
    return out


@LOWERINGS.register("cached_attention")
def _cached_attention(b, node):
    if id(b.graph) not in _WRITES:
        raise LoweringError("cached_attention writes its KV caches in place, which a plain "
                            "OrtProgram cannot do (ORT never writes graph inputs); build "
                            "generation graphs with transfuse.codegen.onnx.generation."
                            "GenerationOrtProgram")
    a, dtype = node.attrs, out_dtype(node)
    layout = a["layout"]
    pos, sot, lens, table = (b.name(node.inputs[i]) for i in range(5, 9))
    h, d = node.inputs[0].type.shape[1 if layout == "bhsd" else 2], node.inputs[0].type.shape[3]
    hkv = node.inputs[1].type.shape[1 if layout == "bhsd" else 2]
    dv = node.inputs[2].type.shape[3]
    why_not = gqa_refuses(b, node)
    if why_not is None:
        flat = _gqa(b, node, h, hkv, d)
        (b.heads_first if layout == "bhsd" else b.split_heads)[id(node.outputs[0])] = flat
        return unflatten(b, flat, node.outputs[0], layout)
    b.memo(("cached-attention-route", why_not), lambda: b.notes.append(
        f"cached_attention with standard ops: {why_not}") or why_not)
    q, k, v = (_flat(b, node.inputs[i], layout) for i in range(3))  # [N, H|Hkv, D]
    slot, offset = _where(b, node, table, sot, pos)  # [N], [N]
    k_cache = _write(b, node, 3, k, slot, offset)
    v_cache = _write(b, node, 4, v, slot, offset)
    length = b.reduce("ReduceMax", lens, [0], True)  # [1]: T
    keys = _visible(b, node, k_cache, table, length, hkv, d)  # [Hkv, B*T, D]
    vals = _visible(b, node, v_cache, table, length, hkv, dv)
    g = h // hkv
    qg = b.add("Reshape", [b.add("Transpose", [q], perm=[1, 0, 2]), b.ints([hkv, -1, d])])
    scores = b.add("MatMul", [qg, b.add("Transpose", [keys], perm=[0, 2, 1])])
    scores = b.add("Reshape", [scores, b.ints([h, -1, 0])])  # [H, N, B*T]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    scores = b.add("Mul", [scores, b.const(scale, dtype, "scale")])
    if a["softcap"] is not None:
        cap = b.const(a["softcap"], dtype, "softcap")
        scores = b.add("Mul", [b.add("Tanh", [b.add("Div", [scores, cap])]), cap])
    keep, alibi = _mask_and_bias(b, node, sot, pos, lens, length)
    if alibi is not None:
        scores = b.add("Add", [scores, alibi])
    scores = b.add("Where", [keep, scores, b.const(float("-inf"), dtype, "neg_inf")])
    probs = b.add("Softmax", [scores], axis=-1)
    if g > 1:
        probs = b.add("Reshape", [probs, b.ints([hkv, -1, 0])])  # [Hkv, G*N, B*T]
    out = b.add("MatMul", [probs, vals])  # [Hkv, G*N, Dv]
    out = b.add("Reshape", [out, b.ints([h, -1, dv])])  # [H, N, Dv]
    flat = b.add("Reshape", [b.add("Transpose", [out], perm=[1, 0, 2]), b.ints([1, -1, h * dv])])
    (b.heads_first if layout == "bhsd" else b.split_heads)[id(node.outputs[0])] = flat
    return unflatten(b, flat, node.outputs[0], layout)


# -- the program --------------------------------------------------------------------------


def add_cache_outputs(model, writes: dict[str, str]) -> dict[str, str]:
    """Make each recorded cache write (:func:`recording_cache_writes`) an extra output of
    ``model``, ``<cache input>_present``, of the cache's type (in place, after the graph's own
    outputs); returns cache input name -> output name. A write that was pruned is an error."""
    produced = {o for n in model.graph.node for o in n.output}
    types = {i.name: i.type for i in model.graph.input}
    outputs: dict[str, str] = {}
    for source, written in writes.items():
        if written not in produced:
            raise LoweringError(f"the write of cache {source!r} was pruned: a "
                                "cached_attention whose output nothing uses")
        out = helper.make_value_info(f"{source}_present", types[source])
        for n in model.graph.node:  # the writer produces the output under its own name
            n.output[:] = [out.name if o == written else o for o in n.output]
            n.input[:] = [out.name if o == written else o for o in n.input]
        model.graph.output.append(out)
        outputs[source] = out.name
    return outputs


class GenerationOrtProgram:
    """An ORT session for a generation graph whose caches are updated in place.

    ``program(flat_inputs)`` takes the graph's inputs (torch CPU tensors; the caches
    contiguous) and returns its outputs; each cache input is written in place: its written
    value is an extra ONNX output bound to the cache's own memory. The binding of the caches
    is kept from call to call (made again when the caller passes other cache memory), and
    the graph's outputs are written into new tensors of the IR's shapes when those follow
    from the inputs' (else ORT allocates them): a decode step binds only its few small
    inputs (measured: ~1 ms less per SmolLM2 step than binding 60 caches every call).
    Attributes: ``cache_outputs`` (cache input name -> ONNX output name), ``model_proto``,
    ``input_names``, ``output_names`` (the graph's own outputs), ``notes``, ``device``
    (always the CPU), ``threads`` (intra-op threads; default torch's).
    """

    def __init__(self, graph: Graph, *, device: str | torch.device | None = None,
                 threads: int | None = None):

        self.graph = graph
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type != "cpu":
            raise LoweringError(f"onnxruntime generation graphs run on the CPU only (their KV "
                                f"caches are bound by host pointer), got device {self.device}")
        providers = ort_providers(self.device)
        with recording_cache_writes(graph) as writes:
            model, self._inits, builder = lower_graph(graph, external=True, providers=providers)
        self.notes = list(builder.notes)
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        self.cache_outputs = add_cache_outputs(model, writes)
        self.model_proto = model
        self.session, self._keep = open_session(
            model, self._inits, threads=self.threads, providers=providers,
            what=f"the generation model of graph {graph.name}")
        self._binding, self._bound_key = None, None  # see _bind_caches
        self._out_dims = _output_dims(graph)
        self._lock = threading.Lock()

    def lowering_notes(self) -> list[str]:
        """Lines for the pass log: how the caches are kept."""
        return [f"{len(self.cache_outputs)} KV caches written in place (ScatterND output "
                "bound to the cache input by IO binding)"] + self.notes

    def __call__(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(flat_inputs) != len(self.input_names):
            raise ExecutionError(f"generation program of graph {self.graph.name!r} takes "
                                 f"{len(self.input_names)} inputs, got {len(flat_inputs)}")
        caches = []
        for name, t in zip(self.input_names, flat_inputs):
            if name in self.cache_outputs:
                if t.device.type != "cpu" or not t.is_contiguous():
                    raise ExecutionError(f"KV cache input {name!r} must be a contiguous CPU "
                                         f"tensor (it is written in place), got {t.device} "
                                         f"strides {t.stride()}")
                caches.append((name, t))
        if not self._lock.acquire(blocking=False):  # another thread runs: a binding of its own
            return self._run(self._bind_caches(caches), flat_inputs)
        try:
            key = tuple((t.data_ptr(), t.shape, t.dtype) for _, t in caches)
            if key != self._bound_key:
                self._binding, self._bound_key = self._bind_caches(caches), key
            return self._run(self._binding, flat_inputs)
        finally:
            self._lock.release()

    def _bind_caches(self, caches: list[tuple[str, torch.Tensor]]):
        """A new IO binding with every cache bound as input and as its written output (the
        same memory). The caches are the same tensors step after step, so ``__call__`` keeps
        this binding and makes a new one only when a cache's memory, shape or dtype differs
        from the last call's (a binding holds raw pointers: equal pointers bind the same
        memory, whoever owns it now)."""
        binding = self.session.io_binding()
        for name in self.output_names:  # first: get_outputs() lists them in binding order
            binding.bind_output(name, "cpu")
        for name, t in caches:
            dtype, shape = _np_dtype(t.dtype), list(t.shape)
            binding.bind_input(name, "cpu", 0, dtype, shape, t.data_ptr())
            binding.bind_output(self.cache_outputs[name], "cpu", 0, dtype, shape, t.data_ptr())
        return binding

    def _run(self, binding, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Bind the step's other inputs (rebinding a name replaces it) and outputs, and run."""
        keep = []
        for name, t in zip(self.input_names, flat_inputs):
            if name in self.cache_outputs:
                continue
            t = t.detach().contiguous()
            keep.append(t)  # alive until the run is over
            binding.bind_input(name, "cpu", 0, _np_dtype(t.dtype), list(t.shape), t.data_ptr())
        outs = None
        if self._out_dims is not None:  # written into tensors of the shapes the IR gives
            outs = [torch.empty([d if isinstance(d, int) else flat_inputs[d[0]].shape[d[1]]
                                 for d in dims], dtype=dtype)
                    for dims, dtype in self._out_dims]
        for i, name in enumerate(self.output_names):  # a name bound again keeps its place
            if outs is None:
                binding.bind_output(name, "cpu")  # ORT allocates
            else:
                t = outs[i]
                binding.bind_output(name, "cpu", 0, _np_dtype(t.dtype), list(t.shape),
                                    t.data_ptr())
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise ExecutionError(f"onnxruntime failed running generation graph "
                                 f"{self.graph.name!r}: {type(e).__name__}: {e}") from e
        if outs is not None:
            return outs
        return [torch.from_numpy(o.numpy())
                for o in binding.get_outputs()[: len(self.output_names)]]


def _output_dims(graph: Graph) -> list[tuple[list, torch.dtype]] | None:
    """Each graph output's dims as ints or (input index, axis) of an input dim with the same
    symbol, and its dtype; None when some dim is neither (ORT then allocates the outputs)."""
    where = {}
    for i, v in enumerate(graph.inputs):
        for axis, d in enumerate(v.type.shape):
            if not isinstance(d, int):
                where.setdefault(d, (i, axis))
    dims = []
    for v in graph.outputs:
        if any(not isinstance(d, int) and d not in where for d in v.type.shape):
            return None
        dims.append(([d if isinstance(d, int) else where[d] for d in v.type.shape],
                     v.type.dtype.torch))
    return dims


_NP_DTYPES: dict = {}


def _np_dtype(dtype: torch.dtype):
    if dtype not in _NP_DTYPES:
        _NP_DTYPES[dtype] = torch.empty((), dtype=dtype).numpy().dtype
    return _NP_DTYPES[dtype]


__all__ = ["GenerationOrtProgram", "recording_cache_writes", "add_cache_outputs"]
