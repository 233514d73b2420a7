"""The worker's drift check: the customers it rescored lately against the model's training cohort
(features.population), as a gauge per input on /metrics and a log line when an input crosses the
tolerance (and when it is back under), never one per event.

The window holds the statistics of the last `WINDOW` customers rescored. It checks the inputs
that describe what a customer buys per order (`population.PER_ORDER`): the customers a worker
rescores are mostly those that just bought (and everyone at a month turn), so their recency and
tenure are not those of a cohort at one date, whatever the model (`clv score` checks every input).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from export_onnx.runtime import Artifact
from features import population
from features.sequences import Inputs
from stream.metrics import Metrics

log = logging.getLogger("clv.worker")
WINDOW = 2048  # customers; PSI's noise over ten bins is about 9 / WINDOW
JUDGE_EVERY_S = 1.0  # the window is judged at most this often (binning it costs ~0.2-0.5 ms)


class DriftWatch:
    """Feed it each micro-batch's model inputs (`observe`); a model without a training
    population is said once at start and not checked."""

    def __init__(
        self, artifact: Artifact, metrics: Metrics, size: int = WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.metrics, self.clock = metrics, clock
        self.judged_at = float("-inf")
        summary = artifact.population
        self.window = None if summary is None else population.Window(summary, population.PER_ORDER, size)
        self.above: set[str] = set()  # inputs past the tolerance when last judged
        if summary is None:
            log.warning(
                "model %s records no training population, so scored customers are not "
                "compared with it (`clv train --population-only` adds it)",
                artifact.version,
            )

    def observe(self, inputs: Inputs) -> None:
        """The statistics of a micro-batch's customers enter the window; gauges and log follow,
        at most every JUDGE_EVERY_S, once the window holds enough customers to judge."""
        if self.window is None:
            return
        self.window.add(inputs)
        now = self.clock()
        if now - self.judged_at < JUDGE_EVERY_S:
            return
        verdict = self.window.verdict()
        if not verdict.judged:
            return
        self.judged_at = now
        for shift in verdict.shifts:
            self.metrics.drift.labels(input=shift.name).set(shift.psi)
        moved = {s.name for s in verdict.moved}
        if moved - self.above:
            log.warning("drift: %s", verdict.sentence())
        elif self.above and not moved:
            log.info(
                "drift: the last %d customers rescored are back within PSI %g of the training cohort on %s",
                verdict.customers,
                population.TOLERANCE,
                ", ".join(self.window.names),
            )
        self.above = moved
