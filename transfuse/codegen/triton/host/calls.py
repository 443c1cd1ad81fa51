"""The functions the triton target's generated host code calls (bound by name, ``_t_*``).

Each takes torch tensors and the destination tensor(s) the memory plan chose (``out``), runs
one hand-written kernel of ``codegen/triton/kernels`` (or cuBLAS through torch for dense
GEMMs) and returns what it wrote. The host lowerings (:mod:`.lowerings`) decide which call a
node becomes; these functions only adapt the IR's conventions to the kernels' wrappers
(layouts, the flattened token axis of generation steps, activations).

Glossary: B batch, H query heads, Hkv kv heads, S / T query / key length, D head dim, N the
tokens of a generation step, K / N in GEMMs the input / output features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from transfuse.codegen.triton import env  # noqa: F401  (before any kernel module)
from transfuse.codegen.triton.gen import GeneratedKernel
from transfuse.codegen.triton.gen import run as run_generated
from transfuse.codegen.triton.gen.epilogue import GemmKernel, run_gemm_epilogue
from transfuse.codegen.triton.host.cuda_graphs import CUDA_GRAPH_TOKENS
from transfuse.codegen.triton.kernels import block_sparse_attention as bsa
from transfuse.codegen.triton.kernels import decode_attention as dec
from transfuse.codegen.triton.kernels import flash_attention as fa
from transfuse.codegen.triton.kernels import prefill_attention as pre
from transfuse.codegen.triton.kernels import quant_gemm
from transfuse.codegen.triton.kernels import rotary as rope

#: the block size of the block mask taken from a 2-D additive bias (``block_sparse``)
SPARSE_BLOCK = 64

#: linear's ``activation`` -> the in-place torch op applied to the GEMM's result
_ACTIVATE = {
    "gelu": lambda y: y.copy_(F.gelu(y)),
    "gelu_tanh": lambda y: y.copy_(F.gelu(y, approximate="tanh")),
    "silu": lambda y: F.silu(y, inplace=True),
    "relu": lambda y: y.relu_(),
}


def group(kernel: GeneratedKernel, inputs: Sequence[torch.Tensor], symbols: dict,
          outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One generated kernel of a fusion group, writing ``outs`` (``symbols``: the dims)."""
    return run_generated(kernel, inputs, outs, env=symbols)


