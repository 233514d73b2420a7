"""Per-customer monthly aggregates, folded one invoice at a time.

This is the single aggregation rule of the product: the batch path folds a history through
`CustomerState.apply` exactly as the live worker folds the stream, so a customer's aggregates (and
so its features) are identical offline and online. Money is held in integer cents, so sums do not
depend on the order events arrive in.

Exactness under redelivery: a state remembers the highest source offset applied from its
partition (a redelivered message is at or below it) and, for the months in the window, the event
ids applied (a re-published invoice carries the same id). Months older than the window are
folded into `past_*` totals, which keeps a state bounded; an event for such a month is too late.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, MutableMapping

import numpy as np

from features.contract import TransactionEvent


def month_of(ts: datetime) -> int:
    """Months since year 0, in UTC: consecutive calendar months are consecutive integers."""
    ts = ts.astimezone(timezone.utc)
    return ts.year * 12 + ts.month - 1


def month_start(month: int) -> datetime:
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)


def line_cents(quantity: Any, unit_price: Any) -> Any:
    """Line amount in cents; works on scalars and numpy arrays with the same rounding."""
    return np.rint(np.multiply(quantity, unit_price) * 100.0)


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one invoice adds to its customer's month."""

    event_id: str
    invoice_no: str
    month: int
    ts: int  # epoch seconds
    spend_cents: int
    units: int

    @property
    def is_purchase(self) -> bool:
        """Net positive units: a purchase counts as an invoice; a return only reduces spend."""
        return self.units > 0


def contribution(event: TransactionEvent) -> Contribution:
    # Per line exactly `line_cents` (float64 product, x100, round half to even), in plain Python:
    # numpy's per-call overhead dominates for a handful of lines.
    return Contribution(
        event_id=event.event_id,
        invoice_no=event.invoice_no,
        month=month_of(event.ts),
        ts=int(event.ts.timestamp()),
        spend_cents=sum(round(ln.quantity * ln.unit_price * 100.0) for ln in event.lines),
        units=sum(ln.quantity for ln in event.lines),
    )


class Applied:
    """Outcome codes of `CustomerState.apply`."""

    APPLIED = "applied"
    REDELIVERED = "redelivered"
    DUPLICATE = "duplicate"
    TOO_LATE = "too_late"


@dataclass(slots=True)
class MonthAgg:
    spend_cents: int = 0
    units: int = 0
    invoices: set[str] = field(default_factory=set)
    events: set[str] = field(default_factory=set)

    @property
    def n_invoices(self) -> int:
        return len(self.invoices)


