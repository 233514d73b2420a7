"""The framework's floor for `clv bench throughput`: a faust agent that only counts messages.

Run as its own process (`python -m stream.bench_agent BOOTSTRAP TOPIC N APP_ID OUT PARTITIONS
[SESSION_TIMEOUT_S]`), like the worker, so both pay the same process and consumer-group costs.
Writes the seconds from its first message to its N-th as JSON, then stops.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import faust


def main(
    bootstrap: str,
    topic_name: str,
    n: int,
    app_id: str,
    out: str,
    partitions: int,
    session_timeout_s: float | None = None,
) -> None:
    session: dict[str, Any] = (
        {
            "broker_session_timeout": session_timeout_s,  # heartbeats as the worker's
            "broker_heartbeat_interval": min(3.0, session_timeout_s / 3),
        }
        if session_timeout_s
        else {}
    )
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        stream_wait_empty=False,
        **session,
    )
    topic = app.topic(
        topic_name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    seen = {"n": 0, "first": 0.0}

    @app.agent(topic)
    async def count(stream: Any) -> None:
        async for _event in stream.events():
            if seen["n"] == 0:
                seen["first"] = time.perf_counter()
            seen["n"] += 1
            if seen["n"] == n:
                with open(out, "w") as fh:
                    json.dump({"messages": n, "seconds": time.perf_counter() - seen["first"]}, fh)
                os.kill(os.getpid(), signal.SIGTERM)

    from faust import Worker

    Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), a[3], a[4], int(a[5]), float(a[6]) if len(a) > 6 else None)
