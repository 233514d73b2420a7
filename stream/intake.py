"""What arrives on `transactions` before the core folds it: the contract's checks and the key's
(`check`), dead letters with their reason, and events on another partition than their key's.

Routing: an event keyed by its customer but on another partition than murmur2 maps the key to (a
publisher with another partitioner) is re-published to the customer's partition and applied
there, never folded into a second copy of the customer on the wrong one. Both kinds of message go
out through faust's producer, which faust flushes before it commits the offsets behind them.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from features.contract import Invalid, Reason, TransactionEvent, validate
from stream.metrics import Metrics

log = logging.getLogger("clv.worker")


def check(raw: bytes, key: bytes | None, max_future: timedelta) -> TransactionEvent | Invalid:
    """The event, or why it is a dead letter: its payload, then its key."""
    parsed = validate(raw, max_future=max_future)
    if isinstance(parsed, Invalid):
        return parsed
    if key is None:
        return Invalid(Reason.MISSING_KEY, "no message key: events are keyed by customer_id "
                                           f"({parsed.customer_id!r})")
    if key.decode("utf-8", "replace") != parsed.customer_id:
        return Invalid(Reason.KEY_MISMATCH, f"message key {key[:40]!r} is not "
                                            f"customer_id {parsed.customer_id!r}")
    return parsed


class Outbox:
    """Dead letters and re-routed events, sent with the faust app's producer."""

    def __init__(self, app: Any, metrics: Metrics, transactions_topic: str, dlq_topic: str) -> None:
        self.app, self.metrics = app, metrics
        self.transactions_topic, self.dlq_topic = transactions_topic, dlq_topic
        self.routed = 0  # events routed so far, for the warning's count

    async def dead_letter(self, raw: bytes, msg: Any, reason: str, detail: str) -> None:
        self.metrics.dlq.labels(reason=reason).inc()
        topic = self.transactions_topic
        headers = [("reason", reason.encode()), ("detail", detail[:500].encode()),
                   ("source_partition", str(msg.partition).encode()),
                   ("source_offset", str(msg.offset).encode()),
                   ("source_topic", topic.encode())]
        await self.app.producer.send(self.dlq_topic, msg.key, raw, None, None, headers)
        log.warning("dead letter %s at %s[%d]@%d: %s", reason, topic, msg.partition, msg.offset,
                    detail)

    async def route(self, raw: bytes, msg: Any, home: int) -> None:
        """Re-publish an event to its customer's partition; it is applied when it arrives there.
        Re-published twice (a crash before the commit), it carries the same event_id: once."""
        self.metrics.routed.inc()
        self.routed += 1
        topic = self.transactions_topic
        headers = [*(msg.headers or ()), ("routed_from_partition", str(msg.partition).encode()),
                   ("routed_from_offset", str(msg.offset).encode())]
        await self.app.producer.send(topic, msg.key, raw, home, None, headers)
        if self.routed == 1 or self.routed % 10_000 == 0:
            log.warning("%d events so far arrived on another partition than their key's under "
                        "murmur2 and were re-published to it (latest: %s[%d]@%d, key %r, "
                        "partition %d): set the publishers' partitioner to murmur2 (librdkafka: "
                        "partitioner=murmur2_random)", self.routed, topic, msg.partition,
                        msg.offset, msg.key[:40], home)
