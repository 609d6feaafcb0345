"""The built-in task: cross-entropy classification of numeric feature vectors.

Data: the bundled scikit-learn sets, FedProx Synthetic(alpha, beta), or one CSV per site
(``dataset=...``); models: ``model=mlp|logreg|cnn|custom``. Local training is minibatch
SGD, with FedProx's proximal term (Li et al., MLSys 2020) when the strategy asks for it,
or sample-level DP-SGD through Opacus (Abadi et al., CCS 2016) with ``privacy.mode=sample``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from fedray.tasks.base import ProximalTerm, Task, client_seed, epoch_batches


@dataclass
class Examples:
    """Features and labels of one split, as tensors on the training device."""

    x: Any
    y: Any

    def __len__(self) -> int:
        return len(self.y)


class LocalSGD:
    """Minibatch SGD with momentum over one client's local run: torch's own update,
    ``torch.optim.sgd.sgd``, exactly as ``torch.optim.SGD(params, lr, momentum,
    foreach=True).step()`` calls it (tests/test_tasks.py checks the weights are equal).

    Not ``torch.optim.SGD`` itself: its ``step()`` imports ``torch._dynamo`` on first use
    (about 1.5 s of CPU per process, most of a job's first round on 2 cores;
    docs/performance.md), for graph breaks that matter only under ``torch.compile``."""

    def __init__(self, params: list, lr: float, momentum: float):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.buffers: list[Any] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch
        from torch.optim.sgd import sgd

        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        buffers = [self.buffers[i] for i in live] if self.momentum != 0 else []
        with torch.no_grad():
            sgd(
                params,
                [p.grad for p in params],
                buffers,
                weight_decay=0.0,
                momentum=self.momentum,
                lr=self.lr,
                dampening=0.0,
                nesterov=False,
                maximize=False,
                has_sparse_grad=any(p.grad.is_sparse for p in params),
                foreach=True,
            )
        for i, buffer in zip(live, buffers, strict=False):
            self.buffers[i] = buffer


class TabularClassificationTask(Task):
    """Classify feature vectors; the task every ``dataset``/``model`` pair without a
    ``task._target_`` runs."""

    def __init__(self, cfg: Any, info: Any):
        super().__init__(cfg)
        self.info = info

    def load_data(self, client_id: int, num_clients: int) -> tuple[Examples, Examples]:
        import torch

        from fedray.data.datasets import load_client_data

        cfg = self.cfg
        d = load_client_data(
            cfg.dataset, [client_id], num_clients, cfg.seed, raw=self._federation_scaled()
        )[client_id]

        def put(a):
            return torch.as_tensor(a, device=self.device)

        return Examples(put(d.x_train), put(d.y_train)), Examples(put(d.x_val), put(d.y_val))

    def load_test_data(self) -> Examples | None:
        import torch

        from fedray.data.datasets import load_test_set

        xt, yt = load_test_set(
            self.cfg.dataset, self.cfg.num_clients, self.cfg.seed, raw=self._federation_scaled()
        )
        return None if xt is None else Examples(torch.as_tensor(xt), torch.as_tensor(yt))

    def _federation_scaled(self) -> bool:
        """Whether features wait, raw, for the federation's statistics (opened before
        round 1): ``dataset.standardize=global`` or ``dataset.missing=impute_mean``."""
        from fedray.config import FedrayConfig, needs_feature_statistics

        return isinstance(self.cfg, FedrayConfig) and needs_feature_statistics(self.cfg)

    # -- federation-wide preparation (dataset.standardize=global, missing=impute_mean) --
    def feature_sums(self, data: tuple[Examples, Examples]):
        """This client's contribution to the federation's feature sums: its training
        rows' per-feature counts of non-empty cells, sums and sums of squares."""
        from fedray.data.datasets import feature_sums

        return feature_sums(data[0].x.cpu().numpy())

    def prepare(self, data: tuple[Examples, Examples], scaling) -> tuple[Examples, Examples]:
        """A client's splits prepared with the federation's ``FeatureScaling``."""
        import torch

        train, val = data
        xt = train.x.cpu().numpy()
        prepared = scaling.apply(xt), scaling.apply(val.x.cpu().numpy(), ref=xt)
        x_train, x_val = (torch.as_tensor(a, device=self.device) for a in prepared)
        return Examples(x_train, train.y), Examples(x_val, val.y)

    def prepare_test(self, test: Examples | None, scaling) -> Examples | None:
        """The server's test set prepared the same way (``site``: by its own statistics)."""
        import torch

        if test is None:
            return None
        return Examples(torch.as_tensor(scaling.apply(test.x.cpu().numpy())), test.y)

    def build_model(self):
        from fedray.models import build_model

        return build_model(self.cfg.model, self.info, self.cfg.seed)

    def describe(self, train: Examples, validation: Examples) -> dict:
        from fedray.data.partition import label_histogram

        y, yv = train.y.cpu().numpy(), validation.y.cpu().numpy()
        classes = int(max(y.max(initial=0), yv.max(initial=0))) + 1
        return {"num_features": int(train.x.shape[1]), "labels": label_histogram(y, classes)}

    def evaluate(self, model, data: Examples) -> dict:
        import torch

        model.eval()
        with torch.no_grad():
            logits = model(data.x)
            loss = float(torch.nn.functional.cross_entropy(logits, data.y))
            accuracy = float((logits.argmax(1) == data.y).float().mean())
        return {"loss": loss, "accuracy": accuracy}

    def train(
        self,
        model,
        data: Examples,
        *,
        epochs: int,
        lr: float,
        seed: int,
        round_num: int = 0,
        client_id: int = 0,
        proximal_mu: float = 0.0,
        privacy: Any = None,
    ) -> dict:
        import torch

        if privacy is not None:
            dp_seed = None  # generators filled from os.urandom (full_entropy_torch_generator)
            if getattr(privacy, "reproducible_noise", False):
                dp_seed = client_seed(self.cfg.seed + 104729, round_num, client_id)
            return self._train_dp_sgd(model, data, epochs=epochs, lr=lr, seed=dp_seed, plan=privacy)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = LocalSGD(params, lr, self.cfg.momentum)  # buffers: one client's local run
        gen = torch.Generator().manual_seed(seed)
        proximal = ProximalTerm(params, proximal_mu)
        loss_fn = torch.nn.CrossEntropyLoss()
        total, batches = 0.0, 0
        model.train()
        for idx in epoch_batches(len(data), self.cfg.batch_size, epochs, gen, self.device):
            opt.zero_grad()
            loss = proximal(loss_fn(model(data.x[idx]), data.y[idx]))
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        model.eval()
        return {"loss": total / max(1, batches)}

    def _train_dp_sgd(
        self, model, data: Examples, *, epochs: int, lr: float, seed: int | None, plan
    ):
        """Sample-level DP-SGD with Opacus on a copy of the model (no hooks left on it);
        the trained weights are copied back.

        Opacus's noise and its Poisson masks come from torch generators. ``seed=None``
        (the default, OS noise): each gets its whole Mersenne Twister state from
        ``os.urandom`` (:func:`~fedray.privacy.mechanisms.full_entropy_torch_generator`;
        a 63-bit seed would keep only 32 bits, few enough to enumerate), and so does
        torch's global generator, in case anything on the way draws from it. Opacus's
        secure mode would need torchcsprng, which fedray does not use
        (docs/explanations/differential-privacy.md, Sample-level DP). With a seed
        (``privacy.reproducible_noise=true``) all three are ``manual_seed(seed)``: the run
        replays, and whoever knows the seed can too.
        """
        import copy

        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        from fedray.privacy import mechanisms

        private = copy.deepcopy(model)
        private.train()  # Opacus accepts only a module in training mode
        params = [p for p in private.parameters() if p.requires_grad]
        if seed is None:
            torch.default_generator.set_state(mechanisms.torch_generator().get_state())
        else:
            torch.manual_seed(seed)
        noise_generator = mechanisms.torch_generator(seed)
        loader = DataLoader(
            TensorDataset(data.x.cpu(), data.y.cpu()),
            batch_size=min(self.cfg.batch_size, len(data)),
            generator=mechanisms.torch_generator(seed),  # Opacus's Poisson masks
        )
        optimizer = torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum)
        with warnings.catch_warnings():
            # fedray documents the RNG choice (docs/explanations/differential-privacy.md,
            # Sample-level DP); no per-round warning.
            # PrivacyEngine() itself warns, so it is built inside this block.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
            private_model, optimizer, loader = engine.make_private(
                module=private,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.clip_norm,
                poisson_sampling=True,
                noise_generator=noise_generator,
            )
        loss_fn = torch.nn.CrossEntropyLoss()
        total, batches = 0.0, 0
        private_model.train()
        for _ in range(epochs):
            for xb, yb in loader:
                if len(yb) == 0:  # Poisson sampling can draw an empty batch
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(private_model(xb.to(self.device)), yb.to(self.device))
                with warnings.catch_warnings():  # inputs need no grad: the hook still fires
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
        with torch.no_grad():
            for dst, src in zip(model.parameters(), private.parameters(), strict=True):
                if dst.requires_grad:
                    dst.copy_(src)
        model.eval()
        return {"loss": total / max(1, batches)}
