"""Zero-inflated lognormal head and loss (Wang, Liu & Miao 2019).

Most customers spend nothing in the horizon and a few spend a lot: one logit says whether a
customer buys at all, a lognormal says how much if they do. The mean of that mixture is the CLV.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

MAX_LOG = 20.0  # exp(20) dollars: far above any customer, keeps exp finite


def split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw head output (..., 3) -> logit, mu, sigma."""
    logit, mu, raw_sigma = out.unbind(-1)
    # A bounded spread: sigma > 3 would let exp(mu + sigma^2 / 2) explode for unusual customers.
    sigma = 0.05 + 2.95 * torch.sigmoid(raw_sigma)
    return logit, mu, sigma


def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logit, mu, sigma = split(out)
    positive = (y > 0).float()
    bce = F.binary_cross_entropy_with_logits(logit, positive, reduction="mean")
    safe_y = torch.where(y > 0, y, torch.ones_like(y))
    log_y = torch.log(safe_y)
    nll = log_y + torch.log(sigma) + 0.5 * math.log(2 * math.pi) + 0.5 * ((log_y - mu) / sigma) ** 2
    return bce + (positive * nll).mean()


def predict(out: torch.Tensor, max_log: torch.Tensor | float = MAX_LOG) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected spend and probability of any purchase; the conditional mean is capped at
    exp(max_log), so an unusual customer cannot get a prediction far beyond any seen in training."""
    logit, mu, sigma = split(out)
    p = torch.sigmoid(logit)
    expected = p * torch.exp(torch.clamp(mu + 0.5 * sigma**2, max=max_log))
    return expected, p
