"""The DuckDB snapshot file analysts read: written whole to a temporary file beside the published
path, then renamed over it. A rename is atomic, so a reader opens either the previous snapshot or
the new one, never a partial file, and the writer never holds a lock on the published path.

Tables:
- `customer_scores`: one row per customer, its newest score, RFM fields, segment and value tier.
- `snapshot_meta`: one row: when it was written, newest event time, row count, offsets per
  partition of the scores topic (the sink resumes from them), model versions.
Views: `segment_summary`, `tier_summary`. Totals and shares add `expected_clv` (expected spend);
`clv`, the per-customer point forecast, ranks customers and sets the value tiers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

# Fields of a `clv-scores` message kept per customer, in table order.
SCORE_COLUMNS = ("customer_id", "clv", "p_purchase", "expected_clv", "recency_days", "frequency",
                 "monetary", "tenure_days", "total_spend", "segment", "horizon_months",
                 "model_version", "as_of", "scored_at")
TIERS = ("low", "medium", "high")

_CREATE = """
CREATE TABLE customer_scores AS
WITH cut AS (
    SELECT quantile_cont(clv, 1 / 3) AS q1, quantile_cont(clv, 2 / 3) AS q2 FROM rows
)
SELECT customer_id, clv::DOUBLE AS clv, p_purchase::DOUBLE AS p_purchase,
       expected_clv::DOUBLE AS expected_clv,
       recency_days::DOUBLE AS recency_days, frequency::INTEGER AS frequency,
       monetary::DOUBLE AS monetary, tenure_days::DOUBLE AS tenure_days,
       total_spend::DOUBLE AS total_spend, segment,
       CASE WHEN clv >= cut.q2 THEN 'high' WHEN clv >= cut.q1 THEN 'medium' ELSE 'low' END
           AS value_tier,
       horizon_months::INTEGER AS horizon_months, model_version,
       as_of::TIMESTAMPTZ AS as_of, scored_at::TIMESTAMPTZ AS scored_at,
       source_partition::INTEGER AS source_partition, source_offset::BIGINT AS source_offset
FROM rows, cut
ORDER BY customer_id;

CREATE VIEW segment_summary AS
SELECT segment, count(*) AS customers, sum(expected_clv) AS total_expected_clv,
       avg(expected_clv) AS mean_expected_clv, avg(clv) AS mean_clv,
       sum(expected_clv) / nullif((SELECT sum(expected_clv) FROM customer_scores), 0)
           AS share_of_value,
       avg(p_purchase) AS mean_p_purchase, avg(recency_days) AS mean_recency_days,
       avg(frequency) AS mean_frequency
FROM customer_scores GROUP BY segment ORDER BY total_expected_clv DESC;

CREATE VIEW tier_summary AS
SELECT value_tier, count(*) AS customers, min(clv) AS min_clv, max(clv) AS max_clv,
       sum(expected_clv) AS total_expected_clv, avg(expected_clv) AS mean_expected_clv,
       sum(expected_clv) / nullif((SELECT sum(expected_clv) FROM customer_scores), 0)
           AS share_of_value
FROM customer_scores GROUP BY value_tier
ORDER BY CASE value_tier WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END;
"""


@dataclass
class SnapshotState:
    """What the sink holds between snapshots: newest score per customer and where it read to."""

    rows: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # SCORE_COLUMNS + partition, offset
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
        list(state.rows.values()), columns=[*SCORE_COLUMNS, "source_partition", "source_offset"])
    con = duckdb.connect(str(tmp))
    try:
        con.execute(_CREATE)
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
        state.newest_event_time = _utc_iso(meta[1]) if meta[1] is not None else None
        frame = con.execute(
            f"SELECT {', '.join(SCORE_COLUMNS)}, source_partition, source_offset FROM customer_scores"
        ).df()
    finally:
        con.close()
    for col in ("as_of", "scored_at"):
        frame[col] = frame[col].map(_utc_iso)
    state.rows = {r[0]: tuple(r) for r in frame.itertuples(index=False, name=None)}
    return state


def _utc_iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat()


def remove_leftovers(path: Path) -> list[Path]:
    """Temporary files of a sink that died mid-write: never published, safe to delete."""
    gone = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone
