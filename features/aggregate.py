"""Per-customer monthly aggregates, folded one invoice at a time.

This is the single aggregation rule of the product: the batch path folds a history through
`CustomerState.apply` exactly as the live worker folds the stream, so a customer's aggregates (and
so its features) are identical offline and online. Money is held in integer cents, so sums do not
depend on the order events arrive in.

Exactness under redelivery: a state remembers the highest source offset applied from its
partition (a redelivered message is at or below it). Re-published duplicates (the same event id
sent again) and invoices split over several events are recognised by 64-bit keys of the ids
(`id_key`) kept per month. Months older than the window are folded into `past_*` totals and
their keys dropped, which keeps a state bounded; an event for such a month is too late.

The id bound: a state keeps at most `MAX_IDS` keys over its window's months. Beyond it (a
customer with thousands of invoices in the window) the oldest keys are forgotten first (the
oldest month's, alternating event and invoice keys) and `ids_forgotten` counts them. Every
event still counts and every invoice arriving in one event still counts once, so invoice counts
stay exact for any volume; what the bound gives up is recognising a re-published duplicate whose
key was forgotten, and an invoice whose events are that far apart (both are then counted again).
Below the bound (every customer of every data set we have) nothing is forgotten and the fold does
not depend on event order at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from features.contract import TransactionEvent

MAX_IDS = 4096  # event and invoice keys a state keeps over its window (8 bytes each encoded)


def month_of(ts: datetime) -> int:
    """Months since year 0, in UTC: consecutive calendar months are consecutive integers."""
    ts = ts.astimezone(timezone.utc)
    return ts.year * 12 + ts.month - 1


def month_start(month: int) -> datetime:
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)


def line_cents(quantity: Any, unit_price: Any) -> Any:
    """Line amount in cents; works on scalars and numpy arrays with the same rounding."""
    return np.rint(np.multiply(quantity, unit_price) * 100.0)


def id_key(text: str) -> int:
    """The 64-bit key a state remembers an event or invoice id by: the same in every process
    (unlike `hash`), and with a 4,096-key state a chance of two ids colliding near 1e-12."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one invoice adds to its customer's month."""

    event_key: int  # id_key(event_id)
    invoice_key: int  # id_key(invoice_no)
    month: int
    ts: int  # epoch seconds
    spend_cents: int
    units: int
    country: str = ""  # the event's country, "" when it carries none

    @property
    def is_purchase(self) -> bool:
        """Net positive units: a purchase counts as an invoice; a return only reduces spend."""
        return self.units > 0

    @property
    def day_bit(self) -> int:
        """The invoice's day of its month (UTC) as one bit of `MonthAgg.days`."""
        return 1 << (datetime.fromtimestamp(self.ts, timezone.utc).day - 1)


