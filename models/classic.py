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
  textbook model counts them. Gamma-Gamma weighs a customer's mean order by the orders behind
  it; the textbook model counts repeat orders only, so a one-time buyer gets the population's
  value. Here a first order counts for a weight w between 0 (the textbook) and 1 (an order like
  any other), chosen on the training examples (`models.pipeline.fit_classic`): where large first
  baskets are rarely repeated the history says so, and one or two of them are not valued as a
  habit; where they are (wholesale customers who come back) they keep their scale.
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
    first_order: float = 1.0  # what a first order counts for in Gamma-Gamma (`first_order_weight`)

    def to_list(self) -> list[float]:
        return [self.r, self.alpha, self.a, self.b, self.p, self.q, self.gamma, self.first_order]

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


def fit(stats: np.ndarray, first_orders: tuple[float, ...] = (1.0,)) -> list[ClassicParams]:
    """BG/NBD and Gamma-Gamma on one cohort's rows of CLASSIC_FEATURES: one parameter set per
    weight of a first order in `first_orders`, each Gamma-Gamma fitted on the orders it counts."""
    from pymc_marketing.clv import BetaGeoModel, GammaGammaModel

    n, t_x, age, m = (stats[:, i].astype(np.float64) for i in range(4))
    ids = np.arange(len(n))
    bg = _map(
        BetaGeoModel(
            data=pd.DataFrame(
                {"customer_id": ids, "frequency": np.maximum(n - 1, 0), "recency": np.minimum(t_x, age), "T": age}
            )
        )
    )
    out = []
    for first in first_orders:
        weight = orders(n, first)
        spenders = (weight > 0) & (m > 0)
        gg = _map(
            GammaGammaModel(
                data=pd.DataFrame(
                    {"customer_id": ids[spenders], "frequency": weight[spenders], "monetary_value": m[spenders]}
                )
            )
        )
        q = gg["q"]
        if q <= MIN_Q:  # a heavier tail than Gamma-Gamma has a mean for (wholesale spend)
            log.warning("Gamma-Gamma fitted q %.3g <= 1 (mean spend unbounded); using q = %.2f", q, MIN_Q)
            q = MIN_Q
        out.append(ClassicParams(bg["r"], bg["alpha"], bg["a"], bg["b"], gg["p"], q, gg["v"], first))
    return out


def orders(n: np.ndarray, first_order: float) -> np.ndarray:
    """The weight of orders behind a customer's mean order: its repeat purchase days, plus
    `first_order` for the first (numpy's twin of the head's, `models.ziln.classic_base`)."""
    return np.maximum(n - 1, 0) + first_order * (n >= 1)


def label_window(cutoff: datetime, horizon_months: int) -> tuple[int, int]:
    """Days from the cutoff day to the start and to the end of what the labels cover: the
    `horizon_months` calendar months after the cutoff's month (a cutoff inside a month leaves
    the rest of that month out, as the model's features and labels do)."""
    day = pd.Timestamp(cutoff.date())
    start = day + pd.offsets.MonthEnd(0)
    end = start + pd.offsets.MonthEnd(horizon_months)
    return int((start - day).days), int((end - day).days)


@dataclass
class Textbook:
    """The textbook model's forecast of each customer: expected spend in the label window,
    P(any purchase) from the cutoff to the window's end, and quantiles of its own predictive
    distribution of the window's spend (`predictive_quantiles`)."""

    spend: np.ndarray
    p: np.ndarray
    quantiles: dict[float, np.ndarray]


