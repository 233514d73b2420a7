"""The worker, declared top-down as faust's own examples are: the app, its topics and the state
changelog, the store and the core, then the agents, the timer, the rebalance hooks and the web
views. Each agent is a small loop handing what arrives to the per-partition core (`stream.core`:
fold, dirty set, micro-batch policy, month turns, rescans, no I/O); around it, the I/O has small
modules of its own: checks, dead letters and routing (`stream.intake`), taking partitions over
(`stream.takeover`, over `state.live.recovery`), publishing micro-batches with the flush failure
policy (`stream.flusher`, `stream.publisher`, `stream.flush_policy`), the store
(`state.live.base.partition`, `state.live.base.store`), metrics (`stream.metrics`, faust's Prometheus sensor
included). What reaches inside faust beyond its public API is in `stream.faust_hooks`.

`create_app(settings)` builds the worker from the settings it is given: `clv worker` resolves
them (defaults, CLV_* variables, its flags), calls it and runs faust's Worker on the app.

Exactness end to end: a customer state remembers the highest offset it applied, so a redelivered
event changes nothing; an event is acknowledged only after the scores of the customers it touched
and the changelog records of their states are acknowledged by the broker (while its partition
catches up: after the partition's record saying its scores are older than its clock), and after
the broker has the dead letters and routed events it became (`stream.intake.Outbox.settle`). No
event is handled by the agent ending: an error on one dead-letters it (`handle`). A crash anywhere
redelivers the events, which mark their customers dirty again, so no score is lost either; a flush
that fails is retried, never dropped, and bounded in time. A stale worker's late writes are fenced
by position: states by their source offset, scores by `event_offset`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from datetime import timedelta
from typing import Any

import faust
from faust.exceptions import NotReady
from faust.types import TP

from export_onnx import ArtifactError
from export_onnx.explain import Explainer
from export_onnx.runtime import Artifact
from features.aggregate import Applied
from features.contract import Invalid, Reason
from features.scores import as_dict
from stream import faust_hooks
from state.auth import guard, is_loopback, require_token
from stream.core import Core
from stream.flush_policy import CommitWatch
from stream.flusher import Flusher
from stream.intake import Outbox, check
from stream.metrics import Metrics
from stream.kafka_io import KafkaChangelog
from stream.publisher import BatchPublisher, home_partition
from export_onnx.scoring import score_states
from stream.settings import Settings
from state.live.base.partition import States
from state.live.stores import open_store
from stream.takeover import Takeovers

log = logging.getLogger("clv.worker")
PROBE_PATHS = frozenset({"/health", "/ready"})  # open to orchestrators' probes on any address


def broker_credentials(settings: Settings) -> Any:
    if settings.sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=settings.kafka_client_options().get("ssl_context"),
        )
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(settings.kafka_client_options()["ssl_context"])
    return None


def create_app(settings: Settings) -> faust.App:
    """The worker for `settings`: its app, topics, store, core, agents, timers, rebalance hooks
    and web views, declared top to bottom as faust's own examples do."""
    # faust's web server also serves its own views (tables, router): off loopback, every path but
    # the probes needs the API's bearer token.
    require_token(settings.web_host, settings.api_token, "web_host")
    artifact = Artifact.load(settings.model_dir or None)
    try:  # drivers of /customers/{id}, computed when asked, never on the scoring path
        explainer: Explainer | None = Explainer(artifact)
    except ArtifactError as exc:
        explainer = None
        log.warning("%s: /customers/{id} answers without drivers", exc)
    faust_hooks.set_fetch_wait(settings.fetch_wait_ms)
    faust_hooks.seek_uncommitted_to_start()
    # Customer states are many long-lived objects: with the default thresholds the collector keeps
    # rescanning them, in pauses that land on event latency. Collect young objects less often and
    # the old generation rarely.
    gc.set_threshold(20_000, 50, 100)
    metrics = Metrics()

    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.bootstrap_servers.split(",")],
        broker_credentials=broker_credentials(settings),
        datadir=settings.data_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_commit_interval=settings.commit_interval_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        web_application_options={}
        if is_loopback(settings.web_host)
        else {"middlewares": [guard(settings.api_token, PROBE_PATHS)]},
        monitor=metrics.faust_monitor(),
        # Unacknowledged events are redelivered after a restart, so shutdown need not wait.
        stream_wait_empty=False,
    )

    transactions = app.topic(
        settings.transactions_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    # The scores and the dead letters are written by the flusher's producer and the outbox, by
    # name; every topic is created before the app starts (`clv worker`, stream.replay.all_topics).
    control = app.topic(
        settings.control_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    # The state changelog keeps the name and key encoding of the faust table it replaces, so a
    # changelog written by an earlier worker recovers into the new store.
    changelog = app.topic(
        settings.changelog_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        compacting=True,
        replicas=settings.replication_factor,
        config=settings.topic_configs(),
    )

    def assigned() -> set[int]:
        """The `transactions` partitions assigned to this worker now."""
        try:
            return {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.transactions_topic}
        except NotReady:  # before the consumer started
            return set()

    def end_offset(partition: int) -> int | None:
        """The partition's end as the consumer last heard it; None before it has."""
        try:
            return app.consumer.highwater(TP(settings.transactions_topic, partition))
        except NotReady:
            return None

    states = States(
        open_store(settings.store, settings.data_dir, changelog.get_topic_name()), changelog.get_topic_name()
    )
    core = Core(
        states,
        artifact.window,
        artifact.version,
        settings.batch_size,
        settings.batch_wait_ms,
        end_offset=end_offset,
        resumed_at=lambda p: faust_hooks.resumed_at(app, TP(settings.transactions_topic, p)),
    )
    outbox = Outbox(app, metrics, settings.transactions_topic, settings.dlq_topic)
    flusher = Flusher(
        core,
        states,
        artifact,
        BatchPublisher(settings, settings.publish_timeout_s),
        metrics,
        outbox,
        scores_topic=settings.scores_topic,
        batch_size=settings.batch_size,
        flush_failure_timeout_s=settings.flush_failure_timeout_s,
    )
    takeovers = Takeovers(core, states, KafkaChangelog(settings, states.topic), metrics)
    commits = CommitWatch(settings.commit_stall_s)
    ready = asyncio.Event()
    max_future = timedelta(minutes=settings.max_future_minutes)

    @app.agent(transactions)
    async def process(stream: Any) -> None:
        """Every transaction: checked, then folded by the core (or dead-lettered, or routed to its
        customer's partition); acknowledged by the flush that publishes what it changed."""
        stream = flusher.stream = stream.noack()
        async for event in stream.events():
            if flusher.stopping:
                continue  # unacknowledged: redelivered to whoever owns the partition next
            ready.set()
            msg = event.message
            if not core.owns(msg.partition) and not await takeovers.ensure(msg.partition):
                continue  # revoked meanwhile: left unacknowledged for its next owner
            metrics.events_in.inc()
            core.received(msg.partition, msg.offset)
            await handle(msg)
            core.acknowledge_after_flush(msg.partition, event)
            if flusher.due():
                flusher.flush_soon()  # in the background: intake goes on while the broker acks
            if flusher.holding():
                await flusher.hold_intake()

    async def handle(msg: Any) -> None:
        """One event: applied, skipped, routed or dead-lettered; an error of the worker's own on it
        dead-letters it as `unprocessable` (with its traceback in the log) instead of ending the
        agent, which would leave the event unacknowledged and hold back every commit behind it."""
        raw = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
        try:
            parsed = check(raw, msg.key, max_future)
            if isinstance(parsed, Invalid):
                await outbox.dead_letter(raw, msg, parsed.reason, parsed.detail)
                return
            key = parsed.customer_id.encode()
            if key != msg.key:
                outbox.trimmed_key(msg, parsed.customer_id)
            if (home := home_partition(key, settings.partitions)) != msg.partition:
                await outbox.route(raw, msg, home, key)
                return
            outcome = core.apply(parsed, msg.partition, msg.offset)
        except Exception as exc:  # a defect: the event is set aside, not retried
            log.exception(
                "event at %s[%d]@%d could not be processed", settings.transactions_topic, msg.partition, msg.offset
            )
            await outbox.dead_letter(raw, msg, Reason.UNPROCESSABLE, f"{type(exc).__name__}: {exc}")
            return
        if outcome == Applied.TOO_LATE:
            await outbox.dead_letter(
                raw, msg, Reason.TOO_LATE, "older than the state window of its customer's partition"
            )
        elif outcome == Applied.APPLIED:
            metrics.events_applied.inc()
        else:
            metrics.events_skipped.labels(reason=outcome).inc()
            if outcome == Applied.DUPLICATE:
                log.info(
                    "event_id %r of customer %r at %s[%d]@%d not applied: that event_id was "
                    "applied before (the first event of an id counts; a correction is a new "
                    "event)",
                    parsed.event_id,
                    parsed.customer_id,
                    settings.transactions_topic,
                    msg.partition,
                    msg.offset,
                )

    @app.agent(control)
    async def commands(stream: Any) -> None:
        """Operator commands, one message per partition (co-partitioned with transactions, so each
        reaches the worker that owns that partition)."""
        async for event in stream.events():
            msg, partition = event.value, event.message.partition
            try:
                command = json.loads(msg).get("command")
            except (ValueError, AttributeError):
                command = None
            if command == "rescore_all":
                await takeovers.ensure(partition)
                n = core.rescore_all(partition)
                log.info(
                    "partition %d: rescore-all requested; %d customers queued for model %s",
                    partition,
                    n,
                    artifact.version,
                )
            else:
                log.warning(
                    "ignored control message at %s[%d]@%d: %r",
                    settings.control_topic,
                    partition,
                    event.message.offset,
                    msg[:200],
                )

    @app.timer(interval=max(settings.batch_wait_ms / 1000.0 / 2, 0.005))
    async def tick() -> None:
        """A micro-batch that waited batch_wait_ms goes out; a chunk of rescan comes in."""
        if flusher.due():
            await flusher.flush()
        flusher.drain_backlog()

    @app.timer(interval=1.0)
    async def watch_commits() -> None:
        """Each owned partition's committed offset against how far it has been processed."""
        for partition in assigned():
            tp = TP(settings.transactions_topic, partition)
            part = core.partitions.get(partition)
            committed = faust_hooks.committed_since(app, tp)
            commits.observe(
                partition,
                committed if committed is not None else core.first_received(partition),
                part.position if part is not None else None,
            )
        metrics.commit_stalled.set(len(commits.stalled))

    @app.task
    async def quiet_client_logs() -> None:
        """The Kafka client logs every produced message at debug level: costly even unprinted."""
        level = max(logging.INFO, logging.getLevelName(settings.log_level.upper()))
        for name in ("aiokafka", "kafka"):
            logging.getLogger(name).setLevel(level)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # faust types receivers without the arguments send passes
    async def on_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        """One attempt to publish what is pending, not retried here: a failure leaves the revoked
        partitions' events unacknowledged, for their next owner to process again."""
        await flusher.flush()
        faust_hooks.forget_committed(app, revoked)  # their next owner commits from now on
        lost = {tp.partition for tp in revoked if tp.topic == settings.transactions_topic}
        takeovers.cancel(lost)
        core.forget(lost)
        commits.forget(lost)

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]  # faust types receivers without the arguments send passes
    async def on_rebalanced(sender: Any, **kwargs: Any) -> None:
        """Sent before faust resumes the partitions: recover and take over every assigned partition
        now (as faust recovers its tables), not only when its next event arrives, which may be
        never. Partitions this worker no longer owns release their store."""
        await changelog.maybe_declare()
        owned = assigned()
        states.close_unowned(owned)
        started = time.perf_counter()
        for partition in sorted(owned):  # one at a time: recovery's fetch buffers are large
            await takeovers.ensure(partition)
        metrics.takeover_seconds.set(time.perf_counter() - started)
        ready.set()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # faust types receivers without the arguments send passes
    async def on_shutdown(sender: Any, **kwargs: Any) -> None:
        """Consumer flow is stopped, the producer still runs: publish and acknowledge what is
        pending, then acknowledge nothing more (the producer flush that follows is the last one, so
        later events are left for redelivery)."""
        log.info(
            "stopping: publishing %d dirty customers before the final commit (one attempt: "
            "after a failure their events are redelivered on restart)",
            core.dirty_count(),
        )
        if flusher.stream is not None:
            await flusher.flush()
        await flusher.close()
        states.store.close_all()  # rocksdb: a restart on this directory replays only the tail

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "model_version": artifact.version})

    @app.page("/ready")
    async def is_ready(web: Any, request: Any) -> Any:
        recovered = not app.rebalancing  # and every assigned partition taken over: `ready`
        failing = flusher.failures.not_ready_reason() or commits.not_ready_reason()
        if failing:
            return web.json({"ready": False, "reason": failing}, status=503)
        status = 200 if recovered and ready.is_set() else 503
        return web.json({"ready": status == 200}, status=status)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        await refresh_gauges()
        body, content_type = metrics.render(request.headers.get("Accept"))
        return web.bytes(body, headers={"Content-Type": content_type})  # with its charset

    @app.page("/customers/{customer_id}")
    async def customer(web: Any, request: Any, customer_id: str) -> Any:
        found = states.find(customer_id)
        if found is None:
            return web.json({"error": f"customer {customer_id} not on this worker"}, status=404)
        partition, state = found
        spend, units, invoices = state.totals()
        as_of = core.as_of(partition)
        score = score_states(artifact, [state], as_of)[0]
        return web.json(
            {
                "customer_id": customer_id,
                "aggregates": {
                    "months": {
                        str(m): {"spend": a.spend_cents / 100, "units": a.units, "invoices": a.n_invoices}
                        for m, a in sorted(state.months.items())
                    },
                    "lifetime_spend": spend / 100,
                    "lifetime_units": units,
                    "lifetime_invoices": invoices,
                    "partition": state.partition,
                    "offset": state.offset,
                    "ids_held": state.n_ids,
                    "ids_forgotten": state.ids_forgotten,
                },
                "score": as_dict(score),  # as of the partition's clock: what it publishes next
                # reference_clv + each group's contribution = the score's clv (export_onnx.explain)
                "drivers": explainer.drivers([state], as_of)[0].as_dict() if explainer else None,
            }
        )

    async def refresh_gauges() -> None:
        """Gauges are read when scraped, not kept current on every tick."""
        metrics.dirty.set(core.dirty_count())
        metrics.backlog.set(core.backlog())
        metrics.near_bound.set(len(states.near_bound))
        metrics.largest_record.set(states.largest_record)
        metrics.partitions.set(len(core.partitions))
        metrics.flush_age.set(flusher.failures.age(bool(core.dirty_count() or core.acks)))
        metrics.set_lag({partition: await committed_lag(partition) for partition in assigned()})

    async def committed_lag(partition: int) -> int:
        """Messages after the group's committed offset: a restart resumes there, so a commit that
        stops advancing shows as growing lag even while intake goes on. Until this worker commits
        on a partition, its committed offset is where consumption started (faust seeks each
        assigned partition to the group's commit)."""
        tp = TP(settings.transactions_topic, partition)
        committed = faust_hooks.committed_since(app, tp)
        if committed is None:
            committed = core.first_received(partition)
        if committed is None:  # nothing consumed here since assignment: the fetch position
            committed = await app.consumer.position(tp)
        return max(0, (app.consumer.highwater(tp) or 0) - (committed or 0))

    return app
