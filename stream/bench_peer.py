"""The peer for `clv bench throughput`: the path users could pick instead of this product, the
same fold written in Quix Streams (the `bench` extra).

It reads the transactions topic, keeps every customer's spend per calendar month (UTC, integer
cents, each line rounded as the worker rounds it) in Quix's RocksDB state with its changelog, and
produces one message per event to an output topic, all at Quix's defaults (but the consumer group
session timeout, when given). Run as its own process (`python -m stream.bench_peer BOOTSTRAP TOPIC
N APP_ID OUT PARTITIONS [SESSION_TIMEOUT_S]`), like the bare agent and the worker, so all pay the
same process and consumer-group costs. Writes the seconds from its
first message to the end of its run (the N-th output produced, the last checkpoint committed:
outputs acknowledged, state and changelog written) and the output topic's name as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import Any

from quixstreams import Application, State
from quixstreams.models.topics import TopicConfig


def monthly_spend(event: dict[str, Any], state: State) -> dict[str, Any]:
    """Add the invoice to its customer's month in state; the customer's spend that month."""
    month = datetime.fromisoformat(event["ts"]).astimezone(timezone.utc).strftime("%Y-%m")
    cents = sum(round(ln["quantity"] * ln["unit_price"] * 100.0) for ln in event["lines"])
    months: dict[str, int] = state.get("months", {})
    months[month] = months.get(month, 0) + cents
    state.set("months", months)
    return {"customer_id": event["customer_id"], "month": month, "spend_cents": months[month]}


def main(
    bootstrap: str,
    topic_name: str,
    n: int,
    app_id: str,
    out: str,
    partitions: int,
    session_timeout_s: float | None = None,
) -> None:
    """Fold the first `n` events; the clock starts at the first event, so process start, group
    join and state setup stay outside it, as for the other paths."""
    session = (
        {
            "session.timeout.ms": int(session_timeout_s * 1000),  # heartbeats as the worker's
            "heartbeat.interval.ms": int(min(3.0, session_timeout_s / 3) * 1000),
        }
        if session_timeout_s
        else None
    )
    app = Application(
        broker_address=bootstrap,
        consumer_group=app_id,
        auto_offset_reset="earliest",
        state_dir=f"quix-state-{app_id}",
        loglevel="WARNING",
        consumer_extra_config=session,
    )
    source = app.topic(topic_name, key_deserializer="str", value_deserializer="json")
    output = f"{app_id}-out"  # named in the figures, so the bench can count what was produced
    sink = app.topic(
        output,
        key_serializer="str",
        value_serializer="json",
        config=TopicConfig(num_partitions=partitions, replication_factor=1),
    )
    first: list[float] = []

    def started(value: dict[str, Any]) -> None:
        if not first:
            first.append(time.perf_counter())

    sdf = app.dataframe(source).update(started).apply(monthly_spend, stateful=True)
    sdf.to_topic(sink)
    app.run(count=n, collect=False)  # returns after its last checkpoint is committed
    with open(out, "w") as fh:
        json.dump({"messages": n, "seconds": time.perf_counter() - first[0], "output_topic": output}, fh)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), a[3], a[4], int(a[5]), float(a[6]) if len(a) > 6 else None)
