"""`clv train` and `clv evaluate`: the GRU against the baselines, same split, same run."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from export_onnx.artifact import Artifact
from features.aggregate import month_of
from features.batch import end_of, read_history
from models import baselines
from models.dataset import NotEnoughHistory, history_until, rolling_split
from models.metrics import report
from models.pipeline import export_artifact, train_ffnn, train_gru
from models.training import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Run:
    customers: int
    models: dict[str, dict[str, Any]]
    predictions: dict[str, np.ndarray]
    actual: np.ndarray


def train(file: str, cutoff: date, horizon: int, window: int, out: Path,
          cfg: TrainConfig = TrainConfig(), **file_opts: Any) -> dict[str, Any]:
    """Train on everything up to the cutoff and write the artifact."""
    history = read_history(file, **file_opts)
    cut = end_of(cutoff)
    events = history_until(history.events, cut)
    split = rolling_split(events, cut, horizon, window)
    model, scaler, info = train_gru(split, cfg, horizon, calendar=_calendar_learnable(events, cut))
    return export_artifact(model, scaler, split, events, cut, horizon, window, out, info, cfg)


def _calendar_learnable(events: list, cutoff: datetime) -> bool:
    """Month-of-year effects need every calendar month seen at least twice."""
    return month_of(cutoff) - month_of(events[0].ts) + 1 >= 24


def evaluate(file: str, cutoff: date, horizon: int, window: int,
             cfg: TrainConfig = TrainConfig(), with_bgnbd: bool = True, **file_opts: Any) -> Run:
    history = read_history(file, **file_opts)
    cut = end_of(cutoff)
    events = history_until(history.events, cut)
    after = [ev for ev in history.events if ev.ts > cut]
    if not after:
        raise NotEnoughHistory(f"no transactions after the cutoff {cutoff}: nothing to evaluate against")
    split = rolling_split(events, cut, horizon, window, actual_events=after)
    actual = split.scoring.y
    days = baselines.horizon_days(cut, horizon)
    preds: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    model, scaler, info = train_gru(split, cfg, horizon, calendar=_calendar_learnable(events, cut))
    with tempfile.TemporaryDirectory() as tmp:  # evaluate what ships: the exported ONNX artifact
        export_artifact(model, scaler, split, events, cut, horizon, window, Path(tmp), info, cfg)
        gru = Artifact.load(tmp).predict(split.scoring.inputs)
    preds["gru"] = gru.clv, gru.p_purchase
    preds["ffnn"] = train_ffnn(split, cfg)
    preds["naive"] = baselines.naive(split.scoring, days)
    if with_bgnbd:
        preds["bgnbd_gg"] = baselines.bgnbd_gamma_gamma(events, split.scoring, cut, days)
    preds["gbt"] = baselines.gradient_boosted(split.train, split.valid, split.scoring, cfg.seed)
    return Run(
        customers=len(actual),
        models={name: report(actual, clv, p) for name, (clv, p) in preds.items()},
        predictions={name: clv for name, (clv, _p) in preds.items()},
        actual=actual,
    )


def render(run: Run) -> str:
    head = f"{'model':<13}{'MAE $':>9}{'RMSE $':>9}{'Spearman':>10}{'normGini':>10}{'top10%':>8}{'bias':>8}{'AUC':>7}"
    rows = [f"customers scored: {run.customers:,}", head]
    for name, m in run.models.items():
        auc = f"{m['auc']:.3f}" if m["auc"] is not None else "-"
        rows.append(
            f"{name:<13}{m['mae']:>9.2f}{m['rmse']:>9.2f}{m['spearman']:>10.3f}{m['norm_gini']:>10.3f}"
            f"{m['top10_share']:>8.1%}{m['total_bias']:>+8.1%}{auc:>7}"
        )
    return "\n".join(rows)


def write_json(run: Run, path: Path) -> None:
    path.write_text(json.dumps({"customers": run.customers, "models": run.models}, indent=2))


def write_plots(run: Run, out: Path) -> list[Path]:
    """Lorenz/gains curves of every model and predicted vs actual by decile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    actual = run.actual
    fig, ax = plt.subplots(figsize=(6, 5))
    x = np.arange(1, len(actual) + 1) / len(actual)
    for name, pred in {**run.predictions, "perfect": actual}.items():
        order = np.argsort(-pred, kind="stable")
        ax.plot(x, np.cumsum(actual[order]) / actual.sum(), label=name,
                linestyle="--" if name == "perfect" else "-")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set(xlabel="share of customers (ranked by prediction)", ylabel="share of horizon spend",
           title="Gains curve")
    ax.legend()
    gains = out / "gains.png"
    fig.savefig(gains, dpi=110, bbox_inches="tight")
    plt.close(fig)

    names = list(run.predictions)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        pred = run.predictions[name]
        deciles = np.array_split(np.argsort(pred, kind="stable"), 10)
        ax.bar(np.arange(1, 11) - 0.2, [pred[d].mean() for d in deciles], 0.4, label="predicted")
        ax.bar(np.arange(1, 11) + 0.2, [actual[d].mean() for d in deciles], 0.4, label="actual")
        ax.set(title=name, xlabel="decile of prediction")
    np.atleast_1d(axes)[0].set_ylabel("mean horizon spend $")
    np.atleast_1d(axes)[0].legend()
    deciles_png = out / "deciles.png"
    fig.savefig(deciles_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [gains, deciles_png]
