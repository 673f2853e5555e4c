"""Open a token dataset of either format on disk, told apart by the magic of PREFIX.idx."""
from __future__ import annotations

from .indexed import IndexedDataset
from .megatron import MegatronDataset, is_megatron


def open_dataset(prefix: str, full_check: bool = False):
    """megaloop's own token files (IndexedDataset) or Megatron's (megatron.MegatronDataset)."""
    return MegatronDataset(prefix, full_check) if is_megatron(prefix) else IndexedDataset(prefix, full_check)
