"""Torch to ONNX with dynamic batch axes, checked against torch before the artifact is written; the
artifact's metadata; `clv train` (fit, then export) and the clusters' refit of an artifact."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export_onnx.explain import reference_inputs
from export_onnx.runtime import FORMAT, INPUTS, META_FILE, MODEL_FILE, OUTPUTS, Artifact
from features.batch import end_of, fingerprint, read_history
from features.calibration import Calibration, Prediction
from features.distribution import SpendDistribution
from features.contract import TransactionEvent
from features.sequences import CLASSIC_FEATURES, SEQ_FEATURES, STATIC_FEATURES, Inputs
from models import clusters
from models.dataset import NotEnoughHistory, Split, history_until, rolling_split
from models.evaluate import Trained, fit
from models.networks import GRUEnsemble, GRUModel
from models.pipeline import describe_cohort, predict_gru
from models.training import TrainConfig

log = logging.getLogger(__name__)
_REFIT = re.compile(r"-k[0-9a-f]{6}$")  # the clusters' digest a refit appends to the version
# Relative, per output; a buyer's log spend (member_mu) is compared as spend, exp(mu).
PARITY_TOLERANCE = {name: 1e-4 for name in OUTPUTS}


class ParityError(RuntimeError):
    pass


def export(model: GRUModel | GRUEnsemble, out_dir: Path, meta: dict[str, Any], check: list[Inputs]) -> dict[str, float]:
    """Write model.onnx + metadata.json into `out_dir`, only once onnxruntime agrees with torch
    (ParityError otherwise): the artifact is built in a directory beside it and renamed into
    place, so a failed export leaves no model a worker would load, and keeps the previous one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a worker run as another user
    try:
        parity = _write(model, staging, meta, check)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return parity


def _write(model: GRUModel | GRUEnsemble, out_dir: Path, meta: dict[str, Any], check: list[Inputs]) -> dict[str, float]:
    model.eval()
    n_seq, n_static = len(meta["seq_features"]), len(meta["static_features"])
    n_classic = len(meta["classic_features"])
    dummy = (torch.zeros(2, meta["window"], n_seq), torch.zeros(2, n_static), torch.ones(2, n_classic), model.h0(2))
    torch.onnx.export(
        model,
        dummy,
        str(out_dir / MODEL_FILE),
        input_names=list(INPUTS),
        output_names=list(OUTPUTS),
        dynamic_axes={
            "seq": {0: "batch"},
            "static": {0: "batch"},
            "classic": {0: "batch"},
            "h0": {1: "batch"},
            **{name: {0: "batch"} for name in OUTPUTS},
        },
        opset_version=17,
        dynamo=False,
    )
    meta = {**meta, "format": FORMAT, "layers": model.layers, "hidden": model.hidden}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    meta["parity"] = parity_check(model, Artifact.load(out_dir), check)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta["parity"]


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, the old `target` aside first (a directory cannot be renamed over
    a non-empty one): a reader sees the old artifact or the new one, or for an instant none."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def parity_check(
    model: GRUModel | GRUEnsemble, artifact: Artifact, batches: list[Inputs]
) -> dict[str, dict[str, float]]:
    """Max abs/relative difference of onnxruntime vs torch per output on the given (unscaled)
    batches; raises ParityError if any output's relative difference exceeds its tolerance."""
    worst = {name: {"max_abs_diff": 0.0, "max_rel_diff": 0.0} for name in OUTPUTS}
    for inputs in batches:
        scaled = artifact.scaler.transform(inputs)
        with torch.no_grad():
            torch_out = model(
                torch.from_numpy(scaled.seq),
                torch.from_numpy(scaled.static),
                torch.from_numpy(scaled.classic),
                model.h0(len(scaled.seq)),
            )
        raw = artifact.raw_predict(inputs)  # compare the graphs, not the calibration
        members = raw.members()
        if members is None:
            raise ParityError(f"{artifact.version}: the exported graph has no member outputs")
        onnx_out = (raw.clv, raw.p_purchase, *members)
        for name, t, o in zip(OUTPUTS, (t.numpy() for t in torch_out), onnx_out):
            if name == "member_mu":
                t, o = np.exp(t.astype(np.float64)), np.exp(o.astype(np.float64))
            diff = np.abs(t - o)
            w = worst[name]
            w["max_abs_diff"] = max(w["max_abs_diff"], float(diff.max(initial=0)))
            w["max_rel_diff"] = max(w["max_rel_diff"], float((diff / np.maximum(np.abs(t), 1e-3)).max(initial=0)))
    log.info(
        "ONNX parity (max abs / rel diff): %s",
        ", ".join(f"{name} {w['max_abs_diff']:.3g} / {w['max_rel_diff']:.3g}" for name, w in worst.items()),
    )
    for name, w in worst.items():
        if w["max_rel_diff"] > PARITY_TOLERANCE[name]:
            raise ParityError(
                f"onnxruntime differs from torch on {name} by {w['max_rel_diff']:.3g} (> {PARITY_TOLERANCE[name]})"
            )
    return worst


