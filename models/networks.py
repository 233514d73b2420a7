"""The sequence model (GRU over monthly steps) and the non-sequential comparison (FFNN), both
correcting the classic model through the head in `models.ziln`."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from models import ziln
from features.sequences import Inputs
from models.classic import ClassicParams


def _correction_layer(n_in: int) -> nn.Linear:
    """The head's last layer starts at zero: an untrained model is the classic model."""
    layer = nn.Linear(n_in, ziln.RAW_OUTPUTS)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Head(nn.Module):
    """What both networks share: the classic parameters, the served horizon and discount, and
    the closed forms from raw outputs to (expected spend, p_purchase)."""

    classic_params: torch.Tensor  # buffers (register_buffer), saved and exported with the weights
    horizon: torch.Tensor
    monthly_discount: torch.Tensor

    def __init__(self, params: ClassicParams, horizon: int) -> None:
        super().__init__()
        self.max_horizon = horizon
        self.register_buffer("classic_params", torch.tensor(params.to_list()))
        self.register_buffer("horizon", torch.tensor(float(horizon)))
        self.register_buffer("monthly_discount", torch.tensor(1.0))  # set at export

    def base(self, classic: torch.Tensor) -> ziln.Base:
        return ziln.classic_base(classic, self.classic_params)

    def distribution(
        self, out: torch.Tensor, base: ziln.Base, horizon: torch.Tensor | None, discount: bool
    ) -> ziln.Horizon:
        h = self.horizon.expand(out.shape[:-1]) if horizon is None else horizon
        return ziln.over_horizon(out, base, h, self.max_horizon, self.monthly_discount if discount else 1.0)

    def predict(self, out: torch.Tensor, base: ziln.Base, horizon: torch.Tensor | None):
        """(expected spend, discounted as set for serving, p_purchase)."""
        d = self.distribution(out, base, horizon, discount=True)
        return torch.exp(d.log_expected), d.p

    def predict_distribution(self, out: torch.Tensor, base: ziln.Base, horizon: torch.Tensor | None):
        """`predict`'s two, then the predictive distribution as one ensemble member of
        `export_onnx.runtime.OUTPUTS`: p, and a buyer's lognormal spend (mu, sigma)."""
        d = self.distribution(out, base, horizon, discount=True)
        mu = d.log_expected - torch.log(d.p) - 0.5 * d.sigma**2
        return torch.exp(d.log_expected), d.p, d.p[..., None], mu[..., None], d.sigma[..., None]


class GRUModel(Head):
    """GRU over the monthly window; its last state, the static features and the classic
    quantities feed the correction head. The initial hidden state is an input so its batch
    axis is dynamic in ONNX too."""

    def __init__(
        self,
        n_seq: int,
        n_static: int,
        params: ClassicParams,
        horizon: int,
        hidden: int = 48,
        layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(params, horizon)
        self.hidden, self.layers = hidden, layers
        self.gru = nn.GRU(n_seq, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Sequential(
            nn.Linear(hidden + n_static + ziln.CONTEXT_FEATURES, 64),
            nn.ReLU(),
            nn.Dropout(dropout),
            _correction_layer(64),
        )

    def raw(
        self, seq: torch.Tensor, static: torch.Tensor, classic: torch.Tensor, h0: torch.Tensor
    ) -> tuple[torch.Tensor, ziln.Base]:
        base = self.base(classic)
        _, h = self.gru(seq, h0)
        return self.head(torch.cat([h[-1], static, ziln.context(base)], dim=-1)), base

    def forward(
        self,
        seq: torch.Tensor,
        static: torch.Tensor,
        classic: torch.Tensor,
        h0: torch.Tensor,
        horizon: torch.Tensor | None = None,
    ):
        return self.predict_distribution(*self.raw(seq, static, classic, h0), horizon)

    def h0(self, batch: int) -> torch.Tensor:
        return torch.zeros(self.layers, batch, self.hidden)


class GRUEnsemble(nn.Module):
    """The mean of several GRUs trained from different seeds: one ONNX graph, steadier scores.
    Expectations and probabilities average as a mixture; each member's distribution is output
    beside them, so the mixture's quantiles can be served (`features.distribution`)."""

    def __init__(self, members: list[GRUModel]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.grus = members  # the same modules, typed (the ModuleList registers their weights)
        self.hidden, self.layers = members[0].hidden, members[0].layers

    def forward(
        self,
        seq: torch.Tensor,
        static: torch.Tensor,
        classic: torch.Tensor,
        h0: torch.Tensor,
        horizon: torch.Tensor | None = None,
    ):
        outs = [m(seq, static, classic, h0, horizon) for m in self.members]
        clv, p, *members = zip(*outs)
        return (torch.stack(clv).mean(0), torch.stack(p).mean(0), *(torch.cat(parts, dim=-1) for parts in members))

    def h0(self, batch: int) -> torch.Tensor:
        return self.grus[0].h0(batch)

    def set_discount(self, annual_rate: float) -> None:
        for m in self.grus:
            m.monthly_discount.fill_(ziln.monthly_discount(annual_rate))


class FFNNModel(Head):
    """A feed-forward network on aggregated RFM-style features, with the same head."""

    def __init__(
        self, n_features: int, params: ClassicParams, horizon: int, hidden: int = 64, dropout: float = 0.1
    ) -> None:
        super().__init__(params, horizon)
        self.net = nn.Sequential(
            nn.Linear(n_features + ziln.CONTEXT_FEATURES, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            _correction_layer(hidden),
        )

    def raw(self, x: torch.Tensor, classic: torch.Tensor) -> tuple[torch.Tensor, ziln.Base]:
        base = self.base(classic)
        return self.net(torch.cat([x, ziln.context(base)], dim=-1)), base

    def forward(self, x: torch.Tensor, classic: torch.Tensor, horizon: torch.Tensor | None = None):
        return self.predict(*self.raw(x, classic), horizon)


def random_twin(meta: dict[str, Any]) -> Callable[[Inputs], None]:
    """An artifact's network in torch, random weights (speed does not depend on them), on one
    thread as the worker's onnxruntime session: what `clv bench scoring` times it against. Takes
    scaled inputs, as the ONNX graph does."""
    torch.set_num_threads(1)
    members = [
        GRUModel(
            len(meta["seq_features"]),
            len(meta["static_features"]),
            ClassicParams.from_dict(meta["training"]["classic"]),
            meta["horizon_months"],
            hidden=meta["hidden"],
            layers=meta["layers"],
        )
        for _ in range(meta["train_config"]["ensemble"])
    ]
    model = GRUEnsemble(members).eval()

    def run(s: Inputs) -> None:
        with torch.no_grad():
            model(
                torch.from_numpy(s.seq), torch.from_numpy(s.static), torch.from_numpy(s.classic), model.h0(len(s.seq))
            )

    return run
