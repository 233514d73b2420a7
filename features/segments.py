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
    """A segment as a campaign team works it: who is in it (the rule), the signals to watch in
    their scores, what to do, and what to measure to know it worked."""

    who: str
    signals: str
    what_to_do: str
    what_to_measure: str


PLAYBOOKS: dict[str, Playbook] = {
    "vip": Playbook(
        "expected CLV in the cohort's top 10% and p_purchase >= 0.5",
        "p_purchase falling below 0.5 or recency past their usual gap between orders",
        "protect: personal service, early access, no blanket discounts",
        "retention rate and spend per VIP against a held-out VIP control group"),
    "at_risk_loyal": Playbook(
        "3 or more purchases, p_purchase < 0.35",
        "recency growing past their usual gap; expected CLV dropping rescore after rescore",
        "win back before they lapse: a personal reminder, a reason to return",
        "share reactivated within the horizon and incremental spend against a control group"),
    "high_potential_new": Playbook(
        "first purchase within 120 days, expected CLV above the cohort median",
        "no second purchase within 60 days of the first",
        "nurture the second purchase: onboarding series, recommendation from the first order",
        "second-purchase rate within 90 days and expected CLV a horizon later"),
    "dormant": Playbook(
        "no purchase for 365 days, or p_purchase < 0.1",
        "any new event moves them out; p_purchase rising after a contact",
        "low-cost reactivation only (email, no paid media)",
        "reactivation rate against the cost of the contact; unsubscribes"),
    "one_and_done": Playbook(
        "one purchase, none for 180 days",
        "the first order's value and category; opened contacts",
        "reactivation test: one offer tied to the first purchase, small cells",
        "second-purchase rate against a control cell; cost per reactivated customer"),
    "regular": Playbook(
        "everyone else",
        "movement into at_risk_loyal or vip between snapshots",
        "standard programmes: newsletter, seasonal campaigns",
        "segment migration between snapshots and mean expected CLV"),
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
