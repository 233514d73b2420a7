"""The evaluation metrics of the protocol (docs/model.md, Evaluation), one function each."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from features.distribution import INTERVAL_FIT


def _gini(actual: np.ndarray, order_by: np.ndarray) -> float:
    """Area between the Lorenz curve of `actual` ranked by `order_by` (descending) and the diagonal."""
    order = np.argsort(-order_by, kind="stable")
    cum = np.cumsum(actual[order]) / actual.sum()
    n = len(actual)
    return float(cum.sum() / n - (n + 1) / (2 * n))


def normalized_gini(actual: np.ndarray, pred: np.ndarray) -> float:
    return _gini(actual, pred) / _gini(actual, actual)


def top_share(actual: np.ndarray, pred: np.ndarray, fraction: float = 0.1) -> float:
    k = max(1, int(round(len(actual) * fraction)))
    top = np.argsort(-pred, kind="stable")[:k]
    return float(actual[top].sum() / actual.sum())


def deciles(actual: np.ndarray, pred: np.ndarray) -> list[dict[str, float]]:
    """Mean predicted and mean actual spend per decile of the prediction, lowest first: a
    calibrated expectation has the two equal in every decile."""
    groups = np.array_split(np.argsort(pred, kind="stable"), 10)
    return [{"predicted": float(pred[g].mean()), "actual": float(actual[g].mean())} for g in groups]


def pinball(actual: np.ndarray, quantile: np.ndarray, level: float) -> float:
    """Mean pinball (quantile) loss: a proper score of the `level`-quantile forecast."""
    diff = actual - quantile
    return float(np.mean(np.maximum(level * diff, (level - 1) * diff)))


def interval_report(
    actual: np.ndarray, quantiles: dict[float, np.ndarray], p_purchase: np.ndarray | None = None
) -> dict[str, float | None]:
    """How a predictive distribution's quantiles (at 10%, 50%, 90%) fit what happened: the share
    of customers who spent more than the 90% quantile and less than the 10% one, and the mean
    pinball loss over the three levels, which rewards a sharp distribution only where it is right.

    Spend has a mass at zero, so the share above the 90% quantile is 10% only where
    P(purchase) >= 0.1: a customer less likely to buy has a 90% quantile of 0 and exceeds it by
    buying at all. So beside the share, what the distribution itself expects (the mean of
    min(p, 10%), given `p_purchase`), and the share among customers whose 90% quantile is above
    zero, which a calibrated distribution puts at 10% whatever the cohort's mix."""
    high = quantiles[0.9]
    open_top = high > 0
    return {
        "above_high": float(np.mean(actual > high)),
        "expected_above": None if p_purchase is None else float(np.minimum(p_purchase, 0.1).mean()),
        "above_positive_high": float(np.mean(actual[open_top] > high[open_top])) if open_top.any() else None,
        "below_low": float(np.mean(actual < quantiles[0.1])),
        "pinball": float(np.mean([pinball(actual, quantiles[q], q) for q in (0.1, 0.5, 0.9)])),
    }


def report(
    actual: np.ndarray,
    pred: np.ndarray,
    p_purchase: np.ndarray | None,
    quantiles: dict[float, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every metric of the protocol; the interval's when the model has a predictive distribution
    (None otherwise)."""
    err = pred - actual
    auc = None
    if p_purchase is not None and 0 < (actual > 0).sum() < len(actual):
        auc = float(roc_auc_score(actual > 0, p_purchase))
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "spearman": float(spearmanr(actual, pred).statistic),
        "norm_gini": normalized_gini(actual, pred),
        "top10_share": top_share(actual, pred),
        "total_bias": float(pred.sum() / actual.sum() - 1),
        "auc": auc,
        "deciles": deciles(actual, pred),
        **(interval_report(actual, quantiles, p_purchase) if quantiles is not None else dict.fromkeys(INTERVAL_FIT)),
    }
