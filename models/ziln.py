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
