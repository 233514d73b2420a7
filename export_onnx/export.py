"""Torch to ONNX with dynamic batch axes, checked against torch before the artifact is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export_onnx.artifact import META_FILE, MODEL_FILE, Artifact
from features.sequences import Inputs
from models.networks import GRUEnsemble

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-4  # relative, on clv and p_purchase


class ParityError(RuntimeError):
    pass


def export(model: GRUEnsemble, out_dir: Path, meta: dict[str, Any], check: list[Inputs]) -> dict[str, float]:
    """Write model.onnx + metadata.json; refuse (ParityError) if onnxruntime disagrees with torch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    n_seq, n_static = len(meta["seq_features"]), len(meta["static_features"])
    dummy = (torch.zeros(2, meta["window"], n_seq), torch.zeros(2, n_static), model.h0(2))
    tmp = out_dir / (MODEL_FILE + ".tmp")
    torch.onnx.export(
        model, dummy, str(tmp), input_names=["seq", "static", "h0"],
        output_names=["clv", "p_purchase"],
        dynamic_axes={"seq": {0: "batch"}, "static": {0: "batch"}, "h0": {1: "batch"},
                      "clv": {0: "batch"}, "p_purchase": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    tmp.replace(out_dir / MODEL_FILE)
    meta = {**meta, "layers": model.layers, "hidden": model.hidden}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    parity = parity_check(model, Artifact.load(out_dir), check)
    meta["parity"] = parity
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return parity


def parity_check(model: GRUEnsemble, artifact: Artifact, batches: list[Inputs]) -> dict[str, float]:
    """Max abs/relative difference of onnxruntime vs torch on the given (unscaled) batches."""
    worst_abs = worst_rel = 0.0
    for inputs in batches:
        scaled = artifact.scaler.transform(inputs)
        with torch.no_grad():
            t_clv, t_p = model(torch.from_numpy(scaled.seq), torch.from_numpy(scaled.static),
                               model.h0(len(scaled.seq)))
        o_clv, o_p = artifact.raw_predict(inputs)  # compare the graphs, not the calibration
        for t, o in ((t_clv.numpy(), o_clv), (t_p.numpy(), o_p)):
            diff = np.abs(t - o)
            worst_abs = max(worst_abs, float(diff.max(initial=0)))
            worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(t), 1e-3)).max(initial=0)))
    log.info("ONNX parity: max abs diff %.3g, max rel diff %.3g", worst_abs, worst_rel)
    if worst_rel > PARITY_TOLERANCE:
        raise ParityError(f"onnxruntime differs from torch by {worst_rel:.3g} (> {PARITY_TOLERANCE})")
    return {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel}
