"""Torch to ONNX with dynamic batch axes, checked against torch before the artifact is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export_onnx.artifact import INPUTS, META_FILE, MODEL_FILE, OUTPUTS, Artifact
from features.sequences import Inputs

log = logging.getLogger(__name__)
# Relative, per output.
PARITY_TOLERANCE = {"clv": 1e-4, "p_purchase": 1e-4}


class ParityError(RuntimeError):
    pass


def export(model: torch.nn.Module, out_dir: Path, meta: dict[str, Any], check: list[Inputs]) -> dict[str, float]:
    """Write model.onnx + metadata.json; refuse (ParityError) if onnxruntime disagrees with torch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    n_seq, n_static = len(meta["seq_features"]), len(meta["static_features"])
    n_classic = len(meta["classic_features"])
    dummy = (torch.zeros(2, meta["window"], n_seq), torch.zeros(2, n_static),
             torch.ones(2, n_classic), model.h0(2))
    tmp = out_dir / (MODEL_FILE + ".tmp")
    torch.onnx.export(
        model, dummy, str(tmp), input_names=list(INPUTS),
        output_names=list(OUTPUTS),
        dynamic_axes={"seq": {0: "batch"}, "static": {0: "batch"}, "classic": {0: "batch"}, "h0": {1: "batch"},
                      **{name: {0: "batch"} for name in OUTPUTS}},
        opset_version=17, dynamo=False,
    )
    tmp.replace(out_dir / MODEL_FILE)
    meta = {**meta, "layers": model.layers, "hidden": model.hidden}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    parity = parity_check(model, Artifact.load(out_dir), check)
    meta["parity"] = parity
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return parity


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
