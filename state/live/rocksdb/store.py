"""One RocksDB database per partition under the data directory. Each write is one write batch
holding the records *and* the changelog offset they came from, so after any stop (kill -9
included) the database is a prefix of the changelog and a restart replays only the records after
that offset. Memory is bounded by the settings below, not by the customers held."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Iterator

from state.live.base.store import CUSTOMER_PREFIX, OFFSET_KEY

# rocksdb memory, shared by all partitions of a worker: write buffers (memtables) and the block
# cache each have one fixed budget, whatever the number of partitions or customers.
ROCKSDB_WRITE_BUFFERS = 8 << 20
ROCKSDB_BLOCK_CACHE = 4 << 20
ROCKSDB_MEMTABLE = 2 << 20


class RocksStore:
    def __init__(self, directory: Path) -> None:
        import rocksdict

        self.rocksdict = rocksdict
        self.directory = directory
        self.dbs: dict[int, rocksdict.Rdict] = {}
        cache = rocksdict.Cache(ROCKSDB_BLOCK_CACHE)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)  # index and filters count against the cache
        table.set_bloom_filter(10, False)
        self.options = rocksdict.Options(raw_mode=True)
        self.options.create_if_missing(True)
        self.options.set_block_based_table_factory(table)
        buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            ROCKSDB_WRITE_BUFFERS, False, cache
        )  # memtables counted in the block cache
        self.options.set_write_buffer_manager(buffers)
        self.options.set_write_buffer_size(ROCKSDB_MEMTABLE)
        self.options.set_max_write_buffer_number(2)
        self.options.set_max_open_files(64)
        self.options.set_keep_log_file_num(2)

    def _path(self, partition: int) -> Path:
        return self.directory / f"p{partition}"

    def open(self, partition: int) -> None:
        if partition not in self.dbs:
            self._path(partition).parent.mkdir(parents=True, exist_ok=True)
            self.dbs[partition] = self.rocksdict.Rdict(str(self._path(partition)), self.options)

    def close(self, partition: int) -> None:
        db = self.dbs.pop(partition, None)
        if db is not None:
            db.close()

    def wipe(self, partition: int) -> None:
        self.close(partition)
        shutil.rmtree(self._path(partition), ignore_errors=True)
        self.open(partition)

    def offset(self, partition: int) -> int:
        raw = self.dbs[partition].get(OFFSET_KEY)
        return -1 if raw is None else int.from_bytes(raw, "big", signed=True)

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self.dbs[partition].get(key)

    def write(self, partition: int, items: Iterable[tuple[bytes, bytes | None]], offset: int) -> None:
        batch = self.rocksdict.WriteBatch(raw_mode=True)
        for key, value in items:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if offset > self.offset(partition):
            batch.put(OFFSET_KEY, offset.to_bytes(8, "big", signed=True))
        self.dbs[partition].write(batch)

    def customer_keys(self, partition: int) -> Iterator[bytes]:
        it = self.dbs[partition].iter()  # a consistent view as of now
        it.seek(CUSTOMER_PREFIX)
        while it.valid():
            key = it.key()
            if key[:1] != CUSTOMER_PREFIX:
                return
            yield key
            it.next()

    def count(self, partition: int) -> int:
        return self.dbs[partition].property_int_value("rocksdb.estimate-num-keys") or 0

    def opened(self) -> set[int]:
        return set(self.dbs)

    def close_all(self) -> None:
        for partition in list(self.dbs):
            self.close(partition)
