"""What a model was trained on, and whether the customers being scored look like it.

`clv train` writes a `summarize` of its training cohort (the customers at the cutoff) into the
artifact: per customer statistic (each a model input), its deciles on that cohort and the cohort's
share in each bin they make. Every scorer compares the customers it scores with that summary by
one measure, the population stability index (PSI) per statistic over those bins,

    PSI = sum over bins (a - e) * ln(a / e)

with `e` the training cohort's share in the bin and `a` the scored customers' share, both floored at
`FLOOR`. Past `TOLERANCE` (0.25, the usual line of a significant shift) a statistic has moved: the
model is scoring customers unlike those it learnt from, and `Verdict.sentence` says which, by how
much and what to do. PSI over quantile bins does not change under a monotone transform, so a
statistic's PSI is the same on its log scale as in dollars or days.

The calendar and horizon inputs are not summarized (they describe the as-of date, one value per
cohort), nor the monthly sequence (its per-customer totals are the static inputs summarized here).
Each scorer checks the statistics it sees: a scored file or upload (one cohort as of one date)
all of them; the worker only `PER_ORDER` (the customers it rescores are mostly those that just
bought, so their recency and tenure are not those of a cohort at one date, whatever the model);
a snapshot reader `FROM_SCORES`, the ones a score's own fields determine. Pure numpy: serving
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from features.sequences import CLASSIC_FEATURES, STATIC_FEATURES, Inputs, slog1p

TOLERANCE = 0.25  # PSI past which a statistic has moved
FLOOR = 1e-4  # a bin's share at least this, so an empty bin counts without an infinite log
MIN_CUSTOMERS = 200  # fewer scored customers are too few to judge (PSI noise ~ bins / customers)
DECILES = np.linspace(0.1, 0.9, 9)

# Statistic -> (words for it, its unit when shown in plain numbers).
STATISTICS: dict[str, tuple[str, str]] = {
    "log_tenure_months": ("tenure (months)", ""),
    "log_recency_months": ("recency (months)", ""),
    "log_invoices_total": ("invoices", ""),
    "log_spend_total": ("total spend", "$"),
    "log_order_value": ("order value", "$"),
    "log_invoices_before_window": ("invoices before the window", ""),
    "log_active_months": ("active months", ""),
    "purchase_days": ("purchase days", ""),
    "purchase_span_days": ("days from first event to last purchase", ""),
    "age_days": ("tenure (days)", ""),
    "spend_per_purchase_day": ("spend per purchase day", "$"),
}
PER_ORDER = ("log_order_value", "spend_per_purchase_day")
FROM_SCORES = ("log_invoices_total", "log_spend_total", "log_order_value")
_STATIC = {name: STATIC_FEATURES.index(name) for name in STATISTICS if name in STATIC_FEATURES}
_CLASSIC = {name: CLASSIC_FEATURES.index(name) for name in STATISTICS if name in CLASSIC_FEATURES}


def values(inputs: Inputs, names: Iterable[str] = STATISTICS) -> dict[str, np.ndarray]:
    """Each statistic of each customer, read off the model's (unscaled) inputs."""
    return {
        name: inputs.static[:, _STATIC[name]] if name in _STATIC else inputs.classic[:, _CLASSIC[name]]
        for name in names
    }


def from_scores(frequency: np.ndarray, total_spend: np.ndarray) -> dict[str, np.ndarray]:
    """`FROM_SCORES` from a score's `frequency` and `total_spend`, as the model's inputs have them
    (float32: a value on a bin's edge must fall where the model's own input falls)."""
    frequency = np.asarray(frequency, dtype=np.float64)
    total_spend = np.asarray(total_spend, dtype=np.float64)
    out = {
        "log_invoices_total": np.log1p(frequency),
        "log_spend_total": slog1p(total_spend),
        "log_order_value": slog1p(total_spend / np.maximum(frequency, 1)),
    }
    return {name: x.astype(np.float32) for name, x in out.items()}


