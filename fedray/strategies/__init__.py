"""Aggregation strategies and server optimizers, built from ``strategy.*`` config."""

from fedray.config import StrategyConfig
from fedray.strategies.base import Strategy, weighted_mean
from fedray.strategies.fedavg import FedAvg, FedProx
from fedray.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedray.strategies.robust import Krum, Median, TrimmedMean


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The strategy named by ``cfg.name`` with its keyword arguments from config."""
    fedopt = {"server_lr": cfg.server_lr, "beta1": cfg.beta1, "beta2": cfg.beta2, "tau": cfg.tau}
    builders = {
        "fedavg": lambda: FedAvg(server_lr=cfg.server_lr),
        "fedprox": lambda: FedProx(proximal_mu=cfg.proximal_mu or 0.01, server_lr=cfg.server_lr),
        "fedavgm": lambda: FedAvgM(server_lr=cfg.server_lr, server_momentum=cfg.server_momentum),
        "fedadam": lambda: FedAdam(**fedopt),
        "fedyogi": lambda: FedYogi(**fedopt),
        "fedadagrad": lambda: FedAdagrad(**fedopt),
        "median": lambda: Median(server_lr=cfg.server_lr),
        "trimmed_mean": lambda: TrimmedMean(
            trim_fraction=cfg.trim_fraction, server_lr=cfg.server_lr
        ),
        "krum": lambda: Krum(
            byzantine=cfg.krum_byzantine, select=cfg.krum_select, server_lr=cfg.server_lr
        ),
    }
    return builders[cfg.name]()


__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "Strategy",
    "TrimmedMean",
    "build_strategy",
    "weighted_mean",
]
