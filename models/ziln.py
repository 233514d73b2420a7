"""The head: the classic model's per-customer quantities, corrected by the network, spread over
the horizon by a retention process, with a zero-inflated lognormal likelihood (Wang, Liu & Miao
2019).

The classic model (BG/NBD for purchases, Gamma-Gamma for spend; population parameters from
`models.classic`) gives each customer, from four statistics and seven numbers:
  P(alive now)                     BG/NBD's P(alive | x, t_x, T)
  purchases per month while alive  the posterior rate (r + x) / (alpha + T)
  monthly dropout hazard           that rate times the posterior dropout chance a / (a + b + x)
  spend per purchase               the Gamma-Gamma conditional mean: the customer's mean order
                                   weighted by the orders behind it, p w / (p w + q - 1), the rest
                                   the population's; w counts repeat orders, and the first for
                                   what the history says it is worth (models.classic.fit)
The network outputs one bounded correction for each (on the logit of P(alive), the log of
the others) (its last layer starts at zero,
so training starts from the classic model) and the spread of a buying customer's spend. It may
lower a customer's spend per purchase freely, and raise it only as far as orders back it:
w / (w + 1) of the bound (at most half for a one-time buyer), so one or two large baskets are
not valued as a habit. The
purchase rate the other way round: the network may raise it freely and lower it only by
1 / (x + 1) of the bound, x the repeat purchases. A customer's own repeat orders measure their
rate; what the network has learnt of others (a large first basket foretells a customer who does
not come back) may lower a one-time buyer's rate as far as the bound, but not overrule five
orders in a month. The
horizon H enters in closed form: alive in month k with probability s^k, buying in it with
1 - exp(-rate), so what is learned from short labels carries to the served horizon.

Expected spend over the horizon is an expectation by construction; with an annual discount rate
d, month k is weighted (1 + d)^(-k/12), the weighting of pymc-marketing's `customer_lifetime_value`
(whose `discount_rate` is the monthly rate (1 + d)^(1/12) - 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

RAW_OUTPUTS = 5  # corrections of alive, rate, hazard, spend; raw sigma
CONTEXT_FEATURES = 3  # classic quantities the network reads beside its own inputs
DAYS_PER_MONTH = 365.25 / 12
MAX_CORRECTION = 3.0  # a correction moves a classic quantity by at most e^3 (20x) either way
MAX_LOGIT = 12.0
_EPS = 1e-6


class Base(NamedTuple):
    """The classic model's quantities per customer."""

    logit_alive: torch.Tensor
    rate: torch.Tensor  # purchases per month while alive
    hazard: torch.Tensor  # monthly dropout hazard while alive
    order_value: torch.Tensor  # expected spend per purchase
    evidence: torch.Tensor  # w / (w + 1), w the orders behind the mean: how far spend may be raised
    doubt: torch.Tensor  # 1 / (x + 1), x the repeat purchases: how far the rate may be lowered


def classic_base(classic: torch.Tensor, params: torch.Tensor) -> Base:
    """`classic`: (..., 4) statistics of `features.sequences.CLASSIC_FEATURES`; `params`: (8,)
    r, alpha, a, b, p, q, gamma and what a first order counts for in Gamma-Gamma."""
    n, t_x, age, m = classic.unbind(-1)
    r, alpha, a, b, p, q, gamma, first = params.unbind(-1)
    x = (n - 1).clamp(min=0)
    weight = x + first * (n >= 1).to(n.dtype)  # orders behind the mean order
    n = n.clamp(min=1)  # a customer with returns only: one purchase worth nothing
    t_x = torch.minimum(t_x.clamp(min=0), age)
    rate_day = (r + x) / (alpha + age)
    log_odds_gone = (
        torch.log(a)
        - torch.log((b + x - 1).clamp(min=_EPS))
        + (r + x) * (torch.log(alpha + age) - torch.log(alpha + t_x))
    )
    logit_alive = torch.where(x > 0, -log_odds_gone, torch.full_like(x, MAX_LOGIT))
    # Gamma-Gamma's credibility: the mean order weighed by the orders behind it, a first order
    # counting for `first` (models.classic.fit says why).
    order_value = p * (gamma + weight * m.clamp(min=0)) / (p * weight + q - 1)
    return Base(
        logit_alive.clamp(-MAX_LOGIT, MAX_LOGIT),
        rate_day * DAYS_PER_MONTH,
        rate_day * DAYS_PER_MONTH * a / (a + b + x),
        order_value,
        weight / (weight + 1),
        1 / (x + 1),
    )


