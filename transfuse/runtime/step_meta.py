"""StepMeta: the metadata inputs of one generation step, built by KVCache.prepare_step.

One step runs the new tokens of B sequences as one flattened axis of N tokens (sequence after
sequence). The tensors are the generation graph's inputs 2..6 (/tmp/team/GEN_DESIGN.md), all
int64 on the cache's device:

- ``position_ids`` [1, N]: each token's position in its own sequence (0-based)
- ``seq_of_token`` [N]: which of the step's sequences (0..B-1) each token belongs to
- ``seq_lens`` [B]: each sequence's length after the step (last position + 1)
- ``cache_table`` [B] (contiguous: slot of each sequence) or [B, max_blocks] (paged: block ids
  in position order, -1 padded)
- ``last_rows`` [B]: the row (0..N-1) of each sequence's last token, the usual ``logit_rows``
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

#: graph input names of the step metadata, in the graph's order
META_INPUTS = ("position_ids", "seq_of_token", "seq_lens", "cache_table", "logit_rows")


@dataclass(frozen=True)
class StepMeta:
    """Metadata tensors of one step (module docstring) and the step's items."""

    seq_ids: tuple[Hashable, ...]  # the step's sequences, in row order
    num_new: tuple[int, ...]  # new tokens of each
    position_ids: torch.Tensor  # [1, N]
    seq_of_token: torch.Tensor  # [N]
    seq_lens: torch.Tensor  # [B]
    cache_table: torch.Tensor  # [B] or [B, max_blocks]
    last_rows: torch.Tensor  # [B]

    @property
    def num_tokens(self) -> int:
        """N, the length of the step's flattened token axis."""
        return int(self.position_ids.shape[1])

    @property
    def batch(self) -> int:
        """B, the number of sequences in the step."""
        return len(self.seq_ids)

    def inputs(self, logit_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Graph inputs 2..6 by name (:data:`META_INPUTS` order); ``logit_rows`` defaults to
        ``last_rows`` (the logits of each sequence's last token)."""
        return {
            "position_ids": self.position_ids,
            "seq_of_token": self.seq_of_token,
            "seq_lens": self.seq_lens,
            "cache_table": self.cache_table,
            "logit_rows": self.last_rows if logit_rows is None else logit_rows,
        }

    @classmethod
    def build(
        cls,
        rows: Sequence[tuple[Hashable, int, int, int | Sequence[int]]],
        max_blocks: int | None,
        device: torch.device,
    ) -> StepMeta:
        """The metadata of a step of ``rows`` = [(seq_id, cached length, n_new, slot or block
        ids)]; ``max_blocks`` is the paged table's width (None: contiguous, one slot each)."""
        positions: list[int] = []
        seq_of_token: list[int] = []
        seq_lens, table, last_rows = [], [], []
        end = 0
        for b, (_, start, n, where) in enumerate(rows):
            positions.extend(range(start, start + n))
            seq_of_token.extend([b] * n)
            seq_lens.append(start + n)
            end += n
            last_rows.append(end - 1)
            table.append(where if max_blocks is None else
                         list(where) + [-1] * (max_blocks - len(where)))

        def i64(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            seq_ids=tuple(r[0] for r in rows),
            num_new=tuple(r[2] for r in rows),
            position_ids=i64([positions]),
            seq_of_token=i64(seq_of_token),
            seq_lens=i64(seq_lens),
            cache_table=i64(table),
            last_rows=i64(last_rows),
        )
