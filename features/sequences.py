"""Customer states to model inputs: a monthly sequence and a few static features.

One function builds the inputs for any number of customers at once: the trainer calls it for a
whole cohort, the worker for each micro-batch of dirty customers. Features depend on the as-of
time only through its calendar month, so a customer's score changes when its own events arrive or
the month turns, never with the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from features.aggregate import CustomerState, month_start

SEQ_FEATURES = (
    "log_spend",
    "log_invoices",
    "log_units",
    "active",
    "moy_sin",
    "moy_cos",
    "before_first",
)
STATIC_FEATURES = (
    "log_tenure_months",
    "log_recency_months",
    "log_invoices_total",
    "log_spend_total",
    "log_order_value",
    "log_invoices_before_window",
    "log_active_months",
    "asof_moy_sin",
    "asof_moy_cos",
    "horizon_months",
)
# The classic model's sufficient statistics (BG/NBD, Gamma-Gamma), unscaled: days with a
# purchase, days from the first event to the last purchase and to the end of the as-of month,
# and mean spend per purchase day. Days, as the textbook model counts them: several invoices of
# one day (a basket split over orders, a wholesale customer's many orders) are one purchase
# event of its Poisson process, not many followed by a silence that reads as churn. The model's
# head turns them into the classic per-customer quantities it corrects (models.ziln).
CLASSIC_FEATURES = ("purchase_days", "purchase_span_days", "age_days", "spend_per_purchase_day")


def slog1p(x: np.ndarray) -> np.ndarray:
    """log1p that keeps the sign: a month of net returns is negative spend."""
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass(frozen=True)
class Inputs:
    seq: np.ndarray  # customers x window x len(SEQ_FEATURES), float32
    static: np.ndarray  # customers x len(STATIC_FEATURES), float32
    classic: np.ndarray  # customers x len(CLASSIC_FEATURES), float32, never scaled

    def take(self, idx: np.ndarray) -> "Inputs":
        return Inputs(self.seq[idx], self.static[idx], self.classic[idx])


def build_inputs(states: Sequence[CustomerState], as_of_month: int, window: int, horizon: int) -> Inputs:
    """Unscaled features of each state as of the end of `as_of_month`, over `window` months,
    for a prediction over the next `horizon` months (an input, so training can use short horizons
    from recent origins)."""
    n = len(states)
    start = as_of_month - window + 1
    # Python lists, converted once: element-wise numpy writes cost more than the loop itself.
    past_rows: list[list[int]] = []  # spend cents, units, invoices, active months before the window
    firsts: list[int] = []
    lasts: list[int] = []
    spans: list[tuple[float, float]] = []  # (last purchase - first event, as-of end - first event), seconds
    purchase_days: list[int] = []
    end_ts = month_start(as_of_month + 1).timestamp()
    rows: list[int] = []
    cols: list[int] = []
    values: list[tuple[int, int, int]] = []
    for i, s in enumerate(states):
        totals = [s.past_spend_cents, s.past_units, s.past_invoices, s.past_active_months]
        for m, agg in s.months.items():
            if m > as_of_month:
                raise ValueError(f"customer {s.customer_id} has events after the as-of month")
            n_invoices = agg.n_invoices
            if m < start:
                totals[0] += agg.spend_cents
                totals[1] += agg.units
                totals[2] += n_invoices
                totals[3] += n_invoices > 0
            else:
                rows.append(i)
                cols.append(m - start)
                values.append((agg.spend_cents, agg.units, n_invoices))
        past_rows.append(totals)
        purchase_days.append(s.purchase_days())
        f = as_of_month if s.first_month is None else s.first_month
        firsts.append(f)
        lasts.append(f if s.last_purchase_month is None else s.last_purchase_month)
        first_ts = end_ts if s.first_ts is None else s.first_ts
        last_ts = first_ts if s.last_purchase_ts is None else s.last_purchase_ts
        spans.append((last_ts - first_ts, end_ts - first_ts))
    past = np.array(past_rows, dtype=np.float64).reshape(n, 4)
    first = np.array(firsts, dtype=np.int64)
    last = np.array(lasts, dtype=np.int64)
    cells = np.zeros((n, window, 3))
    if values:
        cells[rows, cols] = values
    spend, units, invoices = cells[..., 0], cells[..., 1], cells[..., 2]

    months = start + np.arange(window)
    moy = 2 * np.pi * (months % 12) / 12
    seq = np.empty((n, window, len(SEQ_FEATURES)), dtype=np.float32)
    seq[..., 0] = slog1p(spend / 100.0)
    seq[..., 1] = np.log1p(invoices)
    seq[..., 2] = slog1p(units)
    seq[..., 3] = invoices > 0
    seq[..., 4] = np.sin(moy)[None, :]
    seq[..., 5] = np.cos(moy)[None, :]
    seq[..., 6] = months[None, :] < first[:, None]

    total_spend = (past[:, 0] + spend.sum(axis=1)) / 100.0
    total_invoices = past[:, 2] + invoices.sum(axis=1)
    active = past[:, 3] + (invoices > 0).sum(axis=1)
    asof = 2 * np.pi * (as_of_month % 12) / 12
    static = np.empty((n, len(STATIC_FEATURES)), dtype=np.float32)
    static[:, 0] = np.log1p(as_of_month - first)
    static[:, 1] = np.log1p(as_of_month - last)
    static[:, 2] = np.log1p(total_invoices)
    static[:, 3] = slog1p(total_spend)
    static[:, 4] = slog1p(total_spend / np.maximum(total_invoices, 1))
    static[:, 5] = np.log1p(past[:, 2])
    static[:, 6] = np.log1p(active)
    static[:, 7] = np.sin(asof)
    static[:, 8] = np.cos(asof)
    static[:, 9] = horizon
    span = np.array(spans, dtype=np.float64).reshape(n, 2) / 86400.0
    classic = np.empty((n, len(CLASSIC_FEATURES)), dtype=np.float32)
    days = np.array(purchase_days, dtype=np.float64)
    classic[:, 0] = days
    classic[:, 1] = span[:, 0]
    classic[:, 2] = span[:, 1]
    classic[:, 3] = np.maximum(total_spend, 0) / np.maximum(days, 1)
    return Inputs(seq, static, classic)


@dataclass(frozen=True)
class RFM:
    """Recency/frequency/monetary as consumers of the scores read them."""

    recency_days: float
    frequency: int  # purchase invoices over the customer's life
    monetary: float  # mean spend per purchase invoice, dollars
    tenure_days: float
    total_spend: float


def rfm(state: CustomerState, as_of_ts: int) -> RFM:
    spend, _units, invoices = state.totals()
    last = state.last_purchase_ts if state.last_purchase_ts is not None else state.first_ts
    first = state.first_ts if state.first_ts is not None else as_of_ts
    return RFM(
        recency_days=round(max(0, as_of_ts - (last or as_of_ts)) / 86400.0, 3),
        frequency=invoices,
        monetary=round(spend / 100.0 / invoices, 2) if invoices else 0.0,
        tenure_days=round(max(0, as_of_ts - first) / 86400.0, 3),
        total_spend=spend / 100.0,
    )
