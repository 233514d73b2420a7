"""The model artifact a worker loads: ONNX graph + metadata. onnxruntime only, never torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export_onnx import ArtifactError
from features.calibration import Calibration, Prediction, RawPrediction
from features.distribution import SpendDistribution
from features.scaling import Scaler
from features.sequences import CLASSIC_FEATURES, SEQ_FEATURES, STATIC_FEATURES, Inputs

MODEL_FILE = "model.onnx"
META_FILE = "metadata.json"
INPUTS = ("seq", "static", "classic", "h0")
# The graph's outputs, in `RawPrediction`'s order: per customer, then per ensemble member.
OUTPUTS = ("clv", "p_purchase", "member_p", "member_mu", "member_sigma")
# The graph of a model trained before the interval existed: it still serves `clv` and
# `p_purchase`, with the interval and sd published as -1 (not known) until it is retrained.
LEGACY_OUTPUTS = OUTPUTS[:2]
NOT_KNOWN = -1.0
FORMAT = 1  # the artifact layout this release reads and writes (metadata "format"; absent: 1)
# metadata.json keys the runtime reads, and the type each must have
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "version": str,
    "window": int,
    "horizon_months": int,
    "layers": int,
    "hidden": int,
    "seq_features": list,
    "static_features": list,
    "scaler": dict,
    "training": dict,
}


def shipped_model_dir() -> Path:
    """The CDNOW-trained model that ships with the package (`make model` rebuilds it; docs/model.md)."""
    return Path(str(resources.files("export_onnx").joinpath("shipped")))


@dataclass
class Artifact:
    path: Path
    meta: dict[str, Any]
    session: ort.InferenceSession
    scaler: Scaler
    calibration: Calibration

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def window(self) -> int:
        return int(self.meta["window"])

    @property
    def horizon_months(self) -> int:
        return int(self.meta["horizon_months"])

    @property
    def clustering(self) -> dict[str, Any] | None:
        """The behavioral clusters `clv train` chose (features.clusters assigns them); None for
        a model trained before clusters existed."""
        return self.meta.get("clustering")

    @property
    def population(self) -> dict[str, Any] | None:
        """The training cohort's description scorers compare customers with
        (features.population); None for a model trained before it was recorded."""
        return self.meta.get("population")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Artifact":
        """The artifact in `path` (default: the shipped model), or an `ArtifactError` naming the
        file and what is wrong with it: one line for an operator, never a traceback."""
        path = Path(path) if path else shipped_model_dir()
        meta_path, model_path = path / META_FILE, path / MODEL_FILE
        if not meta_path.is_file() or not model_path.is_file():
            raise ArtifactError(f"{path}: not a model directory (needs {MODEL_FILE} and {META_FILE})")
        meta = _read_meta(meta_path)
        try:
            scaler = Scaler.from_dict(meta["scaler"])
            calibration = Calibration.from_dict(meta["training"].get("calibration"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{meta_path}: scaler or calibration unreadable ({type(exc).__name__}: {exc})"
            ) from None
        for name, n in (("seq", len(SEQ_FEATURES)), ("static", len(STATIC_FEATURES))):
            if any(getattr(scaler, f"{name}_{k}").shape != (n,) for k in ("center", "scale", "mask")):
                raise ArtifactError(
                    f"{meta_path}: the scaler's {name} arrays are not {n} long (one per {name} feature)"
                )
        session = _open_session(model_path)
        _check_graph(session, meta, model_path)
        return cls(path, meta, session, scaler, calibration)

    def predict(self, inputs: Inputs) -> Prediction:
        """Dollars and probabilities per customer, from unscaled inputs."""
        return self.predict_raw(self.raw_predict(inputs))

    def predict_raw(self, raw: RawPrediction) -> Prediction:
        """`predict` from the graph's outputs: the level, then the interval."""
        clv, p = self.calibration.apply(raw.clv, raw.p_purchase)
        if raw.member_p is None:
            unknown = np.full(len(clv), NOT_KNOWN, np.float32)
            return Prediction(clv, p, unknown, unknown, unknown)
        dist = self.distribution(raw)
        low, high = dist.interval()
        return Prediction(clv, p, *(a.astype(np.float32) for a in (low, high, dist.sd())))

    @property
    def has_distribution(self) -> bool:
        """Whether the graph gives the predictive distribution (False: a model trained before it)."""
        return len(self.session.get_outputs()) == len(OUTPUTS)

    def distribution(self, raw: RawPrediction) -> SpendDistribution:
        """Each customer's predictive distribution of horizon spend, at the level."""
        members = raw.members()
        if members is None:
            raise ArtifactError(
                f"model {self.version} has no predictive distribution (trained before "
                "this release); retrain it with `clv train`"
            )
        p = self.calibration.apply(raw.clv, raw.p_purchase)[1]
        return SpendDistribution.from_members(p, *members, self.calibration.factor, self.calibration.spread)

    def prob_at_least(self, inputs: Inputs | RawPrediction, threshold: float) -> np.ndarray:
        """P(horizon spend >= threshold) per customer, from unscaled inputs or the graph's
        outputs (an analyst's threshold: `clv score --at-least`)."""
        raw = inputs if isinstance(inputs, RawPrediction) else self.raw_predict(inputs)
        return self.distribution(raw).prob_at_least(threshold).astype(np.float32)

    def raw_predict(self, inputs: Inputs) -> RawPrediction:
        """The ONNX graph's own outputs, before calibration."""
        n = inputs.seq.shape[0]
        if n == 0:
            return RawPrediction(
                np.zeros(0, np.float32), np.zeros(0, np.float32), *(np.zeros((0, 1), np.float32) for _ in range(3))
            )
        scaled = self.scaler.transform(inputs)
        h0 = np.zeros((self.meta["layers"], n, self.meta["hidden"]), dtype=np.float32)
        feeds = {"seq": scaled.seq, "static": scaled.static, "classic": scaled.classic, "h0": h0}
        names = [o.name for o in self.session.get_outputs()]
        return RawPrediction(*self.session.run(names, feeds))


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """metadata.json parsed and checked for what the runtime reads."""
    try:
        meta = json.loads(meta_path.read_text())
    except UnicodeDecodeError:
        raise ArtifactError(f"{meta_path}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{meta_path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path}: not a JSON object")
    if meta.get("format", 1) != FORMAT:
        raise ArtifactError(
            f"{meta_path}: artifact format {meta.get('format')!r}; this release "
            f"reads format {FORMAT}: use the release that wrote it, or retrain "
            "with `clv train`"
        )
    for key, kind in META_TYPES.items():
        if key not in meta:
            raise ArtifactError(f"{meta_path}: no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ArtifactError(
                f"{meta_path}: {key!r} is {type(meta[key]).__name__}, not {getattr(kind, '__name__', kind)}"
            )
    if (
        tuple(meta["seq_features"]) != SEQ_FEATURES
        or tuple(meta["static_features"]) != STATIC_FEATURES
        or tuple(meta.get("classic_features", ())) != CLASSIC_FEATURES
    ):
        raise ArtifactError(
            f"{meta_path}: model {meta['version']} was trained on other features "
            "than this release builds; retrain it with `clv train`"
        )
    return meta


