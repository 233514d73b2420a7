"""The `clv-scores` message contract: its record, JSON encoding, parser and JSON Schema.

One definition for the worker that publishes scores, the snapshot sink that reads them, `clv
score` files and the schema subscribers get (`clv score-schema`): a field added here reaches the
messages, snapshot columns, files and API without another list to keep in step.

`clv` is the customer's expected spend over the horizon, an expectation: it adds up over
customers, and rankings, tiers and segments use it. Schema history: in 1 `clv` was the
expectation; 2 made `clv` a quantile point forecast and carried the expectation as
`expected_clv`; 3 has `clv` as the expectation again and no `expected_clv`; 4 adds `cluster`; 5
adds `country`; 6 adds `event_offset`; 7 adds the 80% predictive interval `clv_low`/`clv_high` and
the standard deviation `clv_sd` of the horizon spend. `parse_score` reads 2 to 6 as well (the text
fields they lack read as "", `event_offset` as -1, the interval and sd as -1: not known), so the
sink keeps working while workers are upgraded.

Which of a customer's scores is the newest is decided by `precedence`, not by arrival: a worker
paused past its session timeout and resumed after another took over can still publish the scores
it had, after newer ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, NewType, get_type_hints

from features.contract import Invalid, Reason, decode, parse_ts

SCORE_SCHEMA_VERSION = 7
READABLE_SCHEMA_VERSIONS = (2, 3, 4, 5, 6, 7)
LEGACY_CLV = "expected_clv"  # schema 2's name for the expectation schema 3 calls `clv`
MAX_INT = 2**31 - 1  # whole-number fields are 32-bit columns in the snapshot
MAX_OFFSET = 2**63 - 1  # Kafka offsets are 64-bit

IsoTime = NewType("IsoTime", str)
"""An instant as ISO-8601 in UTC (`iso_time`), so that equal instants are equal strings."""

Offset = NewType("Offset", int)
"""A Kafka offset (64-bit), or -1 for none."""


def _doc(text: str, run: bool = False, stream: bool = False) -> Any:
    """A field's description for subscribers; `run` marks the fields every score of one scoring
    run shares, `stream` those only the stream knows (the rest describe the customer, and make up
    `clv score` files)."""
    return field(metadata={"doc": text, "run": run, "stream": stream})


@dataclass(frozen=True, slots=True)
class ScoreRecord:
    """One `clv-scores` message: a customer's current score (the newest per key wins)."""

    schema_version: int = _doc("version of this message layout", run=True)
    customer_id: str = _doc("the customer; also the message key")
    clv: float = _doc(
        "expected spend over the next horizon_months calendar months after the "
        "as_of month; an expectation, so it adds up over customers"
    )
    clv_low: float = _doc(
        "10% quantile of the customer's spend over those months, from the model's "
        "predictive distribution: with clv_high an 80% interval (0 whenever "
        "p_purchase < 0.9: no purchase is then more likely than 10%); -1 (not "
        "known) when the message is of schema 2 to 6"
    )
    clv_high: float = _doc(
        "90% quantile of that spend: about one customer in ten spends more "
        "(fewer where p_purchase < 0.1, whose clv_high is 0); -1 when the "
        "message is of schema 2 to 6"
    )
    clv_sd: float = _doc(
        "standard deviation of that spend (a segment's range of its sum uses it); "
        "-1 when the message is of schema 2 to 6"
    )
    p_purchase: float = _doc("probability of any purchase in those months")
    recency_days: float = _doc("days from the last purchase to as_of")
    frequency: int = _doc("purchase invoices over the customer's life")
    monetary: float = _doc("mean spend per purchase invoice")
    tenure_days: float = _doc("days from the first purchase to as_of")
    total_spend: float = _doc("spend over the customer's life, returns deducted")
    segment: str = _doc("named segment (`clv query segments` lists them with their playbooks)")
    cluster: str = _doc(
        "behavioral cluster, named by its profile (`clv query clusters`); empty "
        "when the model carries no clusters or the message is of schema 2 or 3"
    )
    country: str = _doc(
        "country of the customer's newest event that carried one; empty when "
        "none did (CDNOW has none) or the message is of schema 2 to 4"
    )
    horizon_months: int = _doc("months the forecast covers", run=True)
    model_version: str = _doc("the model that produced the score", run=True)
    as_of: IsoTime = _doc(
        "event time (UTC) of the newest event the worker had seen on any partition it owns: the stream's clock",
        run=True,
    )
    scored_at: IsoTime = _doc("wall-clock time (UTC) the score was computed", run=True)
    event_offset: Offset = _doc(
        "offset in `transactions`, on the customer's partition (this message's partition number), "
        "of the newest event folded into the score: of two messages of a customer the one with "
        "the higher event_offset is newer, then the one with the later as_of; -1 when no event "
        "was (a bootstrapped history) or the message is of schema 2 to 5",
        stream=True,
    )


FIELDS = tuple(f.name for f in fields(ScoreRecord))
CUSTOMER_FIELDS = tuple(f.name for f in fields(ScoreRecord) if not f.metadata["run"] and not f.metadata["stream"])
FIELD_TYPES: dict[str, Any] = get_type_hints(ScoreRecord)  # int, float, str, IsoTime or Offset
PRECEDENCE = ("event_offset", "as_of")  # what orders a customer's scores, compared in turn

_values = attrgetter(*FIELDS)
_encode = json.JSONEncoder(separators=(",", ":")).encode


def iso_time(t: datetime) -> IsoTime:
    """How the contract writes an instant: UTC, ISO-8601."""
    return IsoTime(t.astimezone(timezone.utc).isoformat())


