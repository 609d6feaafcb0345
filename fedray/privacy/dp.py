"""Client-level DP-FedAvg with distributed noise under encryption, and its accountant.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018):
each round Poisson-samples clients with rate q, clips each update to L2 norm C, sums
them, adds N(0, sigma^2 C^2) and divides by the *expected* cohort size qN (a fixed
denominator, so the count of participants reveals nothing). Neighbouring data sets
differ in one client (add/remove), so the sum's sensitivity is C.

Noise placement:
  * distributed (crypto=paillier): each client adds its share N(0, sigma^2 C^2 / m_min)
    before encrypting, with m_min = min_clients_per_round. A round only completes with at
    least m_min clients, so the decrypted sum always carries at least sigma C of noise,
    however many drop out. The server never sees anything less noisy.
  * central (crypto=none): the server adds N(0, sigma^2 C^2) to the plaintext sum.

Why quantization keeps the bound (distributed): a client clips, then *quantizes its
clipped update* to the codec's grid (step s), then adds integer noise (a rounded Gaussian
in grid units). Rounding moves each coordinate by at most s/2, so the quantized update
has L2 norm at most C' = C + s sqrt(d)/2: the accountant uses noise multiplier
sigma C / C'. The codec's clip range is C + 10 sigma C / sqrt(m_min), so the noisy value
is clipped with probability below 1e-22 per coordinate, negligible next to delta. The sum
of rounded Gaussians with a standard deviation of thousands of grid steps is treated as
the continuous Gaussian (Kairouz et al., "The Distributed Discrete Gaussian Mechanism",
ICML 2021, bound the gap; it is negligible at this scale).

Weights are uniform (every update counts 1), since example weights would break the C
bound. Accounting: Google's dp-accounting (RDP by default, or PLD), composing one
Poisson-sampled Gaussian event per completed round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedray.config import FedrayConfig, min_clients
from fedray.privacy.mechanisms import gaussian, l2_clip

# Codec clip range, in standard deviations of one client's noise share.
NOISE_TAIL_SIGMAS = 10.0


def poisson_cohort_cap(num_clients: int, rate: float) -> int:
    """Largest Poisson cohort kept (mean + 6 std): the codec's headroom is sized for it."""
    mean = rate * num_clients
    return min(num_clients, max(1, math.ceil(mean + 6 * math.sqrt(mean * (1 - rate)) + 1)))