def context(base: Base) -> torch.Tensor:
    """The classic quantities as network inputs, on a scale near unit."""
    return torch.stack([base.logit_alive / 4, torch.log(base.rate) + 2, (torch.log(base.order_value) - 3) / 2], dim=-1)


def _log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(z)) from exp and log: onnxruntime's Sigmoid is accurate in absolute terms
    only, so far in the tail its relative error reaches 1e-3 (seen at z = -12)."""
    return -(torch.relu(-z) + torch.log(1 + torch.exp(-z.abs())))


def _bounded(
    d: torch.Tensor, raise_by: torch.Tensor | None = None, lower_by: torch.Tensor | None = None
) -> torch.Tensor:
    """A correction within e^MAX_CORRECTION either way; a rise may use only `raise_by` of the bound
    and a fall `lower_by`, where the customer's own orders say how far the network may go."""
    bounded = MAX_CORRECTION * torch.tanh(d / MAX_CORRECTION)
    if raise_by is not None:
        bounded = torch.where(bounded > 0, bounded * raise_by, bounded)
    if lower_by is not None:
        bounded = torch.where(bounded < 0, bounded * lower_by, bounded)
    return bounded


class Horizon(NamedTuple):
    """A customer's spend over the horizon: none with 1 - p, else lognormal (mean E / p)."""

    p: torch.Tensor
    log_expected: torch.Tensor
    sigma: torch.Tensor


def over_horizon(
    out: torch.Tensor, base: Base, horizon: torch.Tensor, max_horizon: int, monthly_discount: torch.Tensor | float = 1.0
) -> Horizon:
    """Raw network output (..., 5), the classic base and each example's horizon (months, at most
    `max_horizon`) -> p_purchase, log expected (discounted) spend, sigma."""
    d_alive, d_rate, d_hazard, d_spend, raw_sigma = out.unbind(-1)
    logit_alive = base.logit_alive + _bounded(d_alive)
    rate = base.rate * torch.exp(_bounded(d_rate, lower_by=base.doubt))  # lowered only as repeats leave room
    s = torch.exp(-base.hazard * torch.exp(_bounded(d_hazard)))
    # P(a purchase in a month while alive), Poisson purchases: 1 - exp(-rate), by its series
    # where that difference would lose float32 precision (ONNX has no expm1).
    buy = torch.where(rate < 1e-2, rate * (1 - rate / 2 + rate * rate / 6), 1 - torch.exp(-rate))
    h = horizon.to(out.dtype)
    # Month by month (H is small): alive in month k with s^k; the first purchase falls in month
    # k after k - 1 alive months without one: (s * (1 - buy))^(k - 1) * s * buy. Summed directly,
    # not as 1 - P(none), which would cancel for customers unlikely to buy.
    s_disc = s * monthly_discount
    alive_k = torch.ones_like(s)
    quiet_k = torch.ones_like(s)
    months = torch.zeros_like(s)
    p_buy = torch.zeros_like(s)
    for k in range(1, max_horizon + 1):
        on = (h >= k).to(out.dtype)
        p_buy = p_buy + on * quiet_k * s * buy
        quiet_k = quiet_k * s * (1 - buy)
        alive_k = alive_k * s_disc
        months = months + on * alive_k
    log_alive = _log_sigmoid(logit_alive)
    p = (torch.exp(log_alive) * p_buy).clamp(_EPS, 1 - _EPS)
    spend = _bounded(d_spend, raise_by=base.evidence)  # raised only as orders back it
    log_expected = log_alive + torch.log(rate) + torch.log(base.order_value) + spend + torch.log(months.clamp(min=_EPS))
    sigma = 0.05 + 2.95 * torch.sigmoid(raw_sigma)
    return Horizon(p, log_expected, sigma)


def loss(d: Horizon, y: torch.Tensor) -> torch.Tensor:
    """Bernoulli for any purchase, lognormal for the spend of buyers (mean E[spend] / p)."""
    log_p = torch.log(d.p)
    positive = (y > 0).float()
    bce = -(positive * log_p + (1 - positive) * torch.log1p(-d.p)).mean()
    mu = d.log_expected - log_p - 0.5 * d.sigma**2
    log_y = torch.log(torch.where(y > 0, y, torch.ones_like(y)))
    nll = log_y + torch.log(d.sigma) + 0.5 * math.log(2 * math.pi) + 0.5 * ((log_y - mu) / d.sigma) ** 2
    return bce + (positive * nll).mean()


def monthly_discount(annual_rate: float) -> float:
    """The weight of one month later at an annual discount rate."""
    return (1.0 + annual_rate) ** (-1.0 / 12.0)
