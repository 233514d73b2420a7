"""The DuckDB snapshot file analysts read, and the sink's working database it is published from.

The sink folds score messages into a working DuckDB file beside the snapshot (`.NAME.sink`): the
newest row per customer, merged in batches, so its memory does not grow with the customer count.
Every interval it copies that table into a temporary file beside the published path and renames
it over that path. A rename is atomic, so a reader opens either the previous snapshot or the new
one, never a partial file, and the sink never holds a lock on the published path.

Tables:
- `customer_scores`: one row per customer, its newest score, RFM fields, segment and value tier;
  indexed by customer id (a lookup reads the index, not the table).
- `snapshot_meta`: one row: when it was written, newest event time, row count, offsets per
  partition of the scores topic (the sink resumes from them), model versions, and when the
  snapshot it replaced was written (`previous_snapshot_at`, NULL for the first).
- `segment_playbook`: per segment, who is in it and what to do (from `features.segments`).
- `previous_segments`: each customer's segment in the snapshot this one replaced (empty for the
  first), copied from that file when this one is written: movement between segments is read
  from one file, so a reader never compares two snapshots of different moments by accident.
- `customer_drivers`: for the top customers by clv, the drivers of their score (dollars per group
  of model inputs, largest first, against the model's average customer: `reference_clv` + the
  customer's contributions = its clv in `customer_scores`); `stream.drivers` says which.
- `customer_distribution`: per customer, the predictive distribution of its horizon spend its
  score came from (`features.distribution.SpendDistribution`: `p`, P(any purchase) at the level,
  and per ensemble member `weights`, `mu`, `sigma`), with the identity of that score (model,
  as-of, event offset, clv: the distribution's mean). Only for customers the sink could compute
  it for with its model from the state the score came from (`stream.distributions`): none in a
  snapshot written without a model, and none yet for a customer whose state and score were not
  in step; a reader says "not known" there.
Views: `segment_summary`, `tier_summary`, `cluster_summary`, `country_summary`: customers,
totals, means and shares of `clv`, the expected spend, which adds up over customers; `clv` also
sets the value tiers. `segment_summary` and `tier_summary` state a range of each total:
`total_clv_low` to `total_clv_high`, an 80% range of the group's horizon spend by a normal
approximation of a sum of independent customers (total +- 1.2816 x the square root of the sum of
their `clv_sd`^2, the lower end floored at 0). Customers are not independent (a season or a shock
moves them together), so the real range of a total is wider; the sum of customers'
clv_low/clv_high is not a range of the sum at all (it is far too wide). Customers scored before
schema 7 have no sd (-1) and add nothing to the range. `cluster_summary` adds each behavioral
cluster's mean RFM fields and its most common segment. `segment_moves`: customers per (previous
segment, segment) pair, NULL on the left for customers new since the previous snapshot and on
the right for those gone.
"""

from __future__ import annotations

import os
from dataclasses import astuple, fields
from datetime import datetime, timezone
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb
import pandas as pd

from features.clusters import UNKNOWN
from features.scores import FIELD_TYPES, FIELDS, LEGACY_CLV, PRECEDENCE, IsoTime, Offset, ScoreRecord, iso_time
from features.segments import PLAYBOOKS, Playbook
from state.snapshot import insights
from state.snapshot.insights import one

