"""Generation passes: the KV cache inside the compiled graph (DESIGN.md §7)."""

from transfuse.passes.generation.insert_kv_cache import InsertKvCache

__all__ = ["InsertKvCache"]
