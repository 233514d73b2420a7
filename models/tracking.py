"""Every `clv train` and `clv evaluate` recorded as a run in MLflow's tracking store, so a data
scientist compares runs side by side (`mlflow ui`): the parameters, the training data's
fingerprint, the metrics (per seed for an evaluation), the plots and, for training, the artifact
itself. The store is a local SQLite file under var/mlruns by default, or whatever
`--tracking-uri` names (`file:DIR`, `sqlite:///FILE`, `http://server:5000`); the artifact's
metadata names its run (`run`). Training-side only: serving never imports MLflow."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///var/mlruns/mlflow.db"
EXPERIMENT = "clv"


class TrackingError(ValueError):
    """The tracking store cannot take the run (a server that does not answer, a bad URI)."""


@dataclass(frozen=True)
class Recorder:
    """One open run: what `clv train` and `clv evaluate` write into it."""

    client: Any  # mlflow.MlflowClient
    run_id: str
    tracking_uri: str

    def reference(self) -> dict[str, str]:
        """What an artifact's metadata says of the run that made it."""
        return {"tracking_uri": self.tracking_uri, "experiment": EXPERIMENT, "run_id": self.run_id}

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def metrics(self, values: Mapping[str, float | None], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        )

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def files(self, path: Path, under: str | None = None) -> None:
        """A file, or every file of a directory, as the run's artifacts (under `under`)."""
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), under)
        else:
            self.client.log_artifact(self.run_id, str(path), under)


@contextmanager
def run(command: str, tracking_uri: str | None, name: str) -> Iterator[Recorder]:
    """A run of `command` in the `clv` experiment, finished when the block ends (FAILED when it
    raises)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or DEFAULT_URI
    if uri.startswith("file:"):  # asked for by name: MLflow keeps it behind an opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    artifacts = None  # a file store or a server keeps them where it is configured to
    if uri.startswith("sqlite:///"):  # beside the database, not in whatever directory runs it
        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (database.parent / "artifacts").resolve().as_uri()
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        )
        started = client.create_run(experiment_id, run_name=name, tags={"command": command})
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"--tracking-uri {uri}: {str(exc).splitlines()[0]}") from None
    recorder = Recorder(client, started.info.run_id, uri)
    try:
        yield recorder
    except BaseException:
        client.set_terminated(recorder.run_id, "FAILED")
        raise
    client.set_terminated(recorder.run_id, "FINISHED")


def training_metrics(meta: Mapping[str, Any]) -> dict[str, float]:
    """What a training run is compared by: each ensemble member's held-out loss and epoch, and
    the ONNX export's agreement with torch."""
    out: dict[str, float] = {}
    for k, member in enumerate(meta["training"].get("members", [])):
        out[f"member{k}.valid_loss"] = member["valid_loss"]
        out[f"member{k}.best_epoch"] = member["best_epoch"]
    for name, parity in meta.get("parity", {}).items():
        out[f"parity.{name}.max_rel_diff"] = parity["max_rel_diff"]
    return out


def record_evaluation(recorder: Recorder, run: Any, summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
    """Every model's metrics per training seed (the seed is the step), and their mean and sd."""
    for seed_run in run.seeds:
        recorder.metrics(
            {
                f"{model}.{key}": value
                for model, metrics in seed_run.models.items()
                for key, value in metrics.items()
                if isinstance(value, (int, float))
            },
            step=seed_run.seed,
        )
    if len(run.seeds) > 1:
        recorder.metrics(
            {
                f"{model}.{key}.{stat}": value
                for model, metrics in summary.items()
                for key, stats in metrics.items()
                for stat, value in stats.items()
            }
        )
