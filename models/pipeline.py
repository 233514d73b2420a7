"""Train the GRU (and the FFNN comparison) on a rolling-origin split (export_onnx.export writes
the artifact)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from features import population
from features.calibration import Calibration, RawPrediction
from features.distribution import SpendDistribution
from features.scaling import CALENDAR, Scaler
from features.segments import cohort_shares
from features.sequences import SEQ_FEATURES, STATIC_FEATURES, Inputs
from models import classic, ziln
from models.classic import ClassicParams
from models.dataset import FOLDS, Split, holdout, horizons, rfm_features
from models.metrics import normalized_gini
from models.networks import FFNNModel, GRUEnsemble, GRUModel
from models.training import TrainConfig, fit

log = logging.getLogger(__name__)
# Ensemble member k trains from seed + 1000 k, so the ensembles of nearby seeds share no member.
MEMBER_SEED_STEP = 1000


def _gru_raw(model: GRUModel, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ziln.Base]:
    seq, static, classic_stats = batch
    return model.raw(seq, static, classic_stats, model.h0(len(seq)))


def _ffnn_raw(model: FFNNModel, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ziln.Base]:
    return model.raw(*batch)


# What a first order may count for in Gamma-Gamma: nothing (the textbook model), half an order,
# an order like any other.
FIRST_ORDER_WEIGHTS = (0.0, 0.5, 1.0)


def fit_classic(split: Split) -> ClassicParams:
    """The head's classic parameters, on the cohort at the cutoff, with the weight of a first
    order whose classic forecast ranks the training examples' spend best (normalized Gini over
    every rolling origin, labels before the cutoff only): whether one large basket foretells
    more is a property of the business, so its history decides it."""
    candidates = classic.fit(split.scoring.inputs.classic, FIRST_ORDER_WEIGHTS)
    ex = split.labelled
    ginis = [
        normalized_gini(ex.y, classic.expected_spend(c, ex.inputs.classic, horizons(ex.inputs))) for c in candidates
    ]
    params = candidates[int(np.argmax(ginis))]
    log.info(
        "classic model: %s (first-order weights %s: Gini %s)",
        ", ".join(f"{k} {v:.4g}" for k, v in params.to_dict().items()),
        FIRST_ORDER_WEIGHTS,
        ", ".join(f"{g:.4f}" for g in ginis),
    )
    return params


def train_gru(
    split: Split, cfg: TrainConfig, horizon: int, calendar: bool, params: ClassicParams, total: float, buyers: float
) -> tuple[GRUEnsemble, Scaler, dict[str, Any]]:
    """`calendar=False` masks the month-of-year features: with under two years of history each
    calendar month is seen once, so they would only alias with customer age. `total` is the
    classic model's expected total of the cohort at the cutoff, `buyers` its expected number of
    buyers (see `level`)."""
    # The horizon reaches the head in closed form (models.ziln), not through the network.
    scaler = Scaler.fit(
        split.labelled.inputs, SEQ_FEATURES, STATIC_FEATURES, {"horizon_months"} | (set() if calendar else CALENDAR)
    )
    members, runs, held_out = [], [], []
    for k in range(cfg.ensemble):  # member k holds out fold k: each customer trains most members
        member_cfg = replace(cfg, seed=cfg.seed + MEMBER_SEED_STEP * k)
        train, valid = holdout(split, k)
        tr, va = scaler.transform(train.inputs), scaler.transform(valid.inputs)
        torch.manual_seed(member_cfg.seed)
        model = GRUModel(len(SEQ_FEATURES), len(STATIC_FEATURES), params, horizon)
        model, info = fit(
            model,
            _gru_raw,
            (tr.seq, tr.static, tr.classic),
            train.y,
            horizons(train.inputs),
            (va.seq, va.static, va.classic),
            valid.y,
            horizons(valid.inputs),
            member_cfg,
            name=f"gru[{k}]",
        )
        members.append(model)
        with torch.no_grad():
            held_out.append(
                (
                    valid.y,
                    RawPrediction(
                        *(
                            t.numpy()
                            for t in model(
                                torch.from_numpy(va.seq),
                                torch.from_numpy(va.static),
                                torch.from_numpy(va.classic),
                                model.h0(len(va.seq)),
                                torch.from_numpy(horizons(valid.inputs)),
                            )
                        )
                    ),
                )
            )
        runs.append(
            {**info, "held_out_fold": k % FOLDS, "training_examples": len(train.y), "validation_examples": len(valid.y)}
        )
    ensemble = GRUEnsemble(members).eval()
    cohort = predict_gru(ensemble, scaler, split.scoring.inputs)
    calibration = replace(level(cohort.clv, cohort.p_purchase, total, buyers), spread=fit_spread(held_out))
    return (
        ensemble,
        scaler,
        {
            "members": runs,
            "classic": params.to_dict(),
            "calibration": calibration.to_dict(),
            "classic_total": total,
            "classic_buyers": buyers,
            "calendar_features": calendar,
        },
    )


def predict_gru(model: GRUEnsemble, scaler: Scaler, inputs: Inputs) -> RawPrediction:
    """The torch model's outputs, before calibration (the artifact's `raw_predict` in ONNX)."""
    s = scaler.transform(inputs)
    with torch.no_grad():
        out = model(
            torch.from_numpy(s.seq),
            torch.from_numpy(s.static),
            torch.from_numpy(s.classic),
            model.h0(len(s.seq)),
            torch.from_numpy(horizons(inputs)),
        )
    return RawPrediction(*(t.numpy() for t in out))


SPREADS = np.exp(np.linspace(np.log(0.5), np.log(3.0), 25))  # the factors on sigma tried


def fit_spread(held_out: list[tuple[np.ndarray, RawPrediction]]) -> float:
    """The factor on every member's sigma (features.distribution) that calibrates the interval
    on held-out customers: each member on the examples of the fold it never trained on (labels
    up to the cutoff), the factor whose shares of customers above clv_high and below clv_low
    come nearest what the distributions themselves expect (10% of those with p >= 0.1 and p of
    the others; 10% of those with p > 0.9). The lognormal's sigma is fitted on the training
    examples themselves, where a member's spread looks smaller than on customers it has not seen."""
    y = np.concatenate([y for y, _ in held_out])
    raw = RawPrediction(*(np.concatenate(parts) for parts in zip(*(r for _, r in held_out))))
    p = raw.p_purchase.astype(np.float64)
    members = raw.members()
    assert members is not None, "a trained network outputs its members"
    want_above, want_below = np.minimum(p, 0.1).mean(), np.where(p > 0.9, 0.1, 0.0).mean()

    def miss(spread: float) -> float:
        low, high = SpendDistribution.from_members(p, *members, spread=spread).interval()
        return float((np.mean(y > high) - want_above) ** 2 + (np.mean(y < low) - want_below) ** 2)

    misses = [miss(c) for c in SPREADS]
    best = float(SPREADS[int(np.argmin(misses))])
    log.info(
        "spread on held-out customers: %.3f (tail shares off by %.4f; at 1.0 by %.4f)",
        best,
        math.sqrt(min(misses)),
        math.sqrt(miss(1.0)),
    )
    return best


