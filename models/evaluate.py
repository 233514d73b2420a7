"""`clv train` and `clv evaluate`: the GRU fitted for its artifact (export_onnx.export writes it), and
against the baselines, same split, same run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from features.aggregate import month_of
from features.batch import end_of, fingerprint, read_history
from features.calibration import Prediction
from features.distribution import INTERVAL_FIT, SpendDistribution
from features.contract import TransactionEvent
from features.scaling import Scaler
from models import baselines, classic, clusters
from models.dataset import NotEnoughHistory, Split, history_until, rolling_split
from models.metrics import report
from models.networks import GRUEnsemble
from models.pipeline import fit_classic, level, train_ffnn, train_gru
from models.classic import ClassicParams
from models.training import TrainConfig

log = logging.getLogger(__name__)
INTERVAL_QUANTILES = (0.1, 0.5, 0.9)  # what the interval's metrics read (models.metrics)


@dataclass
class SeedRun:
    """Every model's metrics and predictions for one training seed."""

    seed: int
    models: dict[str, dict[str, Any]]
    predictions: dict[str, np.ndarray]


@dataclass
class Run:
    customers: int
    actual: np.ndarray
    seeds: list[SeedRun]
    data_sha256: str = ""  # of the transactions up to the cutoff (features.batch.fingerprint)


@dataclass
class _Prepared:
    """What training and evaluation share: the split, the classic model on it, the calendar."""

    events: list[TransactionEvent]
    cutoff: datetime
    split: Split
    params: ClassicParams
    classic: classic.Textbook  # BG/NBD + Gamma-Gamma on daily transactions
    calendar: bool

    @property
    def total(self) -> float:
        return float(self.classic.spend.sum())

    @property
    def buyers(self) -> float:
        return float(self.classic.p.sum())


def _prepare(
    file: str, cutoff: date, horizon: int, window: int, labelled: bool, file_opts: dict[str, Any]
) -> _Prepared:
    history = read_history(file, **file_opts)
    cut = end_of(cutoff)
    events = history_until(history.events, cut)
    after = [ev for ev in history.events if ev.ts > cut]
    if labelled and not after:
        raise NotEnoughHistory(f"no transactions after the cutoff {cutoff}: nothing to evaluate against")
    split = rolling_split(events, cut, horizon, window, actual_events=after if labelled else None)
    # Its predictive quantiles (a simulation) only where there is a holdout to judge them on.
    textbook = classic.bgnbd_gamma_gamma(
        events,
        split.scoring.customer_ids,
        cut,
        classic.label_window(cut, horizon),
        INTERVAL_QUANTILES if labelled else (),
    )
    # Month-of-year effects need every calendar month seen at least twice.
    calendar = month_of(cut) - month_of(events[0].ts) + 1 >= 24
    return _Prepared(events, cut, split, fit_classic(split), textbook, calendar)


@dataclass
class Trained:
    """A trained GRU ensemble and what its artifact records about it (export_onnx.export writes it)."""

    model: GRUEnsemble
    scaler: Scaler
    split: Split
    events: list[TransactionEvent]
    cutoff: datetime
    horizon: int
    window: int
    info: dict[str, Any]
    cfg: TrainConfig
    clustering: dict[str, Any] | None = None


def fit(
    file: str, cutoff: date, horizon: int, window: int, cfg: TrainConfig = TrainConfig(), **file_opts: Any
) -> Trained:
    """Train on everything up to the cutoff, with the cohort's behavioral clusters."""
    prep = _prepare(file, cutoff, horizon, window, False, file_opts)
    clustering = clusters.fit(prep.split.cohort, cfg.seed)
    model, scaler, info = train_gru(prep.split, cfg, horizon, prep.calendar, prep.params, prep.total, prep.buyers)
    return Trained(model, scaler, prep.split, prep.events, prep.cutoff, horizon, window, info, cfg, clustering)