# Per customer, the fields of its newest score, in message order (the schema version describes
# a message, not a customer).
COLUMNS = tuple(name for name in FIELDS if name != "schema_version")
TIERS = ("low", "medium", "high")
_SQL_TYPES = {int: "INTEGER", float: "DOUBLE", str: "VARCHAR", IsoTime: "TIMESTAMPTZ", Offset: "BIGINT"}
_AS_OF = COLUMNS.index("as_of")
_precedence = itemgetter(*(COLUMNS.index(name) for name in PRECEDENCE))  # a row's, as of its score
# A held row the incoming one (`rows`) is at least as new as: `features.scores.precedence` in SQL.
_SUPERSEDED = "({}) <= ({})".format(
    ", ".join(f"scores.{name}" for name in PRECEDENCE),
    ", ".join(f"rows.{name}::{_SQL_TYPES[FIELD_TYPES[name]]}" for name in PRECEDENCE),
)
# What a snapshot of an earlier sink lacks: columns added with score schemas 4, 5 and 6.
_ABSENT_COLUMNS = {
    "cluster": f"'{UNKNOWN}'",
    "country": "''",
    "event_offset": "-1",
    "clv_low": "-1",
    "clv_high": "-1",
    "clv_sd": "-1",
}
_PLAYBOOK_COLUMNS = ("segment", *(f.name for f in fields(Playbook)))
# One row per top customer and group of inputs, largest first (`stream.drivers.driver_rows`).
DRIVER_COLUMNS = (
    ("customer_id", "VARCHAR"),
    ("position", "INTEGER"),
    ("driver", "VARCHAR"),
    ("contribution", "DOUBLE"),
    ("reference_clv", "DOUBLE"),
    ("meaning", "VARCHAR"),
)
# One row per customer whose distribution is known (`stream.distributions.Distributions.rows`).
DISTRIBUTION_COLUMNS = (
    ("customer_id", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("as_of", "TIMESTAMPTZ"),
    ("event_offset", "BIGINT"),
    ("clv", "DOUBLE"),
    ("p", "DOUBLE"),
    ("weights", "DOUBLE[]"),
    ("mu", "DOUBLE[]"),
    ("sigma", "DOUBLE[]"),
)
_DISTRIBUTION_TABLE = ", ".join(f"{name} {kind}" for name, kind in DISTRIBUTION_COLUMNS)
# A distribution belongs to the customer's row when it came from that very score.
_SAME_SCORE = " AND ".join(
    f"distributions.{name} = scores.{name}" for name in ("customer_id", "model_version", "as_of", "event_offset", "clv")
)
DISTRIBUTION_BATCH = 20_000  # customers per model call when the sink computes distributions
_columns = attrgetter(*COLUMNS)

_SOURCE = ("source_partition", "source_offset")
_WORKING = ", ".join(
    [
        *(f"{name} {_SQL_TYPES[FIELD_TYPES[name]]}" for name in COLUMNS),
        "source_partition INTEGER",
        "source_offset BIGINT",
    ]
)
_CASTS = ", ".join(
    [
        *(f"{name}::{_SQL_TYPES[FIELD_TYPES[name]]}" for name in COLUMNS),
        "source_partition::INTEGER",
        "source_offset::BIGINT",
    ]
)
MERGE_ROWS = 50_000  # customers held in Python between merges into the working table

_CREATE = f"""
CREATE TABLE clv_next.customer_scores AS
WITH cut AS (
    SELECT quantile_cont(clv, 1 / 3) AS q1, quantile_cont(clv, 2 / 3) AS q2 FROM scores
)
SELECT {", ".join(COLUMNS)},
       CASE WHEN clv >= cut.q2 THEN 'high' WHEN clv >= cut.q1 THEN 'medium' ELSE 'low' END
           AS value_tier,
       source_partition, source_offset
FROM scores, cut
ORDER BY customer_id;
CREATE INDEX customer_scores_customer_id ON clv_next.customer_scores (customer_id);

CREATE TABLE clv_next.segment_playbook ({", ".join(f"{name} VARCHAR" for name in _PLAYBOOK_COLUMNS)});

CREATE TABLE clv_next.customer_drivers ({", ".join(f"{name} {kind}" for name, kind in DRIVER_COLUMNS)});

DELETE FROM distributions WHERE NOT EXISTS (SELECT 1 FROM scores WHERE {_SAME_SCORE});
CREATE TABLE clv_next.customer_distribution AS
SELECT * FROM distributions ORDER BY customer_id;
"""

# The 80% range of a group's total (normal approximation of a sum of independent customers;
# 1.2816 is the standard normal's 90% quantile); customers without an sd (-1) add nothing.
_SPREAD = "1.2816 * sqrt(coalesce(sum(CASE WHEN clv_sd > 0 THEN clv_sd * clv_sd END), 0))"
_RANGE = f"greatest(sum(clv) - {_SPREAD}, 0) AS total_clv_low, sum(clv) + {_SPREAD} AS total_clv_high"

_VIEWS = f"""
CREATE VIEW segment_summary AS
SELECT * FROM (
    SELECT segment, count(*) AS customers,
           count(*) / (SELECT count(*) FROM customer_scores) AS share_of_customers,
           sum(clv) AS total_clv, {_RANGE}, avg(clv) AS mean_clv,
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

CREATE VIEW country_summary AS
SELECT country, count(*) AS customers, sum(clv) AS total_clv, avg(clv) AS mean_clv,
       sum(clv) / nullif((SELECT sum(clv) FROM customer_scores), 0) AS share_of_value,
       sum(total_spend) AS total_spend
FROM customer_scores GROUP BY country
ORDER BY total_clv DESC, country;

CREATE VIEW segment_moves AS
SELECT previous_segments.segment AS from_segment, customer_scores.segment AS to_segment,
       count(*) AS customers, coalesce(sum(customer_scores.clv), 0) AS total_clv
FROM previous_segments FULL OUTER JOIN customer_scores USING (customer_id)
GROUP BY ALL
ORDER BY from_segment NULLS FIRST, to_segment NULLS LAST;

CREATE VIEW tier_summary AS
SELECT value_tier, count(*) AS customers, min(clv) AS min_clv, max(clv) AS max_clv,
       sum(clv) AS total_clv, {_RANGE}, avg(clv) AS mean_clv,
       sum(clv) / nullif((SELECT sum(clv) FROM customer_scores), 0) AS share_of_value
FROM customer_scores GROUP BY value_tier
ORDER BY CASE value_tier WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END;
"""


def row(score: ScoreRecord, partition: int, offset: int) -> tuple[Any, ...]:
    """A customer's row as the sink holds it: its score's columns, then where it was read."""
    return (*_columns(score), partition, offset)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def working_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sink")


class Snapshots:
    """The newest score per customer in a working DuckDB file, and where the sink read to;
    `publish` writes the snapshot of them. Python holds at most `MERGE_ROWS` customers (those
    changed since the last merge, `merge_rows`); DuckDB spills the rest to its file."""

    def __init__(self, path: Path, source_topic: str, memory_limit_mb: int = 256, merge_rows: int = MERGE_ROWS) -> None:
        self.path, self.source_topic, self.memory_limit_mb = path, source_topic, memory_limit_mb
        self.merge_rows = merge_rows
        self.offsets: dict[int, int] = {}  # next offset to read, per partition
        self.newest_event_time: str | None = None
        self.pending: dict[str, tuple[Any, ...] | None] = {}  # changed since the merge; None: gone
        self.con: duckdb.DuckDBPyConnection | None = None

    def open(self) -> int:
        """Start from the published snapshot (its rows and offsets), or empty; returns customers.
        The working file is rebuilt every time: the snapshot is the only checkpoint."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        work = working_path(self.path)
        for leftover in (work, work.with_name(work.name + ".wal")):
            leftover.unlink(missing_ok=True)
        con = self.con = duckdb.connect(str(work))
        con.execute(f"SET memory_limit = '{self.memory_limit_mb}MB'")
        con.execute("SET preserve_insertion_order = false")
        con.execute(f"CREATE TABLE scores ({_WORKING})")
        con.execute(f"CREATE TABLE distributions ({_DISTRIBUTION_TABLE})")
        if not self.path.exists():
            return 0
        con.execute("ATTACH ? AS clv_previous (READ_ONLY)", [str(self.path)])
        try:
            offsets, newest = one(con.execute("SELECT offsets, newest_event_time FROM clv_previous.snapshot_meta"))
            have = {
                c
                for (c,) in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_catalog = 'clv_previous' "
                    "AND table_name = 'customer_scores'"
                ).fetchall()
            }
            # Written by a sink of score schema 2, whose `clv` column holds quantiles: the
            # expectation, today's `clv`, is in its LEGACY_CLV column. Sinks before schema 4
            # wrote no cluster, before 5 no country, before 6 no event offset: unknown, as in
            # their messages.
            select = [
                f"{LEGACY_CLV} AS clv"
                if c == "clv" and LEGACY_CLV in have
                else f"{_ABSENT_COLUMNS[c]} AS {c}"
                if c not in have
                else c
                for c in (*COLUMNS, *_SOURCE)
            ]
            con.execute(f"INSERT INTO scores SELECT {', '.join(select)} FROM clv_previous.customer_scores")
            if insights.has(con, "customer_distribution", "clv_previous"):
                con.execute("INSERT INTO distributions SELECT * FROM clv_previous.customer_distribution")
        finally:
            con.execute("DETACH clv_previous")
        self.offsets = {int(k): int(v) for k, v in offsets.items()}
        self.newest_event_time = iso_time(newest) if newest is not None else None
        return one(con.execute("SELECT count(*) FROM scores"))[0]

    def put(self, customer_id: str, values: tuple[Any, ...] | None) -> None:
        """A row of the customer (`row`), kept unless the customer has a newer one by the score
        contract's `precedence` (a stale worker may publish after the current one); None when
        the customer was deleted (a tombstone)."""
        held = self.pending.get(customer_id)
        if values is not None and held is not None and _precedence(values) < _precedence(held):
            return
        self.pending[customer_id] = values
        if values is not None:
            as_of = values[_AS_OF]
            # Times are UTC ISO-8601 (`iso_time`), whose text orders as the instants do.
            if self.newest_event_time is None or as_of > self.newest_event_time:
                self.newest_event_time = as_of
        if len(self.pending) >= self.merge_rows:
            self.merge()

    def merge(self) -> None:
        """Fold the pending customers into the working table: delete the deleted, replace the
        rows the pending ones are at least as new as, add the customers it lacks."""
        if not self.pending:
            return
        con = self._con()
        gone = pd.DataFrame(  # noqa: F841  (read by name)
            {"customer_id": [c for c, v in self.pending.items() if v is None]}, dtype=object
        )
        rows = pd.DataFrame.from_records(  # noqa: F841  (read by name)
            [v for v in self.pending.values() if v is not None], columns=[*COLUMNS, *_SOURCE]
        )
        con.execute("BEGIN")
        con.execute("DELETE FROM scores WHERE customer_id IN (SELECT customer_id FROM gone)")
        con.execute(f"DELETE FROM scores USING rows WHERE scores.customer_id = rows.customer_id AND {_SUPERSEDED}")
        con.execute(
            f"INSERT INTO scores SELECT {_CASTS} FROM rows WHERE NOT EXISTS "
            f"(SELECT 1 FROM scores WHERE scores.customer_id = rows.customer_id)"
        )
        con.execute("COMMIT")
        self.pending.clear()

    def top(self, n: int) -> list[dict[str, Any]]:
        """The `n` customers of the highest clv as the next snapshot will hold them: their
        score's identity and the partition it was read from."""
        self.merge()
        cur = self._con().execute(
            "SELECT customer_id, clv, as_of, event_offset, model_version, source_partition "
            "FROM scores ORDER BY clv DESC, customer_id LIMIT ?",
            [n],
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def undistributed(self, model_version: str, batch: int = DISTRIBUTION_BATCH) -> Iterator[list[dict[str, Any]]]:
        """The customers scored by `model_version` whose distribution the working file lacks
        (their score changed, or it was never computed), `batch` at a time by customer id, each
        with its score's identity and the partition it was read from; `keep_distributions` may
        be called between batches."""
        self.merge()
        after = ""
        while True:
            cur = self._con().execute(
                "SELECT customer_id, clv, as_of, event_offset, model_version, source_partition FROM scores "
                "WHERE model_version = ? AND customer_id > ? AND NOT EXISTS "
                f"(SELECT 1 FROM distributions WHERE {_SAME_SCORE}) ORDER BY customer_id LIMIT ?",
                [model_version, after, batch],
            )
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
            if not rows:
                return
            yield rows
            after = rows[-1]["customer_id"]

    def keep_distributions(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """`customer_distribution` rows, replacing the customers' earlier ones."""
        if not rows:
            return
        con = self._con()
        frame = pd.DataFrame.from_records(  # noqa: F841  (read by name)
            list(rows), columns=[name for name, _kind in DISTRIBUTION_COLUMNS]
        )
        casts = ", ".join(f"{name}::{kind}" for name, kind in DISTRIBUTION_COLUMNS)
        con.execute("BEGIN")
        con.execute("DELETE FROM distributions WHERE customer_id IN (SELECT customer_id FROM frame)")
        con.execute(f"INSERT INTO distributions SELECT {casts} FROM frame")
        con.execute("COMMIT")

    def publish(self, drivers: Sequence[tuple[Any, ...]] = ()) -> int:
        """Write the whole snapshot to a temporary file, rename it over the published path;
        returns its customers. `drivers` are rows of `customer_drivers`."""
        self.merge()
        con = self._con()
        tmp = temp_path(self.path)
        tmp.unlink(missing_ok=True)
        con.execute("ATTACH ? AS clv_next", [str(tmp)])
        try:
            con.execute(_CREATE)
            previous_at = self._previous_segments(con)
            con.executemany(
                f"INSERT INTO clv_next.segment_playbook VALUES ({', '.join('?' * len(_PLAYBOOK_COLUMNS))})",
                [[name, *astuple(book)] for name, book in PLAYBOOKS.items()],
            )
            if drivers:
                con.executemany(
                    f"INSERT INTO clv_next.customer_drivers VALUES ({', '.join('?' * len(DRIVER_COLUMNS))})",
                    list(drivers),
                )
            con.execute(
                "CREATE TABLE clv_next.snapshot_meta AS SELECT ?::TIMESTAMPTZ AS snapshot_at, "
                "?::TIMESTAMPTZ AS newest_event_time, "
                "(SELECT count(*) FROM clv_next.customer_scores) AS customers, "
                "?::VARCHAR AS source_topic, MAP(?::INTEGER[], ?::BIGINT[]) AS offsets, "
                "(SELECT list(DISTINCT model_version ORDER BY model_version) FROM scores) "
                "AS model_versions, ?::TIMESTAMPTZ AS previous_snapshot_at",
                [
                    datetime.now(timezone.utc),
                    self.newest_event_time,
                    self.source_topic,
                    sorted(self.offsets),
                    [self.offsets[p] for p in sorted(self.offsets)],
                    previous_at,
                ],
            )
            count = one(con.execute("SELECT customers FROM clv_next.snapshot_meta"))[0]
        finally:
            con.execute("DETACH clv_next")
        views = duckdb.connect(str(tmp))  # views name the tables as a reader of the file sees them
        try:
            views.execute(_VIEWS)
            views.execute("CHECKPOINT")
        finally:
            views.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
        return int(count)

    def _previous_segments(self, con: duckdb.DuckDBPyConnection) -> datetime | None:
        """`clv_next.previous_segments` from the snapshot about to be replaced (the file at the
        published path, whoever put it there); returns when that one was written, None when
        there is none."""
        con.execute("CREATE TABLE clv_next.previous_segments (customer_id VARCHAR, segment VARCHAR)")
        if not self.path.exists():
            return None
        con.execute("ATTACH ? AS clv_replaced (READ_ONLY)", [str(self.path)])
        try:
            con.execute(
                "INSERT INTO clv_next.previous_segments SELECT customer_id, segment FROM clv_replaced.customer_scores"
            )
            dated = one(
                con.execute(  # the earliest sinks did not write it
                    "SELECT count(*) FROM information_schema.columns WHERE table_catalog = 'clv_replaced' "
                    "AND table_name = 'snapshot_meta' AND column_name = 'snapshot_at'"
                )
            )[0]
            return one(con.execute("SELECT snapshot_at FROM clv_replaced.snapshot_meta"))[0] if dated else None
        finally:
            con.execute("DETACH clv_replaced")

    def close(self) -> None:
        """Drop the working file: the published snapshot is what a restart starts from."""
        if self.con is not None:
            self.con.close()
            self.con = None
        work = working_path(self.path)
        for leftover in (work, work.with_name(work.name + ".wal")):
            leftover.unlink(missing_ok=True)

    def _con(self) -> duckdb.DuckDBPyConnection:
        if self.con is None:
            raise RuntimeError("Snapshots.open() first")
        return self.con


def remove_leftovers(path: Path) -> list[Path]:
    """Temporary files of a sink that died mid-write: never published, safe to delete."""
    gone = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone
