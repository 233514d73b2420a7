"""The interface every store of customer state implements, and the keys they share.

A store keeps the changelog records of the partitions a worker owns: bytes by key, per partition,
with the changelog offset they reflect. Backends: `state.live.memory` and `state.live.rocksdb`;
`state.live.stores.open_store` picks one from the `store` setting.

A store holds exactly what the changelog holds: records are written to it only after the broker
acknowledged them (or while recovering them from the changelog), never ahead of it. Its offset
says up to where it has read every record: a worker's own records that land after records of
another worker it has not read (see `state.live.base.partition`) are stored without moving it.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

META_KEY = b"\x00meta"  # the changelog record of the partition itself (state.live.base.partition)
OFFSET_KEY = b"\x00\x00changelog-offset"  # rocksdb only; never a changelog key
CUSTOMER_PREFIX = b'"'  # customer keys are JSON strings (what faust's "json" key serializer wrote)


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

    def write(self, partition: int, items: Iterable[tuple[bytes, bytes | None]], offset: int) -> None:
        """Put (or, for None, delete) the items and record `offset`, all or nothing."""

    def customer_keys(self, partition: int) -> Iterator[bytes]:
        """Every customer key of the partition, as of the call (later writes are not seen)."""

    def count(self, partition: int) -> int:
        """Customers in the partition (rocksdb: its estimate)."""

    def opened(self) -> set[int]:
        """The partitions open now."""

    def close_all(self) -> None: ...
