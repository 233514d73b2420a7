"""Named customer segments, decided per customer from its score and RFM fields, with the
playbook that goes with each: the one place a segment is defined.

The rules need no population statistics at scoring time: CLV thresholds are quantiles of the
training cohort's expected CLV, carried in the model artifact (`clv_quantiles`). First match
wins, in the order of `PLAYBOOKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Playbook:
    """Who is in a segment and what a campaign does with them, as analysts read it."""

    who: str
    what_to_do: str


PLAYBOOKS: dict[str, Playbook] = {
    "vip": Playbook("expected CLV in the cohort's top 10% and p_purchase >= 0.5",
                    "protect: service, early access"),
    "at_risk_loyal": Playbook("3 or more purchases, p_purchase < 0.35",
                              "win back before they lapse"),
    "high_potential_new": Playbook("first purchase within 120 days, expected CLV above the "
                                   "cohort median", "nurture the second purchase"),
    "dormant": Playbook("no purchase for 365 days, or p_purchase < 0.1",
                        "low-cost reactivation only"),
    "one_and_done": Playbook("one purchase, none for 180 days", "reactivation test"),
    "regular": Playbook("everyone else", "standard programmes"),
}
SEGMENTS = tuple(PLAYBOOKS)


def segment(clv: float, p_purchase: float, frequency: int, recency_days: float,
            tenure_days: float, clv_quantiles: Mapping[str, float]) -> str:
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
