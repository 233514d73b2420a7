"""The Streamlit page `clv dashboard` serves: one DuckDB snapshot, read-only like every reader
(state.snapshot.queries), re-read whenever the sink swaps in a new one.

Tabs follow the questions analysts ask: Overview (KPI cards, written insights, value by segment
and by country), Segments (summary, playbooks, tiers, movement since the previous snapshot),
Customers (filters, top-N, download, lookup), Clusters, Model (card, evaluation, training run).
Every figure comes from the snapshot's own tables and views (segment_summary, tier_summary,
cluster_summary, country_summary, segment_moves, snapshot_meta) and the insights from
`state.snapshot.insights`; the filtered table and its download from the same query `clv export`
runs, so what the page shows and what an analyst exports agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from export_onnx.runtime import META_FILE, shipped_model_dir
from features import population
from features.distribution import INTERVAL_FIT, at_least_column
from features.segments import PLAYBOOKS, SEGMENTS, Playbook, described_rules
from state.snapshot.queries import RANGE_NOTE, SEGMENT_COLUMNS, TIER_COLUMNS, QueryError, Selection, Snapshot, csv_text
from state.snapshot.tables import TIERS

REFRESH_S = 3.0  # how often the page looks for a new snapshot
SCATTER_POINTS = 5000  # scatter plots draw a seeded sample above this
TOP_N_MAX = 500
TABS = ("Overview", "Segments and playbooks", "Customers", "Clusters", "Model")
# Long KPI values (times, model versions) wrap in smaller type instead of being cut off.
CSS = """<style>
.st-key-kpi-small [data-testid="stMetricValue"], .st-key-kpi-small [data-testid="stMetricValue"] * {
  font-size: 1.2rem; white-space: normal !important; overflow-wrap: anywhere; text-overflow: clip; }
</style>"""


def _args() -> argparse.Namespace:
    """What `clv dashboard` passes after Streamlit's own options."""
    p = argparse.ArgumentParser(prog="clv dashboard")
    p.add_argument("--snapshot", required=True)
    p.add_argument("--model", default=None)
    return p.parse_args(sys.argv[1:])


def stamp(path: Path) -> tuple[int, int] | None:
    """Identifies one published snapshot: the sink replaces the file whole, so a new one has a
    new modification time (and inode)."""
    try:
        st_ = os.stat(path)
    except FileNotFoundError:
        return None
    return st_.st_mtime_ns, st_.st_ino


@st.cache_resource(show_spinner=False)
def reader(path: str) -> Snapshot:
    """One reader of the snapshot for every session: it holds the file open and follows the
    sink's swaps (state.snapshot.queries)."""
    return Snapshot(path)


@st.cache_data(show_spinner=False, max_entries=2)
def load(path: str, snap_stamp: tuple[int, int]) -> dict[str, Any]:
    """Everything the page shows but the filtered list, read once per snapshot (`snap_stamp`
    keys the cache: a new snapshot is read anew)."""
    snap = reader(path)
    return {
        "customers": snap.frame(),
        "summary": snap.summary(),
        "segments": snap.segments(),
        "tiers": snap.tiers(),
        "clusters": snap.clusters(),
        "countries": snap.countries(),
        "by_country": snap.by_country(),
        "moves": snap.moves(),
        "insights": snap.insights(),
    }


@st.cache_data(show_spinner=False, max_entries=16)
def selected(path: str, snap_stamp: tuple[int, int], sel: Selection) -> pd.DataFrame:
    """The customers the filters select, best first: exactly `clv export`'s rows."""
    return reader(path).frame(sel)


@st.cache_data(show_spinner=False)
def model_meta(model: str | None, written: float) -> dict[str, Any]:
    """The artifact's metadata, read again when the file is rewritten (`written`)."""
    path = Path(model) if model else shipped_model_dir()
    return json.loads((path / META_FILE).read_text())


def money(v: float, cents: bool = False) -> str:
    """Dollars as the page writes them: whole for totals, cents for means and single customers."""
    return f"${v:,.2f}" if cents else f"${v:,.0f}"


def top_share(clv: pd.Series) -> float:
    """Share of the expected value held by the top 10% of customers (ceil(n / 10) of them)."""
    total = float(clv.sum())
    n = math.ceil(len(clv) / 10)
    return float(clv.sort_values(ascending=False).iloc[:n].sum()) / total if total else 0.0


def when(text: str | None) -> str:
    """An instant in UTC to the second: snapshot times are compared with the file's."""
    return pd.Timestamp(text).tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S UTC") if text else "-"