def gemm_group(kernel: GemmKernel, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               inputs: list, symbols: dict, outs: list[torch.Tensor],
               rows: int) -> list[torch.Tensor]:
    """A GEMM and its pointwise epilogue group (``gen/epilogue.py``): at most ``rows`` rows,
    the generated GEMM+epilogue kernel; more, cuBLAS for the GEMM (bias and activation in its
    epilogue / in place) and the group's own generated kernel."""
    m = x.numel() // kernel.k if kernel.k else 0
    if m <= rows:
        return run_gemm_epilogue(kernel, x, w, b, inputs, outs, symbols)
    y = torch.empty((*x.shape[:-1], kernel.n), dtype=x.dtype, device=x.device)
    if kernel.layout == "nk":
        linear(x, w, b, y, kernel.activation)
    else:
        torch.matmul(x, w, out=y)
    full = list(inputs)
    full.insert(kernel.y_index, y)
    return run_generated(kernel.plain, full, outs, env=symbols)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor,
           activation: str | None) -> torch.Tensor:
    """``activation(x @ w.T + b)`` into ``out`` (cuBLAS through torch on a GPU)."""
    n, k = w.shape
    x2 = x.reshape(-1, k)
    y2 = out.view(-1, n)
    if b is not None:
        torch.addmm(b, x2, w.t(), out=y2)
    else:
        torch.mm(x2, w.t(), out=y2)
    if activation is not None:
        _ACTIVATE[activation](y2)
    return out


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched, broadcasting) into ``out``."""
    return torch.matmul(a, b, out=out)


def block_mask(bias: torch.Tensor) -> torch.Tensor:
    """The [1, 1, QB, KB] block mask of a 2-D additive bias: a block is kept when any entry is
    finite. Computed once per call for every attention that shares the bias (hoisted)."""
    return bsa.block_mask_from_bias(bias, SPARSE_BLOCK, SPARSE_BLOCK)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              key_padding_mask: torch.Tensor | None, out: torch.Tensor, *,
              blocks: torch.Tensor | None = None, **attrs) -> torch.Tensor:
    """The IR's ``attention`` with the flash kernel, or the block-sparse one when ``blocks``
    (the block mask of a 2-D bias, :func:`block_mask`) is given."""
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    kw = dict(scale=attrs["scale"], causal=attrs["causal"], window=attrs["window"],
              alibi=attrs["alibi"], softcap=attrs["softcap"], layout=attrs["layout"],
              bias=bias, key_mask=key_padding_mask, out=out)
    if blocks is not None:
        return bsa.block_sparse_attention(q, k, v, blocks, SPARSE_BLOCK, SPARSE_BLOCK, **kw)
    return fa.flash_attention(q, k, v, **kw)


def token_tables(position_ids: torch.Tensor, seq_of_token: torch.Tensor,
                 cache_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """What every layer of a generation step shares (hoisted, computed once per step): per
    token how many cache entries it sees (its position + 1) and its sequence's row of the
    slot / block table (a decode step: each token is one "sequence" of the decode kernel),
    and an empty dict where :func:`cached_attention` keeps the step's prefill tile map
    (``prefill_tiles``) per BLOCK_M, made by the first layer that needs it."""
    return position_ids + 1, cache_table[seq_of_token], {}


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, position_ids: torch.Tensor,
                     seq_of_token: torch.Tensor, cache_table: torch.Tensor,
                     tokens: tuple[torch.Tensor, torch.Tensor, dict], out: torch.Tensor, *,
                     layout: str, paged: bool, cache_order: str, scale: float | None,
                     window: int | None, alibi, softcap: float | None) -> torch.Tensor:
    """The IR's ``cached_attention``: the step's K/V written into the caches in place
    (``write_kv_cache``), then every token attends over its sequence's visible cache (paged:
    through the block table).

    - A step with more tokens than sequences (N > B: prefill chunks, mixed steps) runs the
      prefill kernel (``prefill_attention``): tiles of up to BLOCK_M tokens of one sequence,
      each key tile read once per tile. Its tile map is made once per step (kept in
      ``tokens``); for a step a CUDA graph may capture (on a GPU, N <= CUDA_GRAPH_TOKENS) it
      has N tiles, the unused ones empty, so making it needs no host synchronisation.
    - A decode step (N == B, one token per sequence) runs the split-K decode kernel, one
      token per kernel "sequence" (:func:`token_tables`).
    """
    def tokens_major(x):  # [1, H, N, D] or [1, N, H, D] -> [N, H, D] (a view)
        return x[0].transpose(0, 1) if layout == "bhsd" else x[0]

    qn, kn, vn, on = (tokens_major(x) for x in (q, k, v, out))
    if qn.shape[0] == 0:
        return out
    dec.write_kv_cache(kn, vn, k_cache, v_cache, position_ids, seq_of_token, cache_table,
                       paged=paged, cache_order=cache_order)
    lens, table, tile_maps = tokens
    n = qn.shape[0]
    if n > cache_table.shape[0]:
        block_m = pre.prefill_block_m(qn.dtype, qn.shape[2], on.shape[2])
        tiles = tile_maps.get(block_m)
        if tiles is None:
            graphable = qn.device.type == "cuda" and n <= CUDA_GRAPH_TOKENS
            tiles = tile_maps[block_m] = pre.prefill_tiles(
                seq_of_token, block_m, max_tiles=n if graphable else None)
        pre.prefill_attention(qn, k_cache, v_cache, position_ids, seq_of_token, cache_table,
                              paged=paged, cache_order=cache_order, scale=scale, window=window,
                              alibi=alibi, softcap=softcap, tiles=tiles, out=on)
    else:
        dec.decode_attention(qn, k_cache, v_cache, lens, table, paged=paged,
                             cache_order=cache_order, scale=scale, window=window, alibi=alibi,
                             softcap=softcap, out=on)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, *,
           interleaved: bool) -> torch.Tensor:
    """The IR's ``rotary`` into ``out``."""
    return rope.rotary(x, cos, sin, interleaved=interleaved, out=out)


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor | None, bias: torch.Tensor | None, qtype, out: torch.Tensor,
            activation: str | None) -> torch.Tensor:
    """The IR's ``qlinear`` (int4 / int8 / fp8 weight-only) with the dequant GEMM."""
    return quant_gemm.qlinear(x, qweight, scales, zeros, bias, qtype, activation, out)


def qmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor, *, act_quant: str,
            activation: str | None) -> torch.Tensor:
    """The IR's ``qmatmul`` (W8A8) with the integer-dot GEMM."""
    return quant_gemm.qmatmul(x, qweight, scales, bias, act_quant, activation, out)


#: name in the generated host code -> function
HOST_CALLS = {
    "_t_group": group,
    "_t_gemm_group": gemm_group,
    "_t_linear": linear,
    "_t_matmul": matmul,
    "_t_block_mask": block_mask,
    "_t_attention": attention,
    "_t_token_tables": token_tables,
    "_t_cached_attention": cached_attention,
    "_t_rotary": rotary,
    "_t_qlinear": qlinear,
    "_t_qmatmul": qmatmul,
}

__all__ = ["HOST_CALLS", "SPARSE_BLOCK"]
