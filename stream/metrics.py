"""Counters and histograms rendered in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import bisect
from collections import defaultdict


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """What an operator watches: intake, dead letters by reason, rescoring, freshness, lag."""

    def __init__(self) -> None:
        self.events_in = 0
        self.events_applied = 0
        self.events_skipped: dict[str, int] = defaultdict(int)
        self.dlq: dict[str, int] = defaultdict(int)
        self.rescored = 0
        self.routed = 0  # events re-published to their customer's partition
        self.scoring_errors = 0  # customers a rescoring could not score
        self.lag: dict[int, int] = {}
        self.dirty = 0  # customers waiting to be rescored (event-driven)
        self.backlog = 0  # customers waiting for a month-turn/assignment rescore
        self.partitions = 0  # transactions partitions recovered and owned
        self.batch_size = Histogram("clv_rescore_batch_customers", "customers per rescoring micro-batch",
                                    (1, 8, 32, 128, 512, 1024, 2048, 4096))
        self.batch_latency = Histogram("clv_rescore_batch_seconds", "seconds to score a micro-batch",
                                       (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.publish_latency = Histogram("clv_publish_seconds",
                                         "seconds until the broker acknowledged a flush's scores and state",
                                         (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.freshness = Histogram("clv_event_to_publish_seconds",
                                   "seconds from receiving an event to publishing its customer's score",
                                   (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))

    def render(self) -> str:
        out = [
            "# HELP clv_events_in_total transaction messages received",
            "# TYPE clv_events_in_total counter", f"clv_events_in_total {self.events_in}",
            "# HELP clv_events_applied_total events folded into customer state",
            "# TYPE clv_events_applied_total counter", f"clv_events_applied_total {self.events_applied}",
            "# HELP clv_events_skipped_total events already applied (redelivered or re-published)",
            "# TYPE clv_events_skipped_total counter",
        ]
        out += [f'clv_events_skipped_total{{reason="{r}"}} {n}' for r, n in sorted(self.events_skipped.items())]
        out += ["# HELP clv_dlq_total events sent to the dead-letter topic",
                "# TYPE clv_dlq_total counter"]
        out += [f'clv_dlq_total{{reason="{r}"}} {n}' for r, n in sorted(self.dlq.items())]
        out += ["# HELP clv_events_routed_total events re-published to the partition their key "
                "maps to under murmur2 (a publisher with another partitioner)",
                "# TYPE clv_events_routed_total counter", f"clv_events_routed_total {self.routed}",
                "# HELP clv_scoring_errors_total customers a rescoring could not score (logged; "
                "scored again on their next event or month turn)",
                "# TYPE clv_scoring_errors_total counter",
                f"clv_scoring_errors_total {self.scoring_errors}",
                "# HELP clv_rescored_customers_total customer scores published",
                "# TYPE clv_rescored_customers_total counter", f"clv_rescored_customers_total {self.rescored}",
                "# HELP clv_dirty_customers customers waiting for an event-driven rescore",
                "# TYPE clv_dirty_customers gauge", f"clv_dirty_customers {self.dirty}",
                "# HELP clv_partitions_owned transactions partitions this worker has recovered and owns",
                "# TYPE clv_partitions_owned gauge", f"clv_partitions_owned {self.partitions}",
                "# HELP clv_backlog_customers customers waiting for a month-turn or recovery rescore",
                "# TYPE clv_backlog_customers gauge", f"clv_backlog_customers {self.backlog}",
                "# HELP clv_consumer_lag messages behind the end of each transactions partition",
                "# TYPE clv_consumer_lag gauge"]
        out += [f'clv_consumer_lag{{partition="{p}"}} {n}' for p, n in sorted(self.lag.items())]
        for h in (self.batch_size, self.batch_latency, self.publish_latency, self.freshness):
            out += h.render()
        return "\n".join(out) + "\n"


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A worker's /metrics as {series: value}; empty when it does not answer (yet)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def idle(values: dict[str, float]) -> bool:
    """Nothing left to consume, score or publish."""
    lag = sum(v for k, v in values.items() if k.startswith("clv_consumer_lag"))
    return bool(values) and lag == 0 and values.get("clv_dirty_customers") == 0 \
        and values.get("clv_backlog_customers") == 0
