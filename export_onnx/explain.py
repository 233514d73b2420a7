"""Why a customer's score is what it is: its drivers, in dollars that add up to the score.

Every model input belongs to one named group (`GROUPS`: recency, frequency, order value, trend,
tenure, season). A customer's drivers are the exact Shapley values of those groups for the
published `clv` (what `Artifact.predict` returns, the level included) against one stated
reference: the model's average customer, whose every input is the mean of that input over the
cohort the model was trained on at its cutoff (`reference_inputs`, stored in the artifact as
`reference`). For each coalition of groups the model scores a mixed customer whose inputs in
those groups are the customer's and the rest the reference's: 2^G rows per customer in one
batched onnxruntime call (64 for six groups), no torch. Shapley values add up exactly:
reference clv + contributions = the customer's clv.

A group none of whose inputs reaches the network (its scaler mask switches them all off, as the
calendar is in a model trained without it) moves nothing and is left out, halving the rows per
missing group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from math import factorial
from typing import Any, Sequence

import numpy as np

from export_onnx import ArtifactError
from export_onnx.runtime import Artifact
from features.aggregate import CustomerState, month_of
from features.sequences import CLASSIC_FEATURES, SEQ_FEATURES, STATIC_FEATURES, Inputs, build_inputs

CHUNK_CUSTOMERS = 256  # customers per onnxruntime call (x 2^G rows each)


@dataclass(frozen=True)
class Group:
    """Model inputs that move together in an explanation, and what they say about a customer."""

    name: str
    meaning: str
    seq: tuple[str, ...] = ()  # monthly channels (every month of the window)
    static: tuple[str, ...] = ()
    classic: tuple[str, ...] = ()


GROUPS = (
    Group(
        "recency",
        "how recently the customer last bought",
        static=("log_recency_months",),
        classic=("purchase_span_days",),
    ),
    Group(
        "frequency",
        "how often the customer buys: invoices, active months, purchase days",
        static=("log_invoices_total", "log_invoices_before_window", "log_active_months"),
        classic=("purchase_days",),
    ),
    Group(
        "order_value",
        "how much the customer spends: in total, per invoice, per purchase day",
        static=("log_spend_total", "log_order_value"),
        classic=("spend_per_purchase_day",),
    ),
    Group(
        "trend",
        "the month-by-month pattern of spend, invoices and units over the window",
        seq=("log_spend", "log_invoices", "log_units", "active"),
    ),
    Group(
        "tenure",
        "how long the customer has been known",
        seq=("before_first",),
        static=("log_tenure_months",),
        classic=("age_days",),
    ),
    Group(
        "season",
        "the calendar: the months of the window and of the as-of date",
        seq=("moy_sin", "moy_cos"),
        static=("asof_moy_sin", "asof_moy_cos", "horizon_months"),
    ),
)


MEANINGS = {g.name: g.meaning for g in GROUPS}


def reference_inputs(cohort: Inputs) -> dict[str, Any]:
    """The average customer of a cohort: the mean of every input (each month of the window
    apart), as the artifact stores it (`clv train` records it for its cohort at the cutoff)."""
    return {
        "seq": cohort.seq.mean(axis=0, dtype=np.float64).tolist(),
        "static": cohort.static.mean(axis=0, dtype=np.float64).tolist(),
        "classic": cohort.classic.mean(axis=0, dtype=np.float64).tolist(),
    }


@dataclass(frozen=True)
class Drivers:
    """One customer's explanation: `reference` + the sum of `contributions` = `clv` (dollars)."""

    customer_id: str
    clv: float
    reference: float
    contributions: dict[str, float]  # group name -> dollars, in `GROUPS` order

    def ranked(self) -> list[tuple[str, float]]:
        """(group, dollars), the largest move first: the order every surface shows them in."""
        return sorted(self.contributions.items(), key=lambda kv: -abs(kv[1]))

    def as_dict(self) -> dict[str, Any]:
        """What the APIs answer: the reference, each group's dollars with its meaning, the clv."""
        return {
            "reference_clv": self.reference,
            "clv": self.clv,
            "drivers": [
                {"group": name, "contribution": value, "meaning": MEANINGS[name]} for name, value in self.ranked()
            ],
        }


