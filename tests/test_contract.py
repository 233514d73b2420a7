import json
import math
from datetime import datetime, timedelta, timezone

import pytest

from features.contract import Invalid, Reason, TransactionEvent, validate

GOOD = {
    "schema_version": 1, "event_id": "e1", "customer_id": "17850", "invoice_no": "536365",
    "ts": "2010-12-01T08:26:00+00:00",
    "lines": [{"stock_code": "85123A", "quantity": 6, "unit_price": 2.55}],
}


def with_(**changes):
    obj = {**GOOD, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def test_valid_event_round_trips():
    ev = validate(with_(country="United Kingdom"))
    assert isinstance(ev, TransactionEvent)
    assert ev.lines[0].quantity == 6 and ev.country == "United Kingdom"
    assert validate(ev.to_json()) == ev


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", Reason.MALFORMED_JSON),
    (b"\xff\xfe\x00garbage", Reason.MALFORMED_JSON),
    (b"[1, 2]", Reason.NOT_AN_OBJECT),
    (b'{"a":' * 100_000, Reason.MALFORMED_JSON),  # nested past the decoders' depth: not a crash
    (b"[" * 100_000, Reason.MALFORMED_JSON),
    (with_(customer_id=...), Reason.MISSING_FIELD),
    (with_(lines=...), Reason.MISSING_FIELD),
    (with_(schema_version=...), Reason.MISSING_FIELD),
    (with_(customer_id=17850), Reason.WRONG_TYPE),
    (with_(lines="x"), Reason.WRONG_TYPE),
    (with_(lines=[{"stock_code": "A", "quantity": "6", "unit_price": 1.0}]), Reason.WRONG_TYPE),
    (with_(lines=[{"stock_code": "A", "quantity": 1.5, "unit_price": 1.0}]), Reason.WRONG_TYPE),
    (with_(lines=[{"stock_code": "A", "quantity": True, "unit_price": 1.0}]), Reason.WRONG_TYPE),
    (with_(customer_id="  "), Reason.EMPTY_FIELD),
    (with_(schema_version=99), Reason.UNKNOWN_SCHEMA_VERSION),
    (with_(ts="yesterday"), Reason.BAD_TIMESTAMP),
    (with_(ts="2010-12-01T08:26:00"), Reason.NAIVE_TIMESTAMP),
    (with_(ts="1960-01-01T00:00:00Z"), Reason.ABSURD_VALUE),
    (with_(ts="2999-01-01T00:00:00Z"), Reason.FROM_FUTURE),
    (with_(ts="0001-01-01T00:00:00+01:00"), Reason.ABSURD_VALUE),  # no UTC time that early
    (b'{"schema_version":1,"event_id":"e","customer_id":"c","invoice_no":"i","ts":"2010-12-01T08:26:00Z",'
     b'"lines":[{"stock_code":"A","quantity":1,"unit_price":NaN}]}', Reason.NON_FINITE),
    (b'{"schema_version":1,"event_id":"e","customer_id":"c","invoice_no":"i","ts":"2010-12-01T08:26:00Z",'
     b'"lines":[{"stock_code":"A","quantity":1,"unit_price":1e400}]}', Reason.NON_FINITE),
    (with_(lines=[{"stock_code": "A", "quantity": 0, "unit_price": 1.0}]), Reason.ABSURD_VALUE),
    (with_(lines=[{"stock_code": "A", "quantity": 5_000_000, "unit_price": 1.0}]), Reason.ABSURD_VALUE),
    (with_(lines=[{"stock_code": "A", "quantity": 1, "unit_price": -2.0}]), Reason.ABSURD_VALUE),
    (with_(lines=[]), Reason.NO_LINES),
])
def test_bad_events_get_their_reason(raw, reason):
    out = validate(raw)
    assert isinstance(out, Invalid), out
    assert out.reason == reason, out
    assert out.detail


def test_event_time_ahead_of_the_wall_clock_is_bounded():
    """Clock skew of a few minutes passes; a week ahead, or past the caller's bound, does not."""
    now = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
    at = lambda delta: with_(ts=(now + delta).isoformat())  # noqa: E731
    assert isinstance(validate(at(timedelta(minutes=14)), now), TransactionEvent)
    assert validate(at(timedelta(days=7)), now).reason == Reason.FROM_FUTURE
    assert validate(at(timedelta(minutes=16)), now).reason == Reason.FROM_FUTURE
    assert isinstance(validate(at(timedelta(hours=2)), now, timedelta(hours=3)), TransactionEvent)
    assert validate(at(timedelta(minutes=2)), now, timedelta(minutes=1)).reason == Reason.FROM_FUTURE


