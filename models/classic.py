"""The classic model, BG/NBD for purchases and Gamma-Gamma for spend (pymc-marketing, MAP fits):
the baseline every network must beat, the level the product's forecasts keep, and the population
parameters the network's head starts from.

The classic model is data-efficient: seven numbers fitted on one cohort already rank customers
and set the cohort's total well on short histories. Two fits, for two jobs:
- `bgnbd_gamma_gamma`: the textbook model on daily transactions (lifetimes' and pymc-marketing's
  `rfm_summary`), Gamma-Gamma on repeat purchases. Its cohort's expected number of buyers and
  expected total are the level of every forecast the product ships (`models.pipeline.level`).
- `fit`: the parameters of the network's head, on the statistics the worker keeps per customer
  (`features.sequences.CLASSIC_FEATURES`: days with a purchase, days to the last purchase and to
  the as-of month's end, mean spend per purchase day), so purchases are counted by day as the
  textbook model counts them. Gamma-Gamma here uses every purchase day, the first included, so a
  customer with one large order keeps the scale of that order, shrunk toward the population as
  far as one order warrants.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from features.aggregate import contribution
from features.contract import TransactionEvent

if TYPE_CHECKING:
    from models import ziln


log = logging.getLogger(__name__)
MIN_Q = 1.01  # Gamma-Gamma's conditional mean needs q > 1


@dataclass(frozen=True)
class ClassicParams:
    r: float
    alpha: float  # days
    a: float
    b: float
    p: float
    q: float
    gamma: float

    def to_list(self) -> list[float]:
        return [self.r, self.alpha, self.a, self.b, self.p, self.q, self.gamma]

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassicParams":
        return cls(**{k: float(v) for k, v in d.items()})


def _map(model: Any) -> dict[str, float]:
    """The MAP estimate of every parameter, unrounded (`fit_summary` rounds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(method="map", progressbar=False)
    return {name: float(model.fit_result[name].values.squeeze()) for name in model.fit_result.data_vars}


def fit(stats: np.ndarray) -> ClassicParams:
    """BG/NBD and Gamma-Gamma on one cohort's rows of CLASSIC_FEATURES."""
    from pymc_marketing.clv import BetaGeoModel, GammaGammaModel

    n, t_x, age, m = (stats[:, i].astype(np.float64) for i in range(4))
    ids = np.arange(len(n))
    bg = _map(BetaGeoModel(data=pd.DataFrame({
        "customer_id": ids, "frequency": np.maximum(n - 1, 0),
        "recency": np.minimum(t_x, age), "T": age})))
    spenders = (n > 0) & (m > 0)
    gg = _map(GammaGammaModel(data=pd.DataFrame({
        "customer_id": ids[spenders], "frequency": n[spenders], "monetary_value": m[spenders]})))
    q = gg["q"]
    if q <= MIN_Q:  # a heavier tail than Gamma-Gamma has a mean for (wholesale spend)
        log.warning("Gamma-Gamma fitted q %.3g <= 1 (mean spend unbounded); using q = %.2f", q, MIN_Q)
        q = MIN_Q
    return ClassicParams(bg["r"], bg["alpha"], bg["a"], bg["b"], gg["p"], q, gg["v"])


def label_window(cutoff: datetime, horizon_months: int) -> tuple[int, int]:
    """Days from the cutoff day to the start and to the end of what the labels cover: the
    `horizon_months` calendar months after the cutoff's month (a cutoff inside a month leaves
    the rest of that month out, as the model's features and labels do)."""
    day = pd.Timestamp(cutoff.date())
    start = day + pd.offsets.MonthEnd(0)
    end = start + pd.offsets.MonthEnd(horizon_months)
    return int((start - day).days), int((end - day).days)


def bgnbd_gamma_gamma(events: list[TransactionEvent], customer_ids: list[str], cutoff: datetime,
                      window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The textbook model's expected spend of each customer in the `label_window` (days after
    the cutoff), from daily transactions up to the cutoff, and P(any purchase) from the cutoff to
    the window's end."""
    from pymc_marketing.clv import BetaGeoModel, GammaGammaModel, rfm_summary

    tx = pd.DataFrame({
        "customer_id": [ev.customer_id for ev in events],
        "date": [ev.ts.date() for ev in events],
        "spend": [contribution(ev).spend_cents / 100.0 for ev in events],
    })
    tx = tx.groupby(["customer_id", "date"], as_index=False)["spend"].sum()
    tx["date"] = pd.to_datetime(tx["date"])
    summary = rfm_summary(tx, "customer_id", "date", "spend",
                          observation_period_end=pd.Timestamp(cutoff.date()), time_unit="D")
    summary = summary.set_index("customer_id").reindex(customer_ids).reset_index()
    summary["monetary_value"] = summary["monetary_value"].clip(lower=0)
    bg = BetaGeoModel(data=summary[["customer_id", "frequency", "recency", "T"]])
    _map(bg)
    repeaters = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
    gg = GammaGammaModel(data=repeaters[["customer_id", "frequency", "monetary_value"]])
    _map(gg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start, end = window
        purchases = bg.expected_purchases(future_t=end).values.reshape(-1)
        if start > 0:
            purchases = purchases - bg.expected_purchases(future_t=start).values.reshape(-1)
        p_none = bg.expected_probability_no_purchase(t=end).values.reshape(-1)
        spend = gg.expected_customer_spend(
            data=summary[["customer_id", "frequency", "monetary_value"]]).values.reshape(-1)
    return purchases * spend, 1 - p_none


def base(params: ClassicParams, stats: np.ndarray) -> "ziln.Base":
    """The head's classic quantities of each customer (rows of CLASSIC_FEATURES), in float64."""
    import torch

    from models import ziln

    return ziln.classic_base(torch.from_numpy(stats.astype(np.float64)),
                             torch.tensor(params.to_list(), dtype=torch.float64))


def expected_spend(params: ClassicParams, stats: np.ndarray, horizons: np.ndarray) -> np.ndarray:
    """The head's classic model alone (every correction at zero): each customer's expected spend
    over its horizon (months)."""
    import torch

    from models import ziln

    with torch.no_grad():
        h = torch.from_numpy(horizons.astype(np.float64))
        zero = torch.zeros(len(stats), ziln.RAW_OUTPUTS, dtype=torch.float64)
        d = ziln.over_horizon(zero, base(params, stats), h, int(horizons.max(initial=1)))
        return torch.exp(d.log_expected).numpy()
