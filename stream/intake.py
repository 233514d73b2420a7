"""What arrives on `transactions` before the core folds it: the contract's checks and the key's
(`check`), dead letters with their reason, and events on another partition than their key's.

Routing: an event keyed by its customer but on another partition than murmur2 maps the key to (a
publisher with another partitioner) is re-published to the customer's partition and applied
there, never folded into a second copy of the customer on the wrong one.

Dead letters and routed events go out through faust's producer without waiting, and the flush
that acknowledges the events behind them first waits until the broker has every one (`settle`):
an event is acknowledged only once what it became is on the broker. What cannot be published as
it is (larger than the producer's `max_request_size` or the broker's `max.message.bytes`) goes
to the DLQ truncated: the reason, its source partition and offset in headers, its key, and the
first `PREFIX_BYTES` of its payload; the original stays in `transactions` at that offset. Any
other failure to publish is kept and sent again by the next flush attempt (the flush failure
policy: retried, not ready meanwhile, bounded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Awaitable, cast

from aiokafka.errors import KafkaError

from features.contract import Invalid, Reason, TransactionEvent, validate
from stream.metrics import Metrics

log = logging.getLogger("clv.worker")
PREFIX_BYTES = 64 * 1024  # of a payload too large for the DLQ, what its dead letter carries
KEY_BYTES = 1024  # of a message key, what a truncated dead letter carries


def check(raw: bytes, key: bytes | None, max_future: timedelta) -> TransactionEvent | Invalid:
    """The event, or why it is a dead letter: its payload, then its key. A key is compared as the
    payload's id is read, without surrounding spaces: `" C1 "` keys customer `C1`."""
    parsed = validate(raw, max_future=max_future)
    if isinstance(parsed, Invalid):
        return parsed
    if key is None:
        return Invalid(Reason.MISSING_KEY, f"no message key: events are keyed by customer_id ({parsed.customer_id!r})")
    if key.decode("utf-8", "replace").strip() != parsed.customer_id:
        return Invalid(Reason.KEY_MISMATCH, f"message key {key[:40]!r} is not customer_id {parsed.customer_id!r}")
    return parsed


def too_large(exc: BaseException | None) -> bool:
    """The producer (MessageSizeTooLargeError) or the broker (message, record list or batch too
    large) refused a record for its size: sending it again cannot help."""
    while exc is not None:  # faust wraps the client's error in its own
        if isinstance(exc, KafkaError) and "TooLarge" in type(exc).__name__:
            return True
        exc = exc.__cause__
    return False


@dataclass
class Sent:
    """A dead letter or routed event on its way: what to send again if the broker does not take
    it, and what it stands for."""

    topic: str
    partition: int | None
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    msg: Any  # the transactions message it comes from
    reason: str  # its dead-letter reason ("" for a routed event)
    detail: str
    delivery: Awaitable[Any] | BaseException | None = None  # the producer's future, or why it
    # was refused; None: to hand to the producer (again)