def compute_epsilon(
    *, rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """epsilon at delta after ``steps`` Poisson-sampled Gaussian rounds (dp-accounting)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise_multiplier))
    if accountant == "pld":
        acc = pld_privacy_accountant.PLDAccountant()
    else:
        acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


@dataclass
class ClientPlan:
    """What each sampled client does to its update (sent with the round's options)."""

    clip_norm: float
    noise_std: float  # per-client share, in model units; 0 with central noise
    quant_step: float  # codec grid step (distributed), 0 for plaintext
    secure_rng: bool


class ClientLevelDP:
    """Clipping and noise plan, the server's share of the work, and the accountant."""

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        delta: float,
        rate: float,
        num_clients: int,
        min_clients: int,
        distributed: bool,
        num_parameters: int | None = None,
        secure_rng: bool = False,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
    ):
        if clip_norm <= 0:
            raise ValueError("clip_norm must be > 0")
        if not 0 < rate <= 1:
            raise ValueError("sampling rate must be in (0, 1]")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.rate = rate
        self.num_clients = num_clients
        self.min_clients = min_clients
        self.distributed = distributed
        self.secure_rng = secure_rng
        self.target_epsilon = target_epsilon
        self.accountant = accountant
        self.num_parameters = num_parameters
        self.steps = 0
        self._eps_cache: dict[int, float] = {}
        self.quant_step = 0.0

    @classmethod
    def from_config(cls, cfg: FedrayConfig) -> ClientLevelDP:
        p = cfg.privacy
        distributed = cfg.crypto.name == "paillier"
        return cls(
            clip_norm=p.clip_norm,
            noise_multiplier=p.noise_multiplier,
            delta=p.delta,
            rate=cfg.clients_per_round / cfg.num_clients,
            num_clients=cfg.num_clients,
            min_clients=min_clients(cfg),
            distributed=distributed,
            secure_rng=p.secure_rng,
            target_epsilon=p.target_epsilon,
            accountant=p.accountant,
        )

    # -- sizes --------------------------------------------------------------------------
    @property
    def share_std(self) -> float:
        """Std of one client's noise share (distributed placement)."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)

    @property
    def encode_clip(self) -> float:
        """Codec clip range: the clip norm plus a tail of the noise share."""
        return self.clip_norm + NOISE_TAIL_SIGMAS * self.share_std

    @property
    def cohort_cap(self) -> int:
        return poisson_cohort_cap(self.num_clients, self.rate)

    @property
    def denominator(self) -> float:
        """Fixed denominator: the expected cohort size qN."""
        return self.rate * self.num_clients

    @property
    def effective_sensitivity(self) -> float:
        if not self.distributed or not self.num_parameters:
            return self.clip_norm
        return self.clip_norm + self.quant_step * math.sqrt(self.num_parameters) / 2

    @property
    def accounting_noise_multiplier(self) -> float:
        return self.noise_multiplier * self.clip_norm / self.effective_sensitivity

    # -- server side ----------------------------------------------------------------------
    def sample_cohort(self, rng: np.random.Generator) -> list[int]:
        """Poisson sampling: each client joins with probability q, capped at cohort_cap."""
        chosen = np.flatnonzero(rng.random(self.num_clients) < self.rate)
        if len(chosen) > self.cohort_cap:
            chosen = rng.choice(chosen, size=self.cohort_cap, replace=False)
        return sorted(int(c) for c in chosen)

    def client_plan(self, codec: Any) -> ClientPlan:
        if codec is not None:
            self.quant_step = codec.step
            self.num_parameters = codec.num_values
        return ClientPlan(
            clip_norm=self.clip_norm,
            noise_std=self.share_std if self.distributed else 0.0,
            quant_step=codec.step if codec is not None else 0.0,
            secure_rng=self.secure_rng,
        )

    def server_noise(self, total: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Central placement adds N(0, sigma^2 C^2) to the sum; distributed adds nothing."""
        if self.distributed:
            return total
        std = self.noise_multiplier * self.clip_norm
        return total + gaussian(total.shape, std, rng, secure=self.secure_rng)

    def check_clipped(self, delta: np.ndarray, rejected_type: type[Exception]) -> None:
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        if norm > self.clip_norm * (1 + 1e-4):
            raise rejected_type(
                f"update norm {norm:.4g} is above privacy.clip_norm={self.clip_norm}"
            )

    # -- accounting -----------------------------------------------------------------------
    def epsilon(self, steps: int | None = None) -> float:
        steps = self.steps if steps is None else steps
        if steps not in self._eps_cache:
            self._eps_cache[steps] = compute_epsilon(
                rate=self.rate,
                noise_multiplier=self.accounting_noise_multiplier,
                steps=steps,
                delta=self.delta,
                accountant=self.accountant,
            )
        return self._eps_cache[steps]

    def would_exceed_target(self) -> bool:
        """True if one more round would push epsilon past privacy.target_epsilon."""
        return (
            self.target_epsilon is not None and self.epsilon(self.steps + 1) > self.target_epsilon
        )

    def step(self, participants: list[int] | None = None) -> None:
        del participants  # every round counts for every client (Poisson sampling)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def privatize_update(delta: np.ndarray, plan: ClientPlan, seed: int):
    """Client side: clip to the L2 norm; return (clipped delta, integer noise or None).

    With distributed noise the share is returned in codec grid units for the encoder to
    add after quantizing; without it (central placement) the clipped delta goes as is.
    """
    clipped = l2_clip(delta, plan.clip_norm)
    if plan.noise_std <= 0 or plan.quant_step <= 0:
        return clipped, None
    rng = np.random.default_rng(seed)
    noise = gaussian(clipped.shape, plan.noise_std / plan.quant_step, rng, secure=plan.secure_rng)
    return clipped, np.rint(noise).astype(np.int64)


@dataclass
class SamplePlan:
    """Sample-level DP-SGD inside each client (Opacus)."""

    noise_multiplier: float
    clip_norm: float
    mode: str = "sample"


class SampleLevelDP:
    """DP-SGD inside clients with Opacus; each site's epsilon from Opacus's RDP accountant.

    Protects each *example* of a site's data (not the whole site): every local step
    Poisson-samples the site's examples at rate batch_size / n_k, clips per-example
    gradients to ``privacy.clip_norm`` and adds N(0, sigma^2 C^2). A site's epsilon
    composes local_epochs * n_k / batch_size such steps for each round it took part in;
    the reported epsilon is the largest over sites. Updates stay example-weighted.
    """

    denominator = None  # example-weighted mean, as FedAvg

    def __init__(
        self,
        *,
        noise_multiplier,
        clip_norm,
        delta,
        batch_size,
        local_epochs,
        client_sizes,
        target_epsilon=None,
        accountant="rdp",
    ):
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.delta = delta
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.client_sizes = {int(k): int(v) for k, v in client_sizes.items()}
        self.target_epsilon = target_epsilon
        self.accountant = accountant
        self.participation: dict[int, int] = {}

    @classmethod
    def from_config(cls, cfg: FedrayConfig, client_sizes: dict[int, int]) -> SampleLevelDP:
        p = cfg.privacy
        return cls(
            noise_multiplier=p.noise_multiplier,
            clip_norm=p.clip_norm,
            delta=p.delta,
            batch_size=cfg.batch_size,
            local_epochs=cfg.local_epochs,
            client_sizes=client_sizes,
            target_epsilon=p.target_epsilon,
            accountant=p.accountant,
        )

    def sample_cohort(self, rng):
        return None  # the usual fixed-size cohort

    def client_plan(self, codec) -> SamplePlan:
        return SamplePlan(self.noise_multiplier, self.clip_norm)

    def server_noise(self, total, rng):
        return total

    def check_clipped(self, delta, rejected_type) -> None:
        return None

    def client_epsilon(self, cid: int, rounds: int) -> float:
        """One site's epsilon after ``rounds`` rounds, by Opacus's accountant."""
        from opacus.accountants import create_accountant

        if rounds == 0:
            return 0.0
        n = max(1, self.client_sizes.get(cid, 1))
        rate = min(1.0, self.batch_size / n)
        steps_per_round = self.local_epochs * max(1, math.ceil(n / self.batch_size))
        acc = create_accountant(mechanism=self.accountant if self.accountant == "rdp" else "prv")
        acc.history = [(self.noise_multiplier, rate, steps_per_round * rounds)]
        return float(acc.get_epsilon(delta=self.delta))

    def epsilon(self) -> float:
        return max((self.client_epsilon(c, r) for c, r in self.participation.items()), default=0.0)

    def would_exceed_target(self) -> bool:
        if self.target_epsilon is None:
            return False
        worst = max(self.client_sizes, key=lambda c: self.participation.get(c, 0), default=None)
        if worst is None:
            return False
        return (
            self.client_epsilon(worst, self.participation.get(worst, 0) + 1) > self.target_epsilon
        )

    def step(self, participants: list[int] | None = None) -> None:
        for cid in participants or []:
            self.participation[cid] = self.participation.get(cid, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"participation": {str(k): v for k, v in self.participation.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.participation = {int(k): int(v) for k, v in state["participation"].items()}
