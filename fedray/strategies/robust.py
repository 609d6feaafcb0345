"""Byzantine-robust aggregators. They need every update in the clear: plaintext only.

Coordinate-wise median and trimmed mean: Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates" (ICML 2018). Krum and Multi-Krum: Blanchard
et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"
(NeurIPS 2017). Weights are ignored (each update counts once), as in the papers.
"""

from __future__ import annotations

import math

import numpy as np

from fedray.strategies.base import Strategy


def coordinate_median(deltas: list[np.ndarray]) -> np.ndarray:
    return np.median(np.stack(deltas), axis=0)


def trimmed_mean(deltas: list[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Drop the floor(beta*K) largest and smallest values per coordinate, average the rest."""
    stacked = np.sort(np.stack(deltas), axis=0)
    k = math.floor(trim_fraction * len(deltas))
    if 2 * k >= len(deltas):
        raise ValueError(f"trim_fraction={trim_fraction} trims all {len(deltas)} updates")
    return stacked[k : len(deltas) - k].mean(axis=0)


def krum_select(deltas: list[np.ndarray], byzantine: int, select: int = 1) -> list[int]:
    """Indices of the ``select`` updates with the lowest Krum score.

    Score of update i: sum of squared distances to its K - f - 2 nearest other updates.
    """
    k = len(deltas)
    neighbours = k - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs more than f + 2 = {byzantine + 2} updates, got {k}")
    x = np.stack(deltas).astype(np.float64)
    sq = (x * x).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    scores = np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)
    return np.argsort(scores, kind="stable")[:select].tolist()


class Median(Strategy):
    name = "median"
    needs_individual_updates = True

    def aggregate(self, deltas, weights):
        return coordinate_median(deltas)


class TrimmedMean(Strategy):
    name = "trimmed_mean"
    needs_individual_updates = True

    def __init__(self, *, trim_fraction: float = 0.1, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction={trim_fraction} must be in [0, 0.5)")
        self.trim_fraction = trim_fraction

    def aggregate(self, deltas, weights):
        return trimmed_mean(deltas, self.trim_fraction)


class Krum(Strategy):
    """Krum (select=1) or Multi-Krum (mean of the ``select`` best)."""

    name = "krum"
    needs_individual_updates = True

    def __init__(self, *, byzantine: int = 1, select: int = 1, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if byzantine < 0 or select < 1:
            raise ValueError("krum needs byzantine >= 0 and select >= 1")
        self.byzantine, self.select = byzantine, select

    def aggregate(self, deltas, weights):
        chosen = krum_select(deltas, self.byzantine, min(self.select, len(deltas)))
        return np.mean([deltas[i] for i in chosen], axis=0)
