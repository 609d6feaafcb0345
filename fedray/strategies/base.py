"""The strategy interface: how a round's updates become the next global model.

A strategy has two halves. *Aggregation* turns clients' updates (model deltas and their
weights) into one delta: mean strategies do this as a running weighted sum, which works
under encryption; robust ones need every update in the clear. The *server optimizer*
applies that delta (a pseudo-gradient) to the global weights.
"""

from __future__ import annotations

import numpy as np


def weighted_mean(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum_k w_k d_k / sum_k w_k: FedAvg's aggregate (McMahan et al., AISTATS 2017)."""
    if not deltas:
        raise ValueError("no updates to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w <= 0):
        raise ValueError("weights must be > 0")
    return np.tensordot(w / w.sum(), np.stack(deltas).astype(np.float64), axes=1)


class Strategy:
    """Base class: FedAvg-style mean aggregation and a plain server step.

    Subclasses override :meth:`apply` (server optimizers) or set
    ``needs_individual_updates`` and override :meth:`aggregate` (robust aggregators).
    """

    name = "base"
    #: True for strategies that must see each update in the clear (refused with crypto).
    needs_individual_updates = False

    def __init__(self, *, server_lr: float = 1.0, proximal_mu: float = 0.0):
        if server_lr <= 0:
            raise ValueError(f"server_lr={server_lr} must be > 0")
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu={proximal_mu} must be >= 0")
        self.server_lr = server_lr
        self.proximal_mu = proximal_mu

    def client_options(self) -> dict:
        """Options sent to clients with each round (e.g. FedProx's mu)."""
        return {"proximal_mu": self.proximal_mu}

    def aggregate(self, deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
        """Combine plaintext updates into one delta (mean strategies: weighted mean)."""
        return weighted_mean(deltas, weights)

    def apply(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Server step: new global weights from the aggregated delta."""
        return (weights + self.server_lr * delta).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server optimizer state, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        del state