def shown(
    frame: pd.DataFrame,
    money_cols: tuple[str, ...] = (),
    share_cols: tuple[str, ...] = (),
    rate_cols: tuple[str, ...] = (),
) -> pd.DataFrame:
    """A table as text, money with two decimals and shares as percentages, for st.table."""
    out = frame.copy()
    for c in out.columns:
        if c in money_cols:
            out[c] = out[c].map(lambda v: money(v, cents=True))
        elif c in share_cols:
            out[c] = out[c].map(lambda v: f"{v:.1%}")
        elif c in rate_cols or out[c].dtype.kind == "f":
            out[c] = out[c].map(lambda v: f"{v:,.2f}")
    return out


def colours(field: str, names: list[str]) -> alt.Color:
    """One colour per segment (or cluster) in every chart of the page."""
    return alt.Color(f"{field}:N", scale=alt.Scale(domain=names), title=field)


def svg(chart: alt.Chart) -> alt.Chart:
    """Drawn as SVG, whose marks carry their values as labels: a reader (and a browser test)
    can read a bar's numbers off the page."""
    return chart.properties(usermeta={"embedOptions": {"renderer": "svg"}})


def kpis(data: dict[str, Any]) -> None:
    """The cards: counts and money from the whole snapshot, then when and by what it was scored."""
    s, frame = data["summary"], data["customers"]
    horizon = int(frame["horizon_months"].iloc[0]) if len(frame) else 0
    row1 = st.columns(4)
    row1[0].metric("Customers", f"{s['customers']:,}")
    row1[1].metric(
        f"Expected value, next {horizon} months",
        money(s["total_clv"] or 0.0),
        help="sum of every customer's expected spend over the horizon",
    )
    row1[2].metric("Mean CLV", money(s["mean_clv"] or 0.0, cents=True))
    row1[3].metric(
        "Top 10% share",
        f"{top_share(frame['clv']):.1%}",
        help="share of the expected value held by the top 10% of customers",
    )
    row2 = st.container(key="kpi-small").columns(4)
    row2[0].metric("Snapshot time", when(s["snapshot_at"]))
    row2[1].metric("Newest event time", when(s["newest_event_time"]))
    row2[2].metric("Model version", ", ".join(s["model_versions"] or ["-"]))
    row2[3].metric("Clusters", f"{frame['cluster'].nunique():,}")


def insights_list(data: dict[str, Any]) -> None:
    """The written insights, one sentence each with its number (state.snapshot.insights)."""
    st.subheader("What the snapshot says")
    with st.container(key="insights"):
        st.markdown("\n".join(f"- {i['text']}" for i in data["insights"]) or "- no customers yet")


def overview(data: dict[str, Any], drift: str | None) -> None:
    """The first look: whether the model knows customers like these (`drift_warning`), KPI
    cards, insights, where the value sits by segment and by country."""
    drift_banner(drift, "overview")
    kpis(data)
    insights_list(data)
    seg = pd.DataFrame(data["segments"])
    order = [s for s in SEGMENTS if s in set(seg["segment"])]
    left, right = st.columns(2)
    left.altair_chart(
        svg(
            alt.Chart(seg, title="Expected value by segment ($)")
            .mark_bar()
            .encode(
                x=alt.X("total_clv:Q", title=None),
                y=alt.Y("segment:N", sort=order, title=None),
                color=colours("segment", list(SEGMENTS)).legend(None),
                tooltip=[
                    "segment",
                    "customers",
                    alt.Tooltip("total_clv:Q", format="$,.0f"),
                    alt.Tooltip("share_of_value:Q", format=".1%"),
                ],
            )
        ),
        width="stretch",
    )
    left.markdown(f"**Value tiers** ({TIER_RULE})")
    left.table(
        shown(
            with_range(pd.DataFrame(data["tiers"])[TIER_COLUMNS]),
            money_cols=("min_clv", "max_clv", "total_clv"),
            share_cols=("share_of_value",),
        ),
        hide_index=True,
    )
    left.caption(RANGE_NOTE)
    countries = pd.DataFrame(data["by_country"])
    with right:
        if countries.empty or (countries["country"] == "").all():
            st.markdown("**Expected value by country**")
            st.caption(
                "No customer's transactions name a country (CDNOW has none), so value by "
                "country is not known for this snapshot."
            )
        else:
            country_charts(countries)


COUNTRIES_SHOWN = 10  # the rest are drawn together as "(other)"


