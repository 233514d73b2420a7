import pytest

from features.segments import PLAYBOOKS, SEGMENTS, segment

Q = {"p50": 10.0, "p75": 30.0, "p90": 80.0, "p99": 400.0}


@pytest.mark.parametrize("kw, expected", [
    (dict(clv=120, p_purchase=0.9, frequency=12, recency_days=10, tenure_days=400), "vip"),
    (dict(clv=40, p_purchase=0.2, frequency=5, recency_days=150, tenure_days=500), "at_risk_loyal"),
    (dict(clv=25, p_purchase=0.6, frequency=1, recency_days=20, tenure_days=20), "high_potential_new"),
    (dict(clv=1, p_purchase=0.05, frequency=1, recency_days=400, tenure_days=400), "dormant"),
    (dict(clv=3, p_purchase=0.2, frequency=1, recency_days=200, tenure_days=200), "one_and_done"),
    (dict(clv=8, p_purchase=0.4, frequency=2, recency_days=60, tenure_days=300), "regular"),
])
def test_rules_first_match_wins(kw, expected):
    assert segment(**kw, clv_quantiles=Q) == expected
    assert expected in SEGMENTS


def test_every_segment_has_a_playbook():
    assert SEGMENTS == tuple(PLAYBOOKS) and len(SEGMENTS) == 6
    assert all(book.who and book.what_to_do for book in PLAYBOOKS.values())