def _shapley_weights(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions (2^G x G, bool; the first none, the last all) and the weight of each
    coalition's value in each group's Shapley value: |S|!(G-|S|-1)!/G! for S + i, minus it for
    S, where S excludes i."""
    coalitions = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    size = coalitions.sum(axis=1, keepdims=True)
    w = np.array([factorial(k) * factorial(n - k - 1) / factorial(n) for k in range(n)])
    return coalitions, np.where(coalitions, w[np.maximum(size - 1, 0)], -w[np.minimum(size, n - 1)])


class Explainer:
    """An artifact's drivers: its reference customer scored once, the coalitions laid out once."""

    def __init__(self, artifact: Artifact) -> None:
        ref = artifact.meta.get("reference")
        if ref is None:
            raise ArtifactError(
                f"model {artifact.version} carries no reference customer to "
                "explain scores against; retrain it with `clv train`"
            )
        self.artifact = artifact
        self.reference = Inputs(
            np.asarray(ref["seq"], np.float32)[None],
            np.asarray(ref["static"], np.float32)[None],
            np.asarray(ref["classic"], np.float32)[None],
        )
        scaler = artifact.scaler
        reads = {
            **dict(zip(SEQ_FEATURES, scaler.seq_mask != 0)),
            **dict(zip(STATIC_FEATURES, scaler.static_mask != 0)),
            **{name: True for name in CLASSIC_FEATURES},
        }
        self.groups = tuple(g for g in GROUPS if any(reads[f] for f in (*g.seq, *g.static, *g.classic)))
        self.coalitions, self.weights = _shapley_weights(len(self.groups))
        # Per coalition, which inputs come from the customer (the rest from the reference).
        self.take_seq = self._taken(SEQ_FEATURES, "seq")
        self.take_static = self._taken(STATIC_FEATURES, "static")
        self.take_classic = self._taken(CLASSIC_FEATURES, "classic")

    def _taken(self, names: tuple[str, ...], kind: str) -> np.ndarray:
        """Coalitions x inputs: the input is the customer's. An input of no active group (the
        network never reads it) is the customer's in every coalition."""
        owner = {f: i for i, g in enumerate(self.groups) for f in getattr(g, kind)}
        return np.stack(
            [self.coalitions[:, owner[n]] if n in owner else np.ones(len(self.coalitions), bool) for n in names], axis=1
        )

    def explain(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per customer: its clv, the reference clv and the groups' contributions (customers x
        groups), in dollars; reference + contributions = clv up to float rounding."""
        n = len(inputs.seq)
        clv, ref, contrib = np.empty(n), np.empty(n), np.empty((n, len(self.groups)))
        for lo in range(0, n, CHUNK_CUSTOMERS):
            part = inputs.take(np.arange(lo, min(n, lo + CHUNK_CUSTOMERS)))
            values = self._values(part)  # customers x coalitions
            clv[lo : lo + len(values)] = values[:, -1]  # every group the customer's
            ref[lo : lo + len(values)] = values[:, 0]  # none
            contrib[lo : lo + len(values)] = values @ self.weights
        return clv, ref, contrib

    def _values(self, part: Inputs) -> np.ndarray:
        """The published clv of every coalition's mixed customer, customers x coalitions."""
        k = len(self.coalitions)
        seq = np.where(self.take_seq[None, :, None, :], part.seq[:, None], self.reference.seq[:, None])
        static = np.where(self.take_static[None], part.static[:, None], self.reference.static[:, None])
        classic = np.where(self.take_classic[None], part.classic[:, None], self.reference.classic[:, None])
        mixed = Inputs(
            seq.reshape(-1, *seq.shape[2:]),
            static.reshape(-1, static.shape[-1]),
            classic.reshape(-1, classic.shape[-1]),
        )
        raw = self.artifact.raw_predict(mixed)  # then the level, as `Artifact.predict` applies it
        clv, _p = self.artifact.calibration.apply(raw.clv, raw.p_purchase)
        return clv.astype(np.float64).reshape(-1, k)

    def drivers(self, states: Sequence[CustomerState], as_of: datetime) -> list[Drivers]:
        """Each state's drivers as of `as_of`, the time its score is as of."""
        inputs = build_inputs(states, month_of(as_of), self.artifact.window, self.artifact.horizon_months)
        clv, ref, contrib = self.explain(inputs)
        names = [g.name for g in self.groups]
        return [
            Drivers(s.customer_id, float(c), float(r), dict(zip(names, map(float, row))))
            for s, c, r, row in zip(states, clv, ref, contrib)
        ]


def render(d: Drivers) -> str:
    """The drivers as lines of text that add up to the score, largest first."""
    lines = [
        f"  {'reference':<12}{d.reference:>12,.2f}  the model's average customer (mean inputs of its training cohort)"
    ]
    for name, value in d.ranked():
        lines.append(f"  {name:<12}{value:>+12,.2f}  {MEANINGS[name]}")
    lines.append(f"  {'= clv':<12}{d.clv:>12,.2f}")
    return "\n".join(lines)
