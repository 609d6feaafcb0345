"""Adaptive server optimizers on the mean client delta (the pseudo-gradient).

FedAdagrad, FedAdam, FedYogi: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
Algorithm 2 (no bias correction; tau is the adaptivity). FedAvgM: Hsu et al., "Measuring
the Effects of Non-Identical Data Distribution for Federated Visual Classification" (2019).
All need only the mean, so they run on the decrypted aggregate under encryption.
"""

from __future__ import annotations

import numpy as np

from fedray.strategies.base import Strategy


class FedAvgM(Strategy):
    """Server momentum: m <- beta m + delta; x <- x + lr m."""

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.9):
        super().__init__(server_lr=server_lr)
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum={server_momentum} must be in [0, 1)")
        self.momentum = server_momentum
        self.m: np.ndarray | None = None

    def apply(self, weights, delta):
        self.m = delta if self.m is None else self.momentum * self.m + delta
        return (weights + self.server_lr * self.m).astype(np.float32)

    def state_dict(self):
        return {} if self.m is None else {"m": self.m}

    def load_state_dict(self, state):
        self.m = state.get("m")


class _FedOpt(Strategy):
    """m <- b1 m + (1 - b1) delta; v <- update(v, delta^2); x <- x + lr m / (sqrt(v) + tau)."""

    def __init__(
        self, *, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ):
        super().__init__(server_lr=server_lr)
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key}={value} must be in [0, 1)")
        if tau <= 0:
            raise ValueError(f"tau={tau} must be > 0")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, weights, delta):
        delta = np.asarray(delta, dtype=np.float64)
        if self.m is None:
            self.m = np.zeros_like(delta)
            # Reddi et al. initialise v_0 = tau^2 (Algorithm 2).
            self.v = np.full_like(delta, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self._second_moment(self.v, delta * delta)
        step = self.server_lr * self.m / (np.sqrt(self.v) + self.tau)
        return (weights + step).astype(np.float32)

    def state_dict(self):
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.m, self.v = state.get("m"), state.get("v")


class FedAdagrad(_FedOpt):
    """v <- v + delta^2."""

    name = "fedadagrad"

    def _second_moment(self, v, d2):
        return v + d2


class FedAdam(_FedOpt):
    """v <- b2 v + (1 - b2) delta^2."""

    name = "fedadam"

    def _second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(_FedOpt):
    """v <- v - (1 - b2) delta^2 sign(v - delta^2)."""

    name = "fedyogi"

    def _second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)