def country_charts(countries: pd.DataFrame) -> None:
    """Expected value and revenue so far per country (country_summary), customers of unknown
    country as "(unknown)", the largest by expected value first."""
    frame = countries.assign(country=countries["country"].replace("", "(unknown)"))
    if len(frame) > COUNTRIES_SHOWN:
        rest = frame.iloc[COUNTRIES_SHOWN - 1 :]
        frame = pd.concat(
            [
                frame.iloc[: COUNTRIES_SHOWN - 1],
                pd.DataFrame(
                    [
                        {
                            "country": "(other)",
                            "customers": rest["customers"].sum(),
                            "total_clv": rest["total_clv"].sum(),
                            "share_of_value": rest["share_of_value"].sum(),
                            "total_spend": rest["total_spend"].sum(),
                        }
                    ]
                ),
            ]
        )
    order = list(frame["country"])
    for field, title in (
        ("total_clv", "Expected value by country ($)"),
        ("total_spend", "Revenue so far by country ($)"),
    ):
        st.altair_chart(
            svg(
                alt.Chart(frame, title=title)
                .mark_bar()
                .encode(
                    x=alt.X(f"{field}:Q", title=None),
                    y=alt.Y("country:N", sort=order, title=None),
                    tooltip=["country", alt.Tooltip(f"{field}:Q", format="$,.0f"), "customers"],
                )
            ),
            width="stretch",
        )


TIER_RULE = "terciles of this snapshot's expected CLV: a third of its customers each"
RANGE_COLUMN = "80% range of the total"


def with_range(frame: pd.DataFrame) -> pd.DataFrame:
    """A summary with the stated range of each total (`total_clv_low` to `total_clv_high`) as one
    column of text beside `total_clv`; "not known" where no customer of the group has an sd
    (scored before the interval existed)."""
    text = [
        f"{money(low)} – {money(high)}" if high > total else "not known"
        for low, high, total in zip(frame["total_clv_low"], frame["total_clv_high"], frame["total_clv"])
    ]
    out = frame.drop(columns=["total_clv_low", "total_clv_high"])
    out.insert(list(out.columns).index("total_clv") + 1, RANGE_COLUMN, text)
    return out


def segments(data: dict[str, Any], meta: dict[str, Any]) -> None:
    """segment_summary, its bars, the playbooks, the value tiers and the movement between
    segments since the previous snapshot: the whole snapshot."""
    seg = pd.DataFrame(data["segments"])
    st.table(
        shown(
            with_range(seg[[*SEGMENT_COLUMNS, "mean_recency_days", "mean_frequency"]]),
            money_cols=("total_clv", "mean_clv"),
            share_cols=("share_of_customers", "share_of_value"),
        ),
        hide_index=True,
    )
    st.caption(RANGE_NOTE)
    left, right = st.columns(2)
    order = [s for s in SEGMENTS if s in set(seg["segment"])]
    for col, field, title in (
        (left, "customers", "Customers per segment"),
        (right, "total_clv", "Expected value per segment ($)"),
    ):
        col.altair_chart(
            alt.Chart(seg, title=title)
            .mark_bar()
            .encode(
                x=alt.X(f"{field}:Q", title=None),
                y=alt.Y("segment:N", sort=order, title=None),
                color=colours("segment", list(SEGMENTS)).legend(None),
                tooltip=["segment", "customers", alt.Tooltip("total_clv:Q", format="$,.0f")],
            ),
            width="stretch",
        )
    playbooks(seg, meta)
    st.subheader(f"Value tiers ({TIER_RULE})")
    st.table(
        shown(
            with_range(pd.DataFrame(data["tiers"])),
            money_cols=("min_clv", "max_clv", "total_clv", "mean_clv"),
            share_cols=("share_of_value",),
        ),
        hide_index=True,
    )
    st.caption(RANGE_NOTE)
    movement(data)


def playbooks(seg: pd.DataFrame, meta: dict[str, Any]) -> None:
    """Per segment: who (the rule with this model's dollars, and the share of its training cohort
    it held: where the rule's numbers are true), its share of this snapshot, and what to do."""
    st.subheader("Playbooks")
    who = described_rules(meta)
    books = seg[["segment", "share_of_customers", *(f.name for f in fields(Playbook))]].assign(
        who=seg["segment"].map(lambda name: who.get(name, PLAYBOOKS[name].who)),
        share_of_customers=seg["share_of_customers"].map(lambda v: f"{v:.1%}"),
    )
    st.table(
        books.rename(columns={"share_of_customers": "share here"}).rename(columns=lambda c: c.replace("_", " ")),
        hide_index=True,
    )
    st.caption(
        f"who: each rule with this model's dollar thresholds, and the share of its training "
        f"cohort ({meta['cutoff'][:10]}) it held, where its numbers are true; share here: of "
        "this snapshot's customers, which differs when they are not that cohort (a part of "
        "it, a later date, or other customers: the drift check says when they are unlike it)"
    )


