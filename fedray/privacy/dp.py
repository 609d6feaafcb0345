"""Client-level DP-FedAvg with distributed noise under encryption, and its accountant.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018):
each round Poisson-samples clients with rate q, clips each update to L2 norm C, sums
them, adds N(0, sigma^2 C^2) and divides by the *expected* cohort size qN (a fixed
denominator, so the count of participants reveals nothing).

Neighbouring relation: zero-out (dp-accounting's ``NeighboringRelation.REPLACE_SPECIAL``,
Kairouz et al. 2021, Definition 1.1). Two federations are neighbours when one client's
data is replaced by a special "zero" client whose update is 0. Not add/remove: with
distributed noise a client that leaves takes its noise share with it, so removing a
client changes the noise as well as the sum. Under zero-out every client, real or
zero, still adds its share, the sum's sensitivity is C and the noise is the same on
both sides. Both accountants (:func:`make_accountant`) are built with this relation.

Noise placement:
  * distributed (crypto=paillier): each client adds its share N(0, sigma^2 C^2 / (m_min - k))
    before encrypting, with m_min = min_clients_per_round and k =
    privacy.max_colluding_clients. A round only completes with at least m_min clients, so
    the decrypted sum always carries at least m_min shares, and even after up to k
    clients who collude with the server subtract their own shares (they know them), the
    m_min - k honest shares left carry at least sigma C of noise, however many drop out.
  * central (crypto=none): the server adds N(0, sigma^2 C^2) to the plaintext sum
    (colluding clients know no part of it: k changes nothing).

Colluding clients and the two budgets (distributed noise): ``epsilon_vs_server`` counts
only the noise the server and k colluders cannot remove, (m_min - k) shares of variance
sigma^2 C^2 / (m_min - k): noise multiplier sigma, whatever k. ``epsilon`` (observers of
the released models only, who know no share) counts all of it, at least m_min shares:
noise multiplier sigma sqrt(m_min / (m_min - k)), so a larger k costs accuracy (more
noise) and makes ``epsilon`` smaller. With k = 0 both are sigma, as before.

Noise source: the OS CSPRNG by default (:func:`~fedray.privacy.mechanisms.gaussian`), so
nobody, the server included, can recompute a client's share from the seed and config
and subtract it. ``privacy.reproducible_noise=true`` draws it from numpy's PCG64 seeded
from (seed, round, client): replayable, for research only; then no DP holds against the
server (``epsilon_vs_server`` is reported as null).

Two budgets, both from dp-accounting:
  * ``epsilon``: against anyone who sees only the released models. Poisson sampling
    amplifies: one PoissonSampledDpEvent per released round.
  * ``epsilon_vs_server``: against the party that picks the cohorts. It knows who was in
    each round, so sampling does not amplify: per client, one plain GaussianDpEvent per
    round that client's update was in a released aggregate; the largest over clients.
    With central noise (crypto=none) the server sees every update in the clear, so no
    DP holds against it (null).

Sampling you account for = sampling you do: a round is retried while fewer than m_min
clients answer, so a released round's cohort is a Poisson cohort *conditioned* on having
at least m_min members. A client's inclusion probability in a released round is then
q' = q P(Bin(N-1, q) >= m_min - 1) / P(Bin(N, q) >= m_min) > q (N=10, q=0.5, m_min=3:
0.5186), and ``epsilon`` is accounted at q' (:func:`released_inclusion_probability`).
This models retries caused by a short draw; retries after dropouts (crashes, timeouts)
are assumed independent of the clients' data and are not modelled further. An attempt that fails
releases nothing: with encryption the key holders refuse to decrypt fewer than m_min
updates, and without it the round's updates are dropped unaggregated.

Releases are counted when they happen and survive a resume: the server steps the
accountant before the key holders are asked to open a sum, and the driver persists it
after every round and when a round fails (``privacy_ledger.json`` next to the
checkpoints), so the rounds after the last checkpoint, released once before a crash and
again with fresh noise after the resume, are counted twice.

Why quantization keeps the bound (distributed): a client clips, then *quantizes its
clipped update* to the codec's grid (step s), then adds integer noise (a rounded Gaussian
in grid units). Rounding moves each coordinate by at most s/2, so the quantized update
has L2 norm at most C' = C + s sqrt(d)/2: the accountant uses noise multiplier
sigma C / C'. The codec's clip range is C + 10 sigma C / sqrt(m_min - k), so the noisy value
is clipped with probability below 1e-22 per coordinate, negligible next to delta. The sum
of rounded Gaussians with a standard deviation of thousands of grid steps is treated as
the continuous Gaussian (Kairouz et al., "The Distributed Discrete Gaussian Mechanism",
ICML 2021, bound the gap; it is negligible at this scale).

Weights are uniform (every update counts 1), since example weights would break the C
bound.
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


def make_accountant(accountant: str = "rdp"):
    """A dp-accounting accountant (``rdp`` or ``pld``) under the zero-out relation."""
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import rdp_privacy_accountant

    relation = NeighboringRelation.REPLACE_SPECIAL
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(neighboring_relation=relation)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)


def compute_epsilon(
    *, rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """epsilon at delta after ``steps`` Poisson-sampled Gaussian rounds (dp-accounting)."""
    from dp_accounting import dp_event

    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
    event = dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise_multiplier))
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


def compute_epsilon_unamplified(
    *, noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """epsilon at delta of ``rounds`` plain Gaussian releases: no sampling amplification.

    What one client has against the party that chose the cohorts and so knows the
    ``rounds`` in which that client's update was in the released aggregate.
    """
    from dp_accounting import dp_event

    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return float(acc.get_epsilon(delta))


def released_inclusion_probability(num_clients: int, rate: float, min_clients: int) -> float:
    """P(a client is in a released round's cohort) when rounds with fewer than
    ``min_clients`` sampled clients are retried: Poisson(rate) conditioned on the cohort
    size being at least ``min_clients``, i.e. q P(Bin(N-1, q) >= m-1) / P(Bin(N, q) >= m).
    """
    from scipy.stats import binom

    if rate >= 1.0:
        return 1.0
    need = max(1, min_clients)  # an empty draw is retried too, even with m_min <= 1
    released = float(binom.sf(need - 1, num_clients, rate))  # P(Bin(N, q) >= m)
    if released <= 0.0:
        return 1.0
    with_client = float(binom.sf(need - 2, num_clients - 1, rate))  # P(Bin(N-1, q) >= m-1)
    return min(1.0, rate * with_client / released)


@dataclass
class ClientPlan:
    """What each sampled client does to its update (sent with the round's options)."""

    clip_norm: float
    noise_std: float  # per-client share, in model units; 0 with central noise
    quant_step: float  # codec grid step (distributed), 0 for plaintext
    reproducible_noise: bool = False  # True: seeded noise the server can predict


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
        reproducible_noise: bool = False,
        target_epsilon: float | None = None,
        target_epsilon_vs_server: float | None = None,
        accountant: str = "rdp",
        colluding_clients: int = 0,
    ):
        if clip_norm <= 0:
            raise ValueError("clip_norm must be > 0")
        if not 0 < rate <= 1:
            raise ValueError("sampling rate must be in (0, 1]")
        if not 0 <= colluding_clients < max(1, min_clients):
            raise ValueError("colluding clients must be in [0, min_clients)")
        self.colluding_clients = colluding_clients
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.rate = rate
        self.num_clients = num_clients
        self.min_clients = min_clients
        self.distributed = distributed
        self.reproducible_noise = reproducible_noise
        self.target_epsilon = target_epsilon
        self.target_epsilon_vs_server = target_epsilon_vs_server
        self.accountant = accountant
        self.grid: tuple[float, int] | None = None  # the codec's (step, values): client_plan
        # The rate accounted for: Poisson sampling conditioned on a releasable cohort.
        self.accounted_rate = released_inclusion_probability(num_clients, rate, min_clients)
        self.steps = 0  # released rounds
        self.participation: dict[int, int] = {}  # client -> released rounds it was in
        self._eps_cache: dict[int, float] = {}
        self._eps_server_cache: dict[int, float] = {}

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
            reproducible_noise=p.seeded_noise,
            target_epsilon=p.target_epsilon,
            target_epsilon_vs_server=p.target_epsilon_vs_server,
            accountant=p.accountant,
            colluding_clients=p.max_colluding_clients,
        )

    # -- sizes --------------------------------------------------------------------------
    @property
    def honest_clients(self) -> int:
        """Fewest clients in a released sum who do not collude with the server: m_min - k."""
        return max(1, self.min_clients) - self.colluding_clients

    @property
    def share_std(self) -> float:
        """Std of one client's noise share (distributed placement): sigma C / sqrt(m_min - k),
        so the m_min - k honest shares alone carry sigma C."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.honest_clients)

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
        """C' = C + s sqrt(d) / 2 once the codec's grid (step s, d values) is known: the
        bound of a clipped update after rounding (distributed noise); else C."""
        if not self.distributed or self.grid is None:
            return self.clip_norm
        step, values = self.grid
        return self.clip_norm + step * math.sqrt(values) / 2

    @property
    def noise_multiplier_vs_server(self) -> float:
        """Noise the server (and up to k colluding clients) cannot remove, over C': the
        m_min - k honest shares carry sigma C (distributed); central noise gives none."""
        return self.noise_multiplier * self.clip_norm / self.effective_sensitivity

    @property
    def accounting_noise_multiplier(self) -> float:
        """Noise in a released model, over C' (for ``epsilon``): distributed, at least
        m_min shares of variance sigma^2 C^2 / (m_min - k); central, sigma C."""
        if not self.distributed:
            return self.noise_multiplier_vs_server
        return self.noise_multiplier_vs_server * math.sqrt(
            max(1, self.min_clients) / self.honest_clients
        )

    # -- server side ----------------------------------------------------------------------
    def sample_cohort(self, rng: np.random.Generator) -> list[int]:
        """Poisson sampling: each client joins with probability q, capped at cohort_cap."""
        chosen = np.flatnonzero(rng.random(self.num_clients) < self.rate)
        if len(chosen) > self.cohort_cap:
            chosen = rng.choice(chosen, size=self.cohort_cap, replace=False)
        return sorted(int(c) for c in chosen)

    def client_plan(self, codec: Any) -> ClientPlan:
        if codec is not None:
            self.grid = (codec.step, codec.num_values)
        return ClientPlan(
            clip_norm=self.clip_norm,
            noise_std=self.share_std if self.distributed else 0.0,
            quant_step=codec.step if codec is not None else 0.0,
            reproducible_noise=self.reproducible_noise,
        )

    def server_noise(self, total: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Central placement adds N(0, sigma^2 C^2) to the sum; distributed adds nothing."""
        if self.distributed:
            return total
        std = self.noise_multiplier * self.clip_norm
        return total + gaussian(total.shape, std, rng, secure=not self.reproducible_noise)

    def check_clipped(self, delta: np.ndarray, rejected_type: type[Exception]) -> None:
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        if norm > self.clip_norm * (1 + 1e-4):
            raise rejected_type(
                f"update norm {norm:.4g} is above privacy.clip_norm={self.clip_norm}"
            )

    # -- accounting -----------------------------------------------------------------------
    def epsilon(self, steps: int | None = None) -> float:
        """Against observers of the released models: amplified by the sampling."""
        steps = self.steps if steps is None else steps
        if steps not in self._eps_cache:
            self._eps_cache[steps] = compute_epsilon(
                rate=self.accounted_rate,
                noise_multiplier=self.accounting_noise_multiplier,
                steps=steps,
                delta=self.delta,
                accountant=self.accountant,
            )
        return self._eps_cache[steps]

    def client_epsilon_vs_server(self, rounds: int) -> float:
        """One client's epsilon against the server after ``rounds`` released rounds."""
        if not self.distributed or self.reproducible_noise:
            # The server sees each update in the clear (central noise), or can recompute
            # and subtract every noise share (seeded noise): no DP holds against it.
            return math.inf if rounds else 0.0
        if rounds not in self._eps_server_cache:
            self._eps_server_cache[rounds] = compute_epsilon_unamplified(
                noise_multiplier=self.noise_multiplier_vs_server,
                rounds=rounds,
                delta=self.delta,
                accountant=self.accountant,
            )
        return self._eps_server_cache[rounds]

    @property
    def most_rounds(self) -> int:
        """The most released rounds any one client was in."""
        return max(self.participation.values(), default=0)

    def epsilon_vs_server(self) -> float:
        """The largest epsilon against the server over clients (no amplification)."""
        return self.client_epsilon_vs_server(self.most_rounds)  # grows with the count

    def would_exceed_target(self) -> str | None:
        """The target one more round could push past (``"privacy.target_epsilon=E"``), or None.

        Against the server, the client with the most released rounds is assumed to be in
        the next cohort (the sampling is not known in advance): the run stops before any
        client's ``epsilon_vs_server`` could pass the target."""
        most = self.most_rounds
        return _first_exceeded(
            ("privacy.target_epsilon", self.target_epsilon, lambda: self.epsilon(self.steps + 1)),
            (
                "privacy.target_epsilon_vs_server",
                self.target_epsilon_vs_server,
                lambda: self.client_epsilon_vs_server(most + 1),
            ),
        )

    def rounds_within_target_vs_server(self, limit: int) -> int:
        """How many more released rounds (at most ``limit``) keep every client within
        privacy.target_epsilon_vs_server even if each were in all of them: the key holders
        open one sum per round, so they enforce this window whatever the server does."""
        most = self.most_rounds
        return _rounds_within(
            limit, self.target_epsilon_vs_server, lambda r: self.client_epsilon_vs_server(most + r)
        )

    def saw_in_clear(self, clients: list[int]) -> None:
        """Updates the server received in the clear in an attempt it did not release
        (crypto=none, too few answers). Nothing to count: central noise gives no DP
        against the server, and ``epsilon`` counts released models."""

    def step(self, participants: list[int] | None = None) -> None:
        """Count one released round and the clients whose updates were in it."""
        self.steps += 1
        for cid in participants or []:
            self.participation[int(cid)] = self.participation.get(int(cid), 0) + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "participation": {str(k): v for k, v in sorted(self.participation.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.participation = {int(k): int(v) for k, v in state.get("participation", {}).items()}


def _rounds_within(limit: int, target: float | None, epsilon_after) -> int:
    """The largest r in 0..limit with ``epsilon_after(r) <= target`` (epsilon grows with
    r: a bisection); ``limit`` without a target."""
    if target is None:
        return limit
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_after(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _first_exceeded(*targets) -> str | None:
    """``"NAME=TARGET"`` of the first ``(NAME, TARGET or None, next_epsilon)`` whose
    ``next_epsilon()`` (the epsilon after one more round) passes TARGET, else None. An
    unset target is skipped without accounting."""
    for name, target, next_epsilon in targets:
        if target is not None and next_epsilon() > target:
            return f"{name}={target}"
    return None


def privatize_update(delta: np.ndarray, plan: ClientPlan, seed: int):
    """Client side: clip to the L2 norm; return (clipped delta, integer noise or None).

    With distributed noise the share is returned in codec grid units for the encoder to
    add after quantizing; without it (central placement) the clipped delta goes as is.
    The share comes from the OS CSPRNG; ``seed`` is used only with
    ``plan.reproducible_noise`` (then anyone who knows it can recompute the share).
    """
    clipped = l2_clip(delta, plan.clip_norm)
    if plan.noise_std <= 0 or plan.quant_step <= 0:
        return clipped, None
    seeded = plan.reproducible_noise
    rng = np.random.default_rng(seed) if seeded else None
    noise = gaussian(clipped.shape, plan.noise_std / plan.quant_step, rng, secure=not seeded)
    return clipped, np.rint(noise).astype(np.int64)


@dataclass
class SamplePlan:
    """Sample-level DP-SGD inside each client (Opacus)."""

    noise_multiplier: float
    clip_norm: float
    mode: str = "sample"
    reproducible_noise: bool = False  # True: torch's generator seeded from the job seed


class SampleLevelDP:
    """DP-SGD inside clients with Opacus; each site's epsilon from Opacus's RDP accountant.

    Protects each *example* of a site's data (not the whole site): every local step
    Poisson-samples the site's examples at rate batch_size / n_k, clips per-example
    gradients to ``privacy.clip_norm`` and adds N(0, sigma^2 C^2). A site's epsilon
    composes local_epochs * n_k / batch_size such steps for each round it took part in;
    the reported epsilon is the largest over sites. Updates stay example-weighted.

    What the server learns: the accountant needs each site's example count n_k, so in
    this mode the sites' counts go to the server (the driver asks the hosts for them
    only when ``privacy.mode=sample``). Against the server the budget is the same
    ``epsilon``: the examples are sampled and noised on the site, from torch generators
    whose whole Mersenne Twister state comes from ``os.urandom`` per training
    (:func:`~fedray.privacy.mechanisms.full_entropy_torch_generator`; not a seed, which
    torch would cut to 32 bits). Unpredictable to the server, though not a CSPRNG: the
    state could be recovered from 624 consecutive raw outputs, which never leave the
    site. With ``privacy.reproducible_noise=true`` the server could replay the noise, and
    ``epsilon_vs_server`` is null.
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
        target_epsilon_vs_server=None,
        accountant="rdp",
        reproducible_noise=False,
    ):
        self.reproducible_noise = reproducible_noise
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.delta = delta
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.client_sizes = {int(k): int(v) for k, v in client_sizes.items()}
        self.target_epsilon = target_epsilon
        self.target_epsilon_vs_server = target_epsilon_vs_server
        self.accountant = accountant
        self.participation: dict[int, int] = {}
        self._eps_cache: dict[tuple[int, int], float] = {}

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
            target_epsilon_vs_server=p.target_epsilon_vs_server,
            accountant=p.accountant,
            reproducible_noise=p.seeded_noise,
        )

    def sample_cohort(self, rng):
        return None  # the usual fixed-size cohort

    def client_plan(self, codec) -> SamplePlan:
        return SamplePlan(
            self.noise_multiplier, self.clip_norm, reproducible_noise=self.reproducible_noise
        )

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
        if (n, rounds) not in self._eps_cache:  # sites of one size share their epsilon
            rate = min(1.0, self.batch_size / n)
            steps_per_round = self.local_epochs * max(1, math.ceil(n / self.batch_size))
            mechanism = self.accountant if self.accountant == "rdp" else "prv"
            acc = create_accountant(mechanism=mechanism)
            acc.history = [(self.noise_multiplier, rate, steps_per_round * rounds)]
            self._eps_cache[(n, rounds)] = float(acc.get_epsilon(delta=self.delta))
        return self._eps_cache[(n, rounds)]

    def epsilon(self) -> float:
        return max((self.client_epsilon(c, r) for c, r in self.participation.items()), default=0.0)

    def epsilon_vs_server(self) -> float:
        """Examples are sampled on the site: the server's cohort choice does not matter."""
        if self.reproducible_noise:
            return math.inf if self.participation else 0.0
        return self.epsilon()

    def would_exceed_target(self) -> str | None:
        """The target one more round could push a site past, or None (see ClientLevelDP).

        Checks every site that could be sampled next, not the one with the most rounds:
        a small site (high sampling rate) can have the highest epsilon with fewer rounds.
        Against the server a site's epsilon is the same (its examples are sampled on the
        site), so both targets bound the same figure.
        """

        def next_epsilon() -> float:
            return self._worst_site_epsilon(1)

        return _first_exceeded(
            ("privacy.target_epsilon", self.target_epsilon, next_epsilon),
            ("privacy.target_epsilon_vs_server", self.target_epsilon_vs_server, next_epsilon),
        )

    def _worst_site_epsilon(self, more: int) -> float:
        """The largest site epsilon if every site took part in ``more`` more rounds."""
        return max(
            (
                self.client_epsilon(c, self.participation.get(c, 0) + more)
                for c in self.client_sizes
            ),
            default=0.0,
        )

    def rounds_within_target_vs_server(self, limit: int) -> int:
        """How many more rounds (at most ``limit``) keep every site within
        privacy.target_epsilon_vs_server if each took part in all of them (the window the
        key holders enforce; see ClientLevelDP)."""
        return _rounds_within(limit, self.target_epsilon_vs_server, self._worst_site_epsilon)

    def saw_in_clear(self, clients: list[int]) -> None:
        """Updates the server received in the clear in an attempt it did not release
        (crypto=none, too few answers): each was a DP-SGD run on the site's data that the
        server saw, so it counts like a round (conservative for ``epsilon``)."""
        self.step(clients)

    def step(self, participants: list[int] | None = None) -> None:
        for cid in participants or []:
            self.participation[cid] = self.participation.get(cid, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"participation": {str(k): v for k, v in self.participation.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.participation = {int(k): int(v) for k, v in state["participation"].items()}
