"""The questions analysts ask of a snapshot, for `clv query`, `clv export`, the API and the
dashboard.

A `Snapshot` keeps the published file open read-only (attached to a private in-memory DuckDB,
file access and configuration changes disabled) and answers each question on a cursor of it: one
per thread, or one of its own for a streamed export. It opens the file again only when the sink
has replaced it (the sink renames a new file over the path: a new inode and modification time),
and closes the previous one when its last reader is done, so a question is always answered from
one whole snapshot, never a mix of two. A snapshot never changes once published, so the answers to
the questions asked over and over (tables per segment, tier, cluster or country, insights, top
lists) are kept with the open file and answered again without DuckDB until the file is replaced;
a customer lookup reads every customer's row from memory (`CustomerRows`, built once per snapshot
by the first lookup that needs it: a DuckDB query costs about 0.3 ms before it reads a row). Free
SQL (`sql`) runs on a connection of its own, opened read-only for that query, so nothing sent
through it can write, attach, read files or re-enable either, and it can be stopped from another
thread.

P(horizon spend >= T) for a threshold T the analyst picks (`Selection.at_least`, a lookup's
`at_least`) is computed with numpy from the predictive distribution the snapshot keeps per customer
(`customer_distribution`, `features.distribution.SpendDistribution`): no model is needed. A
customer the snapshot holds no distribution for (written without a model, or its state and score
not yet in step) has it "not known": None (an empty CSV field), and a `min_probability` filter
leaves it out, since it cannot say it holds.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Generator, Hashable, Iterator, Literal, Mapping, NamedTuple, TypeVar

import duckdb
import numpy as np
import pandas as pd

from features.distribution import SpendDistribution, at_least_column
from features.segments import PLAYBOOKS, SEGMENTS, Playbook
from state.snapshot import insights
from state.snapshot.insights import one
from state.snapshot.tables import TIERS

MAX_SQL_ROWS = 10_000
# Per open snapshot, shared by its readers.
READ_CONFIG: dict[str, str | bool | int | float | list[str]] = {"threads": 2, "memory_limit": "1GB"}
KEPT_ANSWERS = 256  # answers kept per open snapshot, the least recently asked dropped first
KEPT_ROWS = 1_000  # larger answers are read again each time
T = TypeVar("T")
# What a terminal shows of a top list; JSON and exports carry every column.
TOP_COLUMNS = ["customer_id", "clv", "p_purchase", "segment", "value_tier", "frequency", "recency_days", "total_spend"]
# The segment and tier tables' columns as the demo and the dashboard's Overview show them: each
# total with its 80% range.
SEGMENT_COLUMNS = [
    "segment",
    "customers",
    "share_of_customers",
    "total_clv",
    "total_clv_low",
    "total_clv_high",
    "mean_clv",
    "share_of_value",
    "mean_p_purchase",
]
TIER_COLUMNS = [
    "value_tier",
    "customers",
    "min_clv",
    "max_clv",
    "total_clv",
    "total_clv_low",
    "total_clv_high",
    "share_of_value",
]


class QueryError(ValueError):
    """A refused or failed query, or no snapshot yet: shown to the user as one line."""


class SnapshotUnavailable(QueryError):
    """No snapshot yet, or one that cannot be opened: the server's state, not the question's fault."""


class QueryStopped(QueryError):
    """A query stopped from another thread (its deadline passed, its client left, shutdown)."""


class Interrupt:
    """Lets another thread stop the query a call is running: DuckDB's `interrupt()` on its
    connection. It stops only a query already executing, so callers repeat it until the call
    returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None

    def attach(self, con: duckdb.DuckDBPyConnection | None) -> None:
        with self._lock:  # never interrupt a connection being closed
            self._con = con

    def __call__(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.interrupt()


class SqlAnswer(NamedTuple):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool  # more rows than the limit; only the first `limit` are in `rows`


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def _dicts(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [{c: _plain(v) for c, v in zip(cols, row)} for row in cur.fetchall()]


def _explained(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """The customers whose drivers the snapshot carries (none in a snapshot of an earlier sink)."""
    if not insights.has(con, "customer_drivers"):
        return frozenset()
    return frozenset(c for (c,) in con.execute("SELECT DISTINCT customer_id FROM customer_drivers").fetchall())


def _summary(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """`snapshot_meta` and the totals of `customer_scores`."""
    cur = con.execute("SELECT * FROM snapshot_meta")
    cols = [d[0] for d in cur.description]
    meta = dict(zip(cols, one(cur)))
    totals = one(con.execute("SELECT count(*), sum(clv), avg(clv), avg(p_purchase) FROM customer_scores"))
    out = {k: _plain(v) for k, v in meta.items()}
    out["offsets"] = {str(k): v for k, v in (meta["offsets"] or {}).items()}
    out.update(
        rows=totals[0], total_clv=_plain(totals[1]), mean_clv=_plain(totals[2]), mean_p_purchase=_plain(totals[3])
    )
    return out


@dataclass(frozen=True)
class Selection:
    """Which customers a top list or an export covers: every filter must hold. `segments` may
    name segments and value tiers (a customer in any of the segments named, and in any of the
    tiers named); `clusters` behavioral clusters; then minimum frequency and expected CLV;
    `countries` countries ("" where unknown). `at_least` adds each customer's P(horizon spend
    >= at_least); `min_probability` (with `at_least`) keeps the customers for whom it is at least
    that."""

    segments: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    min_frequency: int = 0
    min_clv: float | None = None
    countries: tuple[str, ...] = ()
    at_least: float | None = None
    min_probability: float | None = None


# The distribution's parameters beside a customer's row (`_DISTRIBUTION`), dropped once read.
_PARAMETERS = ("dist_p", "dist_weights", "dist_mu", "dist_sigma")


def _distribution(con: duckdb.DuckDBPyConnection) -> str:
    """What joins each customer's distribution parameters to its row (NULL where none: every
    customer of a snapshot written before distributions were kept)."""
    if insights.has(con, "customer_distribution"):
        return (
            " LEFT JOIN (SELECT customer_id, p AS dist_p, weights AS dist_weights, mu AS dist_mu, "
            "sigma AS dist_sigma FROM customer_distribution) USING (customer_id)"
        )
    return (
        ", (SELECT NULL::DOUBLE AS dist_p, NULL::DOUBLE[] AS dist_weights, NULL::DOUBLE[] AS dist_mu, "
        "NULL::DOUBLE[] AS dist_sigma)"
    )


def prob_at_least(frame: pd.DataFrame, threshold: float) -> np.ndarray:
    """P(horizon spend >= threshold) per row of `frame` (its `dist_*` parameters); NaN where the
    snapshot holds no distribution. Customers scored by models of different ensemble sizes are
    computed a size at a time."""
    out = np.full(len(frame), np.nan)
    known = frame["dist_p"].notna().to_numpy()
    if not known.any():
        return out
    rows = np.flatnonzero(known)
    sizes = np.array([len(w) for w in frame["dist_weights"].to_numpy()[rows]])
    for size in np.unique(sizes):
        at = rows[sizes == size]
        dist = SpendDistribution(
            frame["dist_p"].to_numpy(np.float64)[at],
            *(np.stack(frame[name].to_numpy()[at]).astype(np.float64) for name in _PARAMETERS[1:]),
        )
        out[at] = dist.prob_at_least(threshold)
    return out


def _likely(frame: pd.DataFrame, sel: Selection, column: str) -> pd.DataFrame:
    """The rows with P(spend >= sel.at_least) as `column`, those under `sel.min_probability` left
    out, the distribution parameters dropped."""
    p = prob_at_least(frame, sel.at_least if sel.at_least is not None else 0.0)
    out = frame.drop(columns=list(_PARAMETERS)).assign(**{column: p})
    if sel.min_probability is not None:
        out = out[p >= sel.min_probability]  # NaN (not known) fails: it cannot be said to hold
    return out


def stamp(path: Path) -> tuple[int, int, int] | None:
    """Identifies one published file: the sink replaces the snapshot whole, so a new one has a
    new inode and modification time. None when there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class CustomerRows:
    """Every customer's row of one snapshot, held as an Arrow table (about 19 MB per 100,000
    customers) with each id's position, and the drivers the snapshot carries (its top
    customers'): a lookup in about 0.1 ms instead of DuckDB queries, and without I/O, so the API
    answers it on its event loop. The rows come from the same queries a lookup would run, so
    they are the same values."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.table = con.sql("SELECT * FROM customer_scores").to_arrow_table()
        self.position = {c: i for i, c in enumerate(self.table.column("customer_id").to_pylist())}
        self.drivers: dict[str, list[dict[str, Any]]] = {}
        if insights.has(con, "customer_drivers"):
            for d in _dicts(con, "SELECT * FROM customer_drivers ORDER BY customer_id, position"):
                self.drivers.setdefault(d["customer_id"], []).append(d)

    def get(self, customer_id: str) -> dict[str, Any] | None:
        """The customer's row with its `drivers` (None when the snapshot carries none for it)."""
        i = self.position.get(customer_id)
        if i is None:
            return None
        row = {c: _plain(v) for c, v in self.table.slice(i, 1).to_pylist()[0].items()}
        return _with_drivers(row, self.drivers.get(customer_id, []))


def _with_drivers(row: dict[str, Any], drivers: list[dict[str, Any]]) -> dict[str, Any]:
    row["drivers"] = (
        None
        if not drivers
        else {
            "reference_clv": drivers[0]["reference_clv"],
            "clv": row["clv"],
            "drivers": [
                {"group": d["driver"], "contribution": d["contribution"], "meaning": d["meaning"]} for d in drivers
            ],
        }
    )
    return row


class _Opened:
    """One published file, attached read-only to a private in-memory DuckDB (DuckDB shares one
    database per path among the connections of a process, which would keep serving a replaced
    file to a new connection while an old one is open: an attached file is this object's own)."""

    def __init__(self, path: Path, file_stamp: tuple[int, int, int]) -> None:
        self.stamp = file_stamp  # taken before attaching: at worst a newer file under an older stamp
        self.con = duckdb.connect(":memory:", config=READ_CONFIG)
        try:
            self.con.execute("ATTACH ? AS snapshot (READ_ONLY)", [str(path)])
            self.con.execute("USE snapshot")
            self.con.execute("SET enable_external_access = false")
            self.con.execute("SET lock_configuration = true")
        except duckdb.Error:
            self.con.close()
            raise
        self.readers = 0
        self.replaced = False
        self.local = threading.local()
        self.answers: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.rows: CustomerRows | None = None
        self.building_rows = threading.Lock()

    def customer_rows(self) -> CustomerRows | None:
        """The rows in memory; built by the first caller, while the others read through DuckDB
        (None) rather than wait."""
        if self.rows is None and self.building_rows.acquire(blocking=False):
            try:
                if self.rows is None:
                    self.rows = CustomerRows(self.thread_cursor())
            finally:
                self.building_rows.release()
        return self.rows

    def answer(self, key: Hashable, compute: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """`compute`'s answer on this thread's cursor, kept for the next asker when small; kept
        answers are shared, so callers must not change them."""
        with self.lock:
            if key in self.answers:
                self.answers.move_to_end(key)
                return self.answers[key]
        value = compute(self.thread_cursor())
        if not isinstance(value, list) or len(value) <= KEPT_ROWS:
            with self.lock:
                self.answers[key] = value
                while len(self.answers) > KEPT_ANSWERS:
                    self.answers.popitem(last=False)
        return value

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return _snapshot_cursor(self.con)

    def thread_cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (a DuckDB connection is used by one thread at a time)."""
        cur = getattr(self.local, "cursor", None)
        if cur is None:
            cur = self.local.cursor = self.cursor()
        return cur


def _snapshot_cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of its own on the attached snapshot. A read that stops before its last row needs
    one: its unfinished result would make the next question on a shared cursor fail (DuckDB
    refuses a relation while an execute() result is pending)."""
    cur = con.cursor()
    cur.execute("USE snapshot")
    return cur


class Snapshot:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._open: _Opened | None = None

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own on the file, read-only: for free SQL."""
        try:
            return duckdb.connect(
                str(self.path),
                read_only=True,
                config={"enable_external_access": False, "lock_configuration": True, **READ_CONFIG},
            )
        except duckdb.IOException as exc:
            if not self.path.exists():
                raise self._missing() from None
            raise SnapshotUnavailable(f"cannot open {self.path}: {exc}") from None

    def _missing(self) -> SnapshotUnavailable:
        return SnapshotUnavailable(f"no snapshot at {self.path} yet: is `clv snapshot` running?")

    def _acquire(self) -> _Opened:
        """The open snapshot, opened anew when the file was replaced; counted as read."""
        now = stamp(self.path)
        with self._lock:
            held = self._open
            if held is None or held.stamp != now:
                if now is None:
                    raise self._missing()
                try:
                    opened = _Opened(self.path, now)
                except duckdb.Error as exc:
                    if not self.path.exists():
                        raise self._missing() from None
                    raise SnapshotUnavailable(f"cannot open {self.path}: {str(exc).splitlines()[0]}") from None
                if held is not None:
                    held.replaced = True
                    if held.readers == 0:
                        held.con.close()
                self._open = held = opened
            held.readers += 1
            return held

    def _release(self, opened: _Opened) -> None:
        with self._lock:
            opened.readers -= 1
            if opened.replaced and opened.readers == 0:
                opened.con.close()  # its last reader is done: the replaced file is let go

    @contextmanager
    def reading(self, own_cursor: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor on one snapshot for the questions of one call: this thread's, or with
        `own_cursor` one of its own (for a reader that moves between threads, as a streamed
        export does)."""
        opened = self._acquire()
        try:
            cur = opened.cursor() if own_cursor else opened.thread_cursor()
            try:
                yield cur
            finally:
                if own_cursor:
                    cur.close()
        finally:
            self._release(opened)

    def close(self) -> None:
        """Let the open file go (readers still on it finish first)."""
        with self._lock:
            held, self._open = self._open, None
            if held is not None:
                held.replaced = True
                if held.readers == 0:
                    held.con.close()

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self.reading() as con:
            return _dicts(con, sql, params)

    def _kept(self, key: Hashable, compute: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """The answer to a question asked before of the same snapshot, else `compute`'s."""
        opened = self._acquire()
        try:
            return opened.answer(key, compute)
        finally:
            self._release(opened)

    def _kept_rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return self._kept((sql, *(params or ())), lambda con: _dicts(con, sql, params))

    @staticmethod
    def _filter(sel: Selection) -> tuple[str, list[Any]]:
        conds: list[str] = []
        params: list[Any] = []
        if sel.at_least is not None and not (math.isfinite(sel.at_least) and sel.at_least >= 0):
            raise QueryError(f"at_least must be a dollar amount of 0 or more, got {sel.at_least}")
        if sel.min_probability is not None:
            if sel.at_least is None:
                raise QueryError("min_probability needs at_least: the probability of spending at least what?")
            if not 0 <= sel.min_probability <= 1:
                raise QueryError(f"min_probability must be between 0 and 1, got {sel.min_probability}")
        for name in sel.segments:
            if name not in SEGMENTS and name not in TIERS:
                raise QueryError(
                    f"unknown segment {name!r}; segments: {', '.join(SEGMENTS)}; value tiers: {', '.join(TIERS)}"
                )
        for column, names in (
            ("segment", [n for n in sel.segments if n in SEGMENTS]),
            ("value_tier", [n for n in sel.segments if n in TIERS]),
            ("cluster", list(sel.clusters)),
            ("country", list(sel.countries)),
        ):
            if names:
                conds.append(f"{column} IN ({', '.join('?' * len(names))})")
                params += names
        if sel.min_frequency:
            conds.append("frequency >= ?")
            params.append(sel.min_frequency)
        if sel.min_clv is not None:
            conds.append("clv >= ?")
            params.append(sel.min_clv)
        return (" WHERE " + " AND ".join(conds) if conds else ""), params

    def top(self, n: int = 20, sel: Selection = Selection()) -> list[dict[str, Any]]:
        """The `n` customers of the highest clv the selection keeps; with `sel.at_least`, each
        with `p_at_least`, P(horizon spend >= at_least) (None: not known)."""
        if n <= 0:
            raise QueryError(f"n must be positive, got {n}")
        where, params = self._filter(sel)
        if sel.at_least is None:
            return self._kept_rows(
                f"SELECT * FROM customer_scores{where} ORDER BY clv DESC, customer_id LIMIT ?", [*params, n]
            )

        def read(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            kept: list[pd.DataFrame] = []
            with closing(_snapshot_cursor(con)) as own:  # stopped early: not on the thread's cursor
                cur = own.execute(*self._export_query(sel, own))
                while sum(map(len, kept)) < n and not (chunk := cur.fetch_df_chunk(1)).empty:
                    kept.append(_likely(chunk, sel, "p_at_least"))  # best first: stop once n are kept
            frame = pd.concat(kept).head(n) if kept else pd.DataFrame()
            return [{c: _plain(v) for c, v in row.items()} for row in frame.to_dict("records")]

        return self._kept(("top", n, sel), read)

    def segments(self) -> list[dict[str, Any]]:
        return self._kept_rows("SELECT * FROM segment_summary")

    def tiers(self) -> list[dict[str, Any]]:
        return self._kept_rows("SELECT * FROM tier_summary")

    def countries(self) -> list[str]:
        """The countries of the customers whose country is known, for a filter to offer."""
        return [
            r["country"]
            for r in self._kept_rows(
                "SELECT DISTINCT country FROM customer_scores WHERE country <> '' ORDER BY country"
            )
        ]

    def by_country(self) -> list[dict[str, Any]]:
        """Per country ("" where unknown): customers, expected value and its share, spend so far."""
        return self._kept_rows("SELECT * FROM country_summary")

    def moves(self) -> list[dict[str, Any]]:
        """Customers per (previous segment, segment) since the previous snapshot: `from_segment`
        None for new customers, `to_segment` None for those gone; empty for a first snapshot."""

        def read(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            if (
                not insights.has(con, "segment_moves")
                or one(con.execute("SELECT previous_snapshot_at IS NULL FROM snapshot_meta"))[0]
            ):
                return []
            return _dicts(con, "SELECT * FROM segment_moves")

        return self._kept("moves", read)

    def insights(self) -> list[dict[str, Any]]:
        """The written insights (`state.snapshot.insights`), each `key`, `text`, `value`."""
        return self._kept("insights", lambda con: [asdict(i) for i in insights.compute(con)])

    def clusters(self) -> list[dict[str, Any]]:
        """Per behavioral cluster: customers, value, mean RFM fields, most common segment."""
        return self._kept_rows("SELECT * FROM cluster_summary")

    def held_customer(self, customer_id: str) -> dict[str, Any] | None | Literal[False]:
        """`customer` without I/O when the current snapshot's rows are in memory (what the API
        answers on its event loop); False when they are not (ask `customer`)."""
        opened = self._open
        if opened is None or opened.rows is None or opened.stamp != stamp(self.path):
            return False
        return opened.rows.get(customer_id)

    def customer(self, customer_id: str, at_least: float | None = None) -> dict[str, Any] | None:
        """The customer's row, with `drivers`: how its score adds up from the model's average
        customer when the snapshot carries them (its top customers), else None; with `at_least`,
        also `at_least` and `p_at_least`, P(horizon spend >= at_least), None when not known."""
        self._filter(Selection(at_least=at_least))  # a threshold that is no amount is refused
        opened = self._acquire()
        try:
            con = opened.thread_cursor()
            held = opened.customer_rows()
            if held is not None:
                row = held.get(customer_id)
            else:
                found = _dicts(con, "SELECT * FROM customer_scores WHERE customer_id = ?", [customer_id])
                explained = opened.answer("explained customers", _explained)
                drivers = (
                    _dicts(con, "SELECT * FROM customer_drivers WHERE customer_id = ? ORDER BY position", [customer_id])
                    if found and customer_id in explained
                    else []
                )
                row = _with_drivers(found[0], drivers) if found else None
            if row is not None and at_least is not None:
                params = con.execute(
                    f"SELECT {', '.join(_PARAMETERS)} FROM (SELECT ? AS customer_id){_distribution(con)}",
                    [customer_id],
                ).df()
                row.update(at_least=at_least, p_at_least=_plain(float(prob_at_least(params, at_least)[0])))
        finally:
            self._release(opened)
        return row

    def summary(self) -> dict[str, Any]:
        return self._kept("summary", _summary)

    def sql(self, text: str, limit: int = MAX_SQL_ROWS, interrupt: Interrupt | None = None) -> SqlAnswer:
        """Any read-only SQL; writes, file access and settings changes are refused by DuckDB.
        Rows are streamed from DuckDB, so a huge result costs only the `limit` rows kept."""
        interrupt = interrupt or Interrupt()
        con = self.connect()
        interrupt.attach(con)
        try:
            cur = con.execute(text)
            if cur is None:  # DuckDB's answer to text that is only comments
                raise QueryError("query refused: the SQL text holds no statement")
            if cur.description is None:
                return SqlAnswer([], [], False)
            rows = cur.fetchmany(limit + 1)
            return SqlAnswer(
                [d[0] for d in cur.description], [[_plain(v) for v in row] for row in rows[:limit]], len(rows) > limit
            )
        except duckdb.InterruptException:
            raise QueryStopped("query stopped before it finished") from None
        except duckdb.Error as exc:
            raise QueryError(f"query refused: {str(exc).splitlines()[0]}") from None
        finally:
            interrupt.attach(None)
            con.close()

    def _export_query(self, sel: Selection, con: duckdb.DuckDBPyConnection | None = None) -> tuple[str, list[Any]]:
        """The selection's rows, best first; with `at_least` (then `con` is given), each with its
        distribution's parameters (`_PARAMETERS`) for `_likely`."""
        where, params = self._filter(sel)
        joined = _distribution(con) if con is not None and sel.at_least is not None else ""
        return f"SELECT * FROM customer_scores{joined}{where} ORDER BY clv DESC, customer_id", params

    def frame(self, sel: Selection = Selection()) -> pd.DataFrame:
        """The export's rows, best first: `clv export`, the API's and the dashboard's downloads;
        with `sel.at_least`, P(spend >= at_least) as `p_at_least_<at_least>` (`clv score
        --at-least`'s column), empty where not known."""
        with self.reading() as con:
            frame = con.execute(*self._export_query(sel, con)).df()
        if sel.at_least is None:
            return frame
        return _likely(frame, sel, at_least_column(sel.at_least)).reset_index(drop=True)

    def csv_chunks(self, sel: Selection = Selection(), vectors: int = 25) -> Generator[tuple[str, int], None, None]:
        """The export as (CSV text, rows in it), header first, read from DuckDB `vectors` x 2,048
        rows at a time, so an export over HTTP never holds the whole snapshot in memory. Its own
        cursor stays on the snapshot it started on until the iterator ends or is closed."""
        with self.reading(own_cursor=True) as con:
            cur = con.execute(*self._export_query(sel, con))
            header = True
            while not (frame := cur.fetch_df_chunk(vectors)).empty or header:
                if sel.at_least is not None:
                    frame = _likely(frame, sel, at_least_column(sel.at_least))
                yield frame.to_csv(index=False, header=header), len(frame)
                header = False


def render_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as an aligned text table for terminals, money and rates with two decimals, shares
    (`share_*` columns) as percentages."""
    if not rows:
        return "(no rows)"
    frame = pd.DataFrame(rows, columns=columns or list(rows[0]))
    for c in frame.columns:
        if c.startswith("share_"):  # shares as the playbooks and the dashboard write them
            frame[c] = frame[c].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.1%}")
    return frame.to_string(index=False, float_format=lambda v: f"{v:,.2f}")


# What a segment's or tier's range of its total assumes, said wherever the range is shown.
RANGE_NOTE = (
    "The 80% range of each total treats customers as independent of one another; a season or a "
    "shock moves them together, so the true range is wider."
)


def render_totals(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A segment or tier table; where it shows the range of each total (`total_clv_low`,
    `total_clv_high`), `RANGE_NOTE` under it."""
    table = render_table(rows, columns)
    shown = columns if columns is not None else list(rows[0]) if rows else []
    return f"{table}\n{RANGE_NOTE}" if "total_clv_low" in shown else table


def render_segments(
    rows: list[dict[str, Any]], columns: list[str] | None = None, who: Mapping[str, str] | None = None
) -> str:
    """The segment table, then the playbook of each segment shown, one line each: too long for
    table columns. `who`: the rules as a model applies them (`features.segments.described_rules`)
    in place of the playbooks' general words."""
    text = {f.name for f in fields(Playbook)}
    table = render_totals(rows, [c for c in columns or (rows[0] if rows else ()) if c not in text])
    shown = {r["segment"] for r in rows}
    books = []
    for name, book in PLAYBOOKS.items():
        if name in shown:
            words = {f.name: getattr(book, f.name) for f in fields(Playbook)}
            words["who"] = (who or {}).get(name, book.who)
            books += [f"  {name}", *(f"    {k.replace('_', ' ')}: {v}" for k, v in words.items())]
    return "\n".join([table, "", "Playbooks", *books] if books else [table])


def csv_text(frame: pd.DataFrame) -> str:
    """An export frame as the CSV `clv export` writes: the dashboard's download is this too."""
    return frame.to_csv(index=False)


def export(snap: Snapshot, out: Path, sel: Selection = Selection()) -> int:
    """CSV or Parquet by the file's extension; returns rows written."""
    frame = snap.frame(sel)
    suffix = out.suffix.lower()
    if suffix == ".csv":
        out.write_text(csv_text(frame))
    elif suffix == ".parquet":
        duckdb.connect().from_df(frame).write_parquet(str(out))
    else:
        raise QueryError(f"--out must end in .csv or .parquet, got {out.name!r}")
    return len(frame)