@st.cache_data(show_spinner=False, max_entries=4)
def drift_warning(path: str, snap_stamp: tuple[int, int], summary: dict[str, Any] | None) -> str | None:
    """The drift check (features.population) on the snapshot's customers, by what their scores
    carry (invoices, total spend, order value), against the model's training cohort (`summary`):
    the sentence the scorers warn with when they are unlike it, else None. Once per snapshot."""
    frame = load(path, snap_stamp)["customers"]
    if summary is None or frame.empty:
        return None
    return population.check(
        summary, population.from_scores(frame["frequency"].to_numpy(), frame["total_spend"].to_numpy())
    ).sentence()


def drift_banner(warning: str | None, where: str) -> None:
    """The drift warning as a banner (keyed `drift-WHERE`), nothing when there is none."""
    if warning:
        with st.container(key=f"drift-{where}"):
            st.warning(f"Drift: {warning}")


NEW, GONE = "(new)", "(gone)"


def movement(data: dict[str, Any]) -> None:
    """Customers per previous segment (rows) and current segment (columns), from the snapshot's
    own copy of the previous snapshot's segments (`segment_moves`)."""
    st.subheader("Movement between segments since the previous snapshot")
    moves = pd.DataFrame(data["moves"])
    if moves.empty:
        st.caption("This is the first snapshot the sink wrote: nothing to compare with yet.")
        return
    at = when(data["summary"].get("previous_snapshot_at"))
    changed = int(
        moves.loc[
            moves["from_segment"].notna()
            & moves["to_segment"].notna()
            & (moves["from_segment"] != moves["to_segment"]),
            "customers",
        ].sum()
    )
    st.caption(
        f"{changed:,} customers changed segment since the snapshot of {at}; rows: the "
        f"segment then ({NEW}: not in it), columns: the segment now ({GONE}: no longer in the snapshot)"
    )
    grid = moves.fillna({"from_segment": NEW, "to_segment": GONE}).pivot_table(
        index="from_segment", columns="to_segment", values="customers", aggfunc="sum", fill_value=0
    )
    names = [*SEGMENTS, NEW, GONE]
    grid = grid.reindex(index=[n for n in names if n in grid.index], columns=[n for n in names if n in grid.columns])
    grid.index.name = "from \\ to"
    st.table(grid.reset_index().astype({c: str for c in grid.columns}), hide_index=True)


def clusters(data: dict[str, Any], meta: dict[str, Any]) -> None:
    """cluster_summary, and how the model chose its clusters."""
    c = meta.get("clustering") or {}
    rows = pd.DataFrame(data["clusters"])
    rows = rows.assign(
        share_here=rows["customers"] / max(int(rows["customers"].sum()), 1),
        training_share=rows["cluster"].map(lambda name: c.get("profiles", {}).get(name, {}).get("share", float("nan"))),
    )
    rows = rows[
        [
            "cluster",
            "customers",
            "share_here",
            "training_share",
            "total_clv",
            "mean_clv",
            "share_of_value",
            "mean_recency_days",
            "mean_frequency",
            "mean_monetary",
            "main_segment",
        ]
    ]
    st.table(
        shown(
            rows,
            money_cols=("total_clv", "mean_clv", "mean_monetary"),
            share_cols=("share_here", "training_share", "share_of_value"),
        ),
        hide_index=True,
    )
    st.altair_chart(
        alt.Chart(rows, title="Customers and expected value per cluster")
        .mark_circle()
        .encode(
            x=alt.X("customers:Q"),
            y=alt.Y("mean_clv:Q", title="mean expected CLV ($)"),
            size=alt.Size("total_clv:Q", legend=None),
            color=colours("cluster", sorted(rows["cluster"])),
            tooltip=["cluster", "customers", alt.Tooltip("total_clv:Q", format="$,.0f"), "main_segment"],
        ),
        width="stretch",
    )
    if c:
        st.caption(
            f"{c['method']} with k = {c['k']}, chosen by silhouette among K-means, a Gaussian "
            "mixture and Ward on the model's training cohort (training share: each cluster's "
            "share of that cohort); features: " + ", ".join(c["features"]) + ". A customer belongs "
            "to the nearest centroid of the standardized features."
        )


