"""A whole history's customer states from cleaned lines at once: the fold of `features.aggregate`,
with the per-line work done by numpy and pandas.

The result is, record for record, what `Folder` leaves after folding the same file's invoice
events (`features.events.events_from_lines`) one at a time in event-time order, which is also
what the worker leaves (its per-partition clock is then the event's own month): equal months,
totals, times, and event and invoice keys in the same order. Why the shortcut is exact:

- in event-time order no event is too late and each event trims its customer's months to the
  window ending at the event's own month, so the months a state keeps are those within `window`
  months of its customer's newest event, and every earlier month is in the `past_*` totals;
- an event is one (customer, invoice), so its event and invoice keys are new to its customer:
  every event is applied, and every purchase event counts one invoice.

A customer whose keys could pass the `MAX_IDS` bound (the order of forgetting then matters) is
folded by `CustomerState.apply` itself, event by event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.aggregate import MAX_IDS, Contribution, CustomerState, MonthAgg, id_key, line_cents, window_start_for
from features.contract import stable_event_id

NS = 1_000_000_000


@dataclass
class BulkFold:
    states: list[CustomerState]  # in order of first appearance in the file
    events: int  # invoice events folded
    newest_ts: int  # epoch seconds of the newest event (the time `clv score` scores as of)


def invoice_frame(lines: pd.DataFrame) -> pd.DataFrame:
    """One row per (customer, invoice) in the order `events_from_lines` yields them: stamped with
    the earliest line time, with spend in cents and units summed over the lines."""
    # Codes straight from the (Arrow) string columns; Python strings only for the events.
    cust_code, customers = pd.factorize(lines["customer_id"])
    inv_code, invoices = pd.factorize(lines["invoice_no"])
    pair = cust_code.astype(np.int64) * (int(inv_code.max(initial=0)) + 1) + inv_code
    ns = pd.DatetimeIndex(lines["ts"]).as_unit("ns").asi8
    qty = lines["quantity"].to_numpy(np.int64)
    frame = pd.DataFrame(
        {
            "pair": pair,
            "ns": ns,
            "units": qty,
            "cents": line_cents(qty, lines["unit_price"].to_numpy(np.float64)).astype(np.int64),
            "line": np.arange(len(lines)),
        }
    )
    g = frame.groupby("pair", sort=False)
    events = pd.DataFrame(
        {"ns": g["ns"].min(), "units": g["units"].sum(), "cents": g["cents"].sum(), "line": g["line"].first()}
    )
    first = events["line"].to_numpy()
    events["customer"] = np.asarray(customers, dtype=object)[cust_code[first]]
    events["invoice"] = np.asarray(invoices, dtype=object)[inv_code[first]]
    events["country"] = lines["country"].to_numpy(object)[first]  # as `events_from_lines`: first line's
    events["code"] = cust_code[first]
    order = np.lexsort(
        (events["invoice"].to_numpy().astype(str), events["customer"].to_numpy().astype(str), events["ns"].to_numpy())
    )
    return events.iloc[order].reset_index(drop=True)


def _months(ns: np.ndarray) -> np.ndarray:
    """`features.aggregate.month_of` of UTC epoch nanoseconds."""
    ym = ns.astype("datetime64[ns]").astype("datetime64[M]").astype(np.int64)  # months since 1970-01
    return ym + 1970 * 12


def _days_of_month(ns: np.ndarray) -> np.ndarray:
    """The UTC day of the month (1-31) of epoch nanoseconds."""
    t = ns.astype("datetime64[ns]")
    return (t.astype("datetime64[D]") - t.astype("datetime64[M]")).astype(np.int64) + 1


def fold_lines(lines: pd.DataFrame, window: int) -> BulkFold:
    """Every customer's state after folding the cleaned `lines` (see the module docstring)."""
    events = invoice_frame(lines)
    if events.empty:
        return BulkFold([], 0, 0)
    ns = events["ns"].to_numpy()
    ts = ns // NS
    month = _months(ns)
    day_bit = np.left_shift(1, _days_of_month(ns) - 1)
    units = events["units"].to_numpy()
    cents = events["cents"].to_numpy()
    customer = events["customer"].to_numpy()
    invoice = events["invoice"].to_numpy()
    country = [c if isinstance(c, str) else "" for c in events["country"].tolist()]
    event_keys = [id_key(stable_event_id(c, i)) for c, i in zip(customer, invoice)]
    invoice_keys = [id_key(i) for i in invoice]
    # Events grouped by customer, event-time order kept within each.
    by_customer = np.argsort(events["code"].to_numpy(), kind="stable")
    codes = events["code"].to_numpy()[by_customer]
    bounds = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(codes)]])
    purchases = units > 0
    # Worst case of keys a customer holds: every event key and every purchase's invoice key.
    keys_held = np.add.reduceat((1 + purchases[by_customer]).astype(np.int64), starts)
    order_of_first = np.argsort(codes[starts], kind="stable")  # customers as first seen in the file
    states: list[CustomerState] = []
    tsl, monthl, unitsl, centsl = ts.tolist(), month.tolist(), units.tolist(), cents.tolist()
    bitl = day_bit.tolist()
    for k in order_of_first.tolist():
        idx = by_customer[starts[k] : ends[k]].tolist()
        cid = customer[idx[0]]
        if keys_held[k] > MAX_IDS:
            states.append(_fold_one(cid, idx, window, event_keys, invoice_keys, tsl, monthl, centsl, unitsl, country))
            continue
        state = CustomerState(cid)
        start = window_start_for(monthl[idx[-1]], window)
        bought = [i for i in idx if unitsl[i] > 0]
        past_active: set[int] = set()
        past_days: dict[int, int] = {}  # month -> purchase-day bits, before the window
        for i in idx:
            state.country = country[i] or state.country  # in time order: the newest one known
            m = monthl[i]
            if m < start:
                state.past_spend_cents += centsl[i]
                state.past_units += unitsl[i]
                if unitsl[i] > 0:
                    state.past_invoices += 1
                    past_active.add(m)
                    past_days[m] = past_days.get(m, 0) | bitl[i]
                continue
            agg = state.months.get(m)
            if agg is None:
                agg = state.months[m] = MonthAgg()
            agg.spend_cents += centsl[i]
            agg.units += unitsl[i]
            agg.events[event_keys[i]] = None
            if unitsl[i] > 0:
                agg.n_invoices += 1
                agg.invoices[invoice_keys[i]] = None
                agg.days |= bitl[i]
        state.past_active_months = len(past_active)
        state.past_purchase_days = sum(bits.bit_count() for bits in past_days.values())
        state.n_ids = sum(len(a.events) + len(a.invoices) for a in state.months.values())
        state.first_ts, state.newest_ts = tsl[idx[0]], tsl[idx[-1]]  # idx is in time order
        state.first_month = monthl[idx[0]]
        if bought:
            state.last_purchase_ts, state.last_purchase_month = tsl[bought[-1]], monthl[bought[-1]]
        states.append(state)
    return BulkFold(states, len(events), int(ts.max()))


def _fold_one(
    cid: str,
    idx: list[int],
    window: int,
    event_keys: list[int],
    invoice_keys: list[int],
    ts: list[int],
    month: list[int],
    cents: list[int],
    units: list[int],
    country: list[str],
) -> CustomerState:
    """A customer near the key bound, through the stream's own `apply`."""
    state = CustomerState(cid)
    for i in idx:
        state.apply(
            Contribution(event_keys[i], invoice_keys[i], month[i], ts[i], cents[i], units[i], country[i]),
            window_start_for(month[i], window),
        )
    return state
