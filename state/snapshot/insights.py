"""Written insights over one snapshot: each a sentence an analyst can repeat, with its number.

Every number is read with SQL from the snapshot's own tables and views on one connection (so all
of them describe the same snapshot), and each `Insight` carries its headline number beside the
sentence, so a reader can check the one against the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import duckdb


def first(cursor: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """A query's first row, its result read to the end: a result left pending on a cursor makes
    the next question asked on it fail (the API's readers share one cursor per thread)."""
    rows = cursor.fetchall()
    return rows[0] if rows else None


def one(cursor: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
    """The row a query that always answers one (an aggregate, the one-row meta table) answered."""
    row = first(cursor)
    if row is None:
        raise LookupError("the snapshot query answered no row")
    return row


@dataclass(frozen=True)
class Insight:
    """One finding: `key` names what it measures, `value` is the number the sentence leads with
    (a share in [0, 1], a count of customers or dollars)."""

    key: str
    text: str
    value: float


def has(con: duckdb.DuckDBPyConnection, name: str, catalog: str | None = None) -> bool:
    """The snapshot (the database `catalog` when given) has this table or view: those written
    before it existed lack it."""
    sql = "SELECT count(*) FROM information_schema.tables WHERE table_name = ?"
    params = [name]
    if catalog is not None:
        sql += " AND table_catalog = ?"
        params.append(catalog)
    return bool(one(con.execute(sql, params))[0])


def compute(con: duckdb.DuckDBPyConnection) -> list[Insight]:
    """The insights the snapshot supports: the segment holding most value for its size, the
    top 10%'s share, expected buyers, loyal customers at risk, value by country (when
    countries are known) and movement between segments since the previous snapshot (when
    there is one)."""
    n, total, buyers, horizon = one(
        con.execute("SELECT count(*), sum(clv), sum(p_purchase), max(horizon_months) FROM customer_scores")
    )
    if not n or not total:
        return []
    out: list[Insight] = []
    # The segment whose share of the value most exceeds its share of the customers.
    segment, customers, share = one(
        con.execute(
            "SELECT segment, customers, share_of_value FROM segment_summary "
            "ORDER BY share_of_value - customers / ? DESC, segment LIMIT 1",
            [n],
        )
    )
    out.append(
        Insight(
            "segment_concentration",
            f"The {segment} segment, {customers / n:.1%} of customers ({customers:,}), "
            f"holds {share:.1%} of the expected value.",
            share,
        )
    )
    top = math.ceil(n / 10)
    top_value = one(
        con.execute("SELECT sum(clv) FROM (SELECT clv FROM customer_scores ORDER BY clv DESC LIMIT ?)", [top])
    )[0]
    out.append(
        Insight(
            "top_decile_share",
            f"The top 10% of customers ({top:,}) hold {top_value / total:.1%} of the "
            f"expected value, ${top_value:,.0f} of ${total:,.0f}.",
            top_value / total,
        )
    )
    out.append(
        Insight(
            "expected_buyers",
            f"{buyers:,.0f} customers ({buyers / n:.1%}) are expected to buy at least once "
            f"in the next {horizon} months (the sum of p_purchase).",
            buyers,
        )
    )
    at_risk, at_risk_value = one(
        con.execute("SELECT count(*), coalesce(sum(clv), 0) FROM customer_scores WHERE segment = 'at_risk_loyal'")
    )
    if at_risk:
        out.append(
            Insight(
                "at_risk_loyal",
                f"{at_risk:,} loyal customers are slipping away (at_risk_loyal), with "
                f"${at_risk_value:,.0f} of expected value to win back.",
                at_risk,
            )
        )
    known = (
        first(
            con.execute(
                "SELECT country, share_of_value, (SELECT count(*) FROM country_summary "
                "WHERE country <> '') FROM country_summary WHERE country <> '' "
                "ORDER BY total_clv DESC, country LIMIT 1"
            )
        )
        if has(con, "country_summary")
        else None
    )
    if known:
        country, country_share, countries = known
        out.append(
            Insight(
                "country_share",
                f"{country} holds {country_share:.1%} of the expected value, of {countries:,} countries.",
                country_share,
            )
        )
    moved = movement(con)
    if moved:
        out.append(moved)
    return out


def movement(con: duckdb.DuckDBPyConnection) -> Insight | None:
    """Customers whose segment differs from the previous snapshot's, with the largest single
    move; None for a first snapshot (nothing to compare) or one written before the sink kept
    the previous segments."""
    if not has(con, "segment_moves"):
        return None
    previous_at = one(con.execute("SELECT previous_snapshot_at FROM snapshot_meta"))[0]
    if previous_at is None:
        return None
    changed, new = one(
        con.execute(
            "SELECT coalesce(sum(customers) FILTER (WHERE from_segment <> to_segment), 0), "
            "coalesce(sum(customers) FILTER (WHERE from_segment IS NULL), 0) FROM segment_moves"
        )
    )
    when = (
        previous_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(previous_at, datetime)
        else str(previous_at)
    )
    text = f"{changed:,} customers changed segment since the previous snapshot ({when})"
    if changed:
        src, dst, k = one(
            con.execute(
                "SELECT from_segment, to_segment, customers FROM segment_moves "
                "WHERE from_segment <> to_segment ORDER BY customers DESC, from_segment, to_segment "
                "LIMIT 1"
            )
        )
        text += f"; the largest move: {k:,} from {src} to {dst}"
    text += f"; new since then: {new:,}." if new else "."
    return Insight("segment_changes", text, changed)
