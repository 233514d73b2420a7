"""The `transactions` event contract and its validator.

One event is one invoice: its lines travel together so that a customer's state changes once per
invoice, not once per line. The validator never raises on bad input: it returns a reason code, so
the worker can route the original bytes to the dead-letter topic and keep going.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

# Bounds past which a value is a data error, not a purchase: they keep one broken upstream row
# from dwarfing every honest customer's history.
MAX_ABS_QUANTITY = 1_000_000
MAX_UNIT_PRICE = 1_000_000.0
MAX_LINES = 10_000
MIN_TS = datetime(1970, 1, 1, tzinfo=timezone.utc)
# How far ahead of the wall clock an event time may be (clock skew between hosts), unless the
# caller says otherwise (the worker passes its `max_future_minutes` setting). One event stamped
# days ahead would move its partition's clock into a month that has not begun.
MAX_FUTURE = timedelta(minutes=15)


class Reason:
    """Dead-letter reason codes: stable strings, documented in the README."""

    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_FIELD = "empty_field"
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    BAD_TIMESTAMP = "bad_timestamp"
    NAIVE_TIMESTAMP = "naive_timestamp"
    NON_FINITE = "non_finite"
    ABSURD_VALUE = "absurd_value"
    NO_LINES = "no_lines"
    FROM_FUTURE = "from_future"
    KEY_MISMATCH = "key_mismatch"
    MISSING_KEY = "missing_key"
    WRONG_PARTITION = "wrong_partition"
    TOO_LATE = "too_late"
    TOO_LARGE_TO_ROUTE = "too_large_to_route"  # valid, on another partition, over the producer's limit
    UNPROCESSABLE = "unprocessable"  # the worker failed on it (a defect): logged with its traceback

    ALL = (
        MALFORMED_JSON,
        NOT_AN_OBJECT,
        MISSING_FIELD,
        WRONG_TYPE,
        EMPTY_FIELD,
        UNKNOWN_SCHEMA_VERSION,
        BAD_TIMESTAMP,
        NAIVE_TIMESTAMP,
        NON_FINITE,
        ABSURD_VALUE,
        NO_LINES,
        FROM_FUTURE,
        KEY_MISMATCH,
        MISSING_KEY,
        WRONG_PARTITION,
        TOO_LATE,
        TOO_LARGE_TO_ROUTE,
        UNPROCESSABLE,
    )


@dataclass(frozen=True, slots=True)
class Line:
    stock_code: str
    quantity: int
    unit_price: float


@dataclass(frozen=True, slots=True)
class TransactionEvent:
    event_id: str
    customer_id: str
    invoice_no: str
    ts: datetime
    lines: tuple[Line, ...]
    country: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "event_id": self.event_id,
            "customer_id": self.customer_id,
            "invoice_no": self.invoice_no,
            "ts": self.ts.isoformat(),
            "lines": [
                {"stock_code": ln.stock_code, "quantity": ln.quantity, "unit_price": ln.unit_price} for ln in self.lines
            ],
        }
        if self.country is not None:
            out["country"] = self.country
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str
    detail: str


def stable_event_id(customer_id: str, invoice_no: str) -> str:
    """Same invoice, same id: a replay of one file twice publishes identical event ids."""
    digest = hashlib.blake2b(f"{customer_id}\x1f{invoice_no}".encode(), digest_size=10)
    return digest.hexdigest()


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


class _NonFinite(ValueError):
    pass


# One decoder for every message: json.loads with options builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_ts(value: Any) -> datetime | Invalid:
    """ISO-8601 with an explicit zone; a zone-less time is ambiguous across regions."""
    if not isinstance(value, str):
        return Invalid(Reason.WRONG_TYPE, "ts must be an ISO-8601 string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        return Invalid(Reason.BAD_TIMESTAMP, f"ts {value[:40]!r} is not ISO-8601")
    if ts.tzinfo is None or ts.utcoffset() is None:
        return Invalid(Reason.NAIVE_TIMESTAMP, f"ts {value[:40]!r} has no time zone")
    try:
        return ts.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00: before the first representable UTC time
        return Invalid(Reason.ABSURD_VALUE, f"ts {value[:40]!r} is out of range")


def _field(obj: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj or obj[name] is None:
        raise _Bad(Reason.MISSING_FIELD, f"{name} is missing")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _Bad(Reason.WRONG_TYPE, f"{name} must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _text(obj: dict, name: str) -> str:
    value = _field(obj, name, str).strip()
    if not value:
        raise _Bad(Reason.EMPTY_FIELD, f"{name} is empty")
    return value


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_NUMBERS = (int, float)  # exact types: JSON booleans are not quantities


def _line(raw: Any, i: int) -> Line:
    """The common line (string code, whole quantity, price in range) in a few checks; anything
    else goes through every check, which names what is wrong."""
    if type(raw) is dict:
        code: Any = raw.get("stock_code")
        qty: Any = raw.get("quantity")
        price: Any = raw.get("unit_price")
        if (
            type(code) is str
            and type(qty) is int
            and 0 < abs(qty) <= MAX_ABS_QUANTITY
            and type(price) in _NUMBERS
            and 0 <= price <= MAX_UNIT_PRICE
        ):
            return Line(code.strip(), qty, float(price))
    return _checked_line(raw, i)


def _checked_line(raw: Any, i: int) -> Line:
    if not isinstance(raw, dict):
        raise _Bad(Reason.WRONG_TYPE, f"lines[{i}] must be an object")
    code = raw.get("stock_code")
    if code is None:
        raise _Bad(Reason.MISSING_FIELD, f"lines[{i}].stock_code is missing")
    if not isinstance(code, (str, int)) or isinstance(code, bool):
        raise _Bad(Reason.WRONG_TYPE, f"lines[{i}].stock_code must be a string")
    qty = _field(raw, "quantity", (int, float))
    price = _field(raw, "unit_price", (int, float))
    if not math.isfinite(qty) or not math.isfinite(price):
        raise _Bad(Reason.NON_FINITE, f"lines[{i}] has a non-finite number")
    if qty != int(qty):
        raise _Bad(Reason.WRONG_TYPE, f"lines[{i}].quantity must be a whole number")
    qty = int(qty)
    if qty == 0 or abs(qty) > MAX_ABS_QUANTITY:
        raise _Bad(Reason.ABSURD_VALUE, f"lines[{i}].quantity {qty} outside 1..{MAX_ABS_QUANTITY}")
    if price < 0 or price > MAX_UNIT_PRICE:
        raise _Bad(Reason.ABSURD_VALUE, f"lines[{i}].unit_price {price} outside 0..{MAX_UNIT_PRICE}")
    return Line(str(code).strip(), qty, float(price))


def validate_dict(
    obj: Any, now: datetime | None = None, max_future: timedelta = MAX_FUTURE
) -> TransactionEvent | Invalid:
    """Check a decoded event against the contract; ts may be at most `max_future` after `now`
    (default: the wall clock)."""
    if not isinstance(obj, dict):
        return Invalid(Reason.NOT_AN_OBJECT, f"event must be a JSON object, got {type(obj).__name__}")
    try:
        version = _field(obj, "schema_version", int)
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise _Bad(Reason.UNKNOWN_SCHEMA_VERSION, f"schema_version {version} is not supported")
        event_id = _text(obj, "event_id")
        customer_id = _text(obj, "customer_id")
        invoice_no = _text(obj, "invoice_no")
        ts = parse_ts(_field(obj, "ts", str))
        if isinstance(ts, Invalid):
            return ts
        if ts < MIN_TS:
            raise _Bad(Reason.ABSURD_VALUE, f"ts {ts.isoformat()} is before 1970")
        limit = (now or datetime.now(timezone.utc)) + max_future
        if ts > limit:
            raise _Bad(
                Reason.FROM_FUTURE,
                f"ts {ts.isoformat()} is after the wall clock + "
                f"{max_future.total_seconds() / 60:g} min ({limit.isoformat()})",
            )
        raw_lines = _field(obj, "lines", list)
        if not raw_lines:
            raise _Bad(Reason.NO_LINES, "lines is empty")
        if len(raw_lines) > MAX_LINES:
            raise _Bad(Reason.ABSURD_VALUE, f"{len(raw_lines)} lines exceeds {MAX_LINES}")
        lines = tuple(_line(raw, i) for i, raw in enumerate(raw_lines))
        country = obj.get("country")
        if country is not None and not isinstance(country, str):
            raise _Bad(Reason.WRONG_TYPE, "country must be a string")
    except _Bad as bad:
        return Invalid(bad.reason, bad.detail)
    return TransactionEvent(event_id, customer_id, invoice_no, ts, lines, country, version)


def decode(raw: bytes | str) -> Any:
    """One JSON message value, or `Invalid` (malformed, or a NaN/Infinity literal); never raises.
    Shared by every topic's contract, so all of them refuse the same non-JSON."""
    try:
        return _DECODER.decode(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except _NonFinite as exc:
        return Invalid(Reason.NON_FINITE, f"{exc} is not a finite number")
    except (ValueError, TypeError, RecursionError) as exc:
        return Invalid(Reason.MALFORMED_JSON, str(exc)[:200])


class _QuickLine(msgspec.Struct):
    stock_code: str | int
    quantity: int
    unit_price: float


class _QuickEvent(msgspec.Struct):
    schema_version: int
    event_id: str
    customer_id: str
    invoice_no: str
    ts: str
    lines: list[_QuickLine]
    country: str | None = None


_quick_decoder = msgspec.json.Decoder(_QuickEvent)


def _quick(raw: bytes | str, now: datetime | None, max_future: timedelta) -> TransactionEvent | None:
    """The common event (the contract's types exactly, values in range), decoded and checked
    in one pass of msgspec's typed JSON decoder (a third of the time of `json` and the checks);
    None for anything else, which `validate_dict` then names. Every check here is at least as
    strict as its twin there, so whatever this accepts, the full check accepts as the same
    event (tests/test_contract.py holds them level)."""
    try:
        ev = _quick_decoder.decode(raw)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):  # the full way names it
        return None
    event_id, customer_id, invoice_no = ev.event_id.strip(), ev.customer_id.strip(), ev.invoice_no.strip()
    lines = ev.lines
    if (
        ev.schema_version not in SUPPORTED_SCHEMA_VERSIONS
        or not event_id
        or not customer_id
        or not invoice_no
        or not lines
        or len(lines) > MAX_LINES
    ):
        return None
    out = []
    for ln in lines:
        qty, price, code = ln.quantity, ln.unit_price, ln.stock_code
        if not (0 < abs(qty) <= MAX_ABS_QUANTITY and 0 <= price <= MAX_UNIT_PRICE):
            return None
        out.append(Line(code.strip() if type(code) is str else str(code), qty, price))
    ts = parse_ts(ev.ts)
    if isinstance(ts, Invalid) or ts < MIN_TS or ts > (now or datetime.now(timezone.utc)) + max_future:
        return None
    return TransactionEvent(event_id, customer_id, invoice_no, ts, tuple(out), ev.country, ev.schema_version)


def validate(
    raw: bytes | str, now: datetime | None = None, max_future: timedelta = MAX_FUTURE
) -> TransactionEvent | Invalid:
    """Decode and check one message value; never raises."""
    quick = _quick(raw, now, max_future)
    if quick is not None:
        return quick
    obj = decode(raw)
    return obj if isinstance(obj, Invalid) else validate_dict(obj, now, max_future)
