"""The worker's metrics in a prometheus_client registry of its own, served on `/metrics`: the
product's `clv_*` series, and faust's own `faust_*` ones (its Prometheus sensor, over the same
registry: committed and end offsets per partition, rebalances and their recovery, messages in
and sent, commit and producer latency).

Counters and histograms are updated where things happen; gauges that are cheap to read but
costly to keep current (dirty customers, lag) are set when scraped (`stream.app`)."""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

# The `_created` twin of every counter doubles the series without telling an operator anything.
prometheus_client.disable_created_metrics()


class Metrics:
    """What an operator watches: intake, dead letters by reason, rescoring, freshness, flush
    failures, lag against the committed offsets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.monitor: Any = None  # faust's sensor, once `faust_monitor` made it
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.events_in = counter("clv_events_in", "transaction messages received")
        self.events_applied = counter("clv_events_applied", "events folded into customer state")
        self.events_skipped = counter(
            "clv_events_skipped", "events already applied (redelivered or re-published)", ("reason",)
        )
        self.dlq = counter("clv_dlq", "dead letters the broker took on the dead-letter topic", ("reason",))
        self.dlq_truncated = counter(
            "clv_dlq_truncated",
            "dead letters that carry only the first "
            "bytes of their event (too large to publish as it was; the "
            "event stays in transactions at its offset)",
            ("reason",),
        )
        self.dlq_unpublished = counter(
            "clv_dlq_unpublished",
            "dead letters the broker refused even truncated (logged with the event's partition and offset)",
        )
        self.key_trimmed = counter(
            "clv_events_key_trimmed",
            "events whose message key had spaces around the customer id (applied to the id without them)",
        )
        self.commit_stalled = gauge(
            "clv_commit_stalled_partitions",
            "owned partitions whose "
            "committed offset has not moved for commit_stall_s while "
            "events after it were processed",
        )
        self.routed = counter(
            "clv_events_routed",
            "events re-published to the partition their "
            "key maps to under murmur2 (a publisher with another partitioner)",
        )
        self.scoring_errors = counter(
            "clv_scoring_errors",
            "customers a rescoring could not score (logged; scored again on their next event or month turn)",
        )
        self.rescored = counter("clv_rescored_customers", "customer scores published")
        self.flush_failures = counter(
            "clv_flush_failures",
            "micro-batch flushes that failed (their customers, records and acknowledgements were kept and retried)",
        )
        self.recovered_records = counter("clv_state_recovered_records", "state changelog records read by recoveries")
        self.recovery_seconds = counter(
            "clv_state_recovery_seconds", "seconds spent recovering state from the changelog"
        )
        self.dirty = gauge("clv_dirty_customers", "customers waiting for an event-driven rescore")
        self.partitions = gauge("clv_partitions_owned", "transactions partitions this worker has recovered and owns")
        self.backlog = gauge("clv_backlog_customers", "customers waiting for a month-turn or recovery rescore")
        self.takeover_seconds = gauge("clv_state_takeover_seconds", "wall time the last rebalance's takeovers took")
        self.near_bound = gauge(
            "clv_state_near_bound_customers", "customers holding 90% or more of the state's id bound"
        )
        self.largest_record = gauge("clv_state_record_max_bytes", "largest state record written since start")
        self.flush_age = gauge(
            "clv_flush_success_age_seconds",
            "seconds since a flush last succeeded; 0 while nothing waits to be published",
        )
        self.drift = gauge(
            "clv_input_drift_psi",
            "population stability index of an input over the "
            "last customers rescored against the model's training cohort (past "
            "0.25: customers unlike those it learnt from; see stream.drift)",
            ("input",),
        )
        self.lag = gauge(
            "clv_consumer_lag",
            "messages of each transactions partition after the "
            "group's committed offset (end offset minus committed offset)",
            ("partition",),
        )
        self.batch_size = histogram(
            "clv_rescore_batch_customers", "customers per rescoring micro-batch", (1, 8, 32, 128, 512, 1024, 2048, 4096)
        )
        self.batch_latency = histogram(
            "clv_rescore_batch_seconds",
            "seconds to score a micro-batch",
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.publish_latency = histogram(
            "clv_publish_seconds",
            "seconds until the broker acknowledged a flush's scores and state",
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.freshness = histogram(
            "clv_event_to_publish_seconds",
            "seconds from receiving an event to publishing its customer's score",
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, buckets=buckets, registry=self.registry)

    def faust_monitor(self) -> Any:
        """faust's Prometheus sensor, reporting into this registry as `faust_*`: the monitor to
        give `faust.App(monitor=...)`. (faust's `setup_prometheus_sensors` does the same and adds
        a `/metrics` view of its own, which would serve one format only and skip the gauges set
        when scraped; the prefix is fixed so dashboards do not depend on the app id.) Its
        per-message series are brought up to date when scraped (`render`), see `_monitor_class`."""
        from faust.sensors.prometheus import FaustMetrics

        series = FaustMetrics.create(self.registry, "faust")
        self.monitor = _monitor_class()(series, metrics=series)
        return self.monitor

    def set_lag(self, lag: dict[int, int]) -> None:
        """Lag of the partitions owned now: revoked ones leave the exposition."""
        self.lag.clear()
        for partition, n in lag.items():
            self.lag.labels(partition=str(partition)).set(n)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper's Accept header asks for, and its type."""
        if self.monitor is not None:
            self.monitor.export()
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def _monitor_class() -> type:
    """faust's PrometheusMonitor, its per-message work done as faust's plain Monitor does it, over
    faust's public sensor hooks only.

    faust calls five sensor hooks for every message (message in, stream event in and out,
    message out, and the partition's end offset as each record is fetched); its Prometheus
    sensor updates labelled prometheus_client series in each, about 16 us a message against
    under 3 us for the plain Monitor's in-memory counts (measured on the worker's machine), a
    cost paid on the event loop that intake runs on. Here those hooks keep only the plain
    Monitor's counts, and `export` brings the same `faust_*` series up to date from them when
    /metrics is scraped, and before a rebalance clears the partitions' series: a scraper reads the
    same values. The end offset gauge is set when the end offset changes, not again for each
    record. One series is given up: `faust_events_runtime_ms`, the time an agent's loop body
    holds each event, stays empty; for this worker, which acknowledges an event only after the
    flush that publishes it, that time says nothing about an event, and
    `clv_event_to_publish_seconds` measures what it becomes. Everything else (commits, committed
    offsets, rebalances and their recovery, assignment, sends, web requests) is faust's own code,
    unchanged."""
    from faust.sensors.monitor import RE_NORMALIZE, RE_NORMALIZE_SUBSTITUTION, Monitor
    from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor

    class WorkerMonitor(PrometheusMonitor):
        on_message_in = Monitor.on_message_in
        on_stream_event_out = Monitor.on_stream_event_out
        on_message_out = Monitor.on_message_out

        def __init__(self, series: FaustMetrics, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.series = series  # the `faust_*` series this sensor reports into
            self.stream_labels: dict[Any, str] = {}
            self.events_by_label: dict[str, int] = {}
            self.exported: dict[Any, int] = {}  # what each counter was brought up to

        def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> Any:
            state = Monitor.on_stream_event_in(self, tp, offset, stream, event)
            label = self.stream_labels.get(stream)
            if label is None:  # faust's own label of a stream's series
                name = RE_NORMALIZE.sub(RE_NORMALIZE_SUBSTITUTION, stream.shortlabel.lstrip("Stream:"))
                label = self.stream_labels[stream] = f"stream.{name.strip('_').lower()}.events"
            self.events_by_label[label] = self.events_by_label.get(label, 0) + 1
            return state

        def track_tp_end_offset(self, tp: Any, offset: int) -> None:
            if self.tp_end_offsets.get(tp) != offset:
                super().track_tp_end_offset(tp, offset)

        def on_rebalance_start(self, app: Any) -> Any:
            self.export()  # faust's series of topics and partitions start again from here
            return super().on_rebalance_start(app)

        def on_rebalance_end(self, app: Any, state: Any) -> None:
            self.export()
            super().on_rebalance_end(app, state)

        def export(self) -> None:
            """The per-message `faust_*` series, as faust's sensor would have them now."""
            m = self.series
            self.add(m.messages_received, "messages", self.messages_received_total)
            m.active_messages.set(self.messages_active)
            for topic, n in list(self.messages_received_by_topic.items()):
                self.add(m.messages_received_per_topics.labels(topic=topic), ("topic", topic), n)
            for tp, offset in list(self.tp_read_offsets.items()):
                m.messages_received_per_topics_partition.labels(topic=tp.topic, partition=tp.partition).set(offset)
            self.add(m.total_events, "events", self.events_total)
            m.total_active_events.set(self.events_active)
            for label, n in list(self.events_by_label.items()):
                self.add(m.total_events_per_stream.labels(stream=label), ("stream", label), n)

        def add(self, counter: Any, key: Any, total: int) -> None:
            counter.inc(total - self.exported.get(key, 0))
            self.exported[key] = total

    return WorkerMonitor


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A worker's /metrics as {series: value}, a series written as the exposition writes it
    (`name{label="value",...}`); empty when it does not answer (yet)."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    return {
        _series(s.name, s.labels): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def _series(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def idle(values: dict[str, float]) -> bool:
    """Nothing left to consume, score, publish or commit."""
    lag = sum(v for k, v in values.items() if k.startswith("clv_consumer_lag"))
    return (
        bool(values)
        and lag == 0
        and values.get("clv_dirty_customers") == 0
        and values.get("clv_backlog_customers") == 0
    )
