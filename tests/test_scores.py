"""The `clv-scores` contract: every reason a message is unusable, schema-2 to 6 messages read as
the records they imply, which of a customer's scores is the newest, scores carrying the customer's country, a parser that never raises, and
the JSON Schema file kept current."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export_onnx.runtime import Artifact, shipped_model_dir
from features.aggregate import Folder, contribution
from features.contract import Line, TransactionEvent
from features.scores import (CUSTOMER_FIELDS, FIELD_TYPES, FIELDS, LEGACY_CLV, SCORE_SCHEMA_VERSION,
                             IsoTime, Offset, ScoreRecord, as_dict, encode_score, parse_score,
                             precedence, score_schema, score_schema_json)
from export_onnx.scoring import score_states
from score_messages import GOOD, INTERVAL, SCHEMA_2, SCHEMA_3, SCHEMA_4, SCHEMA_5, SCHEMA_6, near_valid


UNKNOWN_INTERVAL = dict.fromkeys(INTERVAL, -1.0)  # what a message before schema 7 reads as


def msg(base: dict = GOOD, **changes) -> bytes:
    obj = {**base, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def test_good_message_parses_and_round_trips():
    record = parse_score(msg())
    assert isinstance(record, ScoreRecord) and as_dict(record) == GOOD
    assert parse_score(encode_score(record)) == record
    assert list(json.loads(encode_score(record))) == list(FIELDS)  # message order


def test_schema_2_message_reads_as_its_expectation():
    record = parse_score(msg(SCHEMA_2))
    assert isinstance(record, ScoreRecord)
    assert record.clv == 412.37 and record.schema_version == SCORE_SCHEMA_VERSION
    assert as_dict(record) == {**GOOD, "cluster": "", "country": "", "event_offset": -1,
                               **UNKNOWN_INTERVAL}  # quantile dropped
    assert parse_score(msg(SCHEMA_2, clv=...)) == record  # its quantile is not needed
    assert parse_score(msg(SCHEMA_2, clv="not read")) == record


def test_schema_3_message_reads_without_a_cluster():
    record = parse_score(msg(SCHEMA_3))
    assert isinstance(record, ScoreRecord)
    assert as_dict(record) == {**GOOD, "cluster": "", "country": "", "event_offset": -1,
                               **UNKNOWN_INTERVAL}
    assert parse_score(msg(SCHEMA_3, cluster=7)) == record  # a field schema 3 lacks is not read
    assert parse_score(msg(cluster=...)) == "missing_field:cluster"  # schema 7 must carry it


def test_schema_4_message_reads_without_a_country():
    record = parse_score(msg(SCHEMA_4))
    assert isinstance(record, ScoreRecord)
    assert as_dict(record) == {**GOOD, "country": "", "event_offset": -1, **UNKNOWN_INTERVAL}
    assert parse_score(msg(SCHEMA_4, country=7)) == record  # a field schema 4 lacks is not read
    assert parse_score(msg(country=...)) == "missing_field:country"


def test_schema_5_message_reads_without_an_event_offset():
    record = parse_score(msg(SCHEMA_5))
    assert isinstance(record, ScoreRecord)
    assert as_dict(record) == {**GOOD, "event_offset": -1, **UNKNOWN_INTERVAL}
    assert parse_score(msg(SCHEMA_5, event_offset="x")) == record  # not read
    assert parse_score(msg(event_offset=...)) == "missing_field:event_offset"


def test_schema_6_message_reads_without_an_interval_and_round_trips_as_7():
    """A worker of the previous release publishes no interval while a new sink reads: its
    messages read as records whose interval and sd are -1 (not known), which encode as schema 7
    and read back as the same record."""
    record = parse_score(msg(SCHEMA_6))
    assert isinstance(record, ScoreRecord) and as_dict(record) == {**GOOD, **UNKNOWN_INTERVAL}
    assert parse_score(msg(SCHEMA_6, clv_low="x", clv_high=...)) == record  # not read
    assert parse_score(encode_score(record)) == record
    assert json.loads(encode_score(record))["schema_version"] == SCORE_SCHEMA_VERSION == 7
    for name in INTERVAL:  # schema 7 must carry each
        assert parse_score(msg(**{name: ...})) == f"missing_field:{name}"
    assert parse_score(msg(clv_high=float("inf"))) == "non_finite"


def test_a_later_state_or_a_later_clock_makes_a_score_newer_not_a_later_arrival():
    """A stale worker's score (an earlier event offset, or the same state on an earlier clock)
    published after the current one is older by `precedence`, which subscribers and the sink
    keep the greatest of."""
    current = parse_score(msg(event_offset=500, as_of="2011-12-09T12:50:00+00:00"))
    stale = parse_score(msg(event_offset=499, as_of="2011-12-31T23:00:00+00:00"))
    aged = parse_score(msg(event_offset=500, as_of="2012-01-01T00:00:00+00:00"))
    fraction = parse_score(msg(event_offset=500, as_of="2011-12-09T12:50:00.5+00:00"))
    assert precedence(stale) < precedence(current) < precedence(fraction) < precedence(aged)
    assert precedence(parse_score(msg(SCHEMA_5))) < precedence(stale)  # a schema-5 message: -1
    rescored = parse_score(msg(event_offset=500, as_of=current.as_of, model_version="gru-next"))
    assert precedence(rescored) == precedence(current)  # equal: the later published wins


def test_times_come_back_in_utc():
    record = parse_score(msg(as_of="2011-12-09T13:50:00+01:00", scored_at="2026-11-22T05:00:00Z"))
    assert record.as_of == "2011-12-09T12:50:00+00:00"
    assert record.scored_at == "2026-11-22T05:00:00+00:00"


@pytest.mark.parametrize("raw, reason", [
    (b"{oops", "malformed_json"),
    (b"\xff\xfe\x00", "malformed_json"),
    (b"", "malformed_json"),
    (msg(clv=float("nan")), "non_finite"),  # NaN is not JSON: no field is read
    (b"[1, 2]", "not_an_object"),
    (b"null", "not_an_object"),
    (msg(schema_version=...), "missing_field:schema_version"),
    (msg(schema_version="3"), "wrong_type:schema_version"),
    (msg(schema_version=True), "wrong_type:schema_version"),
    (msg(schema_version=3.0), "wrong_type:schema_version"),
    (msg(schema_version=1), "unknown_schema_version"),
    (msg(schema_version=8), "unknown_schema_version"),
    (msg(customer_id=None), "wrong_type:customer_id"),
    (msg(customer_id=17850), "wrong_type:customer_id"),
    (msg(customer_id="  "), "empty_field:customer_id"),
    (msg().replace(b'"17850"', b'"a\\ud800"'), "wrong_type:customer_id"),  # lone surrogate
    (msg(clv="412.37"), "wrong_type:clv"),
    (msg(clv=True), "wrong_type:clv"),
    (msg(clv=None), "wrong_type:clv"),
    (msg(p_purchase=[0.5]), "wrong_type:p_purchase"),
    (msg(frequency=34.0), "wrong_type:frequency"),
    (msg(frequency=False), "wrong_type:frequency"),
    (msg(horizon_months="6"), "wrong_type:horizon_months"),
    (msg(segment=1), "wrong_type:segment"),
    (msg(model_version=None), "wrong_type:model_version"),
    (msg(as_of=1323435000), "wrong_type:as_of"),
    (msg().replace(b'"clv": 412.37', b'"clv": 1e400'), "non_finite:clv"),
    (msg(total_spend=10**400), "non_finite:total_spend"),
    (msg(frequency=2**31), "absurd_value:frequency"),
    (msg(event_offset=-2), "absurd_value:event_offset"),
    (msg(event_offset=2**63), "absurd_value:event_offset"),
    (msg(event_offset=12.0), "wrong_type:event_offset"),
    (msg(event_offset="12"), "wrong_type:event_offset"),
    (msg(as_of="yesterday"), "bad_timestamp:as_of"),
    (msg(scored_at="2026-11-22T05:00:00"), "naive_timestamp:scored_at"),
    (msg(as_of="0001-01-01T00:00:00+01:00"), "absurd_value:as_of"),
    (msg(SCHEMA_2, **{LEGACY_CLV: ...}), "missing_field:expected_clv"),
    (msg(SCHEMA_2, **{LEGACY_CLV: "412"}), "wrong_type:expected_clv"),
])
def test_unusable_messages_get_their_reason(raw, reason):
    assert parse_score(raw) == reason


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_required(name):
    assert parse_score(msg(**{name: ...})) == f"missing_field:{name}"


# -- never raises ---------------------------------------------------------------------------
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw):
    assert isinstance(parse_score(raw), (ScoreRecord, str))


# Generation, not parsing, is what can be slow here, on a machine busy with other work.
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(near_valid())
def test_near_valid_messages_never_raise_and_parse_to_sound_records(raw):
    out = parse_score(raw)
    assert isinstance(out, (ScoreRecord, str))
    if isinstance(out, ScoreRecord):
        assert out.schema_version == SCORE_SCHEMA_VERSION and out.customer_id.strip()
        for name, value in as_dict(out).items():
            kind = FIELD_TYPES[name]
            assert type(value) is {IsoTime: str, Offset: int}.get(kind, kind), name
            if kind is float:
                assert math.isfinite(value), name
            if kind is IsoTime:
                assert datetime.fromisoformat(value).utcoffset().total_seconds() == 0, name
        assert parse_score(encode_score(out)) == out


@FUZZ
@given(near_valid(), st.data())
def test_damaged_bytes_never_raise(raw, data):
    at = data.draw(st.integers(0, len(raw) - 1))
    damaged = raw[:at] + data.draw(st.binary(max_size=3)) + raw[at + 1:]
    assert isinstance(parse_score(damaged), (ScoreRecord, str))


# -- the JSON Schema ------------------------------------------------------------------------
def test_schema_file_is_up_to_date():
    """Regenerate with `clv score-schema > features/score.schema.json`."""
    path = Path(__file__).parents[1] / "features" / "score.schema.json"
    assert path.read_text() == score_schema_json()


def test_schema_describes_the_messages_the_worker_writes():
    schema = score_schema()
    assert list(schema["properties"]) == schema["required"] == list(FIELDS)
    json_type = {"integer": int, "number": (int, float), "string": str}
    for name, value in json.loads(encode_score(parse_score(msg()))).items():
        prop = schema["properties"][name]
        assert isinstance(value, json_type[prop["type"]]) and prop["description"], name
    assert schema["properties"]["schema_version"]["const"] == SCORE_SCHEMA_VERSION
    assert set(CUSTOMER_FIELDS) < set(FIELDS)
    assert CUSTOMER_FIELDS[:6] == ("customer_id", "clv", "clv_low", "clv_high", "clv_sd", "p_purchase")


def test_scores_carry_the_customers_country():
    """The one scoring path (worker, `clv score`, `POST /score`) fills `country` from the state."""
    at = datetime(2011, 11, 1, tzinfo=timezone.utc)
    folder = Folder(13)
    for cid, country in (("a", "France"), ("b", None)):
        folder.add(cid, contribution(TransactionEvent(f"e-{cid}", cid, f"i-{cid}", at,
                                                      (Line("X", 2, 3.5),), country)))
    scores = score_states(Artifact.load(shipped_model_dir()), list(folder.states.values()), at)
    assert [(s.customer_id, s.country) for s in scores] == [("a", "France"), ("b", "")]
    assert all(parse_score(encode_score(s)) == s for s in scores)
