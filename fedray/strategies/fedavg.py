"""FedAvg and FedProx.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017). FedProx: Li et al., "Federated Optimization in
Heterogeneous Networks" (MLSys 2020): clients add (mu/2)||w - w_global||^2 to their loss;
the server averages as FedAvg does.
"""

from __future__ import annotations

from fedray.strategies.base import Strategy


class FedAvg(Strategy):
    """Example-weighted mean of client deltas, applied with ``server_lr`` (1.0: plain FedAvg)."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)


class FedProx(Strategy):
    """FedAvg on the server; clients minimise loss + (mu/2)||w - w_global||^2."""

    name = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01, server_lr: float = 1.0):
        if proximal_mu <= 0:
            raise ValueError(f"proximal_mu={proximal_mu} must be > 0 for FedProx")
        super().__init__(server_lr=server_lr, proximal_mu=proximal_mu)
