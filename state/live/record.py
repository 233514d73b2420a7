"""A customer state as bytes: the record of the state changelog and of every store.

Format 2 is one version byte (0x02) followed by a MessagePack array:

    [customer_id, partition, offset, past_spend_cents, past_units, past_invoices,
     past_active_months, past_purchase_days, first_ts, last_purchase_ts, newest_ts, first_month,
     last_purchase_month, ids_forgotten,
     [[month, spend_cents, units, n_invoices, days, invoice_keys, event_keys], ...], country]

`days` is the month's purchase days as a bitmask (bit d - 1 for day d, UTC). Format 1 (before
purchase days; its months without `days`, its state without `past_purchase_days`, its country
optional) is still read: each purchase invoice then stands for a purchase day (the count the
models of that time used), until those months leave the window.

Money in integer cents, times in epoch seconds, months as `features.aggregate.month_of`; key
lists are packed little-endian unsigned 64-bit integers, oldest first. A typical customer (a few
invoices over the window) takes 100-300 bytes. Bound: the state keeps at most `MAX_IDS` keys and
at most `window` months, so a record is at most `record_bound(window)` bytes plus its customer
id's and country's UTF-8 lengths: 33,524 + len(id) + len(country) for the shipped 13-month
window.

The state's source position (`partition`, `offset`: the highest offset of the customer's
`transactions` partition its state has applied) leads every format, so `source_offset` reads it
without decoding the rest: recovery keeps, per customer, the record of the highest position (see
`state.live.recovery`).

Records written before format 1 are JSON objects (first byte `{`, with every event and invoice id
in full); they are still read, their ids turned into keys, so a changelog written by an older
worker recovers into the new format.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgspec

from features.aggregate import MAX_IDS, CustomerState, MonthAgg, id_key

FORMAT = 2
_HEADER = bytes([FORMAT])
_FORMAT_1 = bytes([1])
# array header, month, three int64s, the uint32 days, two bin headers
_MONTH_FIXED = 1 + 5 + 3 * 9 + 5 + 2 * 5
# version, array header, id header, thirteen ints, month list header, country header
_STATE_FIXED = 1 + 1 + 5 + 13 * 9 + 3 + 5


class StateDecodeError(ValueError):
    """Bytes that are not a customer state record (of any format this code reads)."""


def record_bound(window: int) -> int:
    """Most bytes a record takes, besides its customer id and country, for a `window`-month
    state."""
    return _STATE_FIXED + window * _MONTH_FIXED + 8 * MAX_IDS


def _pack(keys: dict[int, None]) -> bytes:
    return struct.pack(f"<{len(keys)}Q", *keys)


def _unpack(blob: bytes) -> dict[int, None]:
    if len(blob) % 8:
        raise StateDecodeError(f"key list of {len(blob)} bytes is not a whole number of keys")
    return dict.fromkeys(struct.unpack(f"<{len(blob) // 8}Q", blob))


_encoder = msgspec.msgpack.Encoder()
_Opt = int | None
_decoder = msgspec.msgpack.Decoder(
    tuple[
        str,
        int,
        int,
        int,
        int,
        int,
        int,
        int,
        _Opt,
        _Opt,
        _Opt,
        _Opt,
        _Opt,
        int,
        list[tuple[int, int, int, int, int, bytes, bytes]],
        str,
    ]
)
_Fields_1 = (
    str,
    int,
    int,
    int,
    int,
    int,
    int,
    _Opt,
    _Opt,
    _Opt,
    _Opt,
    _Opt,
    int,
    list[tuple[int, int, int, int, bytes, bytes]],
)
# Types built at run time from one field list, which a static checker cannot follow.
_decoder_1 = msgspec.msgpack.Decoder(tuple[(*_Fields_1, str)])  # type: ignore[valid-type]
_decoder_1_without_country = msgspec.msgpack.Decoder(tuple[_Fields_1])  # type: ignore[valid-type]


class _Head(msgspec.Struct, array_like=True):
    """The fields formats 1 and 2 begin with (the rest of the array is skipped, not decoded)."""

    customer_id: str
    partition: int
    offset: int


_head_decoder = msgspec.msgpack.Decoder(_Head)


def source_offset(data: bytes) -> int:
    """The highest source offset the record's state has applied (-1: none, a bootstrapped
    history), read from the record's head: a fencing token, since a customer's events all live on
    one partition and a state changes only when it applies a later one."""
    if data[:1] in (_HEADER, _FORMAT_1):
        try:
            return _head_decoder.decode(memoryview(data)[1:]).offset
        except msgspec.MsgspecError as exc:
            raise StateDecodeError(f"not a format-{data[0]} state record: {exc}") from None
    return decode_state(data).offset


def encode_state(state: CustomerState) -> bytes:
    return _HEADER + _encoder.encode(
        (
            state.customer_id,
            state.partition,
            state.offset,
            state.past_spend_cents,
            state.past_units,
            state.past_invoices,
            state.past_active_months,
            state.past_purchase_days,
            state.first_ts,
            state.last_purchase_ts,
            state.newest_ts,
            state.first_month,
            state.last_purchase_month,
            state.ids_forgotten,
            [
                (m, a.spend_cents, a.units, a.n_invoices, a.days, _pack(a.invoices), _pack(a.events))
                for m, a in state.months.items()
            ],
            state.country,
        )
    )


def _format_1_as_2(body: memoryview) -> tuple[Any, ...]:
    """A format-1 array in format 2's shape: a purchase invoice stands for a purchase day; the
    country "" when written before records had one."""
    try:
        fields = _decoder_1.decode(body)
    except msgspec.ValidationError:
        fields = (*_decoder_1_without_country.decode(body), "")
    *head, forgotten, months, country = fields
    months = [
        (m, spend, units, n, (1 << min(n, 31)) - 1, invoices, events) for m, spend, units, n, invoices, events in months
    ]
    return (*head[:7], head[5], *head[7:], forgotten, months, country)


def decode_state(data: bytes) -> CustomerState:
    """The state in `data` (formats 2 and 1, or the JSON records before them); anything else
    raises `StateDecodeError`, never another exception."""
    if data[:1] in (_HEADER, _FORMAT_1):
        body = memoryview(data)[1:]
        try:
            (
                cid,
                partition,
                offset,
                past_spend,
                past_units,
                past_invoices,
                past_active,
                past_days,
                first_ts,
                last_ts,
                newest_ts,
                first_month,
                last_month,
                forgotten,
                months,
                country,
            ) = _decoder.decode(body) if data[:1] == _HEADER else _format_1_as_2(body)
        except msgspec.MsgspecError as exc:
            raise StateDecodeError(f"not a format-{data[0]} state record: {exc}") from None
        state = CustomerState(
            cid,
            partition,
            offset,
            {},
            past_spend,
            past_units,
            past_invoices,
            past_active,
            first_ts,
            last_ts,
            first_month,
            last_month,
            newest_ts,
            forgotten,
            country,
            past_days,
        )
        for m, spend, units, n_invoices, days, invoices, events in months:
            agg = state.months[m] = MonthAgg(spend, units, n_invoices, _unpack(invoices), _unpack(events), days)
            state.n_ids += len(agg.invoices) + len(agg.events)
        return state
    if data[:1] == b"{":
        return _decode_json(data)
    raise StateDecodeError(f"unknown state record format (first byte {data[:1]!r})")


def _decode_json(data: bytes) -> CustomerState:
    """The JSON record of workers before format 1: ids in full, turned into keys here; a
    purchase invoice stands for a purchase day, as in format 1."""
    try:
        d = json.loads(data)
        state = CustomerState(d["c"], d["p"], d["o"])
        for m, spend, units, invoices, events in d["m"]:
            state.months[m] = MonthAgg(
                spend,
                units,
                len(invoices),
                dict.fromkeys(id_key(i) for i in invoices),
                dict.fromkeys(id_key(e) for e in events),
                (1 << min(len(invoices), 31)) - 1,
            )
            state.n_ids += len(state.months[m].invoices) + len(state.months[m].events)
        state.keep_within_bound()  # old records kept every id
        (state.past_spend_cents, state.past_units, state.past_invoices, state.past_active_months) = d["past"]
        state.past_purchase_days = state.past_invoices
        state.first_ts, state.last_purchase_ts, state.newest_ts = d["ts"]
        state.first_month, state.last_purchase_month = d["mo"]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise StateDecodeError(f"not a JSON state record: {exc!r}"[:300]) from None
    return state