def test_zone_is_normalised_to_utc():
    ev = validate(with_(ts="2010-12-01T09:26:00+01:00"))
    assert ev.ts.utcoffset().total_seconds() == 0 and ev.ts.hour == 8


def test_cancellation_is_valid():
    ev = validate(with_(invoice_no="C536379", lines=[{"stock_code": "D", "quantity": -1, "unit_price": 27.5}]))
    assert isinstance(ev, TransactionEvent) and ev.lines[0].quantity == -1
    assert not math.isnan(ev.lines[0].unit_price)


def test_the_quick_line_check_agrees_with_the_full_one():
    """Lines take a short path when they look ordinary; on every kind of value it must accept and
    reject exactly what the full check does, with the same reason."""
    import itertools

    from features import contract

    big_q, big_p = contract.MAX_ABS_QUANTITY, contract.MAX_UNIT_PRICE
    codes = ["85123A", " POST ", "", 22423, True, None, 1.5, ...]
    quantities = [6, -1, 0, big_q, -big_q, big_q + 1, 2.0, 1.5, True, "6", None, float("inf"), ...]
    prices = [2.55, 0, 0.0, 3, big_p, big_p + 0.01, -0.01, float("inf"), True, "1", None, ...]

    def outcome(check, raw):
        try:
            return check(raw, 0)
        except contract._Bad as bad:
            return bad.reason

    raws = [7, "x", None]
    for code, qty, price in itertools.product(codes, quantities, prices):
        raws.append({k: v for k, v in (("stock_code", code), ("quantity", qty),
                                       ("unit_price", price)) if v is not ...})
    for raw in raws:
        assert outcome(contract._line, raw) == outcome(contract._checked_line, raw), raw


def test_the_quick_event_check_accepts_only_what_the_full_one_does_as_the_same_event():
    """Events take msgspec's typed decoder when they are ordinary; whatever it accepts, the full
    check (the `json` decoder, then every rule) must accept as the same event, and what it
    leaves goes the full way for its reason."""
    import itertools
    import random

    from features import contract

    now = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)

    def both(raw):
        quick = contract._quick(raw, now, contract.MAX_FUTURE)
        obj = contract.decode(raw)
        full = obj if isinstance(obj, Invalid) else contract.validate_dict(obj, now)
        if quick is not None:
            assert quick == full, raw
        assert validate(raw, now) == full, raw
        return quick

    line = GOOD["lines"][0]
    values = [..., None, True, 0, 1, -1, 2.0, 1.5, 5_000_000, 2**70, "", " x ", "6", 1e400, [], {}]
    for field, value in itertools.product(list(GOOD) + ["country"], values):
        both(with_(**{field: value}))
    for field, value in itertools.product(list(line), values + [0.1 + 0.2, 19.99, 1e-7, 3]):
        both(with_(lines=[{k: v for k, v in {**line, field: value}.items() if v is not ...}]))
    assert both(with_(lines=[{**line, "stock_code": 22423}])).lines[0].stock_code == "22423"
    assert both(with_(lines=[{**line, "unit_price": 3}])).lines[0].unit_price == 3.0
    for raw in (b'{"schema_version":1,"schema_version":2}', b"", b"null", b"[]", b"\xff",
                with_()[:-1], with_() + b" x", with_() + b"  ", with_().replace(b"17850", b"\\ud800"),
                with_().replace(b'"e1"', b'"e1","event_id":"e2"'),
                with_().replace(b'"e1"', b'"e1","extra":{"a":[1,2]}'), with_(ts="2010-12-01T08:26:00z"),
                with_(ts=" 2010-12-01T08:26:00+00:00 "), with_(ts="2026-01-10T12:14:00Z"),
                with_(ts="2026-01-10T12:16:00Z"), with_(lines=[line] * 10_001)):
        both(raw)
    rng = random.Random(7)
    for _ in range(2000):  # prices and quantities as publishers write them: the same floats
        price = rng.choice([round(rng.uniform(0, 50), rng.randint(0, 4)), rng.uniform(0, 1e6),
                            rng.randint(0, 1000)])
        ev = both(with_(lines=[{**line, "quantity": rng.randint(-1000, 1000) or 1,
                                "unit_price": price}]))
        assert ev is not None and ev.lines[0].unit_price == float(price)