def filters(data: dict[str, Any], horizon: int) -> tuple[Selection, int, str]:
    """The filters above the list: a Selection (the flags of `clv export`, and the chance of
    spending at least an amount), the top-N size, the chart colouring."""
    frame = data["customers"]
    box = st.container(key="filters", border=True)
    row1, row2, row3 = box.columns(4), box.columns(4), box.columns([1, 1, 2])
    segs = row1[0].multiselect("Segment", [s for s in SEGMENTS if s in set(frame["segment"])])
    tiers = row1[1].multiselect("Value tier", list(TIERS))
    picked = row1[2].multiselect("Cluster", sorted(frame["cluster"].unique()))
    countries: list[str] = []
    if data["countries"]:
        countries = row1[3].multiselect("Country", data["countries"])
    else:
        row1[3].caption("Country: no customer's transactions name one, so there is no country filter.")
    min_freq = int(row2[0].number_input("Minimum frequency (purchases)", min_value=0, value=0, step=1))
    min_clv = float(row2[1].number_input("Minimum expected CLV ($)", min_value=0.0, value=0.0, step=5.0))
    n = int(row2[2].number_input("Top N", min_value=1, max_value=TOP_N_MAX, value=20, step=10))
    colour = row2[3].radio("Colour charts by", ["segment", "cluster"], horizontal=True)
    at_least = float(
        row3[0].number_input(
            f"Spends at least ($, over the {horizon}-month horizon)",
            min_value=0.0,
            value=0.0,
            step=50.0,
            help="0: no such filter",
        )
    )
    least = float(row3[1].number_input("with probability at least", min_value=0.0, max_value=1.0, value=0.5, step=0.05))
    row3[2].caption(
        "From each customer's predictive distribution of spend, which the snapshot keeps; a customer "
        "whose distribution it does not hold yet (its state and score not yet in step, or a snapshot "
        "written without a model) is not known and left out."
    )
    sel = Selection(
        tuple(segs) + tuple(tiers),
        tuple(picked),
        min_freq,
        min_clv or None,
        tuple(countries),
        at_least=at_least or None,
        min_probability=least if at_least else None,
    )
    return sel, n, colour


def customers(
    path: str, snap_stamp: tuple[int, int], sel: Selection, n: int, colour: str, all_clusters: list[str]
) -> None:
    """The filtered customers: top-N table, download, distribution and scatter plots."""
    frame = selected(path, snap_stamp, sel)
    st.caption(f"{len(frame):,} customers match the filters; the top {min(n, len(frame)):,} by expected CLV:")
    chance = [at_least_column(sel.at_least)] if sel.at_least is not None else []
    cols = [
        "customer_id",
        "clv",
        "p_purchase",
        "segment",
        "cluster",
        "country",
        "value_tier",
        "frequency",
        "recency_days",
        "monetary",
        "total_spend",
        *chance,
    ]
    st.table(shown(frame[cols].head(n), money_cols=("clv", "monetary", "total_spend")), hide_index=True)
    st.download_button(
        f"Download CSV ({len(frame):,} customers)",
        csv_text(frame),
        file_name="clv-export.csv",
        mime="text/csv",
        help="the rows and columns `clv export` writes for these filters",
    )
    if frame.empty:
        return
    points = frame.sample(SCATTER_POINTS, random_state=0) if len(frame) > SCATTER_POINTS else frame
    points = points.assign(clv_shown=points["clv"].clip(lower=0.01), monetary_shown=points["monetary"].clip(lower=0.01))
    st.subheader("CLV distribution per segment (log axis)")
    st.altair_chart(
        alt.Chart(points)
        .mark_boxplot(extent="min-max")
        .encode(
            x=alt.X("clv_shown:Q", scale=alt.Scale(type="log"), title="expected CLV ($)"),
            y=alt.Y("segment:N", sort=list(SEGMENTS), title=None),
            color=colours("segment", list(SEGMENTS)).legend(None),
        ),
        width="stretch",
    )
    tooltip = ["customer_id", "segment", "cluster", alt.Tooltip("clv:Q", format="$,.2f")]
    names = list(SEGMENTS) if colour == "segment" else sorted(all_clusters)
    colour_by = colours(colour, names)
    left, right = st.columns(2)
    left.altair_chart(
        alt.Chart(points, title="Recency vs frequency")
        .mark_circle(size=18, opacity=0.5)
        .encode(
            x=alt.X("recency_days:Q", title="days since last purchase"),
            y=alt.Y("frequency:Q", scale=alt.Scale(type="log"), title="purchases"),
            color=colour_by,
            tooltip=tooltip,
        ),
        width="stretch",
    )
    right.altair_chart(
        alt.Chart(points, title="Order value vs CLV")
        .mark_circle(size=18, opacity=0.5)
        .encode(
            x=alt.X("monetary_shown:Q", scale=alt.Scale(type="log"), title="mean order value ($)"),
            y=alt.Y("clv_shown:Q", scale=alt.Scale(type="log"), title="expected CLV ($)"),
            color=colour_by,
            tooltip=tooltip,
        ),
        width="stretch",
    )
    if len(frame) > SCATTER_POINTS:
        st.caption(f"charts show a random {SCATTER_POINTS:,} of the {len(frame):,} customers")


