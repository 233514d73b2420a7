"""Torch to ONNX with dynamic batch axes, checked against torch before the artifact is written."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export_onnx.artifact import INPUTS, META_FILE, MODEL_FILE, OUTPUTS, Artifact
from features.sequences import Inputs

log = logging.getLogger(__name__)
# Relative, per output; a buyer's log spend (member_mu) is compared as spend, exp(mu).
PARITY_TOLERANCE = {name: 1e-4 for name in OUTPUTS}


class ParityError(RuntimeError):
    pass


def export(model: torch.nn.Module, out_dir: Path, meta: dict[str, Any], check: list[Inputs]) -> dict[str, float]:
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


def _write(model: torch.nn.Module, out_dir: Path, meta: dict[str, Any], check: list[Inputs]) -> dict[str, float]:
    model.eval()
    n_seq, n_static = len(meta["seq_features"]), len(meta["static_features"])
    n_classic = len(meta["classic_features"])
    dummy = (torch.zeros(2, meta["window"], n_seq), torch.zeros(2, n_static),
             torch.ones(2, n_classic), model.h0(2))
    torch.onnx.export(
        model, dummy, str(out_dir / MODEL_FILE), input_names=list(INPUTS),
        output_names=list(OUTPUTS),
        dynamic_axes={"seq": {0: "batch"}, "static": {0: "batch"}, "classic": {0: "batch"}, "h0": {1: "batch"},
                      **{name: {0: "batch"} for name in OUTPUTS}},
        opset_version=17, dynamo=False,
    )
    meta = {**meta, "layers": model.layers, "hidden": model.hidden}
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


def parity_check(model: torch.nn.Module, artifact: Artifact,
                 batches: list[Inputs]) -> dict[str, dict[str, float]]:
    """Max abs/relative difference of onnxruntime vs torch per output on the given (unscaled)
    batches; raises ParityError if any output's relative difference exceeds its tolerance."""
    worst = {name: {"max_abs_diff": 0.0, "max_rel_diff": 0.0} for name in OUTPUTS}
    for inputs in batches:
        scaled = artifact.scaler.transform(inputs)
        with torch.no_grad():
            torch_out = model(torch.from_numpy(scaled.seq), torch.from_numpy(scaled.static),
                              torch.from_numpy(scaled.classic), model.h0(len(scaled.seq)))
        onnx_out = artifact.raw_predict(inputs)  # compare the graphs, not the calibration
        for name, t, o in zip(OUTPUTS, (t.numpy() for t in torch_out), onnx_out):
            if name == "member_mu":
                t, o = np.exp(t.astype(np.float64)), np.exp(o.astype(np.float64))
            diff = np.abs(t - o)
            w = worst[name]
            w["max_abs_diff"] = max(w["max_abs_diff"], float(diff.max(initial=0)))
            w["max_rel_diff"] = max(w["max_rel_diff"],
                                    float((diff / np.maximum(np.abs(t), 1e-3)).max(initial=0)))
    log.info("ONNX parity (max abs / rel diff): %s", ", ".join(
        f"{name} {w['max_abs_diff']:.3g} / {w['max_rel_diff']:.3g}" for name, w in worst.items()))
    for name, w in worst.items():
        if w["max_rel_diff"] > PARITY_TOLERANCE[name]:
            raise ParityError(f"onnxruntime differs from torch on {name} by {w['max_rel_diff']:.3g} "
                              f"(> {PARITY_TOLERANCE[name]})")
    return worst