def _digest(model: torch.nn.Module, calibration: dict[str, Any]) -> str:
    """Weights and level: either changes what subscribers get, so either makes a new version."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().numpy().tobytes())
    digest.update(json.dumps(calibration, sort_keys=True).encode())
    return digest.hexdigest()[:6]


def export_artifact(
    trained: Trained, out_dir: Path, discount_rate: float = 0.0, run: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write the ONNX artifact; `discount_rate` (annual) is built into the graph's `clv`; the
    trained clustering (models.clusters.fit) ships the behavioral clusters the worker assigns;
    `run` names the tracked training run that made it (models.tracking)."""
    model, scaler, split, events, cutoff = (
        trained.model,
        trained.scaler,
        trained.split,
        trained.events,
        trained.cutoff,
    )
    horizon, window, info, cfg, clustering = (
        trained.horizon,
        trained.window,
        trained.info,
        trained.cfg,
        trained.clustering,
    )
    fp = fingerprint(events)
    model.set_discount(discount_rate)
    raw = predict_gru(model, scaler, split.scoring.inputs)
    cohort_clv, cohort_p = Calibration.from_dict(info["calibration"]).apply(raw.clv, raw.p_purchase)
    quantiles = {f"p{q}": float(np.percentile(cohort_clv, q)) for q in (50, 75, 90, 99)}
    meta = {
        # Data, weights and level: a retrained model on the same data is a new version.
        "version": f"gru-{cutoff.date().isoformat()}-h{horizon}-{fp[:8]}-{_digest(model, info['calibration'])}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "window": window,
        "horizon_months": horizon,
        "cutoff": cutoff.isoformat(),
        "first_event": events[0].ts.isoformat(),  # with the cutoff, the training window
        "seq_features": list(SEQ_FEATURES),
        "static_features": list(STATIC_FEATURES),
        "classic_features": list(CLASSIC_FEATURES),
        "discount_rate": discount_rate,
        "scaler": scaler.to_dict(),
        "training_data_sha256": fp,
        # Each member trains on the customers outside its held-out fold (training.members).
        "labelled_examples": int(len(split.labelled.y)),
        "train_config": asdict(cfg),
        "training": info,
        # Segment thresholds (features.segments): the cohort's predicted CLV at the cutoff.
        "clv_quantiles": quantiles,
        **describe_cohort(split, events[0].ts.isoformat(), cutoff.isoformat(), cohort_clv, cohort_p, quantiles),
        # What a customer's drivers are measured against (export_onnx.explain): the cohort's
        # average inputs at the cutoff.
        "reference": reference_inputs(split.scoring.inputs),
    }
    if clustering is not None:
        meta["clustering"] = clustering
    if run is not None:
        meta["run"] = run
    rng = np.random.default_rng(0)
    real = split.scoring.inputs
    sample = real.take(rng.choice(len(real.seq), size=min(512, len(real.seq)), replace=False))
    random_batch = Inputs(
        (sample.seq + rng.normal(0, 1, sample.seq.shape)).astype(np.float32),
        (sample.static + rng.normal(0, 1, sample.static.shape)).astype(np.float32),
        (sample.classic * np.exp(rng.normal(0, 0.5, sample.classic.shape))).astype(np.float32),
    )
    meta["parity"] = export(model, out_dir, meta, [sample, random_batch])
    return meta