def level(clv: np.ndarray, p: np.ndarray, total: float, buyers: float) -> Calibration:
    """The level every model of the comparison gets: the classic model's expected number of
    buyers and expected total of the cohort at the cutoff (features.calibration says why)."""
    return Calibration.to_cohort(clv, p, total, buyers)


def train_ffnn(split: Split, cfg: TrainConfig, horizon: int, params: ClassicParams) -> tuple[np.ndarray, np.ndarray]:
    """Fit on aggregated features with the GRU's head; (expected spend, p) of the scoring set,
    before the level is set."""
    train, valid = holdout(split, 0)
    x_tr, x_va, x_sc = (rfm_features(e) for e in (train, valid, split.scoring))
    c_tr, c_va, c_sc = (e.inputs.classic for e in (train, valid, split.scoring))
    h_tr, h_va, h_sc = (horizons(e.inputs) for e in (train, valid, split.scoring))
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    torch.manual_seed(cfg.seed)
    model = FFNNModel(x_tr.shape[1], params, horizon)
    model, _ = fit(
        model,
        _ffnn_raw,
        ((x_tr - mu) / sd, c_tr),
        train.y,
        h_tr,
        ((x_va - mu) / sd, c_va),
        valid.y,
        h_va,
        cfg,
        name="ffnn",
    )
    scoring = torch.from_numpy(((x_sc - mu) / sd).astype(np.float32))
    with torch.no_grad():
        clv, p = model(scoring, torch.from_numpy(c_sc), torch.from_numpy(h_sc))
    return clv.numpy(), p.numpy()


def describe_cohort(
    split: Split, first_event: str, cutoff: str, clv: np.ndarray, p: np.ndarray, clv_quantiles: dict[str, float]
) -> dict[str, Any]:
    """What the artifact says of its training cohort (the customers at the cutoff): the
    distribution of each input (`features.population`, what scorers compare with) and each
    segment's share of it with the model's own scores (the cohort its segment rules hold on)."""
    r = split.scoring.rfm  # recency_days, frequency, monetary, tenure_days, total_spend
    return {
        "population": population.summarize(split.scoring.inputs, first_event, cutoff),
        "segment_shares": cohort_shares(
            clv.tolist(), p.tolist(), r[:, 1].tolist(), r[:, 0].tolist(), r[:, 3].tolist(), clv_quantiles
        ),
    }
