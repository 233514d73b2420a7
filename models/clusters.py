"""Fit the behavioral clusters `clv train` ships: K-means, a Gaussian mixture and Ward
hierarchical clustering on the cohort's standardized `features.clusters` features, k picked by
silhouette within a range, each method scored by silhouette, Calinski-Harabasz and
Davies-Bouldin, the best silhouette shipped as centroids with names read off their profiles.

Every method is scored on the labels the shipped rule gives (nearest centroid, the rule
`features.clusters` applies live), so the scores describe what subscribers will see. Fitting and
scoring use a seeded sample of the cohort: Ward and the silhouette are quadratic in customers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from sklearn.mixture import GaussianMixture

from features.clusters import CLUSTER_FEATURES, assign_clusters, nearest, plain, standardize
from models.dataset import NotEnoughHistory

K_RANGE = range(3, 9)  # at least three: fewer says little an RFM table does not
SAMPLE = 4000
MIN_SD = 1e-9  # a feature constant over the cohort (no returns at all) is left at 0

# Words for a centroid's standout features, (below the cohort, above it). A feature stands out at
# |z| >= WORD_Z that is also WORD_RATIO apart from the cohort's mean in plain units (days,
# purchases, dollars, shares): a narrow feature's z-scores alone would call 482 days "new".
WORD_Z = 0.5
WORD_RATIO = 1.25
WORDS = {
    "log_recency_days": ("recent", "lapsed"),
    "log_frequency": ("one_time", "frequent"),
    "log_order_value": ("small_basket", "big_basket"),
    "log_tenure_days": ("newer", "older"),
    "regularity": ("sporadic", "steady"),
    "return_share": ("keeper", "returner"),
}


def _kmeans(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(k, n_init=10, random_state=seed).fit(z).cluster_centers_


def _gmm(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    return GaussianMixture(k, covariance_type="full", n_init=2, random_state=seed).fit(z).means_


def _ward(z: np.ndarray, k: int, _seed: int) -> np.ndarray:
    labels = AgglomerativeClustering(k, linkage="ward").fit_predict(z)
    return np.stack([z[labels == c].mean(axis=0) for c in range(k)])


METHODS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {"kmeans": _kmeans, "gmm": _gmm, "ward": _ward}


def _scores(z: np.ndarray, labels: np.ndarray) -> dict[str, float] | None:
    """Silhouette, Calinski-Harabasz, Davies-Bouldin; None when fewer than two clusters remain."""
    if len(set(labels.tolist())) < 2:
        return None
    return {
        "silhouette": float(silhouette_score(z, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(z, labels)),
        "davies_bouldin": float(davies_bouldin_score(z, labels)),
    }


def compare(z: np.ndarray, seed: int, k_range: Sequence[int] = K_RANGE) -> dict[str, dict[str, Any]]:
    """Per method: its scores at every k, and the k with the best silhouette with its centroids."""
    out: dict[str, dict[str, Any]] = {}
    for name, fit in METHODS.items():
        per_k: dict[int, dict[str, float]] = {}
        centroids: dict[int, np.ndarray] = {}
        for k in k_range:
            if k >= len(z):
                break
            centroids[k] = fit(z, k, seed)
            scores = _scores(z, nearest(z, centroids[k]))
            if scores is not None:
                per_k[k] = scores
        if not per_k:
            continue
        best = max(per_k, key=lambda k: per_k[k]["silhouette"])
        out[name] = {
            "k": best,
            **per_k[best],
            "centroids": centroids[best],
            "by_k": {str(k): s for k, s in per_k.items()},
        }
    return out


def names(centroids: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> list[str]:
    """A name per centroid from its two strongest standout features, in feature order
    (`typical` when none stands out). Centroids that would share a name take their next
    strongest feature, standing out or not, until the names differ (then a number)."""
    cent = plain(mean + centroids * sd)
    ratio = np.abs(np.log((np.maximum(cent, 0) + 1e-3) / (np.maximum(plain(mean), 0) + 1e-3)))
    stands = (np.abs(centroids) >= WORD_Z) & (ratio >= np.log(WORD_RATIO))
    strongest = [
        sorted(range(len(CLUSTER_FEATURES)), key=lambda j: (not stands[i][j], -abs(c[j])))
        for i, c in enumerate(centroids)
    ]

    def word(i: int, j: int) -> str:
        if CLUSTER_FEATURES[j] == "log_frequency" and centroids[i][j] < 0 and cent[i][j] >= 1.5:
            return "infrequent"  # below the cohort, but not single purchases
        return WORDS[CLUSTER_FEATURES[j]][int(centroids[i][j] > 0)]

    def name(i: int, n: int) -> str:
        picked = strongest[i][:n] if n > 2 else [j for j in strongest[i][:2] if stands[i][j]]
        return "_".join(word(i, j) for j in sorted(picked)) or "typical"

    out = [name(i, 2) for i in range(len(centroids))]
    for n in range(3, len(CLUSTER_FEATURES) + 1):
        clash = {x for x in out if out.count(x) > 1}
        out = [name(i, n) if x in clash else x for i, x in enumerate(out)]
    clash = {x for x in out if out.count(x) > 1}  # before numbering renames any of them
    seen: dict[str, int] = {}
    for i, x in enumerate(out):
        if x in clash:
            seen[x] = seen.get(x, 0) + 1
            out[i] = f"{x}_{seen[x]}"
    return out


def fit(x: np.ndarray, seed: int = 0, k_range: Sequence[int] = K_RANGE) -> dict[str, Any]:
    """The artifact's `clustering`: the method with the best silhouette, its centroids,
    standardization and names, each cluster's profile on the whole cohort, and every method's
    scores."""
    if len(x) < 2 * min(k_range):
        raise NotEnoughHistory(f"{len(x)} customers by the cutoff: too few to cluster")
    mean, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd < MIN_SD, 1.0, sd)
    z = standardize(x, {"mean": mean, "sd": sd})
    rng = np.random.default_rng(seed)
    sample = z[rng.choice(len(z), size=min(SAMPLE, len(z)), replace=False)]
    methods = compare(sample, seed, k_range)
    chosen = max(methods, key=lambda m: methods[m]["silhouette"])
    centroids = methods[chosen]["centroids"]
    clustering: dict[str, Any] = {
        "method": chosen,
        "k": int(len(centroids)),
        "features": list(CLUSTER_FEATURES),
        "mean": mean.tolist(),
        "sd": sd.tolist(),
        "centroids": centroids.tolist(),
        "names": names(centroids, mean, sd),
        "sample": len(sample),
        "customers": len(x),
        "methods": {m: {k: v for k, v in r.items() if k != "centroids"} for m, r in methods.items()},
    }
    labels = np.array(assign_clusters(x, clustering))
    clustering["profiles"] = {name: _profile(x[labels == name], len(x)) for name in clustering["names"]}
    return clustering


def digest(clustering: Mapping[str, Any]) -> str:
    """Six hex digits of what assigns customers to clusters (features, standardization,
    centroids, names): other clusters, another digest."""
    assigns = [clustering[k] for k in ("features", "mean", "sd", "centroids", "names")]
    return hashlib.sha256(json.dumps(assigns).encode()).hexdigest()[:6]


def _profile(rows: np.ndarray, total: int) -> dict[str, float]:
    """A cluster in plain units: its share of the cohort, its median features (named without
    `log_`), but the mean return share (the median of a share mostly 0 says little)."""
    if not len(rows):
        return {"share": 0.0}
    median = plain(np.median(rows, axis=0))
    profile = {
        "share": len(rows) / total,
        **{f.removeprefix("log_"): float(v) for f, v in zip(CLUSTER_FEATURES, median)},
    }
    profile["return_share"] = float(rows[:, CLUSTER_FEATURES.index("return_share")].mean())
    return profile


def render(clustering: dict[str, Any]) -> str:
    """What `clv train` prints: every method's scores at its k, the chosen one, its clusters."""
    lines = [
        f"behavioral clusters ({clustering['sample']:,} of {clustering['customers']:,} customers; k by silhouette)",
        f"  {'method':<8}{'k':>3}{'silhouette':>12}{'calinski_h':>12}{'davies_b':>10}",
    ]
    for m, r in clustering["methods"].items():
        mark = "  <- chosen" if m == clustering["method"] else ""
        lines.append(
            f"  {m:<8}{r['k']:>3}{r['silhouette']:>12.3f}{r['calinski_harabasz']:>12.1f}"
            f"{r['davies_bouldin']:>10.3f}{mark}"
        )
    for name, p in clustering["profiles"].items():
        if p["share"]:
            lines.append(
                f"  {name:<28}{p['share']:>6.1%}  recency {p['recency_days']:.0f}d, "
                f"{p['frequency']:.0f} purchases, ${p['order_value']:.2f}/order, "
                f"tenure {p['tenure_days']:.0f}d, regularity {p['regularity']:.2f}"
            )
    return "\n".join(lines)