def bgnbd_gamma_gamma(
    events: list[TransactionEvent],
    customer_ids: list[str],
    cutoff: datetime,
    window: tuple[int, int],
    quantiles: tuple[float, ...] = (),
    seed: int = 0,
) -> Textbook:
    """The textbook model from daily transactions up to the cutoff, for each customer, with the
    `quantiles` of its predictive distribution (simulated; none asked, none computed)."""
    from pymc_marketing.clv import BetaGeoModel, GammaGammaModel, rfm_summary

    tx = pd.DataFrame(
        {
            "customer_id": [ev.customer_id for ev in events],
            "date": [ev.ts.date() for ev in events],
            "spend": [contribution(ev).spend_cents / 100.0 for ev in events],
        }
    )
    tx = tx.groupby(["customer_id", "date"], as_index=False)["spend"].sum()
    tx["date"] = pd.to_datetime(tx["date"])
    summary = rfm_summary(
        tx, "customer_id", "date", "spend", observation_period_end=pd.Timestamp(cutoff.date()), time_unit="D"
    )
    summary = summary.set_index("customer_id").reindex(customer_ids).reset_index()
    summary["monetary_value"] = summary["monetary_value"].clip(lower=0)
    bg = BetaGeoModel(data=summary[["customer_id", "frequency", "recency", "T"]])
    bg_params = _map(bg)
    repeaters = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
    gg = GammaGammaModel(data=repeaters[["customer_id", "frequency", "monetary_value"]])
    gg_params = _map(gg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start, end = window
        purchases = bg.expected_purchases(future_t=end).values.reshape(-1)
        if start > 0:
            purchases = purchases - bg.expected_purchases(future_t=start).values.reshape(-1)
        p_none = bg.expected_probability_no_purchase(t=end).values.reshape(-1)
        spend = gg.expected_customer_spend(data=summary[["customer_id", "frequency", "monetary_value"]]).values.reshape(
            -1
        )
    stats = summary[["frequency", "recency", "T", "monetary_value"]].to_numpy(np.float64)
    return Textbook(
        purchases * spend,
        1 - p_none,
        predictive_quantiles(bg_params, gg_params, stats, window, quantiles, seed) if quantiles else {},
    )


SIMULATED_DRAWS = 2000  # per customer: quantiles of the textbook model to about 1% of their level


def predictive_quantiles(
    bg: dict[str, float],
    gg: dict[str, float],
    stats: np.ndarray,
    window: tuple[int, int],
    quantiles: tuple[float, ...],
    seed: int,
    draws: int = SIMULATED_DRAWS,
    chunk: int = 1000,
) -> dict[float, np.ndarray]:
    """Quantiles of each customer's spend in the window (days after the cutoff) under the
    textbook model's own posterior, by simulation: alive with BG/NBD's P(alive); if so, a
    purchase rate from Gamma(r + x, alpha + T) and a dropout chance from Beta(a, b + x) (the
    posterior given alive), purchases a Poisson process that stops after each with that chance;
    each purchase's spend Gamma(p, nu), nu from Gamma-Gamma's posterior Gamma(q + p x, v + x m)
    (the population's Gamma(q, v) without repeat purchases). `stats`: rows of rfm_summary's
    frequency x, recency t_x, T (days) and mean repeat spend m."""
    rng = np.random.default_rng(seed)
    r, alpha, a, b = (bg[k] for k in ("r", "alpha", "a", "b"))
    p, q, v = gg["p"], gg["q"], gg["v"]
    start, end = window
    out = {level: np.empty(len(stats)) for level in quantiles}
    for lo in range(0, len(stats), chunk):
        x, t_x, age, m = (c[:, None] for c in stats[lo : lo + chunk].T)
        shape = (len(x), draws)
        gone_odds = np.where(x > 0, a / np.maximum(b + x - 1, 1e-12) * ((alpha + age) / (alpha + t_x)) ** (r + x), 0.0)
        alive = rng.uniform(size=shape) < 1 / (1 + gone_odds)
        rate = rng.gamma(r + x, 1 / (alpha + age), shape)
        drop = rng.beta(a, b + x, shape)
        before = rng.poisson(rate * start)
        within = rng.poisson(rate * (end - start))
        last = rng.geometric(drop)  # the purchase after which the customer leaves
        count = np.where(alive, np.clip(np.minimum(before + within, last) - before, 0, None), 0)
        repeat = (x > 0) & (m > 0)
        nu = rng.gamma(q + np.where(repeat, p * x, 0.0), 1, shape) / (v + np.where(repeat, x * m, 0.0))
        spend = np.where(count > 0, rng.gamma(np.maximum(p * count, 1e-12), 1, shape) / nu, 0.0)
        for level in quantiles:
            out[level][lo : lo + chunk] = np.quantile(spend, level, axis=1, method="inverted_cdf")
    return out


def base(params: ClassicParams, stats: np.ndarray) -> "ziln.Base":
    """The head's classic quantities of each customer (rows of CLASSIC_FEATURES), in float64."""
    import torch

    from models import ziln

    return ziln.classic_base(
        torch.from_numpy(stats.astype(np.float64)), torch.tensor(params.to_list(), dtype=torch.float64)
    )


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