def evaluate(
    file: str,
    cutoff: date,
    horizon: int,
    window: int,
    shipped: Callable[[Trained], tuple[Prediction, SpendDistribution]],
    cfg: TrainConfig = TrainConfig(),
    seeds: Sequence[int] | None = None,
    **file_opts: Any,
) -> Run:
    """Every model on the same split, once per training seed; the models without a seed (naive,
    BG/NBD + Gamma-Gamma) are fitted once and reported with every seed. The GRU is judged by
    `shipped`, what a worker would score with it and its predictive distribution
    (export_onnx.export.predict_exported: the ONNX artifact); every other model gets the level the
    shipped one gets (`models.pipeline.level`)."""
    prep = _prepare(file, cutoff, horizon, window, True, file_opts)
    split, params, total, buyers = prep.split, prep.params, prep.total, prep.buyers
    actual = split.scoring.y
    start, end = classic.label_window(prep.cutoff, horizon)
    textbook, naive = prep.classic, baselines.naive(split.scoring, end - start)
    fixed = {
        "naive": report(actual, *naive),
        "bgnbd_gg": report(actual, textbook.spend, textbook.p, textbook.quantiles),
    }
    fixed_pred = {"naive": naive[0], "bgnbd_gg": textbook.spend}

    def leveled(pred: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return level(pred, p, total, buyers).apply(pred, p)

    runs = []
    for seed in dict.fromkeys(seeds or [cfg.seed]):  # a seed given twice runs once
        seed_cfg = replace(cfg, seed=seed)
        preds: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        model, scaler, info = train_gru(split, seed_cfg, horizon, prep.calendar, params, total, buyers)
        gru, dist = shipped(Trained(model, scaler, split, prep.events, prep.cutoff, horizon, window, info, seed_cfg))
        preds["ffnn"] = leveled(*train_ffnn(split, seed_cfg, horizon, params))
        preds["gbt"] = leveled(*baselines.gradient_boosted(split.labelled, split.scoring, params, seed))
        preds["rf"] = leveled(*baselines.random_forest(split.labelled, split.scoring, params, seed))
        models = {
            "gru": report(actual, gru.clv, gru.p_purchase, {q: dist.quantile(q) for q in INTERVAL_QUANTILES}),
            **{name: report(actual, clv, p) for name, (clv, p) in preds.items()},
            **fixed,
        }
        runs.append(
            SeedRun(seed, models, {"gru": gru.clv, **{name: clv for name, (clv, _p) in preds.items()}, **fixed_pred})
        )
    return Run(len(actual), actual, runs, fingerprint(prep.events))


_COLUMNS = (
    ("mae", "MAE $", "{:.2f}"),
    ("rmse", "RMSE $", "{:.2f}"),
    ("spearman", "Spearman", "{:.3f}"),
    ("norm_gini", "normGini", "{:.3f}"),
    ("top10_share", "top10%", "{:.1%}"),
    ("total_bias", "bias", "{:+.1%}"),
    ("auc", "AUC", "{:.3f}"),
    ("above_high", ">high", "{:.1%}"),
    ("expected_above", "expect", "{:.1%}"),
    ("above_positive_high", ">high>0", "{:.1%}"),
    ("below_low", "<low", "{:.1%}"),
    ("pinball", "pinball", "{:.2f}"),
)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def summary(run: Run) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample standard deviation over seeds of every model's metrics."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in run.seeds[0].models:
        out[name] = {}
        for key, _, _ in _COLUMNS:
            values = [r.models[name][key] for r in run.seeds if r.models[name][key] is not None]
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out[name][key] = {"mean": float(np.mean(values)), "sd": sd}
    return out


def render(run: Run) -> str:
    widths = [10, 9, 10, 10, 8, 9, 7, 7, 7, 8, 7, 9]
    head = f"{'model':<10}{'seed':>6}" + "".join(f"{title:>{w}}" for (_, title, _), w in zip(_COLUMNS, widths))
    rows = [f"customers scored: {run.customers:,}", head]
    for r in run.seeds:
        for name, m in r.models.items():
            rows.append(
                f"{name:<10}{r.seed:>6}"
                + "".join(f"{_cell(m[key], fmt):>{w}}" for (key, _, fmt), w in zip(_COLUMNS, widths))
            )
    if len(run.seeds) > 1:
        wide = [w + 9 for w in widths]
        rows += [
            "",
            f"mean +- sd over seeds {', '.join(str(r.seed) for r in run.seeds)}",
            f"{'model':<16}" + "".join(f"{title:>{w}}" for (_, title, _), w in zip(_COLUMNS, wide)),
        ]
        for name, metrics in summary(run).items():
            cells = [
                f"{_cell(metrics[key]['mean'], fmt)} +-{_cell(metrics[key]['sd'], fmt).lstrip('+')}"
                if key in metrics
                else "-"
                for key, _, fmt in _COLUMNS
            ]
            rows.append(f"{name:<16}" + "".join(f"{c:>{w}}" for c, w in zip(cells, wide)))
    rows.append(
        "gru, ffnn, gbt and rf have the expected buyers and total of bgnbd_gg by "
        "construction (the level of the shipped model), so their bias is that model's."
    )
    rows.append(
        "; ".join(f"{title}: {INTERVAL_FIT[key]}" for key, title, _ in _COLUMNS if key in INTERVAL_FIT)
        + " (80% interval: clv_low and clv_high are the 10% and 90% quantiles of the predictive "
        "distribution; bgnbd_gg's by simulating its posterior)."
    )
    return "\n".join(rows)


def write_json(run: Run, path: Path) -> None:
    """One seed: {"customers", "models"}; several: that per seed under "seeds", plus "summary"."""
    per_seed = {str(r.seed): {"customers": run.customers, "models": r.models} for r in run.seeds}
    if len(run.seeds) == 1:
        doc: dict[str, Any] = next(iter(per_seed.values()))
    else:
        doc = {"customers": run.customers, "seeds": per_seed, "summary": summary(run)}
    path.write_text(json.dumps(doc, indent=2))


def write_plots(run: Run, out: Path) -> list[Path]:
    """Lorenz/gains curves of every model and mean predicted vs actual spend per decile of the
    prediction (log axis: the deciles span cents to hundreds of dollars), for the first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    actual = run.actual
    fig, ax = plt.subplots(figsize=(6, 5))
    x = np.arange(1, len(actual) + 1) / len(actual)
    predictions = run.seeds[0].predictions
    for name, pred in {**predictions, "perfect": actual}.items():
        order = np.argsort(-pred, kind="stable")
        ax.plot(x, np.cumsum(actual[order]) / actual.sum(), label=name, linestyle="--" if name == "perfect" else "-")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set(xlabel="share of customers (ranked by prediction)", ylabel="share of horizon spend", title="Gains curve")
    ax.legend()
    gains = out / "gains.png"
    fig.savefig(gains, dpi=110, bbox_inches="tight")
    plt.close(fig)

    names = list(predictions)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        table = run.seeds[0].models[name]["deciles"]
        ax.plot(np.arange(1, 11), [d["predicted"] for d in table], "o-", label="predicted")
        ax.plot(np.arange(1, 11), [d["actual"] for d in table], "s--", label="actual")
        ax.set(title=name, xlabel="decile of prediction")
        ax.set_yscale("symlog", linthresh=0.1)  # log above 10 cents; deciles at $0 stay visible
    np.atleast_1d(axes)[0].set_ylabel("mean horizon spend $")
    np.atleast_1d(axes)[0].legend()
    deciles_png = out / "deciles.png"
    fig.savefig(deciles_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [gains, deciles_png]
