"""`clv bootstrap`: every customer's state and first score from a history file, written straight to
the state changelog and `clv-scores`, so workers start from years of history without replaying it.

What it writes is what a worker that had folded the file would leave: one state record per
customer (`features.bulk`, record for record the stream's fold) on the changelog partition its key
maps to (`home_partition`, where `clv replay` and the worker put the customer), its score on
the same partition of `clv-scores`, and each partition's own record (`PartitionMeta`: clock at the
file's newest event, every customer scored as of that month by this model). A worker started
afterwards recovers the states and, finding its scores current, serves them without rescoring.

Nothing counted twice: a bootstrapped state carries no source offsets (partition and offset -1),
so the worker's offset watermark never mistakes a new event for a redelivered one; what recognises
the bootstrapped invoices is the event-id keys each state keeps for the months of its window.
`clv replay` of the same file publishes the same event ids (`stable_event_id` of customer and
invoice), so a replayed invoice of a month in the window is a duplicate, and one of an older month
is too late for the partition's clock (dead-lettered as `too_late`, already in the past totals).
The one gap is the state's key bound: a customer past `MAX_IDS` keys has forgotten its oldest ones,
and those invoices would count again if replayed (see `features.aggregate`).

Nothing half-written: the broker is asked first (reachable, topics co-partitioned, changelog and
`clv-scores` empty unless `force`; nothing written), then the file is read and checked, and every
record is built before the first write; topics are created only then. The partition records go
out last, after every state and score is acknowledged. A write that fails part-way is reported
(exit 2, the records written so far) and is re-run with `--force`: the same file gives the same
records, and compaction keeps one per key.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from aiokafka.errors import KafkaError

from export_onnx.runtime import Artifact
from features.aggregate import CustomerState, month_of
from features.batch import read_lines
from features.bulk import fold_lines
from features.cleaning import CleaningReport
from features.scores import encode_score
from state.live.record import encode_state
from stream.kafka_io import end_offsets
from stream.publisher import BatchPublisher, Record, home_partition
from stream.replay import all_topics, ensure_topics
from export_onnx.scoring import drift, score_cohort
from features.population import Verdict
from features.sequences import Inputs
from stream.settings import Settings
from state.live.base.partition import PartitionMeta, encode_key, encode_meta
from state.live.base.store import META_KEY

SCORE_CHUNK = 50_000  # customers per onnxruntime call: bounds the inputs' memory
WRITE_CHUNK = 20_000  # records per publish (and progress step)


class BootstrapError(Exception):
    """Bad input or an unusable broker: nothing was written (or, for a failed write, the message
    says how much was and how to finish)."""


@dataclass
class Summary:
    file: str
    report: CleaningReport
    events: int
    customers: int
    partitions: int
    records: int
    as_of: str
    model: str
    seconds: float
    drift: str | None  # the drift warning `clv score` would print for these customers, if any

    def render(self) -> str:
        dropped = {k: v for k, v in self.report.dropped.items() if v}
        rate = self.report.rows_read / self.seconds if self.seconds else 0.0
        return (
            f"bootstrapped {self.customers:,} customers from {self.file}: "
            f"{self.report.rows_read:,} lines read ({self.report.rows_kept:,} kept"
            f"{', dropped ' + ', '.join(f'{k} {v:,}' for k, v in dropped.items()) if dropped else ''}), "
            f"{self.events:,} invoices; {self.records:,} records to {self.partitions} partitions "
            f"of the state changelog and clv-scores, scored as of {self.as_of} with {self.model}; "
            f"{self.seconds:.1f}s ({rate:,.0f} lines/s)"
        )


def state_records(
    states: Iterable[CustomerState], settings: Settings, meta: PartitionMeta
) -> tuple[list[Record], list[Record]]:
    """The changelog a worker that folded these states would leave: each state on its customer's
    partition, and (second list) every partition's own record."""
    topic = settings.changelog_topic
    records = [
        (topic, home_partition(s.customer_id.encode(), settings.partitions), encode_key(s.customer_id), encode_state(s))
        for s in states
    ]
    metas = [(topic, p, META_KEY, encode_meta(meta)) for p in range(settings.partitions)]
    return records, metas


async def write(settings: Settings, records: Sequence[Record], progress: Any = None) -> None:
    """Publish in chunks, each acknowledged by the broker before the next (`progress.update`)."""
    publisher = BatchPublisher(settings, settings.publish_timeout_s)
    try:
        for i in range(0, len(records), WRITE_CHUNK):
            chunk = records[i : i + WRITE_CHUNK]
            await publisher.publish(chunk)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        await publisher.close()


