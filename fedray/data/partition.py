"""Split a labelled data set among clients: iid, dirichlet(alpha) over labels, or label shards.

Dirichlet label skew follows Hsu et al., "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification" (2019); shards follow McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data" (AISTATS 2017).
"""

from __future__ import annotations

import numpy as np

from fedray.errors import ConfigError


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str = "iid",
    seed: int = 0,
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Return one index array per client; together they cover every row exactly once.

    Deterministic for a given seed, so every actor computes the same split on its own.
    """
    n = len(labels)
    if num_clients * min_size > n:
        raise ConfigError(
            f"num_clients={num_clients} is too many for a data set of {n} training rows "
            f"(each client needs at least {min_size}); use at most {n // min_size}"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "dirichlet":
        return _dirichlet(labels, num_clients, rng, dirichlet_alpha, min_size)
    if scheme == "shards":
        return _shards(labels, num_clients, rng, shards_per_client)
    raise ConfigError(f"dataset.partition={scheme!r}; choose one of: iid, dirichlet, shards")


def _dirichlet(labels, num_clients, rng, alpha, min_size):
    classes = np.unique(labels)
    # Resample until every client has min_size rows (standard practice; bounded tries).
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"dataset.dirichlet_alpha={alpha} leaves some of {num_clients} clients with fewer than "
        f"{min_size} rows; raise dataset.dirichlet_alpha or lower num_clients"
    )


def _shards(labels, num_clients, rng, shards_per_client):
    order = np.argsort(labels, kind="stable")
    num_shards = num_clients * shards_per_client
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards)
    return [
        np.sort(np.concatenate([shards[s] for s in assignment[k::num_clients]]))
        for k in range(num_clients)
    ]


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    """Counts per class, for the log line each client prints at start."""
    return np.bincount(labels.astype(np.int64), minlength=num_classes).tolist()
