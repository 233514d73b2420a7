"""The DuckDB snapshot file analysts read: written whole to a temporary file beside the published
path, then renamed over it. A rename is atomic, so a reader opens either the previous snapshot or
the new one, never a partial file, and the writer never holds a lock on the published path.

Tables:
- `customer_scores`: one row per customer, its newest score, RFM fields, segment and value tier.
- `snapshot_meta`: one row: when it was written, newest event time, row count, offsets per
  partition of the scores topic (the sink resumes from them), model versions.
- `segment_playbook`: per segment, who is in it and what to do (from `features.segments`).
Views: `segment_summary`, `tier_summary`, `cluster_summary`: customers, totals, means and shares
of `clv`, the expected spend, which adds up over customers; `clv` also sets the value tiers.
`cluster_summary` adds each behavioral cluster's mean RFM fields and its most common segment.
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass, field, fields
from datetime import datetime, timezone
from operator import attrgetter
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from features.clusters import UNKNOWN
from features.scores import FIELD_TYPES, FIELDS, LEGACY_CLV, IsoTime, ScoreRecord, iso_time
from features.segments import PLAYBOOKS, Playbook

# Per customer, the fields of its newest score, in message order (the schema version describes
# a message, not a customer).
COLUMNS = tuple(name for name in FIELDS if name != "schema_version")
TIERS = ("low", "medium", "high")
_SQL_TYPES = {int: "INTEGER", float: "DOUBLE", str: "VARCHAR", IsoTime: "TIMESTAMPTZ"}
_TIMES = tuple(name for name in COLUMNS if FIELD_TYPES[name] is IsoTime)
_PLAYBOOK_COLUMNS = ("segment", *(f.name for f in fields(Playbook)))
_columns = attrgetter(*COLUMNS)

_CREATE = f"""
CREATE TABLE customer_scores AS
WITH cut AS (
    SELECT quantile_cont(clv, 1 / 3) AS q1, quantile_cont(clv, 2 / 3) AS q2 FROM rows
)
SELECT {", ".join(f"{name}::{_SQL_TYPES[FIELD_TYPES[name]]} AS {name}" for name in COLUMNS)},
       CASE WHEN clv >= cut.q2 THEN 'high' WHEN clv >= cut.q1 THEN 'medium' ELSE 'low' END
           AS value_tier,
       source_partition::INTEGER AS source_partition, source_offset::BIGINT AS source_offset
FROM rows, cut
ORDER BY customer_id;

CREATE TABLE segment_playbook ({", ".join(f"{name} VARCHAR" for name in _PLAYBOOK_COLUMNS)});

CREATE VIEW segment_summary AS
SELECT * FROM (
    SELECT segment, count(*) AS customers, sum(clv) AS total_clv, avg(clv) AS mean_clv,
           sum(clv) / nullif((SELECT sum(clv) FROM customer_scores), 0) AS share_of_value,
           avg(p_purchase) AS mean_p_purchase, avg(recency_days) AS mean_recency_days,
           avg(frequency) AS mean_frequency
    FROM customer_scores GROUP BY segment
) LEFT JOIN segment_playbook USING (segment)
ORDER BY total_clv DESC;

CREATE VIEW cluster_summary AS
SELECT cluster, count(*) AS customers, sum(clv) AS total_clv, avg(clv) AS mean_clv,
       sum(clv) / nullif((SELECT sum(clv) FROM customer_scores), 0) AS share_of_value,
       avg(p_purchase) AS mean_p_purchase, avg(recency_days) AS mean_recency_days,
       avg(frequency) AS mean_frequency, avg(monetary) AS mean_monetary,
       avg(tenure_days) AS mean_tenure_days, mode(segment) AS main_segment
FROM customer_scores GROUP BY cluster
ORDER BY total_clv DESC;

CREATE VIEW tier_summary AS
SELECT value_tier, count(*) AS customers, min(clv) AS min_clv, max(clv) AS max_clv,
       sum(clv) AS total_clv, avg(clv) AS mean_clv,
       sum(clv) / nullif((SELECT sum(clv) FROM customer_scores), 0) AS share_of_value
FROM customer_scores GROUP BY value_tier
ORDER BY CASE value_tier WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END;
"""


def row(score: ScoreRecord, partition: int, offset: int) -> tuple[Any, ...]:
    """A customer's row as the sink holds it: its score's columns, then where it was read."""
    return (*_columns(score), partition, offset)


@dataclass
class SnapshotState:
    """What the sink holds between snapshots: newest score per customer and where it read to."""

    rows: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # see `row`
    offsets: dict[int, int] = field(default_factory=dict)  # next offset to read, per partition
    newest_event_time: str | None = None


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write(path: Path, state: SnapshotState, source_topic: str) -> int:
    """Write the whole snapshot to a temporary file, then rename it over `path`. Returns rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    rows = pd.DataFrame.from_records(  # noqa: F841  (read by DuckDB by name)
        list(state.rows.values()), columns=[*COLUMNS, "source_partition", "source_offset"])
    con = duckdb.connect(str(tmp))
    try:
        con.execute(_CREATE)
        con.executemany(f"INSERT INTO segment_playbook VALUES ({', '.join('?' * len(_PLAYBOOK_COLUMNS))})",
                        [[name, *astuple(book)] for name, book in PLAYBOOKS.items()])
        con.execute(
            "CREATE TABLE snapshot_meta AS SELECT ?::TIMESTAMPTZ AS snapshot_at, "
            "?::TIMESTAMPTZ AS newest_event_time, (SELECT count(*) FROM customer_scores) AS customers, "
            "?::VARCHAR AS source_topic, MAP(?::INTEGER[], ?::BIGINT[]) AS offsets, "
            "(SELECT list(DISTINCT model_version ORDER BY model_version) FROM customer_scores) "
            "AS model_versions",
            [datetime.now(timezone.utc), state.newest_event_time, source_topic,
             sorted(state.offsets), [state.offsets[p] for p in sorted(state.offsets)]])
        count = con.execute("SELECT customers FROM snapshot_meta").fetchone()[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return int(count)


def load(path: Path) -> SnapshotState:
    """The state a published snapshot was written from, so a restarted sink resumes after it."""
    state = SnapshotState()
    if not path.exists():
        return state
    con = duckdb.connect(str(path), read_only=True)
    try:
        meta = con.execute("SELECT offsets, newest_event_time FROM snapshot_meta").fetchone()
        state.offsets = {int(k): int(v) for k, v in meta[0].items()}
        state.newest_event_time = iso_time(meta[1]) if meta[1] is not None else None
        have = {c for (c,) in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'customer_scores'").fetchall()}
        # Written by a sink of score schema 2, whose `clv` column holds quantiles: the
        # expectation, today's `clv`, is in its LEGACY_CLV column. Sinks before schema 4 wrote
        # no cluster: unknown, as in their messages.
        select = [f"{LEGACY_CLV} AS clv" if c == "clv" and LEGACY_CLV in have
                  else f"'{UNKNOWN}' AS {c}" if c == "cluster" and c not in have else c
                  for c in COLUMNS]
        frame = con.execute(
            f"SELECT {', '.join(select)}, source_partition, source_offset FROM customer_scores"
        ).df()
    finally:
        con.close()
    for col in _TIMES:
        frame[col] = frame[col].map(iso_time)
    state.rows = {r[0]: tuple(r) for r in frame.itertuples(index=False, name=None)}
    return state


def remove_leftovers(path: Path) -> list[Path]:
    """Temporary files of a sink that died mid-write: never published, safe to delete."""
    gone = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone
