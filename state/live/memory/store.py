"""Changelog records held as a dict of bytes per partition."""

from __future__ import annotations

from typing import Iterable, Iterator

from state.live.base.store import CUSTOMER_PREFIX, META_KEY


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

    def write(self, partition: int, items: Iterable[tuple[bytes, bytes | None]], offset: int) -> None:
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
