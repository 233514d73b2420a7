"""Where a worker keeps the changelog records of the partitions it owns: bytes by key, per
partition, with the changelog offset they reflect.

One small interface, two stores:

- `memory://`: a dict of encoded records per partition. Nothing survives the process, so every
  start recovers the whole changelog partition.
- `rocksdb://`: one RocksDB database per partition under the data directory. Each write is one
  write batch holding the records *and* the changelog offset they came from, so after any stop
  (kill -9 included) the database is a prefix of the changelog and a restart replays only the
  records after that offset. Memory is bounded by the settings below, not by the customers held.

A store holds exactly what the changelog holds: records are written to it only after the broker
acknowledged them (or while recovering them from the changelog), never ahead of it. Its offset
says up to where it has read every record: a worker's own records that land after records of
another worker it has not read (see `stream.state_writes`) are stored without moving it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Iterator, Protocol

META_KEY = b"\x00meta"  # the changelog record of the partition itself (stream.state_writes)
OFFSET_KEY = b"\x00\x00changelog-offset"  # rocksdb only; never a changelog key
CUSTOMER_PREFIX = b'"'  # customer keys are JSON strings (what faust's "json" key serializer wrote)

# rocksdb memory, shared by all partitions of a worker: write buffers (memtables) and the block
# cache each have one fixed budget, whatever the number of partitions or customers.
ROCKSDB_WRITE_BUFFERS = 8 << 20
ROCKSDB_BLOCK_CACHE = 4 << 20
ROCKSDB_MEMTABLE = 2 << 20


class Store(Protocol):
    """The records of the partitions a worker owns. `write` is atomic with its offset."""

    def open(self, partition: int) -> None: ...

    def close(self, partition: int) -> None:
        """Release the partition's memory and handles (a rocksdb directory stays on disk)."""

    def wipe(self, partition: int) -> None:
        """Forget everything of the partition (its changelog no longer matches it)."""

    def offset(self, partition: int) -> int:
        """The changelog offset the partition's records reflect; -1 when none."""

    def get(self, partition: int, key: bytes) -> bytes | None: ...

    def write(self, partition: int, items: Iterable[tuple[bytes, bytes | None]],
              offset: int) -> None:
        """Put (or, for None, delete) the items and record `offset`, all or nothing."""

    def customer_keys(self, partition: int) -> Iterator[bytes]:
        """Every customer key of the partition, as of the call (later writes are not seen)."""

    def count(self, partition: int) -> int:
        """Customers in the partition (rocksdb: its estimate)."""

    def opened(self) -> set[int]:
        """The partitions open now."""

    def close_all(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[int, dict[bytes, bytes]] = {}
        self.offsets: dict[int, int] = {}

    def open(self, partition: int) -> None:
        self.data.setdefault(partition, {})

    def close(self, partition: int) -> None:
        self.data.pop(partition, None)
        self.offsets.pop(partition, None)

    wipe = close

    def offset(self, partition: int) -> int:
        return self.offsets.get(partition, -1)

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self.data[partition].get(key)

    def write(self, partition: int, items: Iterable[tuple[bytes, bytes | None]],
              offset: int) -> None:
        data = self.data[partition]
        for key, value in items:
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        self.offsets[partition] = max(offset, self.offsets.get(partition, -1))

    def customer_keys(self, partition: int) -> Iterator[bytes]:
        return iter([k for k in self.data.get(partition, {}) if k[:1] == CUSTOMER_PREFIX])

    def count(self, partition: int) -> int:
        data = self.data.get(partition, {})
        return len(data) - (META_KEY in data)

    def opened(self) -> set[int]:
        return set(self.data)

    def close_all(self) -> None:
        self.data.clear()
        self.offsets.clear()


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
            ROCKSDB_WRITE_BUFFERS, False, cache)  # memtables counted in the block cache
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

    def write(self, partition: int, items: Iterable[tuple[bytes, bytes | None]],
              offset: int) -> None:
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


def open_store(url: str, data_dir: str, name: str) -> Store:
    """The store a `store` setting names; rocksdb's databases live in `data_dir`/`name`."""
    if url.startswith("rocksdb:"):
        return RocksStore(Path(data_dir) / name)
    return MemoryStore()
