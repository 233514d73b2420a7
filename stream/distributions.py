"""Each customer's predictive distribution of horizon spend, kept in the snapshot.

A score message carries the interval (`clv_low`, `clv_high`, `clv_sd`), not the distribution it
came from, and P(spend >= T) for a threshold an analyst picks needs the distribution. So at each
snapshot the sink computes it (`Artifact.distribution`: P(any purchase) at the level and each
ensemble member's weight, mu and sigma) for every customer whose score changed since it last did,
from the customer's state in its copy of the customer states (`stream.state_copy`): one model call
per as-of time, not per customer. A distribution is kept only when its mean is the clv the row
holds (the same model, the same state); a customer whose state is not in step with its score gets
none in this snapshot and is tried again at the next. The snapshot's `customer_distribution` table
holds them (`state.snapshot.tables.DISTRIBUTION_COLUMNS`); readers compute P(spend >= T) with numpy
(`state.snapshot.queries`).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from export_onnx import ArtifactError
from export_onnx.runtime import Artifact
from features.aggregate import month_of
from features.sequences import build_inputs
from stream.state_copy import StateCopy, agrees


class Distributions:
    """Computes the `customer_distribution` rows of changed customers with the sink's model."""

    def __init__(self, artifact: Artifact, states: StateCopy) -> None:
        if not artifact.has_distribution:
            raise ArtifactError(f"model {artifact.version} has no predictive distribution (trained before it existed)")
        self.artifact, self.states = artifact, states
        self.lacking = False  # the last rows lacked a distribution for want of a state in step
        self.seen = 0  # the state copy's folds as of the last rows

    @property
    def version(self) -> str:
        return self.artifact.version

    def waiting(self) -> bool:
        """A snapshot lacked distributions for want of states that may have arrived since."""
        return self.lacking and self.states.folds != self.seen

    def start(self) -> None:
        """A snapshot begins: what it lacks is counted afresh over its `rows` calls."""
        self.seen, self.lacking = self.states.folds, False

    def rows(self, changed: Iterable[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """The `customer_distribution` rows of the customers (`Snapshots.undistributed` rows)
        whose state gives the clv their row holds."""
        started = time.perf_counter()
        found = self.states.in_step(changed, self.version)
        out: list[tuple[Any, ...]] = []
        computed, out_of_step = 0, found.out_of_step
        for as_of, pairs in found.by_as_of.items():
            states = [s for _r, s in pairs]
            inputs = build_inputs(states, month_of(as_of), self.artifact.window, self.artifact.horizon_months)
            dist = self.artifact.distribution(self.artifact.raw_predict(inputs))
            means = dist.mean()
            computed += len(pairs)
            for i, (r, _state) in enumerate(pairs):
                if not agrees(float(means[i]), r["clv"]):
                    out_of_step += 1  # the state is newer or older than the score: next time
                    continue
                out.append(
                    (
                        r["customer_id"],
                        r["model_version"],
                        r["as_of"],
                        r["event_offset"],
                        r["clv"],
                        float(dist.p[i]),
                        dist.weights[i].tolist(),
                        dist.mu[i].tolist(),
                        dist.sigma[i].tolist(),
                    )
                )
        self.lacking = self.lacking or bool(found.missing or out_of_step)
        if computed or found.missing or out_of_step:
            found.report(f"distributions: {len(out)} kept of", computed, out_of_step, started, self.version)
        return out