def contribution(event: TransactionEvent) -> Contribution:
    # Per line exactly `line_cents` (float64 product, x100, round half to even), in plain Python:
    # numpy's per-call overhead dominates for a handful of lines.
    return Contribution(
        event_key=id_key(event.event_id),
        invoice_key=id_key(event.invoice_no),
        month=month_of(event.ts),
        ts=int(event.ts.timestamp()),
        spend_cents=sum(round(ln.quantity * ln.unit_price * 100.0) for ln in event.lines),
        units=sum(ln.quantity for ln in event.lines),
        country=event.country or "",
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
    n_invoices: int = 0  # distinct purchase invoices counted (exact, see the module docstring)
    invoices: dict[int, None] = field(default_factory=dict)  # invoice keys kept, oldest first
    events: dict[int, None] = field(default_factory=dict)  # event keys kept, oldest first
    days: int = 0  # days of the month with a purchase, bit d - 1 for day d (UTC)


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
    ids_forgotten: int = 0  # keys dropped at the MAX_IDS bound, over the customer's life
    # Country of the newest event carrying one ("" unknown); an older event only fills an unknown.
    country: str = ""
    past_purchase_days: int = 0  # days with a purchase before the window
    n_ids: int = field(default=0, compare=False)  # keys held now (derived, not encoded)

    def apply(self, c: Contribution, window_start: int, partition: int = -1, offset: int = -1) -> str:
        """Fold one invoice in; returns an `Applied` code. Idempotent for redelivery; a state
        is changed only when the outcome is APPLIED."""
        if offset >= 0 and partition == self.partition and offset <= self.offset:
            return Applied.REDELIVERED
        if c.month < window_start:
            return Applied.TOO_LATE
        agg = self.months.get(c.month)
        if agg is not None and c.event_key in agg.events:
            return Applied.DUPLICATE
        if offset >= 0:
            self.partition, self.offset = partition, offset
        self.trim(window_start)
        if agg is None:
            agg = self.months[c.month] = MonthAgg()
        self._remember(agg.events, c.event_key)
        agg.spend_cents += c.spend_cents
        agg.units += c.units
        if c.is_purchase:
            agg.days |= c.day_bit
            if c.invoice_key not in agg.invoices:
                agg.n_invoices += 1
                self._remember(agg.invoices, c.invoice_key)
            if self.last_purchase_ts is None or c.ts > self.last_purchase_ts:
                self.last_purchase_ts = c.ts
            if self.last_purchase_month is None or c.month > self.last_purchase_month:
                self.last_purchase_month = c.month
        if self.first_ts is None or c.ts < self.first_ts:
            self.first_ts = c.ts
        if self.first_month is None or c.month < self.first_month:
            self.first_month = c.month
        if c.country and (not self.country or self.newest_ts is None or c.ts >= self.newest_ts):
            self.country = c.country
        if self.newest_ts is None or c.ts > self.newest_ts:
            self.newest_ts = c.ts
        return Applied.APPLIED

    def _remember(self, keys: dict[int, None], key: int) -> None:
        keys[key] = None
        self.n_ids += 1
        self.keep_within_bound()

    def keep_within_bound(self) -> None:
        while self.n_ids > MAX_IDS:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        """Drop one key of the oldest month holding any: its event and invoice keys in turn."""
        agg = self.months[min(m for m, a in self.months.items() if a.events or a.invoices)]
        keys = agg.events if len(agg.events) >= len(agg.invoices) else agg.invoices
        del keys[next(iter(keys))]
        self.n_ids -= 1
        self.ids_forgotten += 1

    def trim(self, window_start: int) -> None:
        """Fold months before the window into the past totals (their keys are dropped)."""
        for month in [m for m in self.months if m < window_start]:
            agg = self.months.pop(month)
            self.past_spend_cents += agg.spend_cents
            self.past_units += agg.units
            self.past_invoices += agg.n_invoices
            self.past_active_months += agg.n_invoices > 0
            self.past_purchase_days += agg.days.bit_count()
            self.n_ids -= len(agg.events) + len(agg.invoices)

    def totals(self) -> tuple[int, int, int]:
        """Lifetime (spend cents, units, invoices)."""
        spend, units, invoices = self.past_spend_cents, self.past_units, self.past_invoices
        for a in self.months.values():  # one pass: every rescoring reads these
            spend += a.spend_cents
            units += a.units
            invoices += a.n_invoices
        return spend, units, invoices

    def purchase_days(self) -> int:
        """Lifetime days with a purchase: the classic model's purchase count (BG/NBD counts
        days, so several invoices of one day are one purchase)."""
        return self.past_purchase_days + sum(a.days.bit_count() for a in self.months.values())

    def canonical(self, window_start: int) -> dict[str, Any]:
        """The aggregates as of one window, without offsets or keys: equal for equal histories."""
        past = [
            self.past_spend_cents,
            self.past_units,
            self.past_invoices,
            self.past_active_months,
            self.past_purchase_days,
        ]
        months = []
        for m, a in sorted(self.months.items()):
            if m < window_start:
                past = [
                    past[0] + a.spend_cents,
                    past[1] + a.units,
                    past[2] + a.n_invoices,
                    past[3] + (a.n_invoices > 0),
                    past[4] + a.days.bit_count(),
                ]
            else:
                months.append([m, a.spend_cents, a.units, a.n_invoices, a.days])
        return {
            "c": self.customer_id,
            "m": months,
            "past": past,
            "ts": [self.first_ts, self.last_purchase_ts, self.newest_ts],
            "mo": [self.first_month, self.last_purchase_month],
        }


class StateMap(Protocol):
    """Where a `Folder` keeps its states: a dict in batch, the worker's store for a partition."""

    def get(self, customer_id: str, default: None = None) -> CustomerState | None: ...

    def __setitem__(self, customer_id: str, state: CustomerState) -> None: ...


def window_start_for(clock_month: int, window: int) -> int:
    return clock_month - window + 1


class Folder:
    """Folds contributions into a mapping of states under one event-time clock.

    The batch path keeps one for a whole file; the worker one per partition, over its table.
    """

    def __init__(self, window: int, states: StateMap | None = None, clock: int | None = None) -> None:
        self.window = window
        self.states: StateMap = {} if states is None else states
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
