"""Behavioral clusters: the features a customer is clustered on, and the one rule that assigns a
cluster from the centroids `clv train` ships in the artifact.

The worker, `clv score` and the API's `POST /score` all assign through `assign_clusters`, from
the same customer states, so the live cluster of a customer equals its batch one. Fitting (K-means,
Gaussian mixture, Ward) lives in `models.clusters`; whatever method was chosen, a customer belongs
to the cluster of the nearest centroid in standardized feature space.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from features.aggregate import CustomerState
from features.sequences import RFM

# Log RFM and behaviour: recency, purchases, mean order value, tenure, the share of months since
# the first purchase with a purchase (regularity), and the share of the window's invoices that
# were returns (net units not positive).
CLUSTER_FEATURES = (
    "log_recency_days",
    "log_frequency",
    "log_order_value",
    "log_tenure_days",
    "regularity",
    "return_share",
)
LOGGED = np.array([f.startswith("log_") for f in CLUSTER_FEATURES])  # log1p of plain units
UNKNOWN = ""  # the cluster of a score from a model without clusters


def behaviour(states: Sequence[CustomerState], fields: Sequence[RFM], as_of_month: int, window: int) -> np.ndarray:
    """Unstandardized CLUSTER_FEATURES per customer, as of the end of `as_of_month`; only the
    window's months carry event ids, so returns are counted over the window."""
    out = np.zeros((len(states), len(CLUSTER_FEATURES)), dtype=np.float64)
    start = as_of_month - window + 1
    for i, (s, r) in enumerate(zip(states, fields)):
        active = s.past_active_months + sum(a.n_invoices > 0 for a in s.months.values())
        first = as_of_month if s.first_month is None else s.first_month
        events = purchases = 0
        for m, agg in s.months.items():
            if m >= start:
                events += len(agg.events)
                purchases += agg.n_invoices
        out[i] = (
            r.recency_days,
            r.frequency,
            max(r.monetary, 0.0),
            r.tenure_days,
            active / (as_of_month - first + 1),
            (events - purchases) / events if events else 0.0,
        )
    out[:, LOGGED] = np.log1p(out[:, LOGGED])
    return out


def plain(rows: np.ndarray) -> np.ndarray:
    """`behaviour` rows (unstandardized) back in plain units: days, purchases, dollars, shares,
    the units cluster names and profiles are read in."""
    out = np.array(rows, dtype=np.float64)
    out[..., LOGGED] = np.expm1(out[..., LOGGED])
    return out


def standardize(x: np.ndarray, clustering: Mapping[str, Any]) -> np.ndarray:
    """Features in the units the centroids are in: the training cohort's z-scores."""
    return (x - np.asarray(clustering["mean"])) / np.asarray(clustering["sd"])


def nearest(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) per row; ties go to the lower index."""
    d = ((z[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    return d.argmin(axis=1)


def assign_clusters(x: np.ndarray, clustering: Mapping[str, Any] | None) -> list[str]:
    """Cluster names for `behaviour` rows; UNKNOWN for all when the model carries no clusters."""
    if not clustering:
        return [UNKNOWN] * len(x)
    if len(x) == 0:
        return []
    names = clustering["names"]
    idx = nearest(standardize(x, clustering), np.asarray(clustering["centroids"]))
    return [names[i] for i in idx.tolist()]
