"""Zero-inflated lognormal head and loss (Wang, Liu & Miao 2019), spread over the horizon by a
retention process.

Most customers spend nothing in the horizon and a few spend a lot: a probability says whether a
customer buys at all, a lognormal says how much if they do; the mean of that mixture is the CLV.

The horizon is not a free input of the network. The network gives, per customer, a monthly
survival s, a monthly purchase probability while alive l, and the lognormal of a buying month's
spend (mu, sigma); the horizon H enters through closed forms, in the spirit of BG/NBD:
  expected buying months  l * (s + s^2 + ... + s^H)
  P(no purchase in H)     sum over the months survived j of P(j) * (1 - l)^j
Training examples from recent origins have short horizons and old customers, early origins the
reverse; with the horizon in closed form, what the network learns about ageing from short labels
carries over to the full horizon the model serves, instead of being extrapolated by an MLP.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

MAX_LOG = 20.0  # exp(20) dollars: far above any customer, keeps exp finite
RAW_OUTPUTS = 4  # survival logit, purchase logit, mu, raw sigma
POINT_WEIGHT = 0.01  # share of the expectation in the point forecast (see `forecast`)
_EPS = 1e-6


def _parts(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s_logit, l_logit, mu, raw_sigma = out.unbind(-1)
    s = torch.sigmoid(s_logit + 2.0).clamp(max=1 - 1e-4)  # starts near 0.88 a month
    lam = torch.sigmoid(l_logit - 2.0).clamp(min=_EPS)  # starts near 0.12 a month
    # A bounded spread: sigma > 3 would let exp(mu + sigma^2 / 2) explode for unusual customers.
    sigma = 0.05 + 2.95 * torch.sigmoid(raw_sigma)
    return s, lam, mu, sigma


def over_horizon(out: torch.Tensor, horizon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw head output (..., 4) and horizon months -> (p_purchase, log expected spend, sigma)."""
    s, lam, mu, sigma = _parts(out)
    h = horizon.to(out.dtype)
    survived = s * (1 - s.pow(h)) / (1 - s)  # s + s^2 + ... + s^H
    r = s * (1 - lam)
    p_none = (1 - s) * (1 - r.pow(h)) / (1 - r) + r.pow(h)
    p = (1 - p_none).clamp(_EPS, 1 - _EPS)
    log_mean = torch.log(lam) + torch.log(survived) + mu + 0.5 * sigma**2
    return p, log_mean, sigma


def loss(out: torch.Tensor, y: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
    p, log_mean, sigma = over_horizon(out, horizon)
    log_p = torch.log(p)
    positive = (y > 0).float()
    bce = -(positive * log_p + (1 - positive) * torch.log1p(-p)).mean()
    # The spend of buyers: lognormal with the conditional mean E[spend] / p.
    mu = log_mean - log_p - 0.5 * sigma**2
    safe_y = torch.where(y > 0, y, torch.ones_like(y))
    log_y = torch.log(safe_y)
    nll = log_y + torch.log(sigma) + 0.5 * math.log(2 * math.pi) + 0.5 * ((log_y - mu) / sigma) ** 2
    return bce + (positive * nll).mean()


class _Spend(NamedTuple):
    """Each customer's horizon spend: no purchase with 1 - p, else lognormal with this mean."""

    p: torch.Tensor
    log_buyer_mean: torch.Tensor  # log E[spend | any purchase], capped at max_log
    sigma: torch.Tensor


def _spend(out: torch.Tensor, horizon: torch.Tensor, max_log: torch.Tensor | float) -> _Spend:
    """The conditional mean is capped at exp(max_log), so an unusual customer cannot get a
    prediction far beyond any seen in training."""
    p, log_mean, sigma = over_horizon(out, horizon)
    return _Spend(p, torch.clamp(log_mean - torch.log(p), max=max_log), sigma)


def _expected(d: _Spend) -> torch.Tensor:
    return d.p * torch.exp(d.log_buyer_mean)


def predict(out: torch.Tensor, horizon: torch.Tensor,
            max_log: torch.Tensor | float = MAX_LOG) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected spend and probability of any purchase."""
    d = _spend(out, horizon, max_log)
    return _expected(d), d.p


# Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9),
# in plain tensor operations so the point forecast exports to ONNX with the rest of the head.
_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
      -3.066479806614716e01, 2.506628277459239e00)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
      -1.328068155288572e01, 1.0)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
      4.374664141464968e00, 2.938163982698783e00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00, 1.0)
_TAIL = 0.02425


def _poly(coef: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    acc = torch.full_like(x, coef[0])
    for c in coef[1:]:
        acc = acc * x + c
    return acc


def ndtri(u: torch.Tensor) -> torch.Tensor:
    """Inverse of the standard normal CDF, for u in (0, 1)."""
    central = u - 0.5
    r = central * central
    mid = _poly(_A, r) * central / _poly(_B, r)
    t = torch.sqrt(-2 * torch.log(torch.minimum(u, 1 - u)))
    tail = _poly(_C, t) / _poly(_D, t)
    return torch.where(u < _TAIL, tail, torch.where(u > 1 - _TAIL, -tail, mid))


def _quantile(d: _Spend, q: torch.Tensor | float) -> torch.Tensor:
    u = (q - (1 - d.p)) / d.p
    z = ndtri(u.clamp(1e-6, 1 - 1e-6))
    mu = d.log_buyer_mean - 0.5 * d.sigma**2
    return torch.where(u > 0, torch.exp(mu + d.sigma * z), torch.zeros_like(d.p))


def quantile(out: torch.Tensor, horizon: torch.Tensor, q: torch.Tensor | float,
             max_log: torch.Tensor | float = MAX_LOG) -> torch.Tensor:
    """The q-quantile of the horizon spend: zero while q is within the probability of no purchase,
    else the lognormal quantile of a buyer's spend (mean capped as in `predict`) at the rest."""
    return _quantile(_spend(out, horizon, max_log), q)


def forecast(out: torch.Tensor, horizon: torch.Tensor, q: torch.Tensor | float,
             max_log: torch.Tensor | float = MAX_LOG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(point forecast, p_purchase, expected spend).

    The point forecast with the least expected absolute error, under the constraint that its
    total over the cohort equals the expected total, is the same quantile q of every customer's
    spend distribution (Lagrange: 2 F_i(c_i) - 1 is equal for all i); `fit_quantile` finds q.
    A share POINT_WEIGHT of the expectation is blended in so that customers whose quantile is
    zero still rank by their expected spend (both parts have the same total)."""
    d = _spend(out, horizon, max_log)
    expected = _expected(d)
    point = (1 - POINT_WEIGHT) * _quantile(d, q) + POINT_WEIGHT * expected
    return point, d.p, expected


def fit_quantile(outs: list[torch.Tensor], horizon: torch.Tensor,
                 max_log: torch.Tensor | float = MAX_LOG) -> float:
    """The q at which the cohort's total of q-quantiles equals its expected total, for the
    raw outputs of each member of an ensemble over the same customers (quantiles averaged)."""
    with torch.no_grad():
        spends = [_spend(o, horizon, max_log) for o in outs]
        target = sum(float(_expected(d).sum()) for d in spends)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            total = sum(float(_quantile(d, mid).sum()) for d in spends)
            lo, hi = (mid, hi) if total < target else (lo, mid)
    return (lo + hi) / 2