def as_dict(record: ScoreRecord) -> dict[str, Any]:
    """The message as a JSON object (dataclasses.asdict deep-copies: too slow per score)."""
    return dict(zip(FIELDS, _values(record)))


def encode_score(record: ScoreRecord) -> bytes:
    """The message value the worker publishes."""
    return _encode(as_dict(record)).encode()


_precedence = attrgetter(*PRECEDENCE)


def precedence(record: ScoreRecord) -> tuple[int, IsoTime]:
    """Orders a customer's scores: the one with the greater value is the newer, whatever order
    they were published in; a message reflects a later state of the customer (its event_offset;
    a customer's events all live on one partition, and its state changes only when it applies a
    later one), or the same state aged to a later clock. Of equal values the later published
    is the newer (the same state and clock, scored again: a new model)."""
    return _precedence(record)


# Per readable schema version, each record field after the version, the message field it is read
# from (None: a field the version lacks, read as its `_ABSENT` value) and its type.
_ADDED_IN = {"cluster": 4, "country": 5, "event_offset": 6, "clv_low": 7, "clv_high": 7, "clv_sd": 7}
_ABSENT: dict[str, Any] = {
    "cluster": "",
    "country": "",
    "event_offset": -1,
    "clv_low": -1.0,
    "clv_high": -1.0,
    "clv_sd": -1.0,
}


def _sources(version: int) -> tuple[tuple[str, str | None, Any], ...]:
    return tuple(
        (
            name,
            None if _ADDED_IN.get(name, 0) > version else LEGACY_CLV if name == "clv" and version == 2 else name,
            FIELD_TYPES[name],
        )
        for name in FIELDS
        if name != "schema_version"
    )


_SOURCES = {version: _sources(version) for version in READABLE_SCHEMA_VERSIONS}


def parse_score(value: bytes | str) -> ScoreRecord | str:
    """The record a message stands for, or why it is unusable (`reason` or `reason:field`, with
    the transaction contract's reason codes); never raises. A schema-2 message becomes the
    current record it implies: its `expected_clv` is the `clv`, its quantile `clv` is dropped;
    a message has "" for the text fields its version lacks (cluster before 4, country before 5),
    -1 for event_offset before 6 and for clv_low, clv_high and clv_sd before 7 (not known).
    Times come back as `iso_time` writes them."""
    obj = decode(value)
    if isinstance(obj, Invalid):
        return obj.reason
    if type(obj) is not dict:
        return Reason.NOT_AN_OBJECT
    if "schema_version" not in obj:
        return f"{Reason.MISSING_FIELD}:schema_version"
    version = obj["schema_version"]
    if type(version) is not int:
        return f"{Reason.WRONG_TYPE}:schema_version"
    if version not in READABLE_SCHEMA_VERSIONS:
        return Reason.UNKNOWN_SCHEMA_VERSION
    values: list[Any] = [SCORE_SCHEMA_VERSION]
    for name, source, kind in _SOURCES[version]:
        if source is None:
            values.append(_ABSENT[name])
            continue
        if source not in obj:
            return f"{Reason.MISSING_FIELD}:{source}"
        try:
            values.append(_checked(obj[source], kind))
        except _Unusable as bad:
            return f"{bad.reason}:{source}"
    record = ScoreRecord(*values)
    return record if record.customer_id.strip() else f"{Reason.EMPTY_FIELD}:customer_id"


class _Unusable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _checked(value: Any, kind: Any) -> Any:
    """The value as the record holds it; raises `_Unusable` with the reason it cannot be."""
    t = type(value)
    if kind is float:
        if t is not float and t is not int:  # exact types: JSON booleans are not amounts
            raise _Unusable(Reason.WRONG_TYPE)
        try:
            value = float(value)
        except OverflowError:  # a whole number beyond any float
            raise _Unusable(Reason.NON_FINITE) from None
        if not math.isfinite(value):
            raise _Unusable(Reason.NON_FINITE)
        return value
    if t is not (int if kind is int or kind is Offset else str):
        raise _Unusable(Reason.WRONG_TYPE)
    if kind is int or kind is Offset:
        if not (-MAX_INT - 1 <= value <= MAX_INT if kind is int else -1 <= value <= MAX_OFFSET):
            raise _Unusable(Reason.ABSURD_VALUE)
        return value
    if kind is IsoTime:
        ts = parse_ts(value)
        if isinstance(ts, Invalid):
            raise _Unusable(ts.reason)
        return iso_time(ts)
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate escape: no column or file can hold it
        raise _Unusable(Reason.WRONG_TYPE) from None
    return value


def score_schema() -> dict[str, Any]:
    """JSON Schema of a current message, from the record (`clv score-schema` prints it)."""
    json_types: dict[Any, dict[str, Any]] = {
        int: {"type": "integer"},
        float: {"type": "number"},
        str: {"type": "string"},
        IsoTime: {"type": "string", "format": "date-time"},
        Offset: {"type": "integer", "minimum": -1},
    }
    properties = {
        f.name: {**json_types[FIELD_TYPES[f.name]], "description": f.metadata["doc"]} for f in fields(ScoreRecord)
    }
    properties["schema_version"]["const"] = SCORE_SCHEMA_VERSION
    properties["customer_id"]["minLength"] = 1
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "clv-scores message",
        "description": ScoreRecord.__doc__,
        "type": "object",
        "properties": properties,
        "required": list(FIELDS),
    }


def score_schema_json() -> str:
    """`score_schema` as the text of `features/score.schema.json`."""
    return json.dumps(score_schema(), indent=2) + "\n"
