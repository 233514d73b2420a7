"""Behavioral clusters: the fit picks k by silhouette and names clusters by their profiles, and
the one assignment rule puts every customer at its nearest centroid, whichever method won."""

from __future__ import annotations

import numpy as np

from features.clusters import CLUSTER_FEATURES, UNKNOWN, assign_clusters, standardize
from models import clusters


def blobs(seed: int = 0) -> np.ndarray:
    """Three groups of customers in feature units: lapsed one-timers, recent frequent buyers,
    big-basket returners."""
    rng = np.random.default_rng(seed)
    centres = np.array([[6.0, 0.7, 2.8, 6.2, 0.05, 0.0],
                        [3.0, 2.5, 3.2, 6.2, 0.6, 0.0],
                        [4.5, 1.2, 5.0, 6.2, 0.2, 0.5]])
    return np.clip(np.concatenate([c + rng.normal(0, 0.1, (300, len(CLUSTER_FEATURES))) for c in centres]), 0, None)


def has_word(name: str, word: str) -> bool:
    """Whether a cluster name (words joined by "_") holds `word` whole."""
    return f"_{word}_" in f"_{name}_"


def test_fit_finds_the_groups_and_names_them_by_profile():
    x = blobs()
    c = clusters.fit(x, seed=1)
    assert c["k"] == 3 and set(c["methods"]) == {"kmeans", "gmm", "ward"}
    assert all(r["silhouette"] > 0.4 for r in c["methods"].values())
    labels = assign_clusters(x, c)
    groups = [set(labels[i * 300:(i + 1) * 300]) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3  # each group whole
    one_timers, frequent, returners = (g.pop() for g in groups)
    assert has_word(one_timers, "lapsed") and has_word(one_timers, "one_time")
    assert has_word(frequent, "frequent")  # not "infrequent"
    assert has_word(returners, "returner")


def test_clusters_that_keep_sharing_a_name_are_all_numbered():
    x = blobs()
    same = np.ones(len(CLUSTER_FEATURES))  # identical centroids: no feature tells them apart
    got = clusters.names(np.stack([same, -same, same, same]), x.mean(axis=0), x.std(axis=0))
    shared = "lapsed_frequent_big_basket_older_steady_returner"
    assert got == [f"{shared}_1", "recent_one_time", f"{shared}_2", f"{shared}_3"]


def test_assignment_is_the_nearest_standardized_centroid():
    x = blobs(2)
    c = clusters.fit(x, seed=3)
    z = standardize(x, c)
    d = ((z[:, None, :] - np.asarray(c["centroids"])[None]) ** 2).sum(axis=2)
    assert assign_clusters(x, c) == [c["names"][i] for i in d.argmin(axis=1)]
    centres = np.asarray(c["mean"]) + np.asarray(c["centroids"]) * np.asarray(c["sd"])
    assert assign_clusters(centres, c) == c["names"]  # a centroid is in its own cluster
    assert assign_clusters(x[:2], None) == [UNKNOWN, UNKNOWN]  # a model without clusters


def test_too_few_customers_is_a_clear_error():
    try:
        clusters.fit(blobs()[:5])
    except ValueError as exc:
        assert "too few to cluster" in str(exc)
    else:
        raise AssertionError("fitted 5 customers")