def lookup(path: str, at_least: float | None) -> None:
    """One customer's row, read from the snapshot when asked (not from the cached frame): its
    expected CLV with the 80% interval and the chance of spending at least an amount beside the
    drivers of its score."""
    st.subheader("Customer lookup")
    ask, amount = st.columns([2, 1])
    cid = ask.text_input("Customer id", placeholder="e.g. 00001")
    threshold = float(
        amount.number_input(
            "Chance of spending at least ($)",
            min_value=0.0,
            value=at_least if at_least is not None else 100.0,
            step=50.0,
            help="the filter's amount when it is set",
        )
    )
    if not cid:
        return
    try:
        row = reader(path).customer(cid.strip(), threshold)
    except QueryError as exc:
        st.error(str(exc))
        return
    if row is None:
        st.warning(f"customer {cid.strip()!r} is not in the snapshot")
        return
    book = PLAYBOOKS.get(row["segment"])
    keys = [
        "customer_id",
        "clv",
        "p_purchase",
        "segment",
        "cluster",
        "value_tier",
        "recency_days",
        "frequency",
        "monetary",
        "tenure_days",
        "total_spend",
        "model_version",
        "as_of",
    ]
    st.table(pd.DataFrame({"field": keys, "value": [str(row[k]) for k in keys]}), hide_index=True)
    if book:
        st.info(f"**{row['segment']}**: {book.what_to_do}. Watch: {book.signals}. Measure: {book.what_to_measure}.")
    how_sure, why = st.columns([1, 2])
    with how_sure.container(key="how-sure"):
        how_sure_cards(row, threshold)
    if row["drivers"] is None:
        why.caption(
            f"Why this score: the snapshot carries the drivers of its top customers by expected "
            f"CLV only; `clv score FILE --explain {row['customer_id']}` or the worker's "
            f"/customers/{row['customer_id']} explain any customer."
        )
        return
    why.altair_chart(waterfall(row["drivers"]), width="stretch")
    why.caption(
        "Each bar is what one group of the customer's model inputs adds to, or takes from, the "
        "score of the model's average customer (every input the mean of its training cohort's); "
        "together they make the customer's expected CLV (exact Shapley values of the groups)."
    )


WATERFALL_TITLE = "Why this score: drivers from the model's average customer ($)"


def how_sure_cards(row: dict[str, Any], threshold: float) -> None:
    """The customer's expected CLV with its 80% predictive interval, and its chance of spending
    at least `threshold` over the horizon ("not known" where the snapshot holds no distribution)."""
    horizon = row["horizon_months"]
    known_interval = row["clv_high"] >= 0  # -1: scored before the interval existed
    st.metric(
        f"Expected CLV ({horizon} months)",
        money(row["clv"], cents=True),
        help="the expected spend over the horizon: what rankings, tiers and totals use",
    )
    st.metric(
        "80% interval",
        f"{money(row['clv_low'], cents=True)} – {money(row['clv_high'], cents=True)}"
        if known_interval
        else "not known",
        help="8 in 10 customers like this one spend between these amounts over the horizon (from "
        "the model's predictive distribution; 0 at the low end when a purchase is not likely)",
    )
    p = row.get("p_at_least")
    st.metric(
        f"P(spends at least {money(threshold)})",
        f"{p:.1%}" if p is not None else "not known",
        help="the snapshot holds no predictive distribution for this customer yet (its state and score "
        "not yet in step, or a snapshot written without a model)"
        if p is None
        else "the probability of spending at least this over the horizon, from the predictive distribution",
    )


def waterfall(drivers: dict[str, Any]) -> alt.Chart:
    """The reference score, each group's contribution from where the previous one ended, and
    the customer's clv: a bar per step, labelled with its dollars."""
    steps = [
        {
            "step": "average customer",
            "start": 0.0,
            "end": drivers["reference_clv"],
            "amount": drivers["reference_clv"],
            "kind": "score",
            "meaning": "the reference",
        }
    ]
    level = drivers["reference_clv"]
    for d in drivers["drivers"]:
        steps.append(
            {
                "step": d["group"],
                "start": level,
                "end": level + d["contribution"],
                "amount": d["contribution"],
                "kind": "raises" if d["contribution"] >= 0 else "lowers",
                "meaning": d["meaning"],
            }
        )
        level += d["contribution"]
    steps.append(
        {
            "step": "expected CLV",
            "start": 0.0,
            "end": drivers["clv"],
            "amount": drivers["clv"],
            "kind": "score",
            "meaning": "this customer's score",
        }
    )
    frame = pd.DataFrame(steps)
    frame["label"] = [
        money(a, cents=True) if k == "score" else f"{a:+,.2f}" for a, k in zip(frame["amount"], frame["kind"])
    ]
    frame["top"] = frame[["start", "end"]].max(axis=1)
    base = alt.Chart(frame, title=WATERFALL_TITLE).encode(
        x=alt.X("step:N", sort=list(frame["step"]), title=None, axis=alt.Axis(labelAngle=0))
    )
    bars = base.mark_bar().encode(
        y=alt.Y("start:Q", title="expected spend ($)"),
        y2="end:Q",
        color=alt.Color(
            "kind:N",
            title=None,
            scale=alt.Scale(domain=["score", "raises", "lowers"], range=["#4c78a8", "#54a24b", "#e45756"]),
        ),
        tooltip=["step", alt.Tooltip("label:N", title="dollars"), "meaning"],
    )
    labels = base.mark_text(dy=-6).encode(y="top:Q", text="label:N")
    return svg((bars + labels).properties(height=320))


