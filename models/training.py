"""Seeded training with time-based early stopping; CPU, a few minutes for CDNOW."""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from models import ziln
from models.networks import Head

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Head)  # the network being fitted


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 4
    seed: int = 42
    ensemble: int = 3  # GRUs averaged in one graph; member k: seed + 1000 k, holds out fold k


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def fit(
    model: M,
    forward_raw: Callable[[M, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ziln.Base]],
    train: tuple[np.ndarray, ...],
    y_train: np.ndarray,
    h_train: np.ndarray,
    valid: tuple[np.ndarray, ...],
    y_valid: np.ndarray,
    h_valid: np.ndarray,
    cfg: TrainConfig,
    name: str = "model",
) -> tuple[M, dict[str, float]]:
    """Minimise the ZILN loss (each example over its own horizon `h_*`, undiscounted); keep the
    weights of the best validation epoch."""
    seed_everything(cfg.seed)
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in train]
    y = torch.from_numpy(y_train.astype(np.float32))
    h = torch.from_numpy(h_train.astype(np.float32))
    v_h = torch.from_numpy(h_valid.astype(np.float32))
    v_tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in valid]
    v_y = torch.from_numpy(y_valid.astype(np.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, best_epoch, stale = float("inf"), None, 0, 0
    n = len(y)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad()
            out, base = forward_raw(model, tuple(t[idx] for t in tensors))
            loss = ziln.loss(model.distribution(out, base, h[idx], discount=False), y[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            out, base = forward_raw(model, tuple(v_tensors))
            v_loss = ziln.loss(model.distribution(out, base, v_h, discount=False), v_y).item()
        log.info("%s epoch %d train %.4f valid %.4f", name, epoch + 1, total / n, v_loss)
        if v_loss < best - 1e-4:
            best, best_state, best_epoch, stale = v_loss, copy.deepcopy(model.state_dict()), epoch + 1, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"best_epoch": best_epoch, "valid_loss": best}
