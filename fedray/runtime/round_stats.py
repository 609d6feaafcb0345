"""The round statistics a client sends, and the metrics the server makes of their sums.

One definition for both modes: with ``crypto=paillier`` these numbers travel inside the
encrypted update (:class:`~fedray.crypto.codec.StatsCodec`) and the server opens only
their sum over the round's clients; with ``crypto=none`` each result carries them and the
server adds them up. Either way the server gets the same sums.

Only weights and weight-weighted means travel, never an example count. FedAvg's weight is
w_k = n_k / weight_ref, so a summed example count beside the summed weight would hand the
server weight_ref (Σ n_k / Σ w_k) in a single round, and a summed validation count nearly
so. ``train_loss`` is Σ w_k loss_k / Σ w_k: the example-weighted mean of the clients' mean
losses, since w_k is proportional to n_k; the mean is over ``train_weight`` (w_k when
the task's ``train`` returns a "loss" at all, else 0), so a task that reports none gives
NaN, not 0. Whether it returns one is a property of the task's code, not of a site's data:
a reported loss that is not finite still counts (as 0), so a crafted model that makes
one site's loss overflow shows only as a lower mean, not in the weights. The validation
figures are weighted by ``val_weight`` (w_k for a client with a validation split, else
0). Both are weights, not counts.

Under differential privacy (``privacy=dp``, either mode) the accountant counts what the
released model reveals, nothing else: a loss or an accuracy computed from a site's data is
one more release that ε does not cover, and a sum over cohorts the server picks can be
differenced like any sum. So hosts send their weight only (uniform, 1.0, at client level:
the server knows who answered). At sample level they also send ``values_clipped``: it is
computed from the DP-SGD-trained update and the weight (the server learns the counts in
that mode anyway), so the per-example accountant covers it as post-processing.

A client whose training fails (an exception in the task, a diverged update) is, with
encryption on, sealed as a zero update with the weight it would have had, counting 1 in
``clients_failed`` (:func:`failed_statistics`): the server learns how many of a sum's
clients failed, and only once the sum is opened, never which; the reason stays in the
host's own log. Under DP that count is not released, the summed weight is that of a
round where the client trained, and the zero update carries the client's noise share, so
nothing of the failure is released (at sample level, only through ``values_clipped``,
which a failed client sends as 0). Its other weights are those of a client that trained:
its validation figures from before training, and a training loss reported as 0 (as a
non-finite one is), so no summed weight says which clients failed.
"""

from __future__ import annotations

import math
from typing import Any

from fedray.crypto.codec import STATS_FIELDS

NAN = float("nan")


def metrics_released(cfg: Any) -> bool:
    """Whether hosts send losses and validation figures: not under any DP, as ε would
    not cover them (see the module docstring)."""
    return cfg.privacy.name != "dp"


def released_fields(cfg: Any) -> tuple[str, ...]:
    """The statistics hosts fill in for this job; the others travel as 0."""
    if metrics_released(cfg):
        return STATS_FIELDS
    if cfg.privacy.mode == "sample":
        return ("weight", "values_clipped")
    return ("weight",)


def client_statistics(
    cfg: Any,
    weight: float,
    train_loss: float | None,
    val: tuple[float, float] | None = None,
    values_clipped: int = 0,
) -> dict[str, float]:
    """One client's statistics for this round. ``val``: (mean loss, accuracy) on its
    validation split, or None without one; ``train_loss`` None when the task reports no
    loss. A non-finite or negative value travels as 0, as the encrypted codec stores it, so
    both modes give the same sums."""
    stats = dict.fromkeys(STATS_FIELDS, 0.0)
    if train_loss is not None:
        stats.update(train_weight=weight, weighted_train_loss=weight * train_loss)
    stats["weight"] = weight
    stats["values_clipped"] = float(values_clipped)
    if val is not None:
        stats.update(
            val_weight=weight,
            weighted_val_loss=weight * val[0],
            weighted_val_accuracy=weight * val[1],
        )
    kept = released_fields(cfg)
    return {k: _storable(v) if k in kept else 0.0 for k, v in stats.items()}


def failed_statistics(cfg: Any) -> dict[str, float]:
    """What marks a client whose training failed: ``clients_failed`` = 1 (the host fills in
    its weights as for a client that trained), inside the encrypted sum like every other
    client's figures. Under DP the count is not released (nothing here): how many
    clients' data made training fail is one more release that ε does not cover."""
    return {"clients_failed": 1.0} if "clients_failed" in released_fields(cfg) else {}


def _storable(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) and value > 0 else 0.0


def sum_statistics(stats: list[dict[str, float]]) -> dict[str, float]:
    """The sums of plaintext clients' statistics (what an encrypted round decrypts)."""
    return {k: float(sum(s.get(k, 0.0) for s in stats)) for k in STATS_FIELDS}


def round_metrics(cfg: Any, sums: dict[str, float]) -> dict[str, float]:
    """train_loss, fed_val_loss and fed_val_accuracy from a round's summed statistics:
    weight-weighted means, NaN when nothing was sent for them (no validation split, or
    DP: see :func:`metrics_released`)."""
    train_weight, val_weight = sums.get("train_weight", 0.0), sums.get("val_weight", 0.0)
    shown = metrics_released(cfg)
    train = shown and train_weight > 0
    val = shown and val_weight > 0
    return {
        "train_loss": sums["weighted_train_loss"] / train_weight if train else NAN,
        "fed_val_loss": sums["weighted_val_loss"] / val_weight if val else NAN,
        "fed_val_accuracy": sums["weighted_val_accuracy"] / val_weight if val else NAN,
    }
