"""The state record: round trip, its size bound, a customer far past the bound, old records,
and a decoder that refuses garbage with one clear error."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregate import MAX_IDS, Applied, CustomerState, Folder, contribution, month_of
from features.contract import Line, TransactionEvent, stable_event_id
from state.live.record import StateDecodeError, decode_state, encode_state, record_bound, source_offset

WINDOW = 13
T0 = datetime(2023, 1, 1, tzinfo=timezone.utc)


def event(cid: str, invoice: str, ts: datetime, qty: int = 2, price: float = 2.55,
          country: str | None = None) -> TransactionEvent:
    return TransactionEvent(stable_event_id(cid, invoice), cid, invoice, ts, (Line("A", qty, price),),
                            country)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(-3, 9).filter(bool), st.integers(0, 60)),
                min_size=1, max_size=60))
def test_round_trip_keeps_every_field(rows):
    folder = Folder(WINDOW)
    for k, (day, qty, inv) in enumerate(rows):
        folder.add("c1", contribution(event("c1", f"I{inv}", T0 + timedelta(days=day), qty)),
                   partition=1, offset=k)
    state = folder.states["c1"]
    again = decode_state(encode_state(state))
    assert again == state and again.n_ids == state.n_ids
    assert again.canonical(folder.window_start) == state.canonical(folder.window_start)


def test_country_is_the_newest_known_and_round_trips():
    folder = Folder(WINDOW)
    for k, (day, country) in enumerate([(5, None), (3, "France"), (9, None), (2, "Spain")]):
        folder.add("c1", contribution(event("c1", f"I{k}", T0 + timedelta(days=day), country=country)))
    state = folder.states["c1"]
    assert state.country == "France"  # it filled an unknown country; Spain's event is older
    folder.add("c1", contribution(event("c1", "I9", T0 + timedelta(days=9), country="EIRE")))
    assert state.country == "EIRE"
    assert decode_state(encode_state(state)) == state


def _format_1(state: CustomerState, with_country: bool) -> bytes:
    """The record workers wrote before purchase days (format 1), with or without its country."""
    months = [(m, a.spend_cents, a.units, a.n_invoices, b"".join(k.to_bytes(8, "little") for k in a.invoices),
               b"".join(k.to_bytes(8, "little") for k in a.events)) for m, a in state.months.items()]
    fields = [state.customer_id, state.partition, state.offset, state.past_spend_cents,
              state.past_units, state.past_invoices, state.past_active_months, state.first_ts,
              state.last_purchase_ts, state.newest_ts, state.first_month,
              state.last_purchase_month, state.ids_forgotten, months]
    return b"\x01" + msgspec.msgpack.encode(fields + [state.country] if with_country else fields)


def test_format_1_records_read_each_purchase_invoice_as_a_purchase_day():
    folder = Folder(WINDOW)
    for k in range(3):  # three invoices on one day: one purchase day
        folder.add("c1", contribution(event("c1", f"I{k}", T0 + timedelta(minutes=k), country="France")),
                   partition=2, offset=7 + k)
    state = folder.states["c1"]
    assert state.purchase_days() == 1
    for with_country in (True, False):
        old = decode_state(_format_1(state, with_country))
        assert old.country == ("France" if with_country else "")
        assert old.totals() == state.totals() and (old.partition, old.offset) == (2, 9)
        assert old.purchase_days() == 3  # what the models of format 1 counted
        assert decode_state(encode_state(old)) == old


def test_purchase_days_count_days_not_invoices_and_survive_the_window():
    folder = Folder(WINDOW)
    stamps = [T0, T0 + timedelta(hours=5), T0 + timedelta(days=1), T0 + timedelta(days=40)]
    for k, ts in enumerate(stamps):
        folder.add("c1", contribution(event("c1", f"I{k}", ts)), partition=0, offset=k)
    folder.add("c1", contribution(event("c1", "R1", T0 + timedelta(days=2), qty=-1)), partition=0, offset=9)
    state = folder.states["c1"]
    assert state.totals()[2] == 4 and state.purchase_days() == 3  # the return is no purchase
    assert folder.add("c1", contribution(event("c1", "I0", T0)), partition=0, offset=3) == Applied.REDELIVERED
    state.trim(month_of(T0) + 2)  # both months leave the window: their days go to the past
    assert state.past_purchase_days == 3 and state.purchase_days() == 3
    assert decode_state(encode_state(state)) == state


def test_typical_customer_is_small():
    folder = Folder(WINDOW)
    for k in range(8):
        folder.add("12347", contribution(event("12347", f"5{k:05d}", T0 + timedelta(days=40 * k))))
    assert len(encode_state(folder.states["12347"])) < 300


def test_full_state_stays_under_the_bound():
    """Every month of the window present, every key slot used, every integer at its widest: the
    record comes within 1% of the bound, so the bound is tight as well as safe."""
    folder = Folder(WINDOW)
    per_month = MAX_IDS // WINDOW + 50
    for m in range(WINDOW):
        for k in range(per_month):
            ts = T0 + timedelta(days=31 * m, seconds=k)
            folder.add("c", contribution(event("c", f"{m}-{k}", ts, country="United Kingdom")))
    state = folder.states["c"]
    assert len(state.months) == WINDOW and state.n_ids == MAX_IDS
    widest = 2**63 - 1  # a 64-bit integer, 9 bytes in MessagePack
    last_month = 2**31 - 1  # months are 32-bit (5 bytes), as `record_bound` counts them
    for name in ("partition", "offset", "past_units", "past_invoices", "past_active_months",
                 "past_purchase_days", "first_ts", "last_purchase_ts", "newest_ts", "ids_forgotten"):
        setattr(state, name, widest)
    state.past_spend_cents = -widest
    state.first_month, state.last_purchase_month = last_month - WINDOW + 1, last_month
    state.months = {last_month - WINDOW + 1 + i: agg for i, agg in enumerate(state.months.values())}
    for agg in state.months.values():
        agg.spend_cents, agg.units, agg.n_invoices = -widest, widest, widest
        agg.days = 2**31 - 1  # every day of a 31-day month
    bound = record_bound(WINDOW) + len("c") + len("United Kingdom")
    assert 0.99 * bound <= len(encode_state(state)) <= bound
    assert decode_state(encode_state(state)) == state


def test_thirty_thousand_invoices_in_a_month_count_exactly_within_the_bound():
    folder = Folder(WINDOW)
    cid = "B2B-0001"
    events = [event(cid, f"INV{k:06d}", T0 + timedelta(seconds=60 * k)) for k in range(30_000)]
    for k, ev in enumerate(events):
        assert folder.add(cid, contribution(ev), partition=0, offset=k) == Applied.APPLIED
    state = folder.states[cid]
    assert state.totals() == (30_000 * 510, 60_000, 30_000)
    assert state.n_ids == MAX_IDS and state.ids_forgotten == 2 * 30_000 - MAX_IDS
    size = len(encode_state(state))
    assert size <= record_bound(WINDOW) + len(cid) and size < 40_000  # Kafka's limit is 1 MB
    # A re-published duplicate among its newest ids is still recognised.
    assert folder.add(cid, contribution(events[-1]), partition=0, offset=30_001) == Applied.DUPLICATE
    assert decode_state(encode_state(state)).totals() == state.totals()


def test_records_of_earlier_workers_are_read():
    """The JSON record workers wrote before format 1 (ids in full)."""
    old = {"c": "00042", "p": 3, "o": 917,
           "m": [[month_of(T0), 1250, 3, ["I1", "I2"], ["e1", "e2", "e3"]],
                 [month_of(T0) + 1, -500, -1, [], ["e4"]]],
           "past": [10000, 7, 4, 2], "ts": [1600000000, 1672600000, 1675300000], "mo": [24247, 24276]}
    state = decode_state(json.dumps(old).encode())
    assert state.totals() == (10000 + 1250 - 500, 9, 6)
    assert (state.partition, state.offset, state.n_ids) == (3, 917, 6)
    assert decode_state(encode_state(state)) == state
    c = contribution(TransactionEvent("e2", "00042", "I2", T0 + timedelta(days=1), (Line("A", 1, 1.0),)))
    assert state.apply(c, month_of(T0) - 5) == Applied.DUPLICATE  # its old ids still count


def test_the_source_position_is_read_from_every_format_without_decoding_it_all():
    """Recovery's fencing token: the highest source offset the state applied."""
    folder = Folder(WINDOW)
    for k in range(3):
        folder.add("c1", contribution(event("c1", f"I{k}", T0 + timedelta(days=k))), partition=2, offset=40 + k)
    state = folder.states["c1"]
    old_json = json.dumps({"c": "c1", "p": 2, "o": 42, "m": [], "past": [0, 0, 0, 0], "ts": [None] * 3,
                           "mo": [None, None]}).encode()
    for record in (encode_state(state), _format_1(state, True), _format_1(state, False), old_json):
        assert source_offset(record) == decode_state(record).offset == 42
    assert source_offset(encode_state(CustomerState("bootstrapped"))) == -1
    for bad in (b"", b"\x02", b"\x02\x93\xa2c1\x02", b"\x07abc", b"{not json"):
        with pytest.raises(StateDecodeError):
            source_offset(bad)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda b: b"\x01" + b),
                 st.binary(max_size=300).map(lambda b: b"\x02" + b),
                 st.binary(max_size=300).map(lambda b: b"{" + b),
                 st.text(max_size=100).map(lambda t: ("{" + t).encode()),
                 st.recursive(st.none() | st.integers() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=5) | st.dictionaries(st.sampled_from("cpomts"), c),
                              max_leaves=20).map(lambda v: json.dumps({"c": "x", "m": v}).encode())))
def test_garbage_raises_only_a_decode_error(data):
    try:
        decode_state(data)
    except StateDecodeError:
        pass


def test_truncated_and_mangled_records_raise_a_decode_error():
    folder = Folder(WINDOW)
    folder.add("c1", contribution(event("c1", "I1", T0)))
    good = encode_state(folder.states["c1"])
    for bad in [good[:cut] for cut in range(len(good))] + [b"\x03" + good[1:], b"\x01" + good[1:], b"[1,2]"]:
        with pytest.raises(StateDecodeError, match="state record"):
            decode_state(bad)
