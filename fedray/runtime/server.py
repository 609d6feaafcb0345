"""The server: owns the global model and the server optimizer, and runs one round per call.

Per round: sample the cohort -> put the global weights in the object store once -> ask
each client host to train its sampled clients -> fold results in as they finish
(``ray.wait``) -> decrypt the *sum* through key holders (crypto) or average (plaintext)
-> server optimizer step -> evaluate. The server holds the public key only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from fedray.config import FedrayConfig, min_clients
from fedray.crypto.secure_aggregation import codec_for
from fedray.data.datasets import DatasetInfo
from fedray.errors import ClusterError, DataError
from fedray.runtime.client import PARALLEL_MIN_CIPHERTEXTS, ClientResult, RoundTask
from fedray.runtime.round_stats import round_metrics, sum_statistics

log = logging.getLogger("fedray.server")

RESTART_WAIT_S = 120.0  # how long a retry waits for client hosts Ray is restarting


def sample_cohort(rng: np.random.Generator, num_clients: int, size: int) -> list[int]:
    """``size`` distinct client ids, uniformly without replacement, sorted."""
    return sorted(rng.choice(num_clients, size=size, replace=False).tolist())


def sample_cohort_stratified(
    rng: np.random.Generator, groups: list[list[int]], size: int
) -> list[int]:
    """``size`` client ids drawn from each group in proportion to its size.

    Every client is still included with probability size / num_clients (the group shares
    are rounded by a random largest-remainder draw), but each actor gets an equal share
    of the round's work, so a round waits for no unlucky actor.
    """
    total = sum(len(g) for g in groups)
    exact = np.array([size * len(g) / total for g in groups])
    counts = np.floor(exact).astype(int)
    short = size - counts.sum()
    if short:
        frac = exact - counts
        extra = rng.choice(len(groups), size=short, replace=False, p=frac / frac.sum())
        counts[extra] += 1
    chosen: list[int] = []
    for g, k in zip(groups, counts, strict=True):
        chosen.extend(rng.choice(g, size=int(k), replace=False).tolist())
    return sorted(chosen)


@dataclass
class RoundOutcome:
    """What one round produced: the metrics row plus per-client node placement."""

    metrics: dict[str, Any]
    client_nodes: dict[int, str] = field(default_factory=dict)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    stop: bool = False
    stop_reason: str = ""  # with stop: the privacy target ("privacy.target_epsilon=E")
    # The accountant after this round's release (DP): the driver persists it at once,
    # so a resume from an older checkpoint still counts the rounds released since.
    privacy_state: dict[str, Any] | None = None
    # Too few clients answered: call run_round again to retry the round (the driver
    # first sets up again any host Ray restarted, so a retry never uses one unset).
    retry: bool = False
    # Clients of the opened sum whose training failed (the encrypted ``clients_failed``;
    # counted in ``clients_failed``, not in ``clients_ok``): their hosts answered.
    failed_in_sum: int = 0
    # Hosts of the sum lost before its approval: the attempt is tried again (retry).
    lost_hosts: list[int] = field(default_factory=list)


@dataclass
class _Collected:
    """What one attempt got back: accepted results, and the clients that failed (an
    error or a rejected update), missed the deadline, or were rejected, and why."""

    results: list[ClientResult] = field(default_factory=list)
    failed: int = 0
    late: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    aggregate_s: float = 0.0  # seconds spent folding updates in


class _PlainSum:
    """Running weighted sum of plaintext deltas (mean strategies), or the list (robust)."""

    def __init__(self, keep_all: bool):
        self.keep_all = keep_all
        self.total: np.ndarray | None = None
        self.deltas: list[np.ndarray] = []
        self.weights: list[float] = []
        self.count = 0

    def add(self, delta: np.ndarray, weight: float) -> None:
        if self.keep_all:
            self.deltas.append(delta)
        else:
            scaled = delta.astype(np.float64) * weight
            self.total = scaled if self.total is None else self.total + scaled
        self.weights.append(weight)
        self.count += 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _refused_the_model(exc: BaseException) -> bool:
    """A host call that failed because the host refused the global model (lineage)."""
    from fedray.runtime.lineage import LineageError

    # Ray re-raises it as RayTaskError(LineageError); its text names the class either way
    return isinstance(exc, LineageError) or "LineageError" in str(exc)


def _drop_ciphertexts(res: ClientResult) -> None:
    """Forget a result's ciphertext bytes once folded (or rejected): the sum has them, and
    the slow paths fetch them again from the host (``bytes_up`` stays for the metrics)."""
    if res.encrypted is not None:
        with contextlib.suppress(AttributeError):  # not an EncryptedUpdate: was rejected
            res.encrypted.ciphertexts = b""


def _plain_stats(results: list[ClientResult]) -> dict[str, float]:
    """The summed statistics of plaintext results (with crypto they arrive encrypted and
    summed); the weight is the one the updates were aggregated with."""
    sums = sum_statistics([r.stats or {} for r in results])
    sums["weight"] = float(sum(r.weight for r in results))
    return sums


def opening_processes(cfg: FedrayConfig, num_ciphertexts: int) -> int:
    """Processes the server opens a sum over (``crypto.processes``; automatic: the
    machine's CPUs when a sum has at least PARALLEL_MIN_CIPHERTEXTS ciphertexts)."""
    if cfg.crypto.processes is not None:
        return cfg.crypto.processes
    if num_ciphertexts < PARALLEL_MIN_CIPHERTEXTS:
        return 1
    return max(1, len(os.sched_getaffinity(0)))


class Server:
    """Global model, strategy, cohort sampling and evaluation. Never holds a private key."""

    def __init__(
        self,
        cfg: FedrayConfig,
        info: DatasetInfo,
        hosts: list[Any] | None = None,
        assignment: dict[int, int] | None = None,
        key: Any = None,
        privacy: Any = None,
        key_holders: list[Any] | None = None,
    ):
        """Build the model, strategy and test set: what needs only the config. The driver
        starts the server this way while the hosts load their data (both import torch;
        on a few cores that overlaps the key set-up), then wires in the federation with
        :meth:`set_up`. Given ``hosts``, :meth:`set_up` runs at once."""
        import torch

        from fedray.models import ParamView
        from fedray.strategies import build_strategy
        from fedray.tasks.base import build_task, build_task_model

        torch.set_num_threads(1)
        self.cfg = cfg
        self.task = build_task(cfg, info)  # on the CPU: the server only evaluates
        self.model = build_task_model(self.task, cfg.seed)
        self.view = ParamView(self.model, cfg.model.trainable)
        self.weights = self.view.get()
        self.strategy = build_strategy(cfg.strategy)
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.noise_rng = np.random.default_rng([cfg.seed, 2])
        self.round = 0
        self.info = info
        self.test = self._raw_test = self.task.load_test_data()
        # dataset.standardize=global / missing=impute_mean: the federation's FeatureScaling
        # (a dict), opened before round 1 (open_feature_sums) or loaded on resume
        from fedray.config import needs_feature_statistics

        self._needs_scaling = needs_feature_statistics(cfg)
        self.scaling: dict[str, Any] | None = None
        self.hosts: list[Any] = []
        self.assignment: dict[int, int] = {}
        self._groups: list[list[int]] | None = None
        self.key = self.privacy = None
        self.key_holders: list[Any] = []
        self._hosts_failed = False
        self._open_round: dict[str, Any] | None = None  # a round being retried
        self.codec = self.layout = self._unmasker = None
        # Model checks (cluster.verify_models): the opened sums the hosts recompute each
        # global model from (fedray.runtime.lineage), since this run's start.
        self.releases: list[Any] = []
        self._verify = False
        self._round_model_sha256 = ""
        self._exponents: list[int] | None = None
        self._holder_keys: dict[int, bytes] | None = None  # attestation keys (public)
        self._is_set_up = False
        if hosts is not None:
            self.set_up(hosts, assignment or {}, key, privacy, key_holders)

    def set_up(
        self,
        hosts: list[Any],
        assignment: dict[int, int],
        key: Any = None,
        privacy: Any = None,
        key_holders: list[Any] | None = None,
    ) -> bool:
        """Wire in the federation, once: the hosts and which clients each serves, and
        with crypto the public key (``key``: a
        :class:`~fedray.crypto.threshold.ThresholdPublicKey`, public only) and the key
        holders' handles (holder ``j`` at index ``j - 1``)."""
        if self._is_set_up:
            raise PermissionError("the server's federation is set up once")
        self.hosts = hosts
        self.assignment = assignment
        groups: dict[int, list[int]] = {}
        for cid, host in sorted(assignment.items()):
            groups.setdefault(host, []).append(cid)
        # Simulation mode (hosts with many clients): stratify cohorts over hosts.
        many = len(groups) > 1 and max(len(g) for g in groups.values()) > 1
        self._groups = [groups[h] for h in sorted(groups)] if many else None
        self.key = key
        self.privacy = privacy
        self.key_holders = list(key_holders or [])
        if key is not None:
            from fedray.crypto.secure_aggregation import UpdateLayout

            self.codec = codec_for(self.cfg, key.public, self.view.size)
            self.layout = UpdateLayout.for_key(key.public, self.codec)
            if key.threshold >= 2 and self.cfg.crypto.fast_decrypt:
                self._unmasker = self._make_unmasker(key)
        if privacy is not None:
            privacy.client_plan(self.codec)  # fixes the grid step the accountant uses
        if key is not None:
            from fedray.runtime.lineage import verifies_models

            self._verify = verifies_models(self.cfg)
        self._is_set_up = True
        return True

    def _make_unmasker(self, key):
        """The fast path's opener; big sums are opened over a pool of processes (the
        server is idle while it waits for the key holders, and opening is its one big
        cost: one fixed-base power per ciphertext)."""
        from fedray.crypto.paillier import window_for
        from fedray.crypto.threshold import Unmasker

        num = self.layout.num_ciphertexts
        window = window_for(num)
        processes = opening_processes(self.cfg, num)
        pool = None
        if processes > 1:
            from fedray.crypto.parallel import ParallelCrypto

            pool = ParallelCrypto(
                key, processes, unmask_summands=self.codec.max_summands, window=window
            )
        return Unmasker(key, self.codec.max_summands, window=window, pool=pool)

    # -- info ---------------------------------------------------------------------------
    def privacy_state(self) -> dict[str, Any] | None:
        """The accountant's state now (the driver saves it when a round fails after its
        release was counted, so a resume still counts it)."""
        return self.privacy.state_dict() if self.privacy is not None else None

    def num_parameters(self) -> int:
        """Values exchanged per update (the trainable parameters)."""
        return self.view.size

    def num_model_parameters(self) -> int:
        """All parameters of the model, exchanged or not."""
        from fedray.models import count_model_parameters

        return count_model_parameters(self.model)

    def values_per_ciphertext(self) -> int:
        return self.codec.slots_per_ciphertext if self.codec else 0

    def releases_since(self, round_num: int) -> list[Any]:
        """The opened sums (with their attestations) of the rounds after ``round_num``:
        the driver checks the state it checkpoints against them."""
        return [r for r in self.releases if r.round > int(round_num)]

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly. Contains no key material."""
        return {
            "round": self.round,
            "weights": self.weights.copy(),
            "strategy": self.strategy.state_dict(),
            "rng": self.rng.bit_generator.state,
            "noise_rng": self.noise_rng.bit_generator.state,
            "privacy": self.privacy.state_dict() if self.privacy is not None else None,
            "feature_scaling": self.scaling,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("feature_scaling") is not None and self._needs_scaling:
            self.set_feature_scaling(state["feature_scaling"])
        self.round = int(state["round"])
        self.weights = np.asarray(state["weights"], dtype=np.float32)
        self.strategy.load_state_dict(state["strategy"])
        self.rng.bit_generator.state = state["rng"]
        self.noise_rng.bit_generator.state = state["noise_rng"]
        if self.privacy is not None and state.get("privacy") is not None:
            self.privacy.load_state_dict(state["privacy"])
        if state.get("releases") is not None:  # across organisations: the sites' hosts
            self.releases = list(state["releases"])  # check the next model against them

    # -- before round 1: the federation's feature statistics ---------------------------
    def open_feature_sums(self) -> dict[str, Any]:
        """Ask every host for its clients' feature sums and open their sum: with crypto
        by the key holders, as the one sum of round 0 (every host approves it), so this
        server learns the federation's per-feature counts, sums and sums of squares,
        never a site's. Returns the :class:`~fedray.data.datasets.FeatureScaling` (a
        dict) and prepares the test set with it. ClusterError if a host gives none (a
        sum of some sites would be their statistics), or the sum cannot be opened."""
        from fedray.config import standardization
        from fedray.data.datasets import FeatureScaling

        if not self._is_set_up or not self._needs_scaling:
            raise ClusterError("this job opens no feature sums, or the server is not set up")
        if self.round != 0 or self.scaling is not None:
            raise ClusterError("the feature sums are opened once, before round 1")
        refs = {self.hosts[h].feature_sums.remote(0): h for h in range(len(self.hosts))}
        got: list[tuple[int, ClientResult]] = []
        for ref, h in refs.items():
            try:
                res = self._fetch(ref)
            except Exception as exc:
                self._no_feature_sums(h, _first_line(exc))
            if not isinstance(res, ClientResult):
                self._no_feature_sums(h, f"it answered a {type(res).__name__}")
            got.append((h, res))
        width = int(self.info.num_features)
        if self.key is None:
            total = self._plain_feature_sums(got, width)
        else:
            total = self._open_sealed_feature_sums(got, width)
        try:
            scaling = FeatureScaling.from_sums(
                total,
                standardization(self.cfg),
                self.cfg.dataset.missing == "impute_mean",
                max_cells=float(self.cfg.num_clients),
            )
        except DataError as exc:
            raise ClusterError(f"{exc}; the run stops before round 1") from None
        self.set_feature_scaling(scaling.to_dict())
        return self.scaling

    @staticmethod
    def _no_feature_sums(host: int, why: str) -> NoReturn:
        """A statistic of some sites only would be those sites' statistics (and the key
        holders open round 0's sum only with every client in it): the run stops."""
        raise ClusterError(
            f"client host {host} gave no feature sums ({why}); the federation-wide statistics "
            "need every site, so the run stops before round 1 (run it again, or use "
            "dataset.standardize=site)"
        )

    def _host_clients(self, host: int) -> set[int]:
        return {c for c, h in self.assignment.items() if h == host}

    def _plain_feature_sums(self, got, width: int) -> np.ndarray:
        total = np.zeros(3 * width)
        for h, res in got:
            sums = res.delta
            if not isinstance(sums, np.ndarray) or sums.shape != total.shape:
                self._no_feature_sums(h, "sums of another shape")
            if not np.all(np.isfinite(sums)):
                self._no_feature_sums(h, "sums that are not finite")
            total += sums
        return total

    def _open_sealed_feature_sums(self, got, width: int) -> np.ndarray:
        """The key holders open round 0's sum, by the same paths as a round's."""
        from fedray.crypto.paillier import window_for
        from fedray.crypto.secure_aggregation import (
            EncryptedSum,
            EncryptedUpdate,
            RejectedUpdate,
            feature_sums_codec,
        )
        from fedray.crypto.threshold import Unmasker

        codec = feature_sums_codec(self.cfg, self.key.public, width)
        acc = EncryptedSum(self.key.public, codec)
        for h, res in got:
            enc = res.encrypted
            try:
                if not isinstance(enc, EncryptedUpdate) or enc.count != 1:
                    raise RejectedUpdate("not one sealed update")
                if set(enc.client_ids) != self._host_clients(h):
                    raise RejectedUpdate(f"names clients {list(enc.client_ids)}, not its own")
                acc.add(enc, source=h)
            except RejectedUpdate as exc:
                self._no_feature_sums(h, f"rejected: {exc}")
        acc.approvals = self._approvals(acc)
        unmasker = None
        if self._unmasker is not None:
            unmasker = Unmasker(self.key, len(self.hosts), window=window_for(codec.num_ciphertexts))
        plaintexts, _ = self._decrypt(acc, codec, unmasker)
        return codec.decode_sum(plaintexts, len(acc.update_ids))

    def set_feature_scaling(self, scaling: dict[str, Any]) -> bool:
        """Prepare the test set with the federation's scaling (opened, or on resume the
        checkpoint's); the hosts get it from the driver, signed."""
        from fedray.data.datasets import FeatureScaling

        self.test = self.task.prepare_test(self._raw_test, FeatureScaling.from_dict(scaling))
        self.scaling = dict(scaling)
        return True

    # -- one round ------------------------------------------------------------------------
    def run_round(self) -> RoundOutcome:
        """Run one attempt at the next round, or at the round being retried.

        Too few clients answered: returns an outcome with ``retry`` set and the round
        still open; the driver sets up restarted hosts, then calls this again. After
        ``max_round_retries`` retries: ClusterError (completed rounds are kept)."""
        import ray

        if not self._is_set_up:
            raise ClusterError("the server was not set up (Server.set_up) before a round")
        if self.scaling is None and self._needs_scaling:
            raise ClusterError(
                "the federation's feature statistics were not opened before a round "
                "(Server.open_feature_sums)"
            )

        if self._open_round is None:
            target = self.privacy.would_exceed_target() if self.privacy is not None else None
            if target:
                log.warning("stopping: one more round would exceed %s", target)
                return RoundOutcome({"round": self.round}, stop=True, stop_reason=target)
            if self._hosts_failed:  # hosts Ray is restarting serve this round, not fail it
                self._wait_for_restarting_hosts()
                self._hosts_failed = False
            self.round += 1
            self._open_round = {"start": time.perf_counter(), "retries": 0, "failed": 0}
        else:
            self._wait_for_restarting_hosts()
        state = self._open_round
        try:
            outcome = self._attempt(ray)
        except ClusterError:  # the sum did not open: the run stops at the last round
            self.round -= 1
            self._open_round = None
            raise
        state["failed"] += outcome.metrics["clients_failed"]
        if outcome.metrics["clients_ok"] + outcome.failed_in_sum < min_clients(self.cfg):
            state["retries"] += 1
            if state["retries"] > self.cfg.max_round_retries:
                self.round -= 1
                self._open_round = None
                if outcome.lost_hosts:
                    raise ClusterError(
                        f"round {self.round + 1}: client host(s) {outcome.lost_hosts} were "
                        "lost between their uploads and the sum's approvals, after "
                        f"{state['retries'] - 1} retries; completed rounds are in "
                        "metrics.csv and checkpoints/"
                    )
                raise ClusterError(
                    f"round {self.round + 1}: only {outcome.metrics['clients_ok']} clients "
                    f"answered (min_clients_per_round={min_clients(self.cfg)}) after "
                    f"{state['retries'] - 1} retries; completed rounds are in metrics.csv "
                    "and checkpoints/"
                )
            if not outcome.lost_hosts:  # (a lost host's warning is said)
                log.warning(
                    "round %d: %d clients answered, fewer than %d; retrying",
                    self.round,
                    outcome.metrics["clients_ok"],
                    min_clients(self.cfg),
                )
            self._hosts_failed = self._hosts_failed or bool(outcome.lost_hosts)
            outcome.retry = True
            return outcome
        self._open_round = None
        m = outcome.metrics
        m["clients_failed"] = state["failed"]
        m["retries"] = state["retries"]
        m["seconds"] = time.perf_counter() - state["start"]
        if self.privacy is not None:
            outcome.privacy_state = self.privacy.state_dict()
        return outcome

    def _wait_for_restarting_hosts(self, timeout: float = RESTART_WAIT_S) -> None:
        """Before a retry, wait for hosts Ray is restarting: a call to a restarting actor
        fails at once, so an immediate retry would only fail their clients again."""
        from fedray.runtime.cluster import call_when_available

        deadline = time.monotonic() + timeout
        for host in self.hosts:
            with contextlib.suppress(Exception):  # dead for good, or too slow: go on
                call_when_available(host.ready, timeout=max(0.1, deadline - time.monotonic()))

    def _attempt(self, ray) -> RoundOutcome:
        """One try at the round: sample, dispatch, fold what comes back, and release
        the aggregate if at least min_clients_per_round updates were accepted."""
        t_attempt = time.perf_counter()
        cohort = self._sample_cohort()
        pending = self._dispatch(ray, cohort)
        if self.codec is not None:
            from fedray.crypto.secure_aggregation import EncryptedSum, RejectedUpdate

            acc: Any = EncryptedSum(self.key.public, self.layout)
        else:
            RejectedUpdate = ValueError  # noqa: N806 - same role as the crypto exception
            acc = _PlainSum(keep_all=self.strategy.needs_individual_updates)
        dispatch_s = time.perf_counter() - t_attempt
        got = self._collect(ray, pending, acc, RejectedUpdate)
        metrics: dict[str, Any] = {
            "round": self.round,
            "dispatch_seconds": dispatch_s,
            "wait_seconds": time.perf_counter() - t_attempt - dispatch_s,
            "clients_ok": len(got.results),
            "clients_failed": got.failed + got.late,
            "clients_late": got.late,
            "clients_rejected": len(got.rejected),
        }
        results = got.results
        if len(results) < min_clients(self.cfg):
            if self.codec is None and self.privacy is not None:  # seen, though not released
                self.privacy.saw_in_clear([r.client_id for r in results])
            return RoundOutcome(metrics, rejected=got.rejected)
        if self.codec is not None:
            lost = self._lost_contributors(acc)
            if lost:  # nobody approved anything yet: the round can be tried again
                log.warning(
                    "round %d: client host(s) %s were lost after sending their updates and "
                    "before the sum was approved (nobody has approved it): trying the round again",
                    self.round,
                    lost,
                )
                # The lost hosts' clients failed; the others' updates are dropped unopened
                # and they train again in the retry (clients_ok 0 makes it a retry).
                metrics["clients_failed"] += sum(
                    1 for r in results if self.assignment.get(r.client_id) in lost
                )
                metrics["clients_ok"] = 0
                return RoundOutcome(metrics, rejected=got.rejected, lost_hosts=lost)
            acc.approvals = self._approvals(acc)  # ClusterError: the run stops here
        stats = self._release(acc, results, metrics)
        metrics["aggregate_seconds"] += got.aggregate_s
        failed_in_sum = self._failed_in_sum(stats, len(results))
        metrics["clients_ok"] -= failed_in_sum
        metrics["clients_failed"] += failed_in_sum
        metrics.update(round_metrics(self.cfg, stats))  # weight-weighted means; NaN under DP
        metrics.update(
            {
                "bytes_up": int(sum(r.bytes_up for r in results)),
                "bytes_to_key_holders": int(sum(r.bytes_to_key_holders for r in results)),
                # Updates sent: one per client, or one per host call with crypto.host_sum.
                "updates_up": int(sum(1 for r in results if r.bytes_up)),
                "bytes_down": int(self.weights.nbytes * len(cohort)),
                "train_seconds": sum(r.train_seconds for r in results),
                "encrypt_seconds": sum(r.encrypt_seconds for r in results),
                "epsilon": self.privacy.epsilon() if self.privacy is not None else None,
                "epsilon_vs_server": (
                    self.privacy.epsilon_vs_server() if self.privacy is not None else None
                ),
                # Values the codec clipped to +-crypto.clip, summed over the clients inside
                # the encrypted aggregate (0 without encryption: nothing is clipped then).
                "values_clipped": int(round(stats.get("values_clipped", 0.0))),
            }
        )
        t0 = time.perf_counter()
        metrics.update(self.evaluate())
        metrics["evaluate_seconds"] = time.perf_counter() - t0
        return RoundOutcome(
            metrics,
            client_nodes={r.client_id: r.node_id for r in results},
            rejected=got.rejected,
            failed_in_sum=failed_in_sum,
        )

    def _failed_in_sum(self, stats: dict[str, float], count: int) -> int:
        """How many of the opened sum's ``count`` clients failed: with encryption each
        failed client is a zero update counted in the encrypted ``clients_failed``, so
        this is all the server learns of failures (not which; under DP nothing: honest
        hosts send 0 there, and the field is ignored). The round is released either way:
        its sum is opened."""
        if self.codec is None or self.privacy is not None:
            return 0
        counted = int(round(stats.get("clients_failed", 0.0)))  # a slot: never negative
        failed = min(counted, count)  # honest hosts count 0 or 1 per client
        if failed != counted:
            log.warning(
                "round %d: the opened sum counts %d failed clients of %d (crafted by a "
                "client?); reported as %d",
                self.round,
                counted,
                count,
                failed,
            )
        if failed:
            log.warning(
                "round %d: %d of the sum's %d clients failed (which ones, and why, only "
                "their sites' logs say)",
                self.round,
                failed,
                count,
            )
        return failed

    def _sample_cohort(self) -> list[int]:
        """This attempt's clients: Poisson under client-level DP, else a fixed-size
        cohort (stratified over hosts in simulation mode)."""
        cfg = self.cfg
        cohort = self.privacy.sample_cohort(self.rng) if self.privacy is not None else None
        if cohort is None and self._groups is not None:
            cohort = sample_cohort_stratified(self.rng, self._groups, cfg.clients_per_round)
        elif cohort is None:
            cohort = sample_cohort(self.rng, cfg.num_clients, cfg.clients_per_round)
        return cohort

    def _dispatch(self, ray, cohort: list[int]) -> dict[Any, list[int]]:
        """Start the hosts' training calls; returns each call's ref and its clients."""
        weights_ref = ray.put(self.weights)  # one broadcast per round
        releases_ref = None
        if self._verify:  # the opened sums the hosts recompute this model from
            from fedray.runtime.lineage import model_digest

            releases_ref = ray.put(self.releases)
            self._round_model_sha256 = model_digest(self.weights)  # what holders attest
        # Sites take their DP plan and FedProx mu from their own config, not from here.
        options: dict[str, Any] = dict(self.strategy.client_options())
        by_host: dict[int, list[int]] = {}
        for cid in cohort:
            by_host.setdefault(self.assignment[cid], []).append(cid)
        pending: dict[Any, list[int]] = {}
        # With one encrypted update per client, two calls per host, so ciphertexts are
        # folded in while the rest still train. Otherwise (plaintext, or a host sealing
        # the sum of its clients) one call per host costs less.
        per_client = self.codec is not None and not self.cfg.crypto.host_sum
        # A padding host (federation.answer_after_s) answers each call no sooner than the
        # padding, one call at a time: one call each, or its second would come twice as late.
        padded = self.cfg.federation.answer_after_s > 0
        calls_per_host = 2 if per_client and not padded else 1
        for host, cids in by_host.items():
            size = max(1, math.ceil(len(cids) / calls_per_host))
            for i in range(0, len(cids), size):
                chunk = cids[i : i + size]
                ref = self.hosts[host].train.remote(
                    RoundTask(self.round, chunk, options, releases_ref), weights_ref
                )
                pending[ref] = chunk
        return pending

    def _collect(self, ray, pending: dict[Any, list[int]], acc, rejected_type) -> _Collected:
        """Fold each host's answer into ``acc`` as it arrives, until all answered or the
        round's deadline passed; failed, rejected and late clients are counted."""
        deadline = None
        if self.cfg.round_timeout_s is not None:
            deadline = time.monotonic() + self.cfg.round_timeout_s
        got = _Collected()
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not done:
                got.late = sum(len(c) for c in pending.values())
                log.warning("round %d: %d clients missed the deadline", self.round, got.late)
                break
            ref = done[0]
            chunk = pending.pop(ref)
            try:
                batch = self._fetch(ref)
            except Exception as exc:  # actor died or the call failed: those clients failed
                if _refused_the_model(exc):  # an honest host would have trained it
                    raise ClusterError(
                        f"round {self.round}: a client host refused the global model: "
                        f"{_first_line(exc)}; the run stops (completed rounds are in "
                        "metrics.csv and checkpoints/)"
                    ) from None
                got.failed += len(chunk)
                self._hosts_failed = True
                log.warning(
                    "round %d: clients %s failed: %s",
                    self.round,
                    chunk,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                )
                continue
            self._decompress(batch)
            self._fold_batch(acc, batch, chunk, rejected_type, got)
        return got

    def _fold_batch(self, acc, batch, chunk: list[int], rejected_type, got: _Collected) -> None:
        """One host call's results into ``acc`` (a bad one is rejected, not fatal)."""
        covered: dict[int, bool] = {}  # client -> was the update carrying it accepted
        # Updates first: a host's summed update precedes the clients it covers.
        for res in sorted(batch, key=lambda r: r.encrypted is None):
            if res.error:
                got.failed += 1
                got.rejected.append((res.client_id, res.error))
                log.warning("round %d: client %d failed: %s", self.round, res.client_id, res.error)
                continue
            t0 = time.perf_counter()
            try:
                self._fold(acc, res, rejected_type, covered, chunk)
            except rejected_type as exc:
                got.failed += 1
                got.rejected.append((res.client_id, str(exc)))
                log.warning("round %d: rejected client %d: %s", self.round, res.client_id, exc)
                continue
            finally:
                got.aggregate_s += time.perf_counter() - t0
                _drop_ciphertexts(res)
            got.results.append(res)

    def _release(self, acc, results: list[ClientResult], metrics: dict[str, Any]) -> dict:
        """Open the sum (crypto) or take it, add the server's DP noise, divide, step the
        global model and the accountant. Returns the round's summed statistics; puts the
        timings and the decryption path in ``metrics``."""
        decrypt_s = 0.0
        decrypted_by = None
        if self.privacy is not None:  # counted before any holder is asked to open it
            self.privacy.step([r.client_id for r in results])
        if self.codec is not None:
            t0 = time.perf_counter()
            plaintexts, decrypted_by = self._decrypt(acc)
            attestations = self._attest(acc, plaintexts) if self._verify else {}
            total, stats = self.layout.decode_sum(plaintexts, acc.count)
            decrypt_s = time.perf_counter() - t0
        else:
            stats = _plain_stats(results)
            total = None if acc.keep_all else acc.total
        t0 = time.perf_counter()
        if total is not None:
            from fedray.runtime.lineage import step

            if self.privacy is not None:
                total = self.privacy.server_noise(total, self.noise_rng)
            # DP: a fixed denominator qN, not the count (hosts checking models use theirs)
            denominator = self.privacy.denominator if self.privacy is not None else None
            try:  # the hosts' own check, so that a run without model checks stops too
                self.weights = step(
                    self.strategy,
                    self.weights,
                    total,
                    stats["weight"],
                    denominator,
                    int(acc.count) if self.codec is not None else None,
                )
            except ValueError as e:
                raise ClusterError(
                    f"round {self.round}: sum check failed: {e} (a client's update is "
                    "crafted or corrupt): the run stops; completed rounds are in "
                    "metrics.csv and checkpoints/"
                ) from None
        else:
            delta = self.strategy.aggregate(acc.deltas, acc.weights)
            self.weights = self.strategy.apply(self.weights, delta)
        if self._verify:
            self._record_release(acc, plaintexts, attestations)
        metrics.update(
            aggregate_seconds=time.perf_counter() - t0,
            decrypt_seconds=decrypt_s,
            decrypted_by=decrypted_by,
        )
        return stats

    def _job_sha256(self) -> str:
        """The job the key holders attest sums of: across organisations the declared
        job's digest (what every contribution signs), in one cluster ""."""
        if self.cfg.federation.name != "cross_org":
            return ""
        from fedray.federation.site import job_digest

        return job_digest(self.cfg)

    def _attest(self, acc, plaintexts: list[int]) -> dict[int, bytes]:
        """t key holders' signatures that ``plaintexts`` open this round's deposited
        updates (see ``KeyHolder.attest``); ClusterError if fewer attest it."""
        from fedray.crypto.threshold import ints_to_bytes
        from fedray.runtime.lineage import plaintext_width

        self._opened_bytes = ints_to_bytes(plaintexts, plaintext_width(self.key.public.n))
        exponents, self._exponents = self._exponents, None
        if exponents is None and self.key.threshold >= 2:
            raise ClusterError(
                f"round {self.round}: the sum was opened by partial decryptions, which key "
                "holders cannot check yet, and the hosts check every model against an "
                "attested sum (cluster.verify_models): the run stops; completed rounds are "
                "in metrics.csv and checkpoints/ (resume=true, or cluster.verify_models=false)"
            )
        from fedray.runtime.keys import digest, verify
        from fedray.runtime.lineage import release_message

        if self._holder_keys is None:  # public keys, fetched once
            refs = [h.attestation_key.remote() for h in self.key_holders]
            self._holder_keys = {}
            for j, ref in enumerate(refs, start=1):  # a loop: _fetch names its caller
                with contextlib.suppress(Exception):  # a dead holder attests nothing
                    self._holder_keys[j] = self._fetch(ref)
        message = release_message(
            self.key.fingerprint,
            self.round,
            self._round_model_sha256,
            acc.count,
            digest(self._opened_bytes),
            self._job_sha256(),
        )

        def valid(j: int, signature: Any) -> str | None:
            """A garbage answer (first, as it skips the work) must not take a place."""
            key = self._holder_keys.get(j)
            ok = (
                key is not None and isinstance(signature, bytes) and verify(key, signature, message)
            )
            return None if ok else "its attestation does not verify"

        return self._ask_holders(
            "attest",
            acc.update_ids,
            getattr(acc, "approvals", {}),
            self._payload_refs(acc),
            self._opened_bytes,
            exponents,
            need=self.key.threshold,
            check=valid,
        )

    def _record_release(self, acc, plaintexts: list[int], attestations: dict[int, bytes]):
        from fedray.runtime.lineage import Release

        self.releases.append(
            Release(
                self.round,
                self._round_model_sha256,
                int(acc.count),
                self._opened_bytes,
                dict(attestations),
            )
        )

    def _decompress(self, batch: list[ClientResult]) -> None:
        """Dense deltas from compressed plaintext updates (``compression=int8|topk``)."""
        if self.codec is not None or self.cfg.compression.name == "none":
            return
        from fedray.compression import decompress

        for res in batch:
            if res.compressed is None or res.error:
                continue
            try:
                res.delta = decompress(res.compressed, self.weights.size)
            except ValueError as exc:
                res.error = f"rejected compressed update: {exc}"
            res.compressed = None

    def _fold(
        self, acc, res: ClientResult, rejected_type, covered: dict[int, bool], chunk: list[int]
    ) -> None:
        """Fold one result in, or raise ``rejected_type``. ``covered`` records, per client
        in a host's summed update, whether that update was accepted (for its results
        without a payload); ``chunk`` is the clients this call was asked to train."""
        if self.codec is not None:
            enc = res.encrypted
            if enc is None:
                if res.delta is not None:
                    raise rejected_type("sent a plaintext update to an encrypted round")
                if res.client_id not in covered:
                    raise rejected_type("sent no encrypted update")
                if not covered[res.client_id]:
                    raise rejected_type("its host's summed update was rejected")
                return  # its update is inside an accepted sum from its host
            ids = tuple(enc.client_ids) or (res.client_id,)
            try:
                if (
                    res.client_id not in ids
                    or len(set(ids)) != len(ids)
                    or len(ids) != enc.count
                    or not set(ids) <= set(chunk)
                ):
                    raise rejected_type(
                        f"update of {enc.count} clients names {list(ids)}, not clients of this call"
                    )
                acc.add(enc, source=self.assignment[res.client_id])  # the host, to ask again
            except rejected_type:
                covered.update({i: False for i in ids if i != res.client_id})
                raise
            covered.update({i: True for i in ids if i != res.client_id})
            return
        delta = res.delta
        if not isinstance(delta, np.ndarray) or delta.dtype != np.float32:
            raise rejected_type(f"update must be a float32 vector, got {type(delta).__name__}")
        if delta.shape != self.weights.shape:
            raise rejected_type(
                f"update has shape {delta.shape}, the model has {self.weights.shape}"
            )
        if not np.all(np.isfinite(delta)):
            raise rejected_type("update has NaN or infinite values")
        if self.privacy is not None:
            self.privacy.check_clipped(delta, rejected_type)
        if not 0.0 < res.weight <= 1.0:
            raise rejected_type(f"weight {res.weight} outside (0, 1]")
        acc.add(delta, res.weight)

    def _fetch(self, ref) -> Any:
        """Everything the server receives from hosts and key holders comes through here
        (tests record it to check what the server learns)."""
        import ray

        return ray.get(ref)

    def _decrypt(self, acc, layout=None, unmasker=None) -> tuple[list[int], str]:
        """The summed plaintexts, and how they were opened.

        Threshold custody: ``share_sums`` (the fast path: t holders' sums of exponent
        shares) or else ``partial_decryption`` (t holders' ``c^(s_j)``). Shared custody:
        ``private_key`` (holders decrypt ranges of the sum).
        """
        layout = layout or self.layout
        unmasker = unmasker or self._unmasker
        self._exponents = None
        if unmasker is not None and all(acc.update_ids):
            try:
                return self._open_with_share_sums(acc, layout, unmasker), "share_sums"
            except BrokenProcessPool as exc:
                self._drop_opening_pool(exc)
            except (ClusterError, ValueError) as exc:
                log.warning(
                    "round %d: share sums did not open the sum (%s); asking for partial "
                    "decryptions",
                    self.round,
                    exc,
                )
        if self.key.threshold >= 2:
            plaintexts, how = self._combine_partials(acc), "partial_decryption"
        else:
            plaintexts, how = self._decrypt_with_private_key(acc, layout), "private_key"
        if not layout.fits(plaintexts):
            raise ClusterError(
                f"round {self.round}: the decrypted sum does not fit the packing (an update "
                "was not encoded by this job's codec); completed rounds are in metrics.csv"
            )
        return plaintexts, how

    def _drop_opening_pool(self, exc: BaseException) -> None:
        """A process of the opening pool died (the OOM killer, a signal): the pool is
        broken for good. This round's sum is opened by the next path, later ones
        in-process (the fast path still, only slower)."""
        pool, self._unmasker.pool = self._unmasker.pool, None
        log.warning(
            "round %d: a process of the server's opening pool died (%s); opening this sum "
            "by the next path, and later sums in-process",
            self.round,
            _first_line(exc),
        )
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.close()

    def _lost_contributors(self, acc) -> list[int]:
        """The hosts of the sum that no longer hold their sealed updates (dead, restarted,
        or across organisations disconnected), asked before any host approves: once one
        has approved, the round can never open another sum, so a host lost between its
        upload and its approval would stop the run (see :meth:`_approvals`)."""
        by_host: dict[int, list[str]] = {}
        for uid, h in zip(acc.update_ids, acc.sources, strict=True):
            by_host.setdefault(h, []).append(uid)
        refs = {h: self.hosts[h].holds.remote(self.round, ids) for h, ids in by_host.items()}
        lost = []
        for h, ref in refs.items():
            try:
                if self._fetch(ref) is not True:
                    lost.append(h)
            except Exception:  # dead
                lost.append(h)
        return sorted(lost)

    def _approvals(self, acc) -> dict[int, bytes]:
        """Each host with an update in the sum signs the sum's list of updates (once per
        round: see ``ClientHost.approve``); key holders open only a sum every one of its
        hosts approved. ClusterError if a host does not answer."""
        ids = list(acc.update_ids)
        refs = {h: self.hosts[h].approve.remote(self.round, ids) for h in sorted(set(acc.sources))}
        approvals: dict[int, bytes] = {}
        for h, ref in refs.items():
            try:
                approvals[h] = self._fetch(ref)
            except Exception as exc:
                # The others have signed this round's list and sign no other, so the
                # round cannot be retried with another cohort: the run stops here.
                raise ClusterError(
                    f"round {self.round}: client host {h} did not approve the sum "
                    f"({_first_line(exc)}); the other hosts approved this round's cohort "
                    "and sign no other, so the round cannot be retried: resume from the "
                    "last checkpoint (resume=true)"
                ) from None
        return approvals

    def _ask_holders(self, method: str, *args, need: int, check=None) -> dict[int, Any]:
        """Call ``method`` on every key holder; the first ``need`` answers, by holder index
        (with ``check``: answers it finds no fault with, ``check(j, answer)`` -> why not)."""
        import ray

        pending = {
            getattr(h, method).remote(self.round, *args): j
            for j, h in enumerate(self.key_holders, start=1)
        }
        answers: dict[int, Any] = {}
        refusals = []
        while pending and len(answers) < need:
            done, _ = ray.wait(list(pending), num_returns=1)
            j = pending.pop(done[0])
            try:
                answer = self._fetch(done[0])
            except Exception as exc:  # a dead holder, or one that refuses: ask the others
                refusals.append(f"holder {j}: {_first_line(exc)}")
                continue
            fault = check(j, answer) if check is not None else None
            if fault:
                refusals.append(f"holder {j}: {fault}")
            else:
                answers[j] = answer
        for ref in pending:  # answers past the t-th are not needed
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if len(answers) < need:
            raise ClusterError(
                f"round {self.round}: only {len(answers)} of {len(self.key_holders)} key "
                f"holders answered, {need} needed ({'; '.join(refusals)})"
            )
        return answers

    def _open_with_share_sums(self, acc, layout, unmasker) -> list[int]:
        sums = self._ask_holders(
            "share_sum", acc.update_ids, getattr(acc, "approvals", {}), need=self.key.threshold
        )
        exponents = unmasker.exponents(sums, len(acc.update_ids))
        plaintexts = unmasker.unmask(acc.ciphertexts(), exponents)
        if plaintexts is None or not layout.fits(plaintexts):
            raise ValueError("the summed exponents do not open the summed ciphertexts")
        self._exponents = exponents  # key holders check the opened sum with them
        return plaintexts

    def _combine_partials(self, acc) -> list[int]:
        from fedray.crypto.threshold import combine_partial_decryptions

        partials = self._ask_holders(
            "partial_decrypt",
            acc.update_ids,
            getattr(acc, "approvals", {}),
            self._payload_refs(acc),
            need=self.key.threshold,
        )
        return combine_partial_decryptions(self.key, partials)

    def _payload_refs(self, acc) -> list:
        """A reference per update to its ciphertexts, kept by the host that sealed it (the
        server keeps none). Passed in a list, so Ray hands the key holders the references,
        which they fetch one at a time, rather than every payload at once."""
        return [
            self.hosts[host].sealed_payload.remote(self.round, update_id)
            for update_id, host in zip(acc.update_ids, acc.sources, strict=True)
        ]

    def _decrypt_with_private_key(self, acc, layout) -> list[int]:
        """Shared custody: each holder decrypts a range of the sum, all ranges asked at
        once; a range whose holder failed is asked of the next holders in turn."""
        num = layout.num_ciphertexts
        holders = list(self.key_holders)
        refs = self._payload_refs(acc)
        parts = min(len(holders), num)
        bounds = np.linspace(0, num, parts + 1).astype(int)
        ranges = [(int(bounds[i]), int(bounds[i + 1])) for i in range(parts)]

        def ask(i: int, k: int):
            lo, hi = ranges[i]
            holder = holders[(i + k) % len(holders)]
            return holder.partial_decrypt.remote(
                self.round, acc.update_ids, getattr(acc, "approvals", {}), refs, lo, hi
            )

        pending = [ask(i, 0) for i in range(parts)]
        plaintexts: list[int] = []
        for i, ref in enumerate(pending):
            for k in range(len(holders)):  # that holder died: any other can decrypt it
                try:
                    plaintexts.extend(self._fetch(ref if k == 0 else ask(i, k)))
                    break
                except Exception as exc:
                    last = exc
            else:
                raise ClusterError(f"round {self.round}: no key holder decrypted: {last}")
        return plaintexts

    def evaluate(self) -> dict[str, float]:
        """Central test-set loss and accuracy of the current global model (the task's)."""
        if self.test is None:
            return {"test_loss": float("nan"), "test_accuracy": float("nan")}
        self.view.set(self.weights)
        m = self.task.evaluate(self.model, self.test)
        return {"test_loss": float(m["loss"]), "test_accuracy": float(m["accuracy"])}


def server_actor_class(server_class: type | None = None):
    """Ray actor form of :class:`Server`. It uses a fraction of a CPU: it mostly waits."""
    import ray

    return ray.remote(num_cpus=0)(server_class or Server)
