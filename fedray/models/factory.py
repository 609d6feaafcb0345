"""Build the model from config, and exchange its parameters as one flat float32 vector.

Only the *exchanged* parameters travel (all, or those named by ``model.trainable``, e.g. a
head on a frozen body); the rest stay as initialised from the shared seed on every party.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedray.config import ModelConfig
from fedray.data.datasets import DatasetInfo
from fedray.errors import ConfigError


class MLP(nn.Module):
    """One hidden layer with ReLU: the default model."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogReg(nn.Module):
    """Multinomial logistic regression."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (input: 64 features, reshaped)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        if num_features != 64:
            raise ConfigError("model=cnn expects 8x8 images (64 features), e.g. dataset=digits")
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.view(-1, 1, 8, 8))
        return self.head(x.flatten(1))


def build_model(cfg: ModelConfig, info: DatasetInfo, seed: int) -> nn.Module:
    """The same seed gives the same initial weights on every party."""
    torch.manual_seed(seed)
    if cfg.name == "mlp":
        return MLP(info.num_features, info.num_classes, cfg.hidden)
    if cfg.name == "logreg":
        return LogReg(info.num_features, info.num_classes)
    if cfg.name == "cnn":
        return DigitsCNN(info.num_features, info.num_classes)
    from hydra.utils import instantiate

    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("num_features", info.num_features)
    kwargs.setdefault("num_classes", info.num_classes)
    try:
        model = instantiate({"_target_": cfg._target_, **kwargs})
    except Exception as exc:
        raise ConfigError(f"model._target_={cfg._target_!r} could not be built: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={cfg._target_!r} did not return a torch nn.Module")
    return model


def count_model_parameters(model: nn.Module) -> int:
    """All parameters of a model, counting peft's frozen copy of a trained head once."""
    return sum(p.numel() for name, p in model.named_parameters() if ".original_module." not in name)


class ParamView:
    """The exchanged parameters of a model as one flat float32 numpy vector.

    ``trainable`` names them by prefix (and freezes the rest); without it, they are the
    parameters that require gradients.
    """

    def __init__(self, model: nn.Module, trainable: list[str] | None = None):
        named = list(model.named_parameters())
        if trainable:
            chosen = [(n, p) for n, p in named if any(n.startswith(t) for t in trainable)]
            if not chosen:
                raise ConfigError(
                    f"model.trainable={trainable} matches no parameter; names are: "
                    + ", ".join(n for n, _ in named)
                )
            chosen_ids = {id(p) for _, p in chosen}
            for _, p in named:
                p.requires_grad_(id(p) in chosen_ids)
        else:  # what the model trains: all, or e.g. LoRA adapters and a head under peft
            chosen = [(n, p) for n, p in named if p.requires_grad]
        self.names = [n for n, _ in chosen]
        self.params = [p for _, p in chosen]
        self.size = sum(p.numel() for p in self.params)

    def get(self) -> np.ndarray:
        with torch.no_grad():
            return torch.nn.utils.parameters_to_vector(self.params).detach().cpu().numpy().copy()

    def set(self, flat: np.ndarray) -> None:
        if flat.shape != (self.size,):
            raise ValueError(f"expected a vector of {self.size} parameters, got {flat.shape}")
        # Copy into the parameters' own storage: ``flat`` may be a read-only view of the
        # object store, and optimizers hold references to these tensors.
        src = torch.from_numpy(np.array(flat, dtype=np.float32, copy=True))
        offset = 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                p.copy_(src[offset : offset + k].view_as(p))
                offset += k