def _bins(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bin of each value: bin i holds edges[i-1] <= x < edges[i] (a value on an edge goes up)."""
    return np.searchsorted(edges, x, side="right")


def summarize(inputs: Inputs, first_event: str, cutoff: str) -> dict[str, Any]:
    """The training cohort (`inputs` at the cutoff) as the artifact records it: its size and dates,
    and per statistic the distinct deciles (the bins' edges) and the cohort's share in each bin
    (ties make bins uneven, so the shares are counted, not assumed to be 10%)."""
    stats = {}
    for name, x in values(inputs).items():
        x = x.astype(np.float64)
        edges = np.unique(np.quantile(x, DECILES))
        counts = np.bincount(_bins(edges, x), minlength=len(edges) + 1)
        stats[name] = {"edges": edges.tolist(), "shares": (counts / len(x)).tolist(), "median": float(np.median(x))}
    return {
        "customers": int(len(inputs.static)),
        "first_event": first_event,
        "cutoff": cutoff,
        "measure": "psi",
        "tolerance": TOLERANCE,
        "statistics": stats,
    }


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of shares `actual` against `expected` (same bins)."""
    e, a = np.maximum(expected, FLOOR), np.maximum(actual, FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def _plain(name: str, value: float) -> str:
    """An edge in the statistic's plain units (log1p undone), as a person reads it."""
    if name.startswith("log_"):
        value = float(np.sign(value) * np.expm1(abs(value)))
    unit = STATISTICS[name][1]
    return f"{unit}{value:,.0f}" if abs(value) >= 10 else f"{unit}{value:,.2g}"


@dataclass(frozen=True)
class Shift:
    """One statistic's comparison: its PSI, and its median among the scored customers and in the
    training cohort (on the statistic's own scale)."""

    name: str
    psi: float
    median: float
    training_median: float

    def words(self) -> str:
        return (
            f"{STATISTICS[self.name][0]} PSI {self.psi:.2f} (median {_plain(self.name, self.median)} "
            f"here, {_plain(self.name, self.training_median)} in training)"
        )


@dataclass(frozen=True)
class Verdict:
    """The comparison of `customers` scored customers with the training cohort of `summary`."""

    customers: int
    shifts: tuple[Shift, ...]  # every statistic compared
    summary: Mapping[str, Any]

    @property
    def judged(self) -> bool:
        return self.customers >= MIN_CUSTOMERS

    @property
    def moved(self) -> tuple[Shift, ...]:
        """The statistics past the tolerance, largest shift first (none when too few to judge)."""
        if not self.judged:
            return ()
        return tuple(sorted((s for s in self.shifts if s.psi > TOLERANCE), key=lambda s: -s.psi))

    def sentence(self) -> str | None:
        """One line naming what moved and by how much, and what to do; None when nothing did."""
        moved = self.moved
        if not moved:
            return None
        s = self.summary
        return (
            f"these {self.customers:,} customers are unlike the {s['customers']:,} the model was "
            f"trained on ({s['first_event'][:10]} to {s['cutoff'][:10]}): "
            + "; ".join(m.words() for m in moved)
            + f" (tolerance PSI {TOLERANCE:g}); its scores for them are extrapolations: "
            "train a model on this data (clv train) before acting on them"
        )


def check(summary: Mapping[str, Any], scored: Mapping[str, np.ndarray]) -> Verdict:
    """Compare the scored customers' statistics (`values` or `from_scores`) with the summary."""
    stats = summary["statistics"]
    shifts = []
    n = 0
    for name, x in scored.items():
        x = np.asarray(x, dtype=np.float64)
        stat, n = stats[name], len(x)
        edges = np.asarray(stat["edges"])
        actual = np.bincount(_bins(edges, x), minlength=len(edges) + 1) / max(n, 1)
        shifts.append(
            Shift(
                name,
                psi(np.asarray(stat["shares"]), actual),
                float(np.median(x)) if n else float("nan"),
                stat["median"],
            )
        )
    return Verdict(n, tuple(shifts), summary)


class Window:
    """The statistics of the last `size` customers a worker rescored: a ring of values written
    per micro-batch with one numpy slice assignment; `verdict` bins them (a sort-sized job over
    `size` values per statistic)."""

    def __init__(self, summary: Mapping[str, Any], names: Sequence[str], size: int) -> None:
        self.summary, self.names, self.size = summary, tuple(names), size
        self.ring = np.zeros((len(self.names), size), dtype=np.float32)
        self.position = 0
        self.filled = 0

    def add(self, inputs: Inputs) -> None:
        """The statistics of a micro-batch's customers enter; the oldest beyond `size` leave."""
        n = len(inputs.static)
        if n == 0:
            return
        scored = values(inputs, self.names)
        keep = min(n, self.size)  # a batch larger than the window: its newest customers
        slots = (self.position + np.arange(keep)) % self.size
        for i, name in enumerate(self.names):
            self.ring[i, slots] = scored[name][n - keep :]
        self.position = int((self.position + keep) % self.size)
        self.filled = min(self.filled + keep, self.size)

    def verdict(self) -> Verdict:
        return check(self.summary, {name: self.ring[i, : self.filled] for i, name in enumerate(self.names)})


def describe(summary: Mapping[str, Any] | None) -> str:
    """The training cohort in a few words, for a model card."""
    if not summary:
        return "not recorded (a model from before this release: `clv train --population-only` adds it)"
    return (
        f"{summary['customers']:,} customers, {summary['first_event'][:10]} to "
        f"{summary['cutoff'][:10]}; scored customers are compared with it by PSI per input "
        f"(tolerance {TOLERANCE:g})"
    )


def percentiles(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per statistic, the training cohort's 10th, 50th and 90th percentiles in plain units."""
    return [
        {
            "input": name,
            "what": STATISTICS[name][0],
            "p10": _plain(name, stat["edges"][0]),
            "median": _plain(name, stat["median"]),
            "p90": _plain(name, stat["edges"][-1]),
        }
        for name, stat in summary["statistics"].items()
    ]
