"""Score messages for the tests: a good one of each readable schema, and near-valid variants."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from features.scores import LEGACY_CLV

GOOD = {"schema_version": 7, "customer_id": "17850", "clv": 412.37, "clv_low": 0.0,
        "clv_high": 1105.2, "clv_sd": 690.4, "p_purchase": 0.83,
        "recency_days": 3.1, "frequency": 34, "monetary": 161.2, "tenure_days": 371.0,
        "total_spend": 5481.0, "segment": "vip", "cluster": "recent_frequent",
        "country": "United Kingdom", "horizon_months": 6,
        "model_version": "gru-1998-06-30-h6-1a2b3c4d-5e6f7a", "as_of": "2011-12-09T12:50:00+00:00",
        "scored_at": "2026-11-22T05:00:00.123000+00:00", "event_offset": 91234}
# What workers of earlier releases published for the same customer: no interval, then no event
# offset, then no country, then no cluster.
INTERVAL = ("clv_low", "clv_high", "clv_sd")
SCHEMA_6 = {k: v for k, v in GOOD.items() if k not in INTERVAL} | {"schema_version": 6}
SCHEMA_5 = {k: v for k, v in SCHEMA_6.items() if k != "event_offset"} | {"schema_version": 5}
SCHEMA_4 = {k: v for k, v in SCHEMA_5.items() if k != "country"} | {"schema_version": 4}
SCHEMA_3 = {k: v for k, v in SCHEMA_4.items() if k != "cluster"} | {"schema_version": 3}
SCHEMA_2 = {**SCHEMA_3, "schema_version": 2, "clv": 396.80, LEGACY_CLV: 412.37}

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
# Strings that are almost timestamps, so the time checks see more than garbage.
TIME_TEXT = st.sampled_from(["2011-12-09T12:50:00+00:00", "2011-12-09T12:50:00", "2011-12-09",
                             "0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00+00:00",
                             "9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59.999999+00:00",
                             "2011-12-09T12:50:00Z", " 2011-12-09T12:50:00+00:00 ",
                             "20111209T125000+0000", "2011-W49-5T12:50+00:00"])


@st.composite
def near_valid(draw) -> bytes:
    """A good message (schema 2, 3, 5, 6 or 7) with a few fields removed, replaced or added."""
    obj = dict(draw(st.sampled_from([GOOD, SCHEMA_6, SCHEMA_5, SCHEMA_3, SCHEMA_2])))
    for name in draw(st.lists(st.sampled_from([*obj, "extra"]), max_size=4)):
        action = draw(st.sampled_from(["drop", "value", "time"]))
        if action == "drop":
            obj.pop(name, None)
        else:
            obj[name] = draw(TIME_TEXT if action == "time" else JSON_VALUES)
    return json.dumps(obj).encode()  # NaN and Infinity as Python writes them
