"""The sequence model (GRU over monthly steps) and the non-sequential comparison (FFNN)."""

from __future__ import annotations

import torch
from torch import nn

from models import ziln


class GRUModel(nn.Module):
    """GRU over the monthly window; its last state and the static features feed a ZILN head.

    `forward` returns (expected spend, p_purchase) over the served horizon:
    the exported graph serves exactly what the worker needs. Training passes each example's own
    horizon. The initial hidden state is an input so its batch axis is dynamic in ONNX too.
    """

    def __init__(self, n_seq: int, n_static: int, horizon: int, hidden: int = 48, layers: int = 2,
                 dropout: float = 0.1, max_log: float = ziln.MAX_LOG) -> None:
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.register_buffer("max_log", torch.tensor(max_log))
        self.register_buffer("horizon", torch.tensor(float(horizon)))
        self.gru = nn.GRU(n_seq, hidden, num_layers=layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Sequential(
            nn.Linear(hidden + n_static, 64), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(64, ziln.RAW_OUTPUTS),
        )

    def raw(self, seq: torch.Tensor, static: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(seq, h0)
        return self.head(torch.cat([h[-1], static], dim=-1))

    def forward(self, seq: torch.Tensor, static: torch.Tensor, h0: torch.Tensor,
                horizon: torch.Tensor | None = None):
        h = self.horizon if horizon is None else horizon
        return ziln.predict(self.raw(seq, static, h0), h, self.max_log)

    def h0(self, batch: int) -> torch.Tensor:
        return torch.zeros(self.layers, batch, self.hidden)


class GRUEnsemble(nn.Module):
    """The mean of several GRUs trained from different seeds: one ONNX graph, steadier scores.
    Expectations and probabilities average as a mixture."""

    def __init__(self, members: list[GRUModel]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.hidden, self.layers = members[0].hidden, members[0].layers

    def forward(self, seq: torch.Tensor, static: torch.Tensor, h0: torch.Tensor,
                horizon: torch.Tensor | None = None):
        outs = [m(seq, static, h0, horizon) for m in self.members]
        return tuple(torch.stack(parts).mean(0) for parts in zip(*outs))

    def h0(self, batch: int) -> torch.Tensor:
        return self.members[0].h0(batch)


class FFNNModel(nn.Module):
    """A feed-forward network on aggregated RFM-style features, with the same ZILN head."""

    def __init__(self, n_features: int, hidden: int = 64, dropout: float = 0.1,
                 max_log: float = ziln.MAX_LOG) -> None:
        super().__init__()
        self.register_buffer("max_log", torch.tensor(max_log))
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, ziln.RAW_OUTPUTS),
        )

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor, horizon: torch.Tensor):
        return ziln.predict(self.raw(x), horizon, self.max_log)
