"""Named customer segments, decided per customer from its score and RFM fields, with the
playbook that goes with each: the one place a segment is defined.

The rules need no population statistics at scoring time: CLV thresholds are dollar amounts, the
quantiles of the model's training cohort's expected CLV at its cutoff, carried in the model
artifact (`clv_quantiles`), so a segment's share of another cohort is whatever that cohort gives
(a vip rule drawn at the training cohort's 90th percentile does not make a tenth of every cohort
vip). `rules` writes them with the model's dollars; the artifact records each segment's share of
the training cohort (`cohort_shares`), the cohort on which the rule's numbers hold. First match
wins, in the order of `PLAYBOOKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Playbook:
    """A segment as a campaign team works it: who is in it (the rule), the signals to watch in
    their scores, what to do, and what to measure to know it worked."""

    who: str
    signals: str
    what_to_do: str
    what_to_measure: str


PLAYBOOKS: dict[str, Playbook] = {
    "vip": Playbook(
        "expected CLV at or above the model's vip line (the 90th percentile of its training "
        "cohort's expected CLV, in dollars) and p_purchase >= 0.5",
        "p_purchase falling below 0.5 or recency past their usual gap between orders",
        "protect: personal service, early access, no blanket discounts",
        "retention rate and spend per VIP against a held-out VIP control group",
    ),
    "at_risk_loyal": Playbook(
        "3 or more purchases, p_purchase < 0.35",
        "recency growing past their usual gap; expected CLV dropping rescore after rescore",
        "win back before they lapse: a personal reminder, a reason to return",
        "share reactivated within the horizon and incremental spend against a control group",
    ),
    "high_potential_new": Playbook(
        "first purchase within 120 days, expected CLV at or above the median of the model's "
        "training cohort (in dollars)",
        "no second purchase within 60 days of the first",
        "nurture the second purchase: onboarding series, recommendation from the first order",
        "second-purchase rate within 90 days and expected CLV a horizon later",
    ),
    "dormant": Playbook(
        "no purchase for 365 days, or p_purchase < 0.1",
        "any new event moves them out; p_purchase rising after a contact",
        "low-cost reactivation only (email, no paid media)",
        "reactivation rate against the cost of the contact; unsubscribes",
    ),
    "one_and_done": Playbook(
        "one purchase, none for 180 days",
        "the first order's value and category; opened contacts",
        "reactivation test: one offer tied to the first purchase, small cells",
        "second-purchase rate against a control cell; cost per reactivated customer",
    ),
    "regular": Playbook(
        "everyone else",
        "movement into at_risk_loyal or vip between snapshots",
        "standard programmes: newsletter, seasonal campaigns",
        "segment migration between snapshots and mean expected CLV",
    ),
}
SEGMENTS = tuple(PLAYBOOKS)


def segment(
    clv: float,
    p_purchase: float,
    frequency: int,
    recency_days: float,
    tenure_days: float,
    clv_quantiles: Mapping[str, float],
) -> str:
    """The customer's segment; `clv` is the expected spend over the horizon."""
    if clv >= clv_quantiles["p90"] and p_purchase >= 0.5:
        return "vip"
    if frequency >= 3 and p_purchase < 0.35:
        return "at_risk_loyal"
    if tenure_days <= 120 and clv >= clv_quantiles["p50"]:
        return "high_potential_new"
    if recency_days >= 365 or p_purchase < 0.1:
        return "dormant"
    if frequency <= 1 and recency_days >= 180:
        return "one_and_done"
    return "regular"


# The rules with a model's dollar thresholds: segment -> template over `clv_quantiles`.
_RULES = {
    "vip": "expected CLV >= {p90} (the training cohort's 90th percentile) and p_purchase >= 0.5",
    "high_potential_new": "first purchase within 120 days, expected CLV >= {p50} (the training cohort's median)",
}


def rules(clv_quantiles: Mapping[str, float]) -> dict[str, str]:
    """Every segment's rule as it applies with this model: its dollar thresholds written out."""
    dollars = {k: f"${v:,.2f}" for k, v in clv_quantiles.items()}
    return {name: _RULES[name].format(**dollars) if name in _RULES else book.who for name, book in PLAYBOOKS.items()}


def cohort_shares(
    clv: Sequence[float],
    p_purchase: Sequence[float],
    frequency: Sequence[int],
    recency_days: Sequence[float],
    tenure_days: Sequence[float],
    clv_quantiles: Mapping[str, float],
) -> dict[str, float]:
    """Each segment's share of a cohort (every segment named, 0 when empty)."""
    counts = dict.fromkeys(SEGMENTS, 0)
    for row in zip(clv, p_purchase, frequency, recency_days, tenure_days):
        counts[segment(*row, clv_quantiles)] += 1
    n = max(len(clv), 1)
    return {name: c / n for name, c in counts.items()}


def described_rules(meta: Mapping[str, Any]) -> dict[str, str]:
    """Each segment's rule with a model's dollars (its artifact metadata), and the share of the
    model's training cohort it held there: the cohort on which the rule's numbers are true."""
    shares = meta.get("segment_shares")
    cutoff = meta["cutoff"][:10]
    return {
        name: rule
        + (
            f"; {shares[name]:.1%} of the training cohort at {cutoff}"
            if shares
            else " (this model records no training cohort shares)"
        )
        for name, rule in rules(meta["clv_quantiles"]).items()
    }
