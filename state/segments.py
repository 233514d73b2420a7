"""Named customer segments, decided per customer from its score and RFM fields.

The rules need no population statistics at scoring time: CLV thresholds are the quantiles of the
training cohort's predicted CLV, carried in the model artifact (`clv_quantiles`). Rules, first
match wins:

| segment | rule | what to do |
|---|---|---|
| `vip` | CLV >= cohort p90 and p_purchase >= 0.5 | protect: service, early access |
| `at_risk_loyal` | >= 3 purchases and p_purchase < 0.35 | win back before they lapse |
| `high_potential_new` | tenure <= 120 days and CLV >= cohort p50 | nurture the second purchase |
| `dormant` | no purchase for 365 days, or p_purchase < 0.1 | low-cost reactivation only |
| `one_and_done` | one purchase, none for 180 days | reactivation test |
| `regular` | everything else | standard programmes |
"""

from __future__ import annotations

from typing import Mapping

SEGMENTS = ("vip", "at_risk_loyal", "high_potential_new", "dormant", "one_and_done", "regular")


def segment(clv: float, p_purchase: float, frequency: int, recency_days: float,
            tenure_days: float, clv_quantiles: Mapping[str, float]) -> str:
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
