"""Everything the worker reaches for inside aiokafka (0.14) beyond its public API, in one place,
each with why no public hook does it. Upgrading aiokafka means checking this module only.

- The fetch wait of a consumer built by someone else: `AIOKafkaConsumer(fetch_max_wait_ms=...)`
  is the public way, but faust builds the worker's consumer with its own fixed value (see
  `stream.faust_hooks.set_fetch_wait`); the consumer reads the attribute when it starts its
  fetcher, so setting it between construction and start takes effect.
"""

from __future__ import annotations

from typing import Any


def set_fetch_max_wait(consumer: Any, ms: int) -> None:
    """A consumer not started yet waits at most `ms` for a fetch."""
    consumer._fetch_max_wait_ms = ms
