"""Type and clean a loaded line-level frame, accounting for every row it drops.

Policies (documented in the README):
- cancellations (invoice "C...", negative quantity) are kept: a return reduces spend;
- exact duplicate lines are kept by default (real files repeat genuine lines; CDNOW repeats are
  real purchases) and always counted; `duplicates="drop"` drops the repeats instead;
- wholesale outliers (|quantity| above `outlier_quantity`) are dropped by default, the order and
  its cancellation alike, so one mistyped order cannot dominate a customer's history;
- zero prices are dropped where they are bookkeeping (Online Retail), kept where a free purchase
  is still a purchase (CDNOW).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from features.loaders import Loaded

DATE_FORMATS = ("ISO8601", "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S", "%Y%m%d", "%d/%m/%Y %H:%M")

# Drop reasons, in the order they are checked: a row is counted under the first that applies.
DROP_REASONS = (
    "no_customer",
    "unparseable_date",
    "unparseable_quantity",
    "unparseable_price",
    "bad_debt_adjustment",
    "negative_price",
    "zero_price",
    "zero_quantity",
    "outlier",
    "duplicate",
)


@dataclass(frozen=True)
class CleaningPolicy:
    drop_zero_price: bool = True
    duplicates: Literal["keep", "drop"] = "keep"
    outlier_quantity: int | None = 10_000
    timezone: str = "UTC"  # zone of timestamps that carry none (the UCI files are UK local time)

    @classmethod
    def for_format(cls, fmt: str, **overrides: object) -> "CleaningPolicy":
        """Format defaults, then explicit overrides; `outlier_quantity=0` keeps every line."""
        values = {
            **asdict(cls(drop_zero_price=fmt != "cdnow")),
            **{k: v for k, v in overrides.items() if v is not None},
        }
        if values["outlier_quantity"] == 0:
            values["outlier_quantity"] = None
        return cls(**values)


@dataclass
class CleaningReport:
    format: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    cancellation_lines: int
    duplicate_lines: int
    policy: dict[str, object]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_timestamps(text: pd.Series, tz: str) -> pd.Series:
    """Vectorised over the known styles; zone-less times are read in `tz`; a row no style
    parses stays NaT and is counted."""
    text = text.str.strip()
    out = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns, UTC]")
    zoned = text.str.contains(r"(?:Z|[+-]\d\d:?\d\d)$", regex=True)
    for has_zone in (False, True):
        todo = (text != "") & (zoned == has_zone)
        for fmt in DATE_FORMATS:
            if not todo.any():
                break
            parsed = pd.to_datetime(text[todo], format=fmt, errors="coerce", utc=has_zone)
            if not has_zone:
                parsed = parsed.dt.tz_localize(tz, ambiguous="NaT", nonexistent="shift_forward")
            parsed = parsed.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
            ok = parsed.notna()
            out.loc[ok[ok].index] = parsed[ok]
            todo &= out.isna()
    return out


def _normalise_customer(ids: pd.Series) -> pd.Series:
    """'17850.0' and ' 17850 ' are the same customer as '17850'."""
    ids = ids.str.strip()
    return ids.str.replace(r"^(\d+)\.0+$", r"\1", regex=True)


def clean(loaded: Loaded, policy: CleaningPolicy | None = None) -> tuple[pd.DataFrame, CleaningReport]:
    """Typed, cleaned lines (customer_id, invoice_no, ts, stock_code, quantity, unit_price, country)."""
    policy = policy or CleaningPolicy.for_format(loaded.format)
    raw = loaded.frame
    n = len(raw)
    customer = _normalise_customer(raw["customer_id"].astype(str))
    invoice = raw["invoice_no"].astype(str).str.strip()
    ts = parse_timestamps(raw["ts"].astype(str), policy.timezone)
    qty_f = pd.to_numeric(raw["quantity"].astype(str).str.strip(), errors="coerce")
    price = pd.to_numeric(raw["unit_price"].astype(str).str.strip(), errors="coerce")
    qty_ok = qty_f.notna() & np.isfinite(qty_f) & (qty_f == qty_f.round())
    price_ok = price.notna() & np.isfinite(price)

    reason = np.zeros(n, dtype=np.int8)  # 0 kept, else 1 + the index of its DROP_REASONS entry

    def mark(name: str, mask: pd.Series) -> None:
        reason[(reason == 0) & mask.fillna(False).to_numpy(bool)] = DROP_REASONS.index(name) + 1

    mark("no_customer", customer.isin(["", "nan", "NaN", "None"]))
    mark("unparseable_date", ts.isna())
    mark("unparseable_quantity", ~qty_ok)
    mark("unparseable_price", ~price_ok)
    mark("bad_debt_adjustment", invoice.str.upper().str.startswith("A"))
    mark("negative_price", price < 0)
    if policy.drop_zero_price:
        mark("zero_price", price == 0)
    mark("zero_quantity", qty_f == 0)
    if policy.outlier_quantity is not None:
        mark("outlier", qty_f.abs() > policy.outlier_quantity)

    lines = pd.DataFrame(
        {
            "customer_id": customer,
            "invoice_no": invoice,
            "ts": ts,
            "stock_code": raw["stock_code"].astype(str).str.strip(),
            "quantity": qty_f,
            "unit_price": price,
            "country": raw["country"].astype(str).str.strip().replace("", None),
        }
    )
    candidate = reason == 0
    dupes = lines[candidate].duplicated(keep="first")
    duplicate_lines = int(dupes.sum())
    if policy.duplicates == "drop":
        mark("duplicate", dupes.reindex(raw.index, fill_value=False))

    kept = lines[reason == 0].copy()
    kept["quantity"] = kept["quantity"].astype("int64")
    kept["unit_price"] = kept["unit_price"].astype("float64")
    counts = np.bincount(reason, minlength=len(DROP_REASONS) + 1)
    dropped = {name: int(counts[i + 1]) for i, name in enumerate(DROP_REASONS)}
    report = CleaningReport(
        format=loaded.format,
        rows_read=n,
        rows_kept=len(kept),
        dropped=dropped,
        cancellation_lines=int((kept["quantity"] < 0).sum()),
        duplicate_lines=duplicate_lines,
        policy=asdict(policy),
        notes=list(loaded.notes),
    )
    if report.rows_kept + sum(dropped.values()) != n:
        raise RuntimeError(f"cleaning accounted for {report.rows_kept + sum(dropped.values())} of {n} rows")
    return kept.reset_index(drop=True), report
