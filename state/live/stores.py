"""Which store a worker keeps its customer state in, from the `store` setting."""

from __future__ import annotations

from pathlib import Path

from state.live.base.store import Store
from state.live.memory.store import MemoryStore
from state.live.rocksdb.store import RocksStore


def open_store(url: str, data_dir: str, name: str) -> Store:
    """The store a `store` setting names; rocksdb's databases live in `data_dir`/`name`."""
    if url.startswith("rocksdb:"):
        return RocksStore(Path(data_dir) / name)
    return MemoryStore()