async def _preflight(settings: Settings, force: bool) -> None:
    """Reachable broker, co-partitioned topics, and an empty changelog and `clv-scores`."""
    topics = (settings.transactions_topic, settings.changelog_topic, settings.scores_topic)
    answers = await asyncio.gather(*(end_offsets(settings, t) for t in topics), return_exceptions=True)
    for topic, ends in zip(topics, answers):
        if isinstance(ends, KafkaError):
            raise BootstrapError(f"cannot use the broker at {settings.bootstrap_servers}: {ends}") from None
        if isinstance(ends, BaseException):
            raise ends
        if ends and len(ends) != settings.partitions:
            raise BootstrapError(
                f"topic {topic} has {len(ends)} partitions, not {settings.partitions}: pass --partitions {len(ends)}"
            )
        if topic != settings.transactions_topic and any(ends.values()) and not force:
            raise BootstrapError(
                f"topic {topic} is not empty ({sum(ends.values()):,} records "
                "written to it): a bootstrap starts workers from nothing; "
                "--force writes over it (to finish a bootstrap that failed)"
            )


def build(
    lines: pd.DataFrame, artifact: Artifact, settings: Settings
) -> tuple[list[Record], int, int, datetime, Verdict | None]:
    """Every record to write (states, scores, then partition records), the invoices folded, the
    customers, the time scored as of, and how the customers compare with the model's training
    cohort (`export_onnx.scoring.drift`)."""
    folded = fold_lines(lines, artifact.window)
    as_of = datetime.fromtimestamp(folded.newest_ts, timezone.utc)
    changelog, metas = state_records(
        folded.states, settings, PartitionMeta(folded.newest_ts, month_of(as_of), artifact.version)
    )
    scores: list[Record] = []
    seen: list[Inputs] = []
    for i in range(0, len(folded.states), SCORE_CHUNK):
        chunk, _, inputs = score_cohort(artifact, folded.states[i : i + SCORE_CHUNK], as_of)
        seen.append(inputs)
        scores += [
            (settings.scores_topic, record[1], score.customer_id.encode(), encode_score(score))
            for record, score in zip(changelog[i : i + SCORE_CHUNK], chunk)
        ]
    return (
        changelog + scores + metas,
        folded.events,
        len(folded.states),
        as_of,
        drift(artifact, *seen) if seen else None,
    )


def bootstrap(
    file: str | Path, file_options: dict[str, Any], settings: Settings, force: bool = False, progress: bool = True
) -> Summary:
    """Read, check, build, then write (see the module docstring for what is guaranteed)."""
    from tqdm import tqdm

    started = time.perf_counter()
    artifact = Artifact.load(settings.model_dir or None)
    asyncio.run(_preflight(settings, force))  # first: a broker that will refuse fails fast
    with tqdm(
        total=2, unit="step", disable=not progress, mininterval=0.5, leave=False, desc=f"reading {Path(file).name}"
    ) as bar:
        lines, report = read_lines(file, **file_options)
        if lines.empty:
            raise BootstrapError(f"{file}: no transactions left after cleaning ({report.rows_read:,} lines read)")
        bar.update()
        bar.set_description(f"folding and scoring {len(lines):,} lines")
        records, events, customers, as_of, verdict = build(lines, artifact, settings)
        bar.update()
        bar.unit = "rec"
        bar.set_description("writing")
        bar.reset(total=len(records))
        try:
            asyncio.run(_create_and_write(settings, records, bar))
        except KafkaError as exc:
            raise BootstrapError(
                f"writing failed after {bar.n:,} of {len(records):,} records ({exc}): the topics "
                "hold part of the bootstrap; start no worker on them, re-run the same command "
                "with --force"
            ) from None
    return Summary(
        str(file),
        report,
        events,
        customers,
        settings.partitions,
        len(records),
        as_of.isoformat(),
        artifact.version,
        time.perf_counter() - started,
        verdict.sentence() if verdict else None,
    )


async def _create_and_write(settings: Settings, records: Sequence[Record], bar: Any) -> None:
    await ensure_topics(settings, {**all_topics(settings), settings.changelog_topic: {"cleanup.policy": "compact"}})
    await write(settings, records, bar)
