"""Cleaned line-level frames to invoice events, in event-time order.

Both the replay tool (which publishes them) and the batch path (which folds them) start here, so a
file replayed through the stream and the same file scored in batch see the same invoices.
"""

from __future__ import annotations

from datetime import timezone
from typing import Iterator

import numpy as np
import pandas as pd

from features.contract import Line, TransactionEvent, stable_event_id


def events_from_lines(lines: pd.DataFrame) -> Iterator[TransactionEvent]:
    """One event per (customer, invoice); stamped with the invoice's earliest line time."""
    if lines.empty:
        return
    frame = lines.sort_values(["customer_id", "invoice_no", "ts"], kind="stable")
    keys = frame["customer_id"].to_numpy(object), frame["invoice_no"].to_numpy(object)
    change = np.ones(len(frame), dtype=bool)
    change[1:] = (keys[0][1:] != keys[0][:-1]) | (keys[1][1:] != keys[1][:-1])
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], len(frame))
    ts = frame["ts"].to_numpy()
    order = np.lexsort((keys[1][starts].astype(str), keys[0][starts].astype(str), ts[starts]))
    stock = frame["stock_code"].to_numpy(object)
    qty = frame["quantity"].to_numpy(np.int64)
    price = frame["unit_price"].to_numpy(np.float64)
    country = frame["country"].to_numpy(object)
    stamps = pd.DatetimeIndex(frame["ts"]).to_pydatetime()
    for i in order:
        a, b = starts[i], ends[i]
        customer, invoice = keys[0][a], keys[1][a]
        c = country[a]
        yield TransactionEvent(
            event_id=stable_event_id(customer, invoice),
            customer_id=customer,
            invoice_no=invoice,
            ts=stamps[a].astimezone(timezone.utc),
            lines=tuple(Line(str(stock[j]), int(qty[j]), float(price[j])) for j in range(a, b)),
            country=None if c is None or (isinstance(c, float) and np.isnan(c)) else str(c),
        )
