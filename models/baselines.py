"""What an analyst would use instead: a naive run rate, boosted trees and a random forest (the
classic BG/NBD + Gamma-Gamma model is `models.classic`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models import classic, ziln
from models.classic import ClassicParams
from models.dataset import Examples, horizons, rfm_features


def naive(scoring: Examples, days: int) -> tuple[np.ndarray, None]:
    """Past spend per day since the first purchase, times the horizon."""
    tenure = np.maximum(scoring.rfm[:, 3], 1.0)
    return np.maximum(scoring.rfm[:, 4], 0) / tenure * days, None


def _tree_features(ex: Examples, params: ClassicParams) -> np.ndarray:
    """The networks' aggregated inputs plus the classic model's quantities (what the networks'
    head reads), so trees and networks start from the same knowledge."""
    with torch.no_grad():
        context = ziln.context(classic.base(params, ex.inputs.classic)).numpy()
    return np.column_stack([rfm_features(ex), context])


def _trees(
    regressor: Any, classifier: Any, train: Examples, scoring: Examples, params: ClassicParams
) -> tuple[np.ndarray, np.ndarray]:
    """Trees that correct the classic model like the networks do: each example's target is its
    spend over the classic expectation for its own horizon, weighted by that expectation (for
    Poisson deviance, the same fit as an offset), so the served horizon enters through the classic
    model's closed form; the correction is bounded by e^MAX_CORRECTION either way. The
    classifier for p reads the horizon as a feature. Returns (expected spend, p) of the scoring
    set."""

    def base(ex: Examples) -> np.ndarray:
        return np.maximum(classic.expected_spend(params, ex.inputs.classic, horizons(ex.inputs)), 1e-6)

    b_tr = base(train)
    x_tr, x_sc = _tree_features(train, params), _tree_features(scoring, params)
    regressor.fit(x_tr, train.y / b_tr, sample_weight=b_tr)
    classifier.fit(np.column_stack([x_tr, horizons(train.inputs)]), train.y > 0)
    # The ratio target is unbounded where the classic expectation is tiny, and a leaf fitted
    # there can meet a customer with a large one: bound the correction as the networks bound
    # each of theirs.
    bound = np.exp(ziln.MAX_CORRECTION)
    pred = base(scoring) * np.clip(regressor.predict(x_sc), 1 / bound, bound)
    return pred, classifier.predict_proba(np.column_stack([x_sc, horizons(scoring.inputs)]))[:, 1]


def gradient_boosted(
    train: Examples, scoring: Examples, params: ClassicParams, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's histogram GBT, Poisson deviance; a GBT classifier for p."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    reg = HistGradientBoostingRegressor(
        loss="poisson", max_iter=300, learning_rate=0.05, early_stopping=True, random_state=seed
    )
    clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True, random_state=seed)
    return _trees(reg, clf, train, scoring, params)


def random_forest(
    train: Examples, scoring: Examples, params: ClassicParams, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's random forest (squared error on the same weighted ratio target); each tree
    sees a fifth of the examples, which keeps a CDNOW fit to about a minute on two cores."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    common = dict(n_estimators=100, min_samples_leaf=50, max_samples=0.2, n_jobs=2, random_state=seed)
    return _trees(RandomForestRegressor(**common), RandomForestClassifier(**common), train, scoring, params)
