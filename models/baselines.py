"""What an analyst would use instead: naive run rate, BG/NBD + Gamma-Gamma, boosted trees."""

from __future__ import annotations

import logging
import warnings
from datetime import datetime

import numpy as np
import pandas as pd

from features.aggregate import contribution
from features.contract import TransactionEvent
from export_onnx.calibration import Calibration
from models.dataset import Examples, horizons, rfm_features

log = logging.getLogger(__name__)


def horizon_days(cutoff: datetime, horizon_months: int) -> int:
    end = (pd.Timestamp(cutoff).normalize() + pd.offsets.MonthEnd(horizon_months))
    return int((end - pd.Timestamp(cutoff).normalize()).days)


def naive(scoring: Examples, days: int) -> tuple[np.ndarray, None]:
    """Past spend per day since the first purchase, times the horizon."""
    tenure = np.maximum(scoring.rfm[:, 3], 1.0)
    return np.maximum(scoring.rfm[:, 4], 0) / tenure * days, None


def bgnbd_gamma_gamma(
    events: list[TransactionEvent], scoring: Examples, cutoff: datetime, days: int
) -> tuple[np.ndarray, np.ndarray]:
    """pymc-marketing's BG/NBD for purchase counts and Gamma-Gamma for spend, MAP fits."""
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
    summary = summary.set_index("customer_id").reindex(scoring.customer_ids).reset_index()
    summary["monetary_value"] = summary["monetary_value"].clip(lower=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bg = BetaGeoModel(data=summary[["customer_id", "frequency", "recency", "T"]])
        bg.fit(method="map", progressbar=False)
        purchases = bg.expected_purchases(future_t=days).values.reshape(-1)
        p_none = bg.expected_probability_no_purchase(t=days).values.reshape(-1)
        repeaters = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
        gg = GammaGammaModel(data=repeaters[["customer_id", "frequency", "monetary_value"]])
        gg.fit(method="map", progressbar=False)
        spend = gg.expected_customer_spend(
            data=summary[["customer_id", "frequency", "monetary_value"]]
        ).values.reshape(-1)
    return purchases * spend, 1 - p_none


def gradient_boosted(train: Examples, valid: Examples, scoring: Examples,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's histogram GBT on RFM features: Poisson loss for spend, a classifier for p;
    calibrated on the validation period like the networks, so the comparison is fair."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    def features(ex: Examples) -> np.ndarray:  # the horizon is a plain feature for the trees
        return np.column_stack([rfm_features(ex), horizons(ex.inputs)])

    x, xs = features(train), features(scoring)
    reg = HistGradientBoostingRegressor(loss="poisson", max_iter=300, learning_rate=0.05,
                                        early_stopping=True, random_state=seed)
    reg.fit(x, train.y)
    clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True,
                                         random_state=seed)
    clf.fit(x, train.y > 0)
    cal = Calibration.fit(reg.predict(features(valid)), valid.y)
    return cal.apply(reg.predict(xs)), clf.predict_proba(xs)[:, 1]


