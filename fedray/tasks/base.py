"""The task API: the code a user writes for a federated job, and nothing else.

A task is one small class with four methods (Flower's ``ClientApp``, a Lightning
module): load a site's data, build the model, train it for a round, evaluate it. The
framework owns the rest: placing sites on actors, rounds and cohorts, the global
weights, encryption, differential privacy, checkpoints. Name a task in the config::

    python -m fedray.launch task._target_=mypkg.tasks.MyTask +task.kwargs.width=64

Only the parameters with ``requires_grad`` (or those ``model.trainable`` names) are
exchanged between sites and the server, so a task that freezes a body and trains
adapters and a head sends only those.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from fedray.errors import ConfigError


def client_seed(seed: int, round_num: int, client_id: int) -> int:
    """One RNG stream per (run, round, client): replayable whichever actor hosts the client."""
    return int(np.random.SeedSequence([seed, round_num, client_id]).generate_state(1)[0])


class Task:
    """Subclass this. The framework sets ``self.cfg`` (the job's
    :class:`~fedray.config.FedrayConfig`: ``seed``, ``batch_size``, ``momentum``, ...) and
    ``self.device`` (the torch device this process trains on) before calling any method.

    Methods run in different processes: ``load_data`` and ``train`` in the actor hosting
    the site, ``load_test_data`` and ``evaluate`` on the server too. ``build_model`` runs
    everywhere under the same torch seed, so every party starts from the same weights.
    """

    def __init__(self, cfg: Any = None, **kwargs: Any):
        import torch

        self.cfg = cfg
        self.device = torch.device("cpu")
        self.kwargs = kwargs

    def load_data(self, client_id: int, num_clients: int) -> tuple[Any, Any]:
        """Site ``client_id``'s ``(train, validation)`` data, loaded inside its actor.

        ``len(train)`` is the site's example count (it weights the site's update);
        ``validation`` may be None (then the site reports no federated evaluation).
        """
        raise NotImplementedError

    def load_test_data(self) -> Any:
        """The server's central test data, or None for a job without one."""
        return None

    def build_model(self) -> Any:
        """A fresh ``torch.nn.Module``; called under ``torch.manual_seed(cfg.seed)``."""
        raise NotImplementedError

    def train(self, model: Any, data: Any, *, epochs: int, lr: float, seed: int) -> dict:
        """Train ``model`` in place on ``data`` for ``epochs`` passes; return ``{"loss": ...}``.

        ``seed`` is this client's RNG seed for this round. The framework may also pass
        ``round_num`` and ``client_id``, and, when the job uses them, ``proximal_mu``
        (FedProx: add ``mu/2 * ||w - w_global||^2``) and ``privacy`` (sample-level DP);
        it passes only the keywords the method accepts, and refuses to run a job that
        needs one the method does not accept.
        """
        raise NotImplementedError

    def evaluate(self, model: Any, data: Any) -> dict:
        """``{"loss": float, "accuracy": float}`` of ``model`` on ``data``."""
        raise NotImplementedError

    def describe(self, train: Any, validation: Any) -> dict:
        """Metadata about a site's data for the start-up log (never the data itself)."""
        return {}


class ProximalTerm:
    """FedProx's ``mu/2 * ||w - w_global||^2`` (Li et al. 2020) over ``params``, anchored
    at their values when it is made: build it before local training, when the model holds
    the global weights. With ``mu = 0`` it returns the loss unchanged."""

    def __init__(self, params: Any, mu: float):
        self.mu = float(mu)
        self._params = list(params)
        self._anchor = [p.detach().clone() for p in self._params] if self.mu > 0 else None

    def __call__(self, loss: Any) -> Any:
        if self._anchor is None:
            return loss
        pairs = zip(self._params, self._anchor, strict=True)
        return loss + 0.5 * self.mu * sum(((p - a) ** 2).sum() for p, a in pairs)


def epoch_batches(n: int, batch_size: int, epochs: int, generator: Any, device: Any):
    """The index tensors of a site's local steps: each epoch a fresh permutation of its
    ``n`` examples (from ``generator``: replayable per client and round), in batches."""
    import torch

    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


# Keywords a job cannot run without, once they are in use: (option, what needs it).
REQUIRED_WHEN_SET = {
    "proximal_mu": "strategy=fedprox (strategy.proximal_mu > 0)",
    "privacy": "privacy.mode=sample",
}


def train_keywords(task: Task, offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``offered`` keywords that ``task.train`` accepts.

    Raises ConfigError when the job uses an option (FedProx, sample-level DP) that the
    task's ``train`` does not take: silently dropping it would run a different algorithm.
    """
    params = inspect.signature(task.train).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    accepted = {k: v for k, v in offered.items() if k in params}
    for key, needs in REQUIRED_WHEN_SET.items():
        if offered.get(key) and key not in accepted:
            raise ConfigError(
                f"{needs} needs {type(task).__name__}.train() to accept the keyword {key!r}"
            )
    return accepted


def build_task(cfg: Any, info: Any = None) -> Task:
    """The job's task: ``task._target_`` if set, else the built-in one for ``model``."""
    if cfg.task._target_:
        from hydra.utils import get_class

        try:
            cls = get_class(cfg.task._target_)
        except Exception as exc:
            raise ConfigError(
                f"task._target_={cfg.task._target_!r} could not be imported: "
                + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(
                f"task._target_={cfg.task._target_!r} must name a subclass of fedray.tasks.Task"
            )
        return cls(cfg, **dict(cfg.task.kwargs))
    if cfg.model.name == "hf":
        from fedray.tasks.text import TextClassificationTask

        return TextClassificationTask(cfg)
    from fedray.tasks.tabular import TabularClassificationTask

    return TabularClassificationTask(cfg, info)


def build_task_model(task: Task, seed: int) -> Any:
    """``task.build_model()`` under the job seed (same initial weights on every party)."""
    import torch

    torch.manual_seed(seed)
    model = task.build_model()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{type(task).__name__}.build_model() must return a torch nn.Module")
    return model.to(task.device)
