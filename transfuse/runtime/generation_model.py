"""``GenerationModel``: a compiled generation step, its KV cache and its generation config.

What ``transfuse.optimize(model, (ids,), generation=...)`` returns (GEN_DESIGN.md). It holds

- the step: an ordinary :class:`CompiledModel` of the graph that ``generation.insert-kv-cache``
  made (inputs ``input_ids``, ``position_ids``, ``seq_of_token``, ``seq_lens``,
  ``cache_table``, ``logit_rows``, then ``k_cache_i``, ``v_cache_i`` per layer; output
  ``logits`` [R, V]) and its program, built once for every prefill and decode step;
- the cache spec: the :class:`KVCache` arguments, read from ``graph.meta["generation"]`` (the
  pass's geometry) and the cache inputs' types, as plain JSON;
- the model's generation config (EOS/PAD ids, sampling defaults), also plain JSON.

The :class:`KVCache` is allocated on the first ``generate()`` (``optimize`` allocates none)
and kept for later calls (``gen.cache``; ``gen.cache_report()`` says its bytes before and
after). ``save(dir)`` writes an ordinary artifact (runtime/artifact.py) whose manifest has a
``generation`` field with the cache spec and the config; ``transfuse.load(dir)`` sees that
field and returns a GenerationModel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from transfuse.errors import ArtifactError, InputError, LoweringError
from transfuse.ir.graph import Graph
from transfuse.ir.signature import InputSpec, Signature
from transfuse.runtime import artifact
from transfuse.runtime.compiled import CompiledModel, from_contents
from transfuse.runtime.generate import OPTIONS, CacheRoom, check_call, generate
from transfuse.runtime.kv_cache import KVCache, bytes_per_token, cache_shape

#: the step graph's inputs before the caches, in order (GEN_DESIGN.md)
STEP_INPUTS = ("input_ids", "position_ids", "seq_of_token", "seq_lens", "cache_table",
               "logit_rows")
#: the generation config fields kept (the options generate() reads, and the BOS id)
CONFIG_FIELDS = tuple(o for o in OPTIONS if o not in ("seed", "stream")) + ("bos_token_id",)
#: the cache spec's fields and their JSON types
SPEC_FIELDS: dict[str, tuple[type, ...]] = {
    "layers": (int,), "kv_heads": (int,), "head_dim": (int,), "dtype": (str,),
    "max_seq_len": (int,), "max_batch": (int,), "layout": (str,),
    "block_size": (int, type(None)), "num_blocks": (int, type(None)), "order": (str,),
    "max_step_tokens": (int,)}
#: spec fields an older artifact may lack, and how to fill them from the spec's others
SPEC_DEFAULTS = {"max_step_tokens": lambda spec: spec["max_batch"] * spec["max_seq_len"]}


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> Any:
    """Read any artifact directory (``transfuse.load``): a :class:`GenerationModel` when its
    manifest has the ``generation`` field, else a :class:`CompiledModel`."""
    contents = artifact.read(path, device)
    if contents.generation is None:
        return from_contents(contents)
    return from_contents(contents, GenerationModel.from_artifact)


class GenerationModel:
    """A causal LM compiled for generation: ``generate()``, ``save()``, a KV cache."""

    def __init__(self, graph: Graph, program: Any = None, pass_log: Any = None, *,
                 backend: str = "python", generation_config: Any = None,
                 meta: Mapping[str, Any] | None = None,
                 cache_spec: Mapping[str, Any] | None = None):
        self._cache_spec = dict(cache_spec) if cache_spec is not None else cache_spec_of(graph)
        check_step_graph(graph, self._cache_spec)
        self._compiled = CompiledModel(graph, step_signature(graph), pass_log, backend=backend,
                                       program=program, meta=meta)
        self._config = config_fields(generation_config)
        self._vocab = int(graph.outputs[0].type.shape[-1])
        self._cache: KVCache | None = None

    @classmethod
    def from_step(cls, step: Any, generation_config: Any = None, *, backend: str = "python",
                  meta: Mapping[str, Any] | None = None) -> GenerationModel:
        """From a compiled step object with ``graph``, ``program`` and ``pass_log``
        (``transfuse.api.compile_generation_step``'s)."""
        return cls(step.graph, step.program, step.pass_log, backend=backend,
                   generation_config=generation_config, meta=meta)

    # -- generating -----------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor | Iterator[Any]:
        """Hugging Face's ``generate()`` for what it supports (runtime/generate.py): returns
        prompt + new tokens ``[B, S + steps]``, or with ``stream=True`` an iterator of each
        step's new ids (an ``int`` for one prompt, an i64 ``[B]`` tensor otherwise).
        Defaults come from the model's generation config."""
        cache = self._cache
        if cache is None:  # check the call before the first allocation
            check_call(input_ids, attention_mask, kwargs, self._config, self._vocab,
                       empty_room(self._cache_spec))
            cache = self.cache
        return generate(self.step_for(cache), cache, input_ids, attention_mask,
                        generation_config=self._config, vocab_size=self._vocab,
                        max_step_tokens=self._cache_spec["max_step_tokens"], **kwargs)

    def step_for(self, cache: KVCache):
        """``step(input_ids [1, N], meta) -> logits [R, V]`` over ``cache``'s tensors."""
        names = [v.name for v in self._compiled.graph.inputs]
        program, device = self._compiled.program, self.device
        tensors = cache.cache_inputs()

        def step(input_ids: torch.Tensor, meta: Any) -> torch.Tensor:
            feeds = {"input_ids": input_ids.to(device), **meta.inputs(), **tensors}
            return program([feeds[n] for n in names])[0]

        return step

    @property
    def cache(self) -> KVCache:
        """The KV cache, allocated (once) on first use from the cache spec."""
        if self._cache is None:
            self._cache = make_cache(self._cache_spec, self.device)
        return self._cache

    def cache_report(self) -> dict[str, Any]:
        """The cache's memory: ``KVCache.memory_report()`` once allocated, else what it
        will take (``bytes``, ``bytes_per_token``) with ``allocated: False``."""
        if self._cache is not None:
            return {"allocated": True, **self._cache.memory_report()}
        spec = self._cache_spec
        per_token = bytes_per_token(spec["layers"], spec["kv_heads"], spec["head_dim"],
                                    spec["dtype"])
        shape = spec_cache_shape(spec)  # rows x positions per row, whatever the order
        rows, cols = shape[:2] if spec["order"] == "token-major" else shape[::2]
        return {"allocated": False, "layout": spec["layout"], "bytes": per_token * rows * cols,
                "bytes_per_token": per_token}

    # -- what it is -------------------------------------------------------------------------

    @property
    def cache_spec(self) -> dict[str, Any]:
        return dict(self._cache_spec)

    @property
    def generation_config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def step_model(self) -> CompiledModel:
        """The compiled step (callable with the step's inputs, checked)."""
        return self._compiled

    @property
    def graph(self) -> Graph:
        return self._compiled.graph

    @property
    def signature(self) -> Signature:
        return self._compiled.signature

    @property
    def pass_log(self) -> Any:
        return self._compiled.pass_log

    @property
    def backend(self) -> str:
        return self._compiled.backend

    @property
    def program(self) -> Any:
        return self._compiled.program

    @property
    def source(self) -> str:
        return self._compiled.source

    @property
    def kernels(self) -> list:
        """The kernels the step runs (the triton target; empty for the others)."""
        return self._compiled.kernels

    @property
    def meta(self) -> dict[str, Any]:
        return self._compiled.meta

    @property
    def device(self) -> torch.device:
        return self._compiled.device or torch.device("cpu")

    @property
    def generation_manifest(self) -> dict[str, Any]:
        """The artifact manifest's ``generation`` field."""
        return {"cache": dict(self._cache_spec), "config": dict(self._config)}

    def to(self, device: str | torch.device) -> GenerationModel:
        """Move the weights to ``device`` (in place; returns self); the KV cache is dropped and
        allocated there at the next generate()."""
        if self._cache is not None and len(self._cache):
            raise InputError(f"cannot move the model while {len(self._cache)} sequences are in "
                             "its KV cache (a stream is still open); finish or close it first")
        self._compiled.to(device)
        self._cache = None
        return self

    # -- saving -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write an artifact directory (runtime/artifact.py) with the generation fields."""
        artifact.save(self, path)

    #: artifact.save writes no model.onnx for the onnxruntime backend (see export_onnx)
    deploy_onnx = False

    def export_onnx(self, path: str, **kwargs: Any) -> str:
        """Refused: the step writes its caches in place (ORT runs it with IO binding in
        ``GenerationOrtProgram``); a plain ONNX file cannot say that."""
        raise LoweringError("a generation model has no plain ONNX export: its cached_attention "
                            "writes the KV caches in place; save() the artifact instead")

    @classmethod
    def from_artifact(cls, contents: artifact.ArtifactContents, program: Any) -> GenerationModel:
        """Rebuild from what :func:`artifact.read` checked (its ``generation`` field)."""
        gen = contents.generation
        spec = dict(gen["cache"])
        where = contents.root / artifact.MANIFEST
        for key, default in SPEC_DEFAULTS.items():
            if key not in spec and all(isinstance(spec.get(k), int) for k in
                                       ("max_batch", "max_seq_len")):
                spec[key] = default(spec)
        for key, kinds in SPEC_FIELDS.items():
            if not isinstance(spec.get(key), kinds) or isinstance(spec.get(key), bool):
                raise ArtifactError(f"{where}: generation cache spec field {key!r} is "
                                    f"{spec.get(key)!r}")
        if not spec["max_batch"] <= spec["max_step_tokens"] <= spec["max_batch"] * \
                spec["max_seq_len"]:
            raise ArtifactError(f"{where}: generation cache spec field 'max_step_tokens' is "
                                f"{spec['max_step_tokens']}; expected max_batch "
                                f"({spec['max_batch']}) to max_batch x max_seq_len")
        contents.graph.meta["generation"] = geometry_of(spec)
        return cls(contents.graph, program, contents.pass_log, backend=contents.backend,
                   generation_config=gen.get("config"), meta=contents.meta, cache_spec=spec)

    def __repr__(self) -> str:
        spec = self._cache_spec
        report = self.cache_report()
        return (f"GenerationModel(backend={self.backend!r}, device={self.device}, "
                f"vocab={self._vocab}, layers={spec['layers']}, cache={spec['layout']} "
                f"{spec['max_batch']}x{spec['max_seq_len']} "
                f"({report['bytes'] / 2**20:.1f} MiB, "
                f"{'allocated' if report['allocated'] else 'not allocated'}))")


# -- the spec -----------------------------------------------------------------------------------


def cache_spec_of(graph: Graph) -> dict[str, Any]:
    """The KVCache arguments of a step graph: its ``meta["generation"]`` + cache input types."""
    geo = graph.meta.get("generation")
    if not isinstance(geo, Mapping):
        raise LoweringError(f"graph {graph.name} is no generation step: it has no "
                            "meta['generation'] (run generation.insert-kv-cache)")
    caches = [v for v in graph.inputs if v.name.startswith(("k_cache_", "v_cache_"))]
    if not caches:
        raise LoweringError(f"generation step {graph.name} has no k_cache_i/v_cache_i inputs")
    order = geo.get("cache_order", "token-major")
    shape = caches[0].type.shape
    kv_heads, head_dim = (shape[2], shape[3]) if order == "token-major" else (shape[1], shape[3])
    paged = geo["kv"] == "paged"
    return {"layers": len(caches) // 2, "kv_heads": int(kv_heads), "head_dim": int(head_dim),
            "dtype": str(caches[0].type.dtype.torch).removeprefix("torch."),
            "max_seq_len": int(geo["max_seq_len"]), "max_batch": int(geo["max_batch"]),
            "layout": geo["kv"], "block_size": int(geo["block_size"]) if paged else None,
            "num_blocks": int(geo["num_blocks"]) if paged else None, "order": order,
            "max_step_tokens": int(geo.get("max_step_tokens")
                                   or int(geo["max_batch"]) * int(geo["max_seq_len"]))}


def geometry_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The pass's ``graph.meta["generation"]`` for a cache spec (the inverse of the above)."""
    return {"kv": spec["layout"], "max_seq_len": spec["max_seq_len"],
            "max_batch": spec["max_batch"], "block_size": spec["block_size"],
            "num_blocks": spec["num_blocks"], "cache_order": spec["order"],
            "max_step_tokens": spec["max_step_tokens"], "layers": spec["layers"]}


def make_cache(spec: Mapping[str, Any], device: torch.device | str = "cpu", *,
               num_blocks: int | None = None, prefix_caching: bool = False) -> KVCache:
    """Allocate the KVCache a spec describes (its own memory check first); a paged cache may
    take another pool size (``num_blocks``) and prefix caching."""
    kw = {"block_size": spec["block_size"], "num_blocks": num_blocks or spec["num_blocks"],
          "prefix_caching": prefix_caching} if spec["layout"] == "paged" else {}
    return KVCache(spec["layers"], spec["kv_heads"], spec["head_dim"], spec["dtype"],
                   max_seq_len=spec["max_seq_len"], max_batch=spec["max_batch"],
                   layout=spec["layout"], order=spec["order"], device=device, **kw)


def check_step_graph(graph: Graph, spec: Mapping[str, Any]) -> None:
    """The graph takes the step inputs in order, then one K and one V cache per layer of the
    spec's shape and dtype, and returns one ``logits`` [R, V] output."""
    names = [v.name for v in graph.inputs]
    want = list(STEP_INPUTS) + [f"{kv}_cache_{i}" for i in range(spec["layers"])
                                for kv in ("k", "v")]
    if names != want:
        raise LoweringError(f"generation step {graph.name} takes inputs {names}; expected {want}")
    shape = spec_cache_shape(spec)
    for v in graph.inputs[len(STEP_INPUTS):]:
        got = tuple(v.type.shape)
        if got != shape or str(v.type.dtype.torch) != f"torch.{spec['dtype']}":
            raise LoweringError(f"generation step {graph.name}: cache input %{v.name} is "
                                f"{v.type}; the cache spec makes {list(shape)} {spec['dtype']}")
    if len(graph.outputs) != 1 or graph.outputs[0].type.rank != 2 \
            or not isinstance(graph.outputs[0].type.shape[-1], int):
        raise LoweringError(f"generation step {graph.name} must return one logits [R, V] "
                            f"output, returns {[str(v.type) for v in graph.outputs]}")


def empty_room(spec: Mapping[str, Any]) -> CacheRoom:
    """The room of the spec's cache before anything is in it."""
    if spec["layout"] == "paged":
        return CacheRoom(spec["max_seq_len"], spec["max_batch"], spec["max_batch"],
                         spec["block_size"], spec["num_blocks"], spec["num_blocks"])
    return CacheRoom(spec["max_seq_len"], spec["max_batch"], spec["max_batch"])


def spec_cache_shape(spec: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """One layer's K (or V) cache shape for the spec (KVCache's own rule)."""
    paged = spec["layout"] == "paged"
    return cache_shape(spec["layout"], spec["order"], spec["kv_heads"], spec["head_dim"],
                       max_seq_len=spec["max_seq_len"], max_batch=spec["max_batch"],
                       **({"block_size": spec["block_size"], "num_blocks": spec["num_blocks"]}
                          if paged else {}))


def step_signature(graph: Graph) -> Signature:
    """The step graph's calling convention: every input positional, ``logits`` out."""
    inputs = [InputSpec(v.name, v.type) for v in graph.inputs]
    return Signature(inputs, {}, {"kind": "tensor", "index": 0}, 1)


def config_fields(config: Any) -> dict[str, Any]:
    """The generation config's fields generate() reads, JSON-clean (None dropped)."""
    if config is None:
        return {}
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {}
    for key in CONFIG_FIELDS:
        value = data.get(key)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


__all__ = ["GenerationModel", "load", "cache_spec_of", "make_cache", "check_step_graph",
           "spec_cache_shape", "empty_room", "step_signature", "config_fields", "STEP_INPUTS"]