@dataclass(slots=True)
class CustomerState:
    customer_id: str
    partition: int = -1
    offset: int = -1
    months: dict[int, MonthAgg] = field(default_factory=dict)
    past_spend_cents: int = 0
    past_units: int = 0
    past_invoices: int = 0
    past_active_months: int = 0
    first_ts: int | None = None
    last_purchase_ts: int | None = None
    first_month: int | None = None
    last_purchase_month: int | None = None
    newest_ts: int | None = None

    def apply(
        self, c: Contribution, window_start: int, partition: int = -1, offset: int = -1
    ) -> str:
        """Fold one invoice in; returns an `Applied` code. Idempotent for redelivery."""
        if offset >= 0 and partition == self.partition and offset <= self.offset:
            return Applied.REDELIVERED
        if c.month < window_start:
            return Applied.TOO_LATE
        if offset >= 0:
            self.partition, self.offset = partition, offset
        self.trim(window_start)
        agg = self.months.get(c.month)
        if agg is None:
            agg = self.months[c.month] = MonthAgg()
        elif c.event_id in agg.events:
            return Applied.DUPLICATE
        agg.events.add(c.event_id)
        agg.spend_cents += c.spend_cents
        agg.units += c.units
        if c.is_purchase:
            agg.invoices.add(c.invoice_no)
            if self.last_purchase_ts is None or c.ts > self.last_purchase_ts:
                self.last_purchase_ts = c.ts
            if self.last_purchase_month is None or c.month > self.last_purchase_month:
                self.last_purchase_month = c.month
        if self.first_ts is None or c.ts < self.first_ts:
            self.first_ts = c.ts
        if self.first_month is None or c.month < self.first_month:
            self.first_month = c.month
        if self.newest_ts is None or c.ts > self.newest_ts:
            self.newest_ts = c.ts
        return Applied.APPLIED

    def trim(self, window_start: int) -> None:
        """Fold months before the window into the past totals (their id sets are dropped)."""
        for month in [m for m in self.months if m < window_start]:
            agg = self.months.pop(month)
            self.past_spend_cents += agg.spend_cents
            self.past_units += agg.units
            self.past_invoices += agg.n_invoices
            self.past_active_months += agg.n_invoices > 0

    def totals(self) -> tuple[int, int, int]:
        """Lifetime (spend cents, units, invoices)."""
        spend, units, invoices = self.past_spend_cents, self.past_units, self.past_invoices
        for a in self.months.values():  # one pass: every rescoring reads these
            spend += a.spend_cents
            units += a.units
            invoices += a.n_invoices
        return spend, units, invoices

    def to_dict(self, canonical: bool = True) -> dict[str, Any]:
        """`canonical=False` skips sorting the id sets and months: the same state, in an order
        that differs between equal states (the changelog codec, which only has to round-trip)."""
        order = sorted if canonical else list
        return {
            "c": self.customer_id, "p": self.partition, "o": self.offset,
            "m": [[m, a.spend_cents, a.units, order(a.invoices), order(a.events)]
                  for m, a in order(self.months.items())],
            "past": [self.past_spend_cents, self.past_units, self.past_invoices,
                     self.past_active_months],
            "ts": [self.first_ts, self.last_purchase_ts, self.newest_ts],
            "mo": [self.first_month, self.last_purchase_month],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CustomerState":
        state = cls(d["c"], d["p"], d["o"])
        state.months = {m: MonthAgg(s, u, set(inv), set(ev)) for m, s, u, inv, ev in d["m"]}
        (state.past_spend_cents, state.past_units, state.past_invoices,
         state.past_active_months) = d["past"]
        state.first_ts, state.last_purchase_ts, state.newest_ts = d["ts"]
        state.first_month, state.last_purchase_month = d["mo"]
        return state

    def canonical(self, window_start: int) -> dict[str, Any]:
        """The aggregates as of one window, without offsets or id sets: equal for equal histories."""
        trimmed = CustomerState.from_dict(self.to_dict())
        trimmed.trim(window_start)
        out = trimmed.to_dict()
        del out["p"], out["o"]
        out["m"] = [row[:4] for row in out["m"]]
        return out


def window_start_for(clock_month: int, window: int) -> int:
    return clock_month - window + 1


class Folder:
    """Folds contributions into a mapping of states under one event-time clock.

    The batch path keeps one for a whole file; the worker one per partition, over its table.
    """

    def __init__(self, window: int, states: MutableMapping[str, CustomerState] | None = None,
                 clock: int | None = None) -> None:
        self.window = window
        self.states: MutableMapping[str, CustomerState] = {} if states is None else states
        self.clock = clock

    @property
    def window_start(self) -> int:
        return window_start_for(self.clock if self.clock is not None else 0, self.window)

    def add(self, customer_id: str, c: Contribution, partition: int = -1, offset: int = -1) -> str:
        """Apply one contribution; returns the `Applied` code."""
        self.clock = c.month if self.clock is None else max(self.clock, c.month)
        state = self.states.get(customer_id)
        if state is None:
            state = CustomerState(customer_id)
        outcome = state.apply(c, self.window_start, partition, offset)
        if outcome == Applied.APPLIED:
            self.states[customer_id] = state
        return outcome
