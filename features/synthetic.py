"""Seeded Online Retail-format transaction files with the traits real exports have.

Used by the tests, the demo and the load tests. Each trait is injected on its own rows so the
generator knows exactly how many rows cleaning must drop under each reason (`Truth`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from features.contract import Line, TransactionEvent, stable_event_id

# Relative invoice volume by calendar month: retail's autumn ramp and Christmas peak.
SEASON = np.array([0.7, 0.6, 0.8, 0.75, 0.8, 0.8, 0.8, 0.75, 1.1, 1.3, 1.7, 1.0])
# Shares of customers who place one or two large first orders and leave, and of steady buyers.
BIG_FIRST_SHARE = 0.10
STEADY_SHARE = 0.05


@dataclass
class Truth:
    rows: int
    customers: int
    no_customer: int
    zero_price: int
    negative_price: int
    bad_debt_adjustment: int
    outlier: int
    duplicate_lines: int
    cancellation_lines: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _purchases(
    rng: np.random.Generator,
    n_customers: int,
    n_invoices: int,
    t0: pd.Timestamp,
    t1: pd.Timestamp,
    wholesale_share: float,
    big_first_share: float = BIG_FIRST_SHARE,
    steady_share: float = STEADY_SHARE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, pd.DatetimeIndex]:
    """The customer model: ids, purchase rates, basket multipliers, and each kept invoice's
    buyer (index) and time.

    Beside the crowd (a gamma of purchase rates, an exponential lifetime) two kinds that real
    retail files hold and that pull rankings apart: `big_first_share` of customers arrive after the
    first quarter of the period, place one order 3-6 times the usual size (a second of the same
    size within a month for half of them) and never come back; `steady_share` arrive in the
    first quarter, buy one to two times a month (before the season thins it) at 1-1.5 times the
    usual size and stay. One or two large baskets look like a habit only to a model that does
    not weigh how few orders back them."""
    customer_ids = np.arange(12346, 12346 + n_customers)
    rate = rng.gamma(0.6, 1.0, n_customers)
    born = rng.uniform(0, 0.8, n_customers)
    gone = np.minimum(1.0, born + rng.exponential(0.6, n_customers))
    basket = np.where(
        rng.uniform(size=n_customers) < wholesale_share, np.exp(rng.uniform(np.log(10), np.log(60), n_customers)), 1.0
    )
    kind = rng.uniform(size=n_customers)
    big_first = (kind < big_first_share) & (basket == 1.0)
    steady = (kind >= big_first_share) & (kind < big_first_share + steady_share) & (basket == 1.0)
    born[big_first] = rng.uniform(0.25, 0.97, big_first.sum())
    basket[big_first] = rng.uniform(3.0, 6.0, big_first.sum())
    rate[big_first] = 0.0  # their orders are placed below, not drawn with the crowd's
    born[steady] = rng.uniform(0, 0.25, steady.sum())
    gone[steady] = 1.0
    days = (t1 - t0).days
    # Rates are shares of the invoices: a steady customer's share is 1-2 orders a month.
    per_month = rng.uniform(1.0, 2.0, steady.sum()) * days / 30.4 / n_invoices
    rate[steady] = per_month * rate[~steady].sum() / max(1e-9, 1 - per_month.sum())
    basket[steady] = rng.uniform(1.0, 1.5, steady.sum())
    buyer = rng.choice(n_customers, size=n_invoices, p=rate / rate.sum())

    span = rng.uniform(born[buyer], gone[buyer]) * days
    first = np.flatnonzero(big_first)
    second = first[rng.uniform(size=len(first)) < 0.5]
    buyer = np.concatenate([buyer, first, second])
    span = np.concatenate(
        [span, born[first] * days, np.minimum(born[second] * days + rng.uniform(1, 30, len(second)), days - 1)]
    )
    month_weight = SEASON[(t0 + pd.to_timedelta(span, unit="D")).month.to_numpy() - 1]
    keep = rng.uniform(0, SEASON.max(), len(buyer)) < month_weight
    buyer, span = buyer[keep], span[keep]
    minutes = rng.integers(8 * 60, 18 * 60, len(buyer))
    inv_ts = t0 + pd.to_timedelta(np.floor(span), unit="D") + pd.to_timedelta(minutes, unit="m")
    return customer_ids, rate, basket, buyer, inv_ts


def invoice_events(
    n_customers: int,
    n_invoices: int,
    seed: int = 7,
    start: str = "2009-12-01",
    end: str = "2011-12-09",
    wholesale_share: float = 0.03,
) -> Iterator[TransactionEvent]:
    """Clean invoice events in time order from the same customer model as `generate`, without
    its line-level defects and with 1-3 lines per invoice: multi-month histories for many
    customers at a fraction of the cost (state and load benchmarks). About 3% of purchases are
    followed by a partial return three days later."""
    rng = np.random.default_rng(seed)
    t0, t1 = pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC")
    customer_ids, _rate, basket, buyer, inv_ts = _purchases(rng, n_customers, n_invoices, t0, t1, wholesale_share)
    n = len(buyer)
    returned = rng.uniform(size=n) < 0.03
    ts = np.concatenate([inv_ts.to_numpy(), (inv_ts[returned] + pd.Timedelta(days=3)).to_numpy()])
    source = np.concatenate([np.arange(n), np.flatnonzero(returned)])
    is_return = np.arange(len(ts)) >= n
    qty = np.maximum(1, np.round(rng.geometric(1 / 6, n) * basket[buyer])).astype(np.int64)
    price = np.round(np.exp(rng.normal(0.8, 0.9, n)), 2) + 0.01
    lines = rng.integers(1, 4, n)
    stamps = pd.DatetimeIndex(ts).to_pydatetime()
    for i in np.argsort(ts, kind="stable"):
        k = source[i]
        if stamps[i] > t1:
            continue
        cid, invoice = str(customer_ids[buyer[k]]), f"{'C' if is_return[i] else ''}{536365 + k}"
        sign = -1 if is_return[i] else 1
        yield TransactionEvent(
            stable_event_id(cid, invoice),
            cid,
            invoice,
            stamps[i],
            tuple(
                Line(f"{85000 + j}", int(sign * max(1, qty[k] // (j + 1))), float(price[k]))
                for j in range(lines[k] if not is_return[i] else 1)
            ),
        )


def generate(
    n_customers: int = 2000,
    n_invoices: int = 20000,
    seed: int = 7,
    start: str = "2009-12-01",
    end: str = "2011-12-09",
    layout: str = "online-retail",
    wholesale_share: float = 0.03,
) -> tuple[pd.DataFrame, Truth]:
    """A line-level frame in the UCI layout (`online-retail` or `online-retail-ii`).

    Customers differ in purchase rate (a few buy often, most once or twice), arrive over the
    first 80% of the period and leave after an exponential lifetime; `wholesale_share` of them
    order 10-60 times the usual quantities, the heavy tail of real retail files."""
    rng = np.random.default_rng(seed)
    t0, t1 = pd.Timestamp(start), pd.Timestamp(end)
    customer_ids, rate, basket, buyer, inv_ts = _purchases(rng, n_customers, n_invoices, t0, t1, wholesale_share)
    n_inv = len(buyer)
    inv_no = (536365 + np.arange(n_inv)).astype(str)

    n_lines_per = 1 + rng.geometric(1 / 12, n_inv)
    idx = np.repeat(np.arange(n_inv), n_lines_per)
    n = len(idx)
    catalog = 4000
    # Distinct items within an invoice, so the only exact duplicates are the injected ones.
    position = np.arange(n) - np.repeat(np.cumsum(n_lines_per) - n_lines_per, n_lines_per)
    item = (rng.integers(0, catalog, n_inv)[idx] + position) % catalog
    item_price = np.round(np.exp(rng.normal(0.8, 0.9, catalog)), 2) + 0.01
    lines = pd.DataFrame(
        {
            "InvoiceNo": inv_no[idx],
            "StockCode": (85000 + item).astype(str),
            "Description": "ITEM " + item.astype(str) + " ",
            "Quantity": np.minimum(np.ceil(rng.geometric(1 / 6, n) * basket[buyer[idx]]), 9999).astype(np.int64),
            "InvoiceDate": inv_ts[idx],
            "UnitPrice": item_price[item],
            "CustomerID": customer_ids[buyer[idx]].astype(float).astype(object),
            "Country": np.where(rate[buyer[idx]] > 2.0, "EIRE", "United Kingdom"),
        }
    )

    # About a quarter of invoices carry no customer id at all.
    anonymous_inv = rng.uniform(size=n_inv) < 0.25
    anon = anonymous_inv[idx]
    lines.loc[anon, "CustomerID"] = ""
    no_customer = int(anon.sum())
    named = np.flatnonzero(~anon)

    zero = rng.choice(named, size=max(1, n // 400), replace=False)
    lines.loc[zero, "UnitPrice"] = 0.0
    rest = np.setdiff1d(named, zero)

    # Cancellations: a few named invoices are partly returned some days later.
    cancel_inv = np.flatnonzero(~anonymous_inv & (rng.uniform(size=n_inv) < 0.03))
    src = lines.iloc[np.flatnonzero(np.isin(idx, cancel_inv) & np.isin(np.arange(n), rest))]
    src = src.groupby("InvoiceNo", sort=False).head(2).copy()
    src["InvoiceNo"] = "C" + src["InvoiceNo"]
    src["Quantity"] = -src["Quantity"]
    src["InvoiceDate"] = src["InvoiceDate"] + pd.Timedelta(days=3)
    src = src[src["InvoiceDate"] <= t1]

    donor = lines.iloc[rest[0]].to_dict()
    spare = 536365 + n_inv  # invoice numbers past the generated ones
    bad_debt = pd.DataFrame(
        [
            {
                **donor,
                "InvoiceNo": f"A{spare + k}",
                "StockCode": "B",
                "Description": "Adjust bad debt",
                "Quantity": 1,
                "UnitPrice": -11062.06,
            }
            for k in range(2)
        ]
    )
    negative = pd.DataFrame([{**donor, "InvoiceNo": str(spare + 2), "UnitPrice": -3.5}])
    outlier = pd.DataFrame(
        [
            {**donor, "InvoiceNo": str(spare + 3), "Quantity": 80995, "UnitPrice": 2.08},
            {**donor, "InvoiceNo": f"C{spare + 4}", "Quantity": -80995, "UnitPrice": 2.08},
        ]
    )
    dupes = lines.iloc[rng.choice(rest, size=max(1, n // 100), replace=False)]

    frame = pd.concat([lines, src, bad_debt, negative, outlier, dupes], ignore_index=True)
    frame = frame.sort_values("InvoiceDate", kind="stable").reset_index(drop=True)
    truth = Truth(
        rows=len(frame),
        customers=int(pd.Series(frame["CustomerID"]).replace("", np.nan).dropna().nunique()),
        no_customer=no_customer,
        zero_price=len(zero),
        negative_price=len(negative),
        bad_debt_adjustment=len(bad_debt),
        outlier=len(outlier),
        duplicate_lines=len(dupes),
        cancellation_lines=len(src),
    )
    return _style(frame, layout, rng), truth


def _style(frame: pd.DataFrame, layout: str, rng: np.random.Generator) -> pd.DataFrame:
    """Write dates, ids and spacing the way each export does."""
    if layout == "online-retail":
        ts = frame["InvoiceDate"]
        frame["InvoiceDate"] = (
            ts.dt.month.astype(str)
            + "/"
            + ts.dt.day.astype(str)
            + "/"
            + ts.dt.year.astype(str)
            + " "
            + ts.dt.hour.astype(str)
            + ":"
            + ts.dt.strftime("%M")
        )
        return frame
    if layout == "online-retail-ii":
        frame["InvoiceDate"] = frame["InvoiceDate"].dt.strftime("%Y-%m-%d %H:%M:%S")
        frame["CustomerID"] = frame["CustomerID"].map(lambda v: v if v == "" else f" {int(v)}")
        return frame.rename(
            columns={
                "InvoiceNo": "Invoice",
                "UnitPrice": "Price",
                "CustomerID": "Customer ID",
            }
        )
    raise ValueError(f"unknown layout {layout!r}")


def write(frame: pd.DataFrame, path: str | Path) -> Path:
    """CSV (optionally .gz) or .xlsx, chosen by the file name."""
    path = Path(path)
    if path.suffix == ".xlsx":
        frame.to_excel(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path
