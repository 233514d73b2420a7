"""The model artifact a worker loads: ONNX graph + metadata. onnxruntime only, never torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from export_onnx import ArtifactError
from export_onnx.calibration import Calibration
from export_onnx.distribution import SpendDistribution
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


class RawPrediction(NamedTuple):
    """The graph's outputs, before the level: the ensemble's expected spend and P(any purchase),
    and each member's P(any purchase) and a buyer's lognormal spend (log-scale mu, sigma); the
    members' are None from a graph of `LEGACY_OUTPUTS`."""

    clv: np.ndarray
    p_purchase: np.ndarray
    member_p: np.ndarray | None = None
    member_mu: np.ndarray | None = None
    member_sigma: np.ndarray | None = None


class Prediction(NamedTuple):
    """Per customer over the horizon: `clv`, the expected spend (what rankings, tiers and budgets
    use; it adds up over customers), `p_purchase`, the probability of any purchase, and the 80%
    predictive interval of the spend (its 10% and 90% quantiles) with its standard deviation
    (what a sum over customers' range needs)."""

    clv: np.ndarray
    p_purchase: np.ndarray
    clv_low: np.ndarray
    clv_high: np.ndarray
    clv_sd: np.ndarray


def shipped_model_dir() -> Path:
    """The CDNOW-trained model that ships with the package (see README for how it is made)."""
    return Path(str(resources.files("export_onnx").joinpath("shipped")))


def fingerprint(events: list[Any]) -> str:
    """Hash of the training transactions, so an artifact names the data it came from."""
    h = hashlib.sha256()
    for ev in events:
        h.update(ev.to_json())
    return h.hexdigest()


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

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Artifact":
        path = Path(path) if path else shipped_model_dir()
        meta_path, model_path = path / META_FILE, path / MODEL_FILE
        if not meta_path.is_file() or not model_path.is_file():
            raise ArtifactError(f"{path}: not a model directory (needs {MODEL_FILE} and {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if (tuple(meta["seq_features"]) != SEQ_FEATURES or tuple(meta["static_features"]) != STATIC_FEATURES
                or tuple(meta.get("classic_features", ())) != CLASSIC_FEATURES):
            raise ArtifactError(
                f"{path}: model {meta.get('version')} was trained on other features than this "
                "release builds; retrain it with `clv train`"
            )
        opts = ort.SessionOptions()
        # One thread: the GRU's steps are sequential and small, so a second intra-op thread
        # gains no wall time (measured: 26 vs 29 ms per 1,024 customers) while its spin-wait
        # doubles the CPU a prediction takes, CPU the broker client and event loop need.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        if (tuple(o.name for o in session.get_outputs()) not in (OUTPUTS, LEGACY_OUTPUTS)
                or tuple(i.name for i in session.get_inputs()) != INPUTS):
            raise ArtifactError(f"{path}: model {meta.get('version')} does not map "
                                f"{', '.join(INPUTS)} to {', '.join(OUTPUTS)}; retrain it with `clv train`")
        return cls(path, meta, session, Scaler.from_dict(meta["scaler"]),
                   Calibration.from_dict(meta["training"].get("calibration")))

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
        if raw.member_p is None:
            raise ArtifactError(f"model {self.version} has no predictive distribution (trained before "
                                "this release); retrain it with `clv train`")
        p = self.calibration.apply(raw.clv, raw.p_purchase)[1]
        return SpendDistribution.from_members(p, raw.member_p, raw.member_mu, raw.member_sigma,
                                              self.calibration.factor, self.calibration.spread)

    def prob_at_least(self, inputs: Inputs | RawPrediction, threshold: float) -> np.ndarray:
        """P(horizon spend >= threshold) per customer, from unscaled inputs or the graph's
        outputs (an analyst's threshold: `clv score --at-least`)."""
        raw = inputs if isinstance(inputs, RawPrediction) else self.raw_predict(inputs)
        return self.distribution(raw).prob_at_least(threshold).astype(np.float32)

    def raw_predict(self, inputs: Inputs) -> RawPrediction:
        """The ONNX graph's own outputs, before calibration."""
        n = inputs.seq.shape[0]
        if n == 0:
            return RawPrediction(np.zeros(0, np.float32), np.zeros(0, np.float32),
                                 *(np.zeros((0, 1), np.float32) for _ in range(3)))
        scaled = self.scaler.transform(inputs)
        h0 = np.zeros((self.meta["layers"], n, self.meta["hidden"]), dtype=np.float32)
        feeds = {"seq": scaled.seq, "static": scaled.static, "classic": scaled.classic, "h0": h0}
        names = [o.name for o in self.session.get_outputs()]
        return RawPrediction(*self.session.run(names, feeds))