def train(
    file: str,
    cutoff: date,
    horizon: int,
    window: int,
    out: Path,
    cfg: TrainConfig = TrainConfig(),
    discount_rate: float = 0.0,
    run: dict[str, str] | None = None,
    **file_opts: Any,
) -> dict[str, Any]:
    """`clv train`: train on everything up to the cutoff and write the artifact; `discount_rate`
    (annual) makes `clv` the discounted expected spend; `run` is the tracked run it belongs to."""
    return export_artifact(fit(file, cutoff, horizon, window, cfg, **file_opts), out, discount_rate, run)


def predict_exported(trained: Trained) -> tuple[Prediction, SpendDistribution]:
    """What ships, for `clv evaluate`: the GRU exported to ONNX and scored as a worker scores it,
    with each customer's predictive distribution."""
    with tempfile.TemporaryDirectory() as tmp:
        export_artifact(replace(trained, clustering=None), Path(tmp))
        art = Artifact.load(tmp)
        raw = art.raw_predict(trained.split.scoring.inputs)
        return art.predict_raw(raw), art.distribution(raw)


def refit_version(version: str, clustering: dict[str, Any]) -> str:
    """A model's version once its clusters are refitted: the network's version (an earlier
    refit's digest dropped), `-k` and the clusters' digest, so a score's `model_version` names
    the clusters its `cluster` comes from and workers treat refitted clusters as a new model."""
    return f"{_REFIT.sub('', version)}-k{clusters.digest(clustering)}"


def _training_split(
    file: str, cutoff: date, meta: dict[str, Any], file_opts: dict[str, Any]
) -> tuple[list[TransactionEvent], Split]:
    """The events and cohort an artifact was trained on, refused unless the file up to the
    cutoff is the data its fingerprint names."""
    cut = end_of(cutoff)
    events = history_until(read_history(file, **file_opts).events, cut)
    if cut.isoformat() != meta["cutoff"] or fingerprint(events) != meta["training_data_sha256"]:
        raise NotEnoughHistory(
            f"{file} up to {cutoff} is not the data model {meta['version']} was "
            f"trained on (cutoff {meta['cutoff'][:10]}, other transactions)"
        )
    return events, rolling_split(events, cut, meta["horizon_months"], meta["window"])  # train's cohort


def _rewrite(meta_path: Path, meta: dict[str, Any]) -> None:
    """Replace the metadata file whole (a reader sees the old one or the new one)."""
    tmp = meta_path.with_name(f".{META_FILE}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.chmod(tmp, meta_path.stat().st_mode)
    os.replace(tmp, meta_path)


def recluster(file: str, cutoff: date, out: Path, seed: int, **file_opts: Any) -> dict[str, Any]:
    """Refit only the behavioral clusters of the artifact in `out`, on the data it was trained
    on (its fingerprint is checked), leaving the network as it is (`refit_version` names the
    result): clusters for a model trained before they existed, or a new seed, without hours of
    training."""
    meta = Artifact.load(out).meta  # refuses a directory that holds no model
    events, split = _training_split(file, cutoff, meta, file_opts)
    meta["clustering"] = clusters.fit(split.cohort, seed)
    meta["version"] = refit_version(meta["version"], meta["clustering"])
    meta["first_event"] = events[0].ts.isoformat()
    _rewrite(out / META_FILE, meta)
    return meta


def describe_population(file: str, cutoff: date, out: Path, **file_opts: Any) -> dict[str, Any]:
    """Add to the artifact in `out` the description of its training cohort that `clv train`
    writes (input distributions, segment shares), recomputed from the data it was trained on
    (its fingerprint is checked) and its own ONNX scores: the network, its level and its version
    stay as they are, since what it scores does not change."""
    artifact = Artifact.load(out)
    meta = artifact.meta
    events, split = _training_split(file, cutoff, meta, file_opts)
    pred = artifact.predict(split.scoring.inputs)
    meta.update(
        describe_cohort(
            split, events[0].ts.isoformat(), meta["cutoff"], pred.clv, pred.p_purchase, meta["clv_quantiles"]
        )
    )
    _rewrite(out / META_FILE, meta)
    return meta
