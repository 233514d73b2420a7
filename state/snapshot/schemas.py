"""The analyst API's answers as pydantic models: its OpenAPI document is generated from them.

A customer's row is built from the score contract (`features.scores`), so a field added there
reaches the API's description without another list to keep in step. The handlers send rows
as the snapshot holds them; the models describe them (and `/docs` shows them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from features.scores import CUSTOMER_FIELDS, FIELD_TYPES, IsoTime, Offset
from state.snapshot.tables import COLUMNS

_PYTHON = {int: int, float: float, str: str, IsoTime: datetime, Offset: int}


class Error(BaseModel):
    """Every error the API answers."""

    error: str


_ROW: dict[str, Any] = {name: (_PYTHON[FIELD_TYPES[name]], ...) for name in COLUMNS}
_ROW.update(value_tier=(Literal["low", "medium", "high"], ...), source_partition=(int, ...), source_offset=(int, ...))
_SCORE: dict[str, Any] = {name: (_PYTHON[FIELD_TYPES[name]], ...) for name in CUSTOMER_FIELDS}

Customer = create_model(
    "Customer",
    __doc__="A `customer_scores` row: the score contract's fields, then its value tier and where the sink read it.",
    **_ROW,
)


class Driver(BaseModel):
    group: str
    contribution: float
    meaning: str


class Drivers(BaseModel):
    """Why the score is what it is: reference_clv, the score of the model's average customer
    (every input the mean of its training cohort's), plus each group's contribution in dollars
    (exact Shapley values, largest first) makes clv. The snapshot carries them for its
    snapshot_drivers_top customers of the highest clv; null for the others (the worker's
    /customers/{id} and `clv score --explain` explain anyone)."""

    reference_clv: float
    clv: float
    drivers: list[Driver]


P_AT_LEAST = Field(
    None,
    description="with at_least: P(horizon spend >= at_least) from the customer's predictive distribution; null "
    "when not known: the snapshot holds no distribution for the customer (written without a model, or "
    "its state and score were not yet in step: a later snapshot has it); absent without at_least",
)

RankedCustomer = create_model(
    "RankedCustomer",
    __base__=Customer,
    __doc__="A customer's row in a top list, with its probability of spending at least at_least when asked.",
    p_at_least=(float | None, P_AT_LEAST),
)

CustomerWithDrivers = create_model(
    "CustomerWithDrivers",
    __base__=Customer,
    __doc__="A customer's row and, for the snapshot's top customers, the drivers of its score; with "
    "at_least, its probability of spending at least that.",
    drivers=(Drivers | None, ...),
    at_least=(float | None, Field(None, description="the threshold asked for; absent without at_least")),
    p_at_least=(float | None, P_AT_LEAST),
)

Score = create_model(
    "Score",
    __doc__="A customer's score in an uploaded file, as `clv score` writes it; with at_least=T (repeatable), "
    "also p_at_least_T: its probability of spending at least T over the horizon (`clv score --at-least`).",
    __config__=ConfigDict(extra="allow"),
    **_SCORE,
)


RANGE_DOC = (
    "80% range of the group's total horizon spend: a normal approximation of a sum of independent "
    "customers (total +- 1.2816 x sqrt(sum of clv_sd^2), the low end floored at 0); customers move "
    "together with a season or a shock, so the true range is wider"
)


class Segment(BaseModel):
    """A row of `segment_summary`: a segment's customers and value, and its playbook."""

    segment: str
    customers: int
    share_of_customers: float | None
    total_clv: float
    total_clv_low: float = Field(description=RANGE_DOC)
    total_clv_high: float = Field(description=RANGE_DOC)
    mean_clv: float
    share_of_value: float | None
    mean_p_purchase: float
    mean_recency_days: float
    mean_frequency: float
    who: str | None
    signals: str | None
    what_to_do: str | None
    what_to_measure: str | None


class Tier(BaseModel):
    """A row of `tier_summary`: a tercile of expected CLV."""

    value_tier: Literal["low", "medium", "high"]
    customers: int
    min_clv: float
    max_clv: float
    total_clv: float
    total_clv_low: float = Field(description=RANGE_DOC)
    total_clv_high: float = Field(description=RANGE_DOC)
    mean_clv: float
    share_of_value: float | None


class Cluster(BaseModel):
    """A row of `cluster_summary`: a behavioral cluster's customers, value and profile."""

    cluster: str
    customers: int
    total_clv: float
    mean_clv: float
    share_of_value: float | None
    mean_p_purchase: float
    mean_recency_days: float
    mean_frequency: float
    mean_monetary: float
    mean_tenure_days: float
    main_segment: str


class Country(BaseModel):
    """A row of `country_summary`; the country is empty for customers whose country is unknown."""

    country: str
    customers: int
    total_clv: float
    mean_clv: float
    share_of_value: float | None
    total_spend: float


class Insight(BaseModel):
    """A written insight: a sentence and the number it leads with."""

    key: str
    text: str
    value: float


class Summary(BaseModel):
    """`snapshot_meta` and the snapshot's totals."""

    model_config = ConfigDict(extra="allow")

    snapshot_at: datetime
    newest_event_time: datetime | None
    customers: int
    source_topic: str
    offsets: dict[str, int]
    model_versions: list[str] | None
    rows: int
    total_clv: float | None
    mean_clv: float | None
    mean_p_purchase: float | None


class SqlAnswer(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool


class Scored(BaseModel):
    """`POST /score`'s JSON answer."""

    model_version: str
    horizon_months: int
    as_of: datetime
    customers: int
    cleaning: dict[str, Any]
    drift_warning: str | None = Field(
        description="the line `clv score` warns with when the file's "
        "customers are unlike the model's training cohort (PSI per "
        "input past 0.25), else null"
    )
    scores: list[Score]  # type: ignore[valid-type]


class Health(BaseModel):
    status: str
    snapshot: str
    snapshot_exists: bool