EVALUATION_FILE = "evaluation.json"  # `clv evaluate --json DIR/evaluation.json --plots DIR`
# The point forecast's metrics, then the 80% interval's fit (models with a predictive distribution).
METRICS = ("mae", "rmse", "spearman", "norm_gini", "top10_share", "total_bias", "auc", *INTERVAL_FIT)
INTERVAL_NOTE = " ".join(f"{key}: {meaning}." for key, meaning in INTERVAL_FIT.items())


def evaluation(model_dir: Path) -> None:
    """The holdout evaluation kept beside the model, if any: `clv evaluate`'s metrics per model
    (mean +- sd over seeds when it ran several) and its gains and decile plots."""
    path = model_dir / EVALUATION_FILE
    plots = sorted(model_dir.glob("*.png"))
    if not path.exists() and not plots:
        st.caption(
            f"no holdout evaluation beside this model: `clv evaluate FILE --cutoff D --json "
            f"{model_dir}/{EVALUATION_FILE} --plots {model_dir}` puts one here"
        )
        return
    if path.exists():
        doc = json.loads(path.read_text())
        if "models" in doc:
            rows = [
                {"model": name, **{k: "n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in METRICS}}
                for name, m in doc["models"].items()
            ]
        else:
            rows = [
                {"model": name, **{k: f"{m[k]['mean']:.3f} ± {m[k]['sd']:.3f}" if k in m else "n/a" for k in METRICS}}
                for name, m in doc["summary"].items()
            ]
        st.caption(f"Holdout evaluation ({doc['customers']:,} customers; `clv evaluate`)")
        st.table(pd.DataFrame(rows), hide_index=True)
        st.caption(INTERVAL_NOTE)
    for col, png in zip(st.columns(max(len(plots), 1)), plots):
        col.image(str(png), caption=png.stem)


def _examples(meta: dict[str, Any]) -> str:
    """Models of this release record every labelled example (each network holds out a fold of
    customers for early stopping); earlier ones a training and a validation count."""
    if "labelled_examples" in meta:
        return f"{meta['labelled_examples']:,} (each network holds out one customer in five)"
    return f"{meta['training_examples']:,} training, {meta['validation_examples']:,} validation"


def training_run(meta: dict[str, Any]) -> None:
    """The run the model came from: its data (by fingerprint), cutoff and training settings, so
    it can be repeated with `clv train`."""
    st.subheader("The training run")
    config = {k: v for k, v in (meta.get("train_config") or {}).items() if not isinstance(v, (dict, list))}
    run = {
        "training data (sha256)": meta.get("training_data_sha256", "-"),
        "cutoff": meta["cutoff"][:10],
        **{k.replace("_", " "): str(v) for k, v in config.items()},
    }
    st.table(pd.DataFrame({"setting": list(run), "value": list(run.values())}), hide_index=True)


def training_cohort(meta: dict[str, Any]) -> None:
    """The inputs' percentiles on the training cohort: what scored customers are compared with."""
    if meta.get("population"):
        st.caption(
            "Training cohort at the cutoff: each input's 10th, 50th and 90th percentiles "
            "(what the drift check compares scored customers with)"
        )
        st.table(pd.DataFrame(population.percentiles(meta["population"])), hide_index=True)


def model_card(data: dict[str, Any], meta: dict[str, Any], model_dir: Path, drift: str | None) -> None:
    """What the artifact says of itself, the training run it came from, its evaluation, a
    warning if it did not score this snapshot, and one if the snapshot's customers are unlike
    its training cohort."""
    st.subheader("Model card")
    drift_banner(drift, "model")
    versions = data["summary"]["model_versions"] or []
    if meta["version"] not in versions:
        st.warning(
            f"the snapshot was scored by {', '.join(versions)}, not by {meta['version']} "
            "shown here: start the dashboard with --model for that artifact"
        )
    training = meta.get("training", {})
    facts = {
        "version": meta["version"],
        "training window": f"{(meta.get('first_event') or '?')[:10]} to {meta['cutoff'][:10]}",
        "horizon": f"{meta['horizon_months']} months after the as-of month",
        "history read": f"{meta['window']} months",
        "trained at": meta.get("created_at", "-"),
        "labelled examples": _examples(meta),
        "ensemble": f"{len(training.get('members', []))} GRUs",
        "discount rate": f"{meta.get('discount_rate', 0.0):.0%} a year",
        "ONNX vs torch (max rel. diff)": ", ".join(
            f"{k} {v['max_rel_diff']:.1e}" for k, v in meta.get("parity", {}).items()
        ),
        "segment CLV thresholds": ", ".join(f"{k} {money(v, cents=True)}" for k, v in meta["clv_quantiles"].items()),
        "training cohort": population.describe(meta.get("population")),
    }
    st.table(pd.DataFrame({"fact": list(facts), "value": list(facts.values())}), hide_index=True)
    training_run(meta)
    training_cohort(meta)
    left, right = st.columns(2)
    members = pd.DataFrame([{"member": f"gru[{i}]", **m} for i, m in enumerate(training.get("members", []))])
    if not members.empty:
        left.altair_chart(
            alt.Chart(members, title="Validation loss per ensemble member")
            .mark_bar()
            .encode(
                x=alt.X("member:N", title=None),
                y=alt.Y("valid_loss:Q", title="validation loss"),
                tooltip=["member", "best_epoch", "valid_loss"],
            ),
            width="stretch",
        )
    c = meta.get("clustering")
    if c:
        by_k = pd.DataFrame(
            [{"method": m, "k": int(k), **s} for m, r in c["methods"].items() for k, s in r["by_k"].items()]
        )
        right.altair_chart(
            alt.Chart(by_k, title="Cluster silhouette by k")
            .mark_line(point=True)
            .encode(
                x=alt.X("k:O"),
                y=alt.Y("silhouette:Q"),
                color="method:N",
                tooltip=["method", "k", "silhouette", "calinski_harabasz", "davies_bouldin"],
            ),
            width="stretch",
        )
        scores = pd.DataFrame(
            [
                {
                    "method": m,
                    "k": r["k"],
                    "silhouette": r["silhouette"],
                    "calinski_harabasz": r["calinski_harabasz"],
                    "davies_bouldin": r["davies_bouldin"],
                    "chosen": "yes" if m == c["method"] else "",
                }
                for m, r in c["methods"].items()
            ]
        )
        st.caption(
            "Clustering methods, each at the k with its best silhouette, scored on the "
            "nearest-centroid labels subscribers get"
        )
        st.table(shown(scores), hide_index=True)
        st.caption("Cluster profiles on the training cohort: share, medians, mean return share")
        profiles = pd.DataFrame([{"cluster": name, **p} for name, p in c["profiles"].items()])
        st.table(shown(profiles, share_cols=("share", "return_share"), money_cols=("order_value",)), hide_index=True)
    evaluation(model_dir)


def main() -> None:
    """The page, top to bottom; Streamlit runs it again on every widget change and refresh."""
    args = _args()
    st.set_page_config(page_title="CLV dashboard", layout="wide")
    st.html(CSS)
    path = Path(args.snapshot)
    st.title("Customer lifetime value")
    snap_stamp = stamp(path)
    if snap_stamp is None:
        st.info(f"no snapshot at {path} yet: is `clv snapshot` running? This page looks again every {REFRESH_S:g} s.")
    watch(path, snap_stamp)
    if snap_stamp is None:
        return
    try:
        data = load(str(path), snap_stamp)
    except QueryError as exc:
        st.error(str(exc))
        return
    model_dir = Path(args.model) if args.model else shipped_model_dir()
    meta = model_meta(args.model, (model_dir / META_FILE).stat().st_mtime)
    st.caption(f"snapshot {path} (read-only; the page follows new snapshots as the sink publishes them)")
    drift = drift_warning(str(path), snap_stamp, meta.get("population"))
    overview_tab, segments_tab, customers_tab, clusters_tab, model_tab = st.tabs(TABS)
    with overview_tab:
        overview(data, drift)
    with segments_tab:
        segments(data, meta)
    with customers_tab:
        sel, n, colour = filters(data, int(meta["horizon_months"]))
        customers(str(path), snap_stamp, sel, n, colour, sorted(data["customers"]["cluster"].unique()))
        lookup(str(path), sel.at_least)
    with clusters_tab:
        clusters(data, meta)
    with model_tab:
        model_card(data, meta, model_dir, drift)
    with st.container(key="page-end"):  # the last element: a browser knows the page is all drawn
        st.caption(f"clv-stream · snapshot {path} · model card from {model_dir}")


def watch(path: Path, shown_stamp: tuple[int, int] | None) -> None:
    """Reruns the page when a new snapshot replaces the one it shows."""

    @st.fragment(run_every=REFRESH_S)
    def check() -> None:
        if stamp(path) != shown_stamp:
            st.rerun()

    check()


main()