class Outbox:
    """Dead letters and re-routed events, sent with the faust app's producer and settled before
    the events behind them are acknowledged."""

    def __init__(self, app: Any, metrics: Metrics, transactions_topic: str, dlq_topic: str) -> None:
        self.app, self.metrics = app, metrics
        self.transactions_topic, self.dlq_topic = transactions_topic, dlq_topic
        self.routed = 0  # events routed so far, for the warning's count
        self.trimmed = 0  # events keyed with spaces around their id, for the warning's count
        self.pending: list[Sent] = []  # sent, not yet known to be on the broker

    async def dead_letter(self, raw: bytes, msg: Any, reason: str, detail: str) -> None:
        headers = [
            ("reason", reason.encode()),
            ("detail", detail[:500].encode()),
            *_source(msg, self.transactions_topic),
        ]
        await self._send(Sent(self.dlq_topic, None, msg.key, raw, headers, msg, reason, detail))
        log.warning(
            "dead letter %s at %s[%d]@%d: %s", reason, self.transactions_topic, msg.partition, msg.offset, detail
        )

    async def route(self, raw: bytes, msg: Any, home: int, key: bytes) -> None:
        """Re-publish an event to its customer's partition, keyed by its customer id; it is
        applied when it arrives there. Re-published twice (a crash before the commit), it
        carries the same event_id: once."""
        self.metrics.routed.inc()
        self.routed += 1
        topic = self.transactions_topic
        headers = [
            *(msg.headers or ()),
            ("routed_from_partition", str(msg.partition).encode()),
            ("routed_from_offset", str(msg.offset).encode()),
        ]
        await self._send(Sent(topic, home, key, raw, headers, msg, "", ""))
        if self.routed == 1 or self.routed % 10_000 == 0:
            log.warning(
                "%d events so far arrived on another partition than their key's under "
                "murmur2 and were re-published to it (latest: %s[%d]@%d, key %r, "
                "partition %d): set the publishers' partitioner to murmur2 (librdkafka: "
                "partitioner=murmur2_random)",
                self.routed,
                topic,
                msg.partition,
                msg.offset,
                msg.key[:40],
                home,
            )

    def trimmed_key(self, msg: Any, customer_id: str) -> None:
        """An event keyed by its customer id with spaces around it: applied to the id without
        them (on that id's partition), counted, and said in a warning (the first, then every
        10,000th)."""
        self.metrics.key_trimmed.inc()
        self.trimmed += 1
        if self.trimmed == 1 or self.trimmed % 10_000 == 0:
            log.warning(
                "%d events so far were keyed with spaces around their customer id "
                "(latest: %s[%d]@%d, key %r): applied to customer %r, whose partition is "
                "that of the id without them; key messages by the id as the payload "
                "gives it",
                self.trimmed,
                self.transactions_topic,
                msg.partition,
                msg.offset,
                (msg.key or b"")[:40],
                customer_id,
            )

    async def settle(self) -> None:
        """Wait until the broker has every dead letter and routed event sent so far. One refused
        for its size goes to the DLQ truncated (`_truncated`); one that failed otherwise is sent
        again and the first such error is raised, so the flush that called fails and is retried
        (the events behind them stay unacknowledged meanwhile)."""
        while self.pending:
            pending, self.pending, failed = self.pending, [], None
            for sent in pending:
                try:
                    if sent.delivery is None:
                        await self._hand_over(sent)
                    if isinstance(sent.delivery, BaseException):
                        raise sent.delivery
                    await cast(Awaitable[Any], sent.delivery)  # handed over just above
                except Exception as exc:  # noqa: BLE001  each kind handled below
                    if not too_large(exc):
                        sent.delivery = None  # handed over again by the next attempt
                        self.pending.append(sent)
                        failed = failed or exc
                    elif not _is_truncated(sent):
                        await self._send(self._truncated(sent, exc))
                    else:  # even truncated: say where the event is, and go on
                        self.metrics.dlq_unpublished.inc()
                        log.error(
                            "the dead letter of %s[%d]@%d (%s) was refused even truncated "
                            "to %d bytes (%s); the event is acknowledged and stays in %s "
                            "at that offset",
                            self.transactions_topic,
                            sent.msg.partition,
                            sent.msg.offset,
                            sent.reason,
                            len(sent.value),
                            exc,
                            self.transactions_topic,
                        )
                    continue
                if sent.topic == self.dlq_topic:
                    self.metrics.dlq.labels(reason=sent.reason).inc()
                    if _is_truncated(sent):
                        self.metrics.dlq_truncated.labels(reason=sent.reason).inc()
            if failed is not None:
                raise failed

    async def _send(self, sent: Sent) -> None:
        await self._hand_over(sent)
        self.pending.append(sent)

    async def _hand_over(self, sent: Sent) -> None:
        """Hand the record to the producer; a refusal (its size, say) is kept for `settle`."""
        try:
            sent.delivery = await self.app.producer.send(
                sent.topic, sent.key, sent.value, sent.partition, None, sent.headers
            )
        except Exception as exc:  # noqa: BLE001  settled (retried or truncated) there
            sent.delivery = exc

    def _truncated(self, sent: Sent, exc: BaseException) -> Sent:
        """The dead letter that stands in for a record too large to publish: reason (a routed
        event's is `too_large_to_route`), source, key and the payload's first PREFIX_BYTES."""
        reason = sent.reason or Reason.TOO_LARGE_TO_ROUTE
        detail = sent.detail or (
            f"{len(sent.value):,} bytes could not be re-published to partition {sent.partition}: {type(exc).__name__}"
        )
        headers = [
            ("reason", reason.encode()),
            ("detail", detail[:500].encode()),
            *_source(sent.msg, self.transactions_topic),
            ("truncated", b"true"),
            ("original_bytes", str(len(sent.value)).encode()),
        ]
        log.warning(
            "%s[%d]@%d (%s, %d bytes) too large to publish as it is (%s): its dead letter "
            "carries the first %d bytes; the whole event stays in %s at that offset",
            self.transactions_topic,
            sent.msg.partition,
            sent.msg.offset,
            reason,
            len(sent.value),
            exc,
            PREFIX_BYTES,
            self.transactions_topic,
        )
        return Sent(
            self.dlq_topic,
            None,
            (sent.msg.key or b"")[:KEY_BYTES] or None,
            sent.value[:PREFIX_BYTES],
            headers,
            sent.msg,
            reason,
            detail,
        )


def _source(msg: Any, topic: str) -> list[tuple[str, bytes]]:
    return [
        ("source_partition", str(msg.partition).encode()),
        ("source_offset", str(msg.offset).encode()),
        ("source_topic", topic.encode()),
    ]


def _is_truncated(sent: Sent) -> bool:
    return any(k == "truncated" for k, _ in sent.headers)