def _open_session(model_path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # One thread: the GRU's steps are sequential and small, so a second intra-op thread gains no
    # wall time (measured: 26 vs 29 ms per 1,024 customers) while its spin-wait doubles the CPU a
    # prediction takes, CPU the broker client and event loop need.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  onnxruntime's errors share no base class
        text = " ".join(str(exc).split())
        raise ArtifactError(
            f"{model_path}: onnxruntime cannot load it (truncated, or not an ONNX model it reads): {text[:300]}"
        ) from None


def _check_graph(session: ort.InferenceSession, meta: dict[str, Any], model_path: Path) -> None:
    """The graph takes and gives what the metadata says: names, then the fixed dimensions."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if tuple(o.name for o in session.get_outputs()) not in (OUTPUTS, LEGACY_OUTPUTS) or tuple(inputs) != INPUTS:
        raise ArtifactError(
            f"{model_path}: model {meta['version']} does not map "
            f"{', '.join(INPUTS)} to {', '.join(OUTPUTS)}; retrain it with `clv train`"
        )
    want = {
        "seq": [None, meta["window"], len(SEQ_FEATURES)],
        "static": [None, len(STATIC_FEATURES)],
        "classic": [None, len(CLASSIC_FEATURES)],
        "h0": [meta["layers"], None, meta["hidden"]],
    }
    for name, dims in want.items():
        have = inputs[name]
        if len(have) != len(dims) or any(d is not None and h != d for h, d in zip(have, dims)):
            raise ArtifactError(
                f"{model_path}: input {name} has shape {have}, but "
                f"{META_FILE} says {['batch' if d is None else d for d in dims]} "
                "(window, features, layers, hidden): the metadata is not this "
                "graph's"
            )
