"""FedProx Synthetic(alpha, beta): Li et al., "Federated Optimization in Heterogeneous
Networks" (MLSys 2020), after Shamir et al. (2014).

Client k draws u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2) (alpha, beta are std devs, as in
the reference code); its model W_k, b_k ~ N(u_k, 1); its
feature mean v_k ~ N(B_k, 1); x ~ N(v_k, Sigma) with Sigma_jj = j^-1.2; y = argmax(W_k x + b_k).
alpha controls how much local models differ, beta how much local features differ.
Each client's data depends only on (seed, client_id), so any actor can make it alone.
"""

from __future__ import annotations

import numpy as np


def _client_rng(seed: int, client_id: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, client_id, stream])


def synthetic_client(
    client_id: int,
    *,
    alpha: float,
    beta: float,
    num_samples: int,
    num_features: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    stream: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples of one client's distribution. ``stream`` picks independent draws (1 = test)."""
    params = _client_rng(seed, client_id, 0)
    u = params.normal(0.0, alpha)
    b_mean = params.normal(0.0, beta)
    w = params.normal(u, 1.0, size=(num_features, num_classes))
    b = params.normal(u, 1.0, size=num_classes)
    v = params.normal(b_mean, 1.0, size=num_features)
    std = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    draws = _client_rng(seed, client_id, 1 + stream)
    x = v + draws.standard_normal((num_samples, num_features)) * std
    y = np.argmax(x @ w + b, axis=1)
    return x.astype(np.float32), y.astype(np.int64)
