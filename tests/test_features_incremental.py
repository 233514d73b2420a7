"""The live path (events in any order, in chunks, redelivered after crashes, re-published) yields
exactly the batch path's aggregates and features."""

from datetime import datetime, timedelta, timezone

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregate import Applied, Folder, contribution, month_of
from features.contract import Line, TransactionEvent, stable_event_id
from features.sequences import build_inputs

WINDOW = 8
T0 = datetime(2023, 1, 1, tzinfo=timezone.utc)

line = st.builds(
    Line,
    stock_code=st.sampled_from(["A", "B", "C"]),
    quantity=st.integers(-5, 40).filter(bool),
    unit_price=st.sampled_from([0.0, 0.29, 1.25, 2.55, 9.99, 12.5, 1e-3, 333.33]),
)


@st.composite
def histories(draw):
    n = draw(st.integers(1, 40))
    events = []
    for k in range(n):
        cust = draw(st.sampled_from(["c1", "c2", "c3", "c4"]))
        inv = f"I{k}"
        ts = T0 + timedelta(minutes=draw(st.integers(0, 60 * 24 * 30 * (WINDOW - 1))))
        lines = tuple(draw(st.lists(line, min_size=1, max_size=4)))
        events.append(TransactionEvent(stable_event_id(cust, inv), cust, inv, ts, lines))
    return events


def batch_states(events):
    folder = Folder(WINDOW)
    for ev in sorted(events, key=lambda e: e.ts):
        assert folder.add(ev.customer_id, contribution(ev)) == Applied.APPLIED
    return folder


def stream_states(log, chunks, crash_points, partitions):
    """Consume `log` (the topic, in offset order) in chunks; at each crash point, go back to the
    last committed offset while keeping the state written so far, as a changelog would."""
    folders = {p: Folder(WINDOW) for p in range(partitions)}
    committed = 0
    pos = 0
    crashes = list(crash_points)
    while pos < len(log):
        end = min(len(log), pos + chunks)
        for offset in range(pos, end):
            ev = log[offset]
            p = hash(ev.customer_id) % partitions
            folders[p].add(ev.customer_id, contribution(ev), partition=p, offset=offset)
        if crashes and crashes[0] <= end:
            crashes.pop(0)
            pos = committed  # redeliver everything since the last commit
            continue
        committed = pos = end
    merged = {}
    for f in folders.values():
        merged.update(f.states)
    return merged


@settings(max_examples=150, deadline=None)
@given(
    events=histories(),
    data=st.data(),
)
def test_incremental_equals_batch(events, data):
    order = data.draw(st.permutations(events))
    republished = data.draw(st.lists(st.sampled_from(events), max_size=5))
    log = list(order) + republished
    chunks = data.draw(st.integers(1, 7))
    crash_points = sorted(data.draw(st.lists(st.integers(1, len(log)), max_size=3)))
    partitions = data.draw(st.integers(1, 3))

    batch = batch_states(events).states
    live = stream_states(log, chunks, crash_points, partitions)
    assert set(batch) == set(live)

    as_of = max(month_of(e.ts) for e in events)
    start = as_of - WINDOW + 1
    ids = sorted(batch)
    for cid in ids:
        assert batch[cid].canonical(start) == live[cid].canonical(start)
    a = build_inputs([batch[c] for c in ids], as_of, WINDOW, 6)
    b = build_inputs([live[c] for c in ids], as_of, WINDOW, 6)
    assert np.array_equal(a.seq, b.seq) and np.array_equal(a.static, b.static)


def test_state_round_trips_through_its_changelog_encoding():
    from state.live.record import decode_state, encode_state

    folder = Folder(WINDOW)
    ev = TransactionEvent("e1", "c1", "I1", T0, (Line("A", 2, 2.55),))
    folder.add("c1", contribution(ev), partition=0, offset=7)
    state = folder.states["c1"]
    assert decode_state(encode_state(state)) == state


def test_too_late_and_window_trimming_bound_state():
    folder = Folder(WINDOW)
    first = TransactionEvent("e1", "c1", "I1", T0, (Line("A", 1, 10.0),))
    folder.add("c1", contribution(first))
    later = TransactionEvent("e2", "c1", "I2", T0 + timedelta(days=31 * WINDOW + 5), (Line("A", 1, 5.0),))
    folder.add("c1", contribution(later))
    state = folder.states["c1"]
    assert list(state.months) == [month_of(later.ts)]  # the first month was folded into the past
    assert state.past_spend_cents == 1000 and state.past_invoices == 1
    stale = TransactionEvent("e3", "c1", "I3", T0 + timedelta(days=2), (Line("A", 1, 1.0),))
    assert folder.add("c1", contribution(stale)) == Applied.TOO_LATE
    assert state.totals() == (1500, 2, 2)


def test_returns_reduce_spend_but_are_not_invoices():
    folder = Folder(WINDOW)
    buy = TransactionEvent("e1", "c1", "I1", T0, (Line("A", 3, 2.0),))
    ret = TransactionEvent("e2", "c1", "CI1", T0 + timedelta(days=1), (Line("A", -1, 2.0),))
    for ev in (buy, ret):
        folder.add("c1", contribution(ev))
    assert folder.states["c1"].totals() == (400, 2, 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-1000, 1000).filter(bool),
                          st.floats(0, 10_000, allow_nan=False).map(lambda v: round(v, 3))),
                min_size=1, max_size=20))
def test_contribution_rounds_like_the_vectorised_cleaning(lines):
    """The stream's per-invoice sum (plain Python) equals `line_cents` over arrays (numpy)."""
    from features.aggregate import line_cents

    ev = TransactionEvent("e", "c", "i", datetime(2011, 1, 1, tzinfo=timezone.utc),
                          tuple(Line("s", q, p) for q, p in lines))
    q = np.array([q for q, _ in lines], dtype=np.float64)
    p = np.array([p for _, p in lines], dtype=np.float64)
    assert contribution(ev).spend_cents == int(line_cents(q, p).sum())
    assert contribution(ev).units == int(q.sum())
