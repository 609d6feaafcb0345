"""Client actors: each hosts one client (silo mode) or many virtual clients (simulation).

A ``ClientHost`` loads its clients' data inside its own process and keeps it, and one
model replica, for the whole run; per-client state stays here between rounds. One call
trains a list of clients, so a thousand clients need only as many processes as cores.
The class is plain Python (testable without Ray); :data:`ClientActor` is its Ray form.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np

from fedray.config import FedrayConfig
from fedray.data.datasets import DatasetInfo
from fedray.privacy.mechanisms import count_clipped
from fedray.runtime.lineage import model_digest  # noqa: F401 - signed with each update
from fedray.runtime.round_stats import (
    client_statistics,
    failed_statistics,
    metrics_released,
)
from fedray.tasks.base import client_seed

log = logging.getLogger("fedray.client")

DEPOSIT_TIMEOUT_S = 30.0


@dataclass
class RoundTask:
    """What the server asks of a client host for one round."""

    round: int
    client_ids: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    # With model checks: the opened sums since the chain's start (fedray.runtime.lineage
    # Release records; an ObjectRef to their list, put once per round).
    releases: Any = None


@dataclass
class ClientResult:
    """One client's answer: a plaintext delta or an encrypted update, plus metrics.

    ``stats`` are the client's round statistics (:mod:`fedray.runtime.round_stats`) in a
    plaintext round; with crypto they travel inside the encrypted update and this is None.
    No example count travels either way. Fields after ``client_id`` are keyword-only."""

    client_id: int
    _: KW_ONLY
    weight: float = 0.0
    delta: np.ndarray | None = None
    encrypted: Any = None
    compressed: Any = None  # a fedray.compression.CompressedUpdate instead of ``delta``
    stats: dict[str, float] | None = None
    train_seconds: float = 0.0
    encrypt_seconds: float = 0.0
    bytes_up: int = 0
    bytes_to_key_holders: int = 0
    node_id: str = ""
    error: str | None = None


PARALLEL_MIN_CIPHERTEXTS = 1000  # ~0.35 s in one process: below that a pool does not pay


def crypto_processes(cfg: FedrayConfig, num_ciphertexts: int) -> int:
    """Processes a host spreads one update's encryption over (``crypto.processes``).

    Automatic (null): as many as the host's whole CPUs when an update has at least
    PARALLEL_MIN_CIPHERTEXTS ciphertexts, else 1 (in-process, with precomputation).
    """
    if cfg.crypto.processes is not None:
        return cfg.crypto.processes
    if num_ciphertexts < PARALLEL_MIN_CIPHERTEXTS:
        return 1
    return max(1, int(cfg.client.num_cpus or 1))


class ClientHost:
    """Hosts clients: their data, a model replica, encryption, key-holder decrypt.

    Training and evaluation are the task's (:mod:`fedray.tasks`); the host runs them.
    """

    def __init__(
        self,
        cfg: FedrayConfig,
        client_ids: list[int],
        info: DatasetInfo,
        weight_ref: float = 1.0,
        authority: bytes | None = None,
    ):
        """``authority``: the driver's set-up public key; with crypto on, the host accepts
        only a key and key holders that the driver signed (see ``configure_crypto``)."""
        self._init_error: str | None = None
        try:
            self._setup(cfg, client_ids, info, weight_ref, authority)
        except Exception as exc:  # reported by ready() as one line, not a restart loop
            self._init_error = f"{type(exc).__name__}: {exc}".splitlines()[0]

    def _setup(self, cfg, client_ids, info, weight_ref, authority) -> None:
        import torch

        from fedray.models import ParamView
        from fedray.tasks.base import build_task, build_task_model, train_keywords

        self.cfg = cfg
        self.client_ids = list(client_ids)
        self.weight_ref = weight_ref
        threads = max(1, int(cfg.client.num_cpus or 1))
        torch.set_num_threads(threads)
        self.device = torch.device(
            "cuda" if cfg.client.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        )
        # The task (fedray/tasks/) owns data, model and the training step; this host owns
        # the sites' state, the exchanged-parameter view and the crypto.
        self.task = build_task(cfg, info)
        self.task.device = self.device
        # Refuse now, not every round, a job option the task's train() cannot honour.
        train_keywords(
            self.task,
            {
                "proximal_mu": cfg.strategy.proximal_mu,
                "privacy": cfg.privacy.name == "dp" and cfg.privacy.mode == "sample",
            },
        )
        self.data = {cid: self.task.load_data(cid, cfg.num_clients) for cid in self.client_ids}
        self.model = build_task_model(self.task, cfg.seed)
        self.view = ParamView(self.model, cfg.model.trainable)
        # The chain of global models starts here: this site's own build of the model.
        self._initial_weights = self.view.get().copy()
        self._lineage = None
        self._encryptor = None
        self._private = None
        self._key = None
        self._holders: list[Any] = []
        self._host_index = -1
        self._parallel = None
        self._to_seal: dict[int, tuple[np.ndarray, float, Any, dict]] = {}
        # This round's sealed updates (update id -> ciphertext bytes), for the key
        # holders' slow paths: the server keeps no update's bytes (see sealed_payload).
        self._sealed: dict[str, bytes] = {}
        self._signed: dict[str, Any] = {}  # update id -> its SignedContribution, same round
        self._sealed_round = -1
        self._busy = False
        self._set_up_closed = False  # see _check_set_up_open
        self._precompute_thread: threading.Thread | None = None
        self._authority = authority
        self._identity = None
        self._job_sha256 = ""  # across organisations: its site's declared job (SiteHost)
        self._model_sha256 = ""
        self._plan = None  # the DP plan: built with the codec when crypto is configured
        # dataset.standardize=global / missing=impute_mean: the data waits, raw, for the
        # federation's FeatureScaling (set_feature_scaling); no training before it.
        from fedray.config import needs_feature_statistics

        self._needs_scaling = needs_feature_statistics(cfg)
        self._scaling: dict[str, Any] | None = None
        self._feature_sums_given = False
        try:
            import warnings

            import ray

            # Ray 2.60's own property reads its deprecated ``actor_id``: every host printed
            # a RayDeprecationWarning it could do nothing about.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
        except Exception:  # plain use, outside an actor
            restarted = False
        # A host Ray restarted starts from its constructor's arguments (weight_ref 1.0):
        # it trains nothing until the driver has set it up again (see ``trainable``).
        self._awaiting_weight_ref = bool(restarted)
        if restarted:  # by Ray, while the server runs: no unsigned set-up call answers
            self._set_up_closed = True
        if cfg.crypto.name == "paillier":
            from fedray.runtime.keys import CohortApprover, HostIdentity

            self._identity = HostIdentity()  # made here; only its public half ever leaves
            self._approver = CohortApprover(self._identity)  # one sum per round: approve

    # -- set-up -------------------------------------------------------------------------
    def identity(self) -> tuple[bytes, bool]:
        """This host's public signing key, and whether its crypto is configured (a
        restarted host is not: the driver registers it again)."""
        if self._identity is None:
            raise RuntimeError("this host runs without encryption")
        return self._identity.public_bytes(), self._encryptor is not None

    def trainable(self) -> bool:
        """Whether this host is set up to train: with crypto, its key and key holders
        configured; in every mode, its weight_ref set again after a restart. The driver
        asks this to find hosts that Ray restarted (they fail closed until set up)."""
        if self._identity is not None and self._encryptor is None:
            return False
        return not self._awaiting_weight_ref and not self._awaiting_scaling

    def install_private_key(self, private: Any) -> bool:
        """Shared custody only: the key dealer gives every host the private key. Once."""
        from fedray.crypto.paillier import PrivateKey

        if self.cfg.crypto.custody != "shared" or not isinstance(private, PrivateKey):
            raise PermissionError("a private key is accepted only in crypto.custody=shared")
        if self._private is not None or self._encryptor is not None:
            raise PermissionError("this host already has its key")
        self._private = private
        return True

    def configure_crypto(
        self,
        key: Any,
        holders: list[Any],
        host_index: int,
        signature: bytes,
        holder_keys: dict[int, bytes] | None = None,
        root: dict[str, Any] | None = None,
    ) -> bool:
        """Take the public key and the key holders to deposit with, as the driver signed.

        Unsigned (or signed for other holders) it is refused: a host must never give its
        exponent shares to holders the server picked. With model checks
        (``cluster.verify_models``), ``holder_keys`` are the holders' attestation keys and
        ``root`` where this host's chain of models starts (see :mod:`fedray.runtime.lineage`),
        signed with the rest.
        """
        from fedray.crypto.secure_aggregation import ClientEncryptor, UpdateLayout, codec_for
        from fedray.runtime.keys import configure_message, verify
        from fedray.runtime.lineage import root_message, verifies_models

        if self._identity is None or self._authority is None:
            raise PermissionError("this host was started without crypto")
        holder_ids = [h._actor_id.hex() for h in holders]
        message = configure_message(
            key.fingerprint,
            int(host_index),
            holder_ids,
            holder_keys,
            None if holder_keys is None else root_message(key.fingerprint, host_index, root),
        )
        if not verify(self._authority, signature, message):
            raise PermissionError("crypto configuration not signed by the job's set-up key")
        if verifies_models(self.cfg) and holder_keys is None:
            raise PermissionError(
                "this site checks global models (cluster.verify_models) and was given no "
                "key holders' attestation keys"
            )
        if self._encryptor is not None:
            raise PermissionError("this host's crypto is already configured")
        private = self._private
        if private is not None and private.public != key.public:
            raise PermissionError("the installed private key is not this job's key")
        self._key, self._holders, self._host_index = key, list(holders), int(host_index)
        self._set_up_closed = True  # the server may exist from here on
        self.codec = codec_for(self.cfg, key.public, self.view.size)
        self.layout = UpdateLayout.for_key(key.public, self.codec)
        if holder_keys is not None:
            from fedray.runtime.lineage import Lineage

            self._lineage = Lineage(
                self.cfg,
                key,
                self.layout,
                holder_keys,
                self._initial_weights,
                root,
                job_sha256=self._job_sha256,
            )
        processes = crypto_processes(self.cfg, self.layout.num_ciphertexts)
        if processes > 1:
            from fedray.crypto.paillier import window_for
            from fedray.crypto.parallel import ParallelCrypto

            self._parallel = ParallelCrypto(
                key,
                processes,
                private=private,
                obfuscator=self.cfg.crypto.obfuscator,
                window=window_for(self.layout.num_ciphertexts),
            )
        self._encryptor = ClientEncryptor(
            key,
            self.layout,
            private=private,
            obfuscator=self.cfg.crypto.obfuscator,
            share=self.cfg.crypto.custody == "threshold" and self.cfg.crypto.fast_decrypt,
            pool=self._parallel,
        )
        # Obfuscators for the ciphertexts this host expects to make per round (x1.5):
        # one update per call with crypto.host_sum, else one per sampled client.
        per_round = len(self.client_ids) * self.cfg.clients_per_round / self.cfg.num_clients
        if self.cfg.crypto.host_sum:
            per_round = min(per_round, 1.0)
        self._pool_target = min(
            100_000, math.ceil(1.5 * per_round + 1) * self.layout.num_ciphertexts
        )
        # The DP plan needs the codec's grid: built here, never before (a plan cached
        # without it would add no noise to the encrypted updates).
        self._plan = None
        self._privacy_plan()
        self._precompute_in_background()
        return True

    def _precompute_in_background(self) -> None:
        """Fill the obfuscator pool while this host is idle; a train call stops it at once."""
        enc = self._encryptor
        if enc is None or enc.pool_size >= self._pool_target:
            return
        if self._precompute_thread is not None and self._precompute_thread.is_alive():
            return
        self._precompute_thread = threading.Thread(
            target=enc.precompute,
            args=(self._pool_target - enc.pool_size, lambda: self._busy),
            name="fedray-obfuscators",
            daemon=True,
        )
        self._precompute_thread.start()

    def ready(self) -> bool | str:
        """True once set up, else the error that stopped the set-up (bad data, bad key)."""
        if self._init_error is not None:
            msg = self._init_error
            for prefix in ("DataError: ", "ConfigError: "):
                msg = msg.removeprefix(prefix)
            return msg
        return True

    def set_weight_ref(self, weight_ref: float, signature: bytes | None = None) -> bool | str:
        """Example count that maps to weight 1.0, known to every host (not told to the
        server, and no count in the round statistics gives it away). True, or why it is
        refused (a public ``dataset.weight_ref`` below a hosted client's count would cap its
        FedAvg weight at 1 and weigh the federation wrongly).

        Given the driver's set-up key (every job the driver runs) it must be signed by it:
        a server that could set another site's weight_ref to 1e12 would zero that site's
        weighted update and read a victim's update alone out of a two-site "sum", or set a
        restarted host's weight_ref itself and read example counts from its weights.
        """
        if self._authority is not None:
            from fedray.runtime.keys import verify, weight_ref_message

            if not verify(self._authority, signature or b"", weight_ref_message(weight_ref)):
                raise PermissionError("weight_ref not signed by the job's set-up key")
        else:
            self._check_set_up_open("set_weight_ref")
        largest = max(float(len(train)) for train, _ in self.data.values())
        if largest > weight_ref:
            return (
                f"dataset.weight_ref={weight_ref:g} is below the example count of a client "
                "of this site; set it to at least the largest site's count, or null"
            )
        self.weight_ref = float(weight_ref)
        self._awaiting_weight_ref = False
        self._set_up_closed = True  # the server exists only after this: it cannot ask
        return True

    @property
    def _awaiting_scaling(self) -> bool:
        return self._needs_scaling and self._scaling is None

    def feature_sums(self, round_num: int = 0) -> ClientResult:
        """This host's clients' summed feature statistics (their training rows'
        non-empty cells, sums and sums of squares, per feature, each over weight_ref),
        once per job, before its first round; the server opens their sum over the hosts
        (see :class:`~fedray.data.datasets.FeatureScaling`).

        With crypto they are sealed as a round's update is: encrypted, signed and
        deposited with the key holders for round 0, whose one sum every host approves
        (:meth:`approve`); the server sees only the federation's sums. Without crypto
        they go in the clear, as updates do."""
        from fedray.crypto.secure_aggregation import feature_sums_codec

        self._refuse_if_not_set_up(scaled=False)
        if not self._needs_scaling or int(round_num) != 0:
            raise PermissionError(
                "feature sums are given once, for round 0, and only in a job with "
                "dataset.standardize=global or dataset.missing=impute_mean"
            )
        if self._feature_sums_given or self._scaling is not None:
            raise PermissionError("this host has given its feature sums (once per job)")
        self._feature_sums_given = True
        ids = tuple(self.client_ids)
        # Over weight_ref, as the FedAvg weights are: a summed count of rows beside the
        # summed weight would give the server weight_ref (the largest site's size).
        total = np.sum([self.task.feature_sums(self.data[cid]) for cid in ids], axis=0)
        total = total / float(self.weight_ref)
        result = ClientResult(ids[0], node_id=self.node_id())
        if self._encryptor is None:
            result.delta = np.asarray(total, dtype=np.float64)
            return result
        codec = feature_sums_codec(self.cfg, self._key.public, len(total) // 3)
        try:
            plaintexts = codec.encode(total)
        except ValueError as exc:
            raise ValueError(f"this site's feature sums cannot be sealed: {exc}") from None
        with self._on_the_clock():
            update, shares = self._encryptor.encrypt_plaintexts(plaintexts)
        update.num_values, update.client_ids = codec.num_values, ids
        self._seal_for_round(0)
        self._model_sha256 = ""
        accepted = self._await_deposits(self._deposit(0, update, shares))
        if accepted < self._key.threshold:
            raise RuntimeError(
                f"only {accepted} key holders accepted this host's feature sums "
                f"({self._key.threshold} needed)"
            )
        self._sealed[update.update_id] = update.ciphertexts
        result.encrypted = update
        return result

    def set_feature_scaling(self, scaling: dict[str, Any], signature: bytes) -> bool:
        """Prepare every hosted client's data with the federation's scaling (opened from
        the feature sums), as the driver signed it: the server cannot give sites
        different ones. Once; the same again is a no-op (a restarted host is sent it
        again)."""
        from fedray.data.datasets import FeatureScaling
        from fedray.runtime.keys import scaling_message, verify

        if not self._needs_scaling:
            raise PermissionError("this job prepares no data with federation-wide statistics")
        if self._authority is None or not verify(
            self._authority, signature, scaling_message(scaling)
        ):
            raise PermissionError("feature scaling not signed by the job's set-up key")
        if self._scaling is not None:
            if scaling_message(scaling) != scaling_message(self._scaling):
                raise PermissionError("this host's data is already prepared, with another scaling")
            return True
        prepared = FeatureScaling.from_dict(scaling)
        self.data = {cid: self.task.prepare(d, prepared) for cid, d in self.data.items()}
        self._scaling = dict(scaling)
        return True

    def _check_set_up_open(self, method: str) -> None:
        """Set-up calls answer the driver only, before the server exists (the server
        holds this host's handle and could otherwise read per-site sizes through them).
        A host Ray restarts is open again until its first round."""
        if getattr(self, "_set_up_closed", False):
            raise PermissionError(f"{method} is a set-up call; set-up is over")

    def node_id(self) -> str:
        import ray

        if not ray.is_initialized():  # plain use outside Ray: do not start one
            return ""
        return ray.get_runtime_context().get_node_id()

    def describe(self) -> dict[int, dict[str, Any]]:
        """Each hosted client's placement; sizes and label histograms only if the user
        opted in with ``dataset.share_label_counts=true`` (else they stay on the site)."""
        node = self.node_id()
        import ray

        gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        out = {}
        for cid, (train, val) in self.data.items():
            out[cid] = {
                "node_id": node,
                "device": str(self.device),
                "gpu_ids": gpu_ids,
                "pid": os.getpid(),
            }
            if self.cfg.dataset.share_label_counts:  # the task's metadata (label counts)
                out[cid].update(
                    num_examples=len(train),
                    num_val=0 if val is None else len(val),
                    **self.task.describe(train, val),
                )
        return out

    def running_max_examples(self, so_far: float = 0.0) -> float:
        """max(``so_far``, this host's largest client's example count): one link of the
        chain along which hosts find weight_ref (see the driver)."""
        self._check_set_up_open("running_max_examples")
        return max(float(so_far), *(float(len(train)) for train, _ in self.data.values()))

    def dp_client_sizes(self) -> dict[int, int]:
        """Each hosted client's example count: only for sample-level DP's accountant."""
        self._check_set_up_open("dp_client_sizes")
        if not (self.cfg.privacy.name == "dp" and self.cfg.privacy.mode == "sample"):
            raise PermissionError("dp_client_sizes answers only with privacy.mode=sample")
        return {cid: len(train) for cid, (train, _) in self.data.items()}

    # -- one round ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_the_clock(self):
        """Real work (training, decryption): the precompute thread yields, then resumes."""
        self._busy = True
        try:
            yield
        finally:
            self._busy = False
            self._precompute_in_background()

    def train(self, task: RoundTask, global_weights: np.ndarray) -> list[ClientResult]:
        """Train each listed client from the global weights; return their updates.

        Fails closed: a host whose crypto is not configured (Ray restarted it and the
        driver has not set it up again) or whose weight_ref was lost refuses the call
        before it trains, so nothing of its clients reaches the server in the clear."""
        came = time.monotonic()
        self._refuse_if_not_set_up()
        if self._lineage is not None:
            self._check_lineage(task, global_weights)
        # Signed with each update: key holders sum only updates of the same model.
        self._model_sha256 = model_digest(global_weights)
        self._set_up_closed = True
        self._seal_for_round(task.round)
        results: list[ClientResult] = []
        try:
            with self._on_the_clock():
                results = self._train_many(task, global_weights)
        finally:  # a call that fails answers no sooner than one that trained
            self._pad(results, came)
        return results

    def _pad(self, results: list[ClientResult], came: float) -> None:
        """``federation.answer_after_s`` in one cluster: answer no sooner than that after
        the call came, with no train or encrypt seconds, so when a host answers does not
        tell how its clients' training went (a client that fails early). Across
        organisations the site's agent pads (from the request's arrival) instead."""
        pad = float(self.cfg.federation.answer_after_s)
        if pad <= 0 or self.cfg.federation.name != "none":
            return
        for r in results:
            r.train_seconds = r.encrypt_seconds = 0.0
        time.sleep(max(0.0, pad - (time.monotonic() - came)))

    def _seal_for_round(self, round_num: int) -> None:
        """The sealed updates kept for the key holders' slow paths (and their signed
        contributions) are one round's: a new round drops the last one's, opened by now."""
        if round_num != self._sealed_round:
            self._sealed.clear()
            self._signed.clear()
            self._sealed_round = round_num

    def check_model(self, task: RoundTask, global_weights: np.ndarray) -> bool:
        """The model checks alone, without training (True, or LineageError): a site's
        agent asks this before the round counts in its policy and record, so a crafted
        model spends nothing of them. ``train`` checks again (the sums taken here stay
        taken). A host that is not set up (restarted) refuses as ``train`` would, and
        one of a job with model checks but without its chain refuses too."""
        from fedray.runtime.lineage import verifies_models

        self._refuse_if_not_set_up()
        if self._lineage is None:
            if self._encryptor is not None and verifies_models(self.cfg):
                raise PermissionError("this host's model checks are not set up")
            return True
        self._check_lineage(task, global_weights)
        return True

    def _refuse_if_not_set_up(self, scaled: bool = True) -> None:
        if self._identity is not None and self._encryptor is None:
            raise PermissionError(
                "this host's crypto is not configured (restarted); it trains again once "
                "the driver has set it up"
            )
        if self._awaiting_weight_ref:
            raise PermissionError(
                "this host was restarted and has no weight_ref yet; it trains again once "
                "the driver has set it up"
            )
        if scaled and self._awaiting_scaling:
            raise PermissionError(
                "this host's data is not prepared yet (dataset.standardize=global or "
                "dataset.missing=impute_mean: it waits for the federation's feature "
                "statistics); it trains once the driver has sent them"
            )

    def _check_lineage(self, task: RoundTask, global_weights: np.ndarray) -> None:
        """Refuse, before training, a global model that is not the next link of the chain
        this host recomputes (one log line here names the round and the check)."""
        from fedray.runtime.lineage import LineageError

        releases = task.releases
        if releases is not None and not isinstance(releases, list | tuple):
            import ray

            releases = ray.get(releases)
        from fedray.runtime.lineage import min_client_weight

        self._lineage.min_client_weight = min_client_weight(
            self.weight_ref, self._lineage.layout.stats.frac_bits
        )
        try:
            self._lineage.check(int(task.round), global_weights, list(releases or []))
        except LineageError as exc:
            log.error("refusing to train: %s", exc)
            raise
        except Exception as exc:  # malformed records: refused the same way
            log.error(
                "refusing to train: round %d: lineage records unreadable: %s", task.round, exc
            )
            raise LineageError(
                f"round {task.round}: lineage check failed: unreadable records ({exc})"
            ) from None

    def approve(self, round_num: int, update_ids: list[str]) -> bytes:
        """Sign the list of updates of the sum the server will have opened this round.

        Once per round: the same list again gets the same signature, any other list is
        refused, so two different sums of one round that hold this host's update can
        never both be opened (key holders open a sum only if every host in it approved
        exactly it; see :mod:`fedray.runtime.keys`). Only a list that holds an update
        this host sealed this round is signed."""
        if self._identity is None or self._key is None:
            raise PermissionError("this host's crypto is not configured")
        return self._approver.approve(
            self._key.fingerprint, round_num, update_ids, self._sealed_of(round_num)
        )

    def holds(self, round_num: int, update_ids: list[str]) -> bool:
        """Whether this process sealed these updates this round and can still approve a
        sum of them (a host Ray restarted holds none): the server asks every host of the
        sum before any is asked to approve it."""
        own = self._sealed_of(round_num)
        return self._approver is not None and all(str(u) in own for u in update_ids)

    def _sealed_of(self, round_num: int) -> dict[str, bytes]:
        """The updates this process sealed in ``round_num`` (it keeps its latest round's)."""
        return self._sealed if int(round_num) == self._sealed_round else {}

    def sealed_payload(self, round_num: int, update_id: str) -> bytes:
        """The ciphertexts of an update this host sealed this round, again.

        The server folds each update into its sum and drops the bytes; when the sum must
        be opened the slow way, it hands the key holders references to these instead
        (they check them against the signed digest). Nothing the server has not seen."""
        sealed = self._sealed_of(round_num).get(str(update_id))
        if sealed is not None:
            return sealed
        raise LookupError(
            f"round {round_num}: this host holds no sealed update {update_id!r} (it keeps "
            f"those of its latest round only, {self._sealed_round}, and not after a restart)"
        )

    def _train_many(self, task: RoundTask, global_weights: np.ndarray) -> list[ClientResult]:
        node = self.node_id()
        results = []
        self._to_seal.clear()
        for cid in task.client_ids:
            t0 = time.perf_counter()
            self._evaluated = None  # (cid, its validation figures) once it has them
            try:
                result = self._train_one(cid, task, global_weights)
            except Exception as exc:  # one client's failure must not sink its neighbours
                self._to_seal.pop(cid, None)
                result = ClientResult(cid, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            if result.error is not None and self._encryptor is not None:
                result = self._failed_in_the_sum(task, result)
            result.train_seconds = time.perf_counter() - t0
            result.node_id = node
            results.append(result)
        if self._encryptor is not None:
            try:
                self._seal(task, results)
            finally:
                self._to_seal.clear()  # no plaintext update outlives the call
        return results

    def _failed_in_the_sum(self, task: RoundTask, failed: ClientResult) -> ClientResult:
        """With encryption, a client whose training failed goes into the sum as a zero
        update with the weight it would have had, counting 1 in the encrypted
        ``clients_failed`` (not released under DP), and under distributed DP with its
        noise share: the summed weight and the noise are those of a round where it
        trained. The server opens only the count: which clients failed, and why, stays in
        this log. A crafted model that makes training fail only on some data thus tells
        the server how many of a sum's clients have it (under DP, nothing), not which.

        If the zero update cannot be made, the whole call fails (no reason attached)."""
        cid = failed.client_id
        log.warning("round %d: client %d failed: %s", task.round, cid, failed.error)
        try:
            zero = np.zeros(self.view.size, dtype=np.float32)
            zero, noise, weight = self._weighted(cid, task.round, zero, self._privacy_plan())
        except Exception as exc:  # no zero update without its noise: nothing is sealed
            self._to_seal.clear()
            raise RuntimeError(
                f"round {task.round}: this call's updates could not be sealed "
                f"({type(exc).__name__})"
            ) from None
        self._to_seal[cid] = (zero, weight, noise, self._failed_statistics(cid, weight))
        return ClientResult(cid, weight=weight)

    def _failed_statistics(self, cid: int, weight: float) -> dict[str, float]:
        """A failed client's figures, alike in every weight to a client that trained:
        its validation figures from before training (0 if they could not be had), a
        training loss reported as 0 (as a non-finite one is) where the task reports
        losses, and 1 in ``clients_failed`` (not under DP). So no summed weight tells
        which clients failed."""
        evaluated = None
        last = getattr(self, "_evaluated", None)
        if last is not None and last[0] == cid:
            evaluated = last[1]
        elif self._validates(self.data[cid][1]):  # its evaluation failed: sent as 0
            evaluated = (math.nan, math.nan)
        loss = math.nan if getattr(self, "_reports_loss", True) else None
        stats = client_statistics(self.cfg, weight, loss, evaluated, 0)
        return {**stats, **failed_statistics(self.cfg)}

    def _weighted(self, cid: int, round_num: int, delta: np.ndarray, privacy: Any) -> tuple:
        """A client's update as it is sealed, (delta, noise share or None, weight): under
        client-level DP clipped, with its noise share, and weight 1 (uniform weights keep
        the sensitivity bound C); else as it is, weighted by its examples over weight_ref
        (at most 1)."""
        if privacy is None or getattr(privacy, "mode", None) == "sample":
            return delta, None, min(1.0, len(self.data[cid][0]) / self.weight_ref)
        from fedray.privacy.dp import privatize_update

        seed = client_seed(self.cfg.seed + 7919, round_num, cid)
        delta, noise = privatize_update(delta, privacy, seed)
        return delta, noise, 1.0

    def _train_one(self, cid: int, task: RoundTask, global_weights: np.ndarray) -> ClientResult:
        """One client's local round through the task: evaluate, train, take the delta."""
        from fedray.tasks.base import train_keywords

        opts = task.options
        train, val = self.data[cid]
        self.view.set(global_weights)
        result = ClientResult(cid, weight=1.0)
        evaluated = self._validate(val)
        self._evaluated = (cid, evaluated)  # a failed client still reports these
        del opts  # the server's options are not trusted for anything that protects a site
        privacy = self._privacy_plan()
        sample_dp = getattr(privacy, "mode", None) == "sample"
        offered = {
            "epochs": self.cfg.local_epochs,
            "lr": self.cfg.lr,
            "seed": client_seed(self.cfg.seed, task.round, cid),
            "round_num": task.round,
            "client_id": cid,
            "proximal_mu": float(self._strategy_options().get("proximal_mu", 0.0)),
            "privacy": privacy if sample_dp else None,
        }
        metrics = self.task.train(self.model, train, **train_keywords(self.task, offered))
        delta = (self.view.get() - global_weights).astype(np.float32)
        # None: the task reports no loss (its code, the same on every site); a reported
        # but non-finite loss counts as reported (sent as 0), so train_weight does not
        # tell the server which sites' data made the loss overflow.
        train_loss = float(metrics["loss"]) if "loss" in metrics else None
        self._reports_loss = train_loss is not None
        delta, noise, result.weight = self._weighted(cid, task.round, delta, privacy)
        result.stats = self._statistics(result.weight, delta, train_loss, evaluated)
        return self._finish(result, delta, noise)

    def _validate(self, val) -> tuple[float, float] | None:
        """(loss, accuracy) of the global model on a client's validation split; None
        without one, and not computed where it would not be sent (DP: see round_stats)."""
        if not self._validates(val):
            return None
        m = self.task.evaluate(self.model, val)
        return float(m["loss"]), float(m["accuracy"])

    def _validates(self, val) -> bool:
        """Whether a client computes and sends validation figures: it has a validation
        split, ``federated_eval`` is on, and they would be released (not under DP)."""
        if not (self.cfg.federated_eval and metrics_released(self.cfg)):
            return False
        return val is not None and len(val) > 0

    def _statistics(self, weight, delta, train_loss, evaluated) -> dict[str, float]:
        """What the client reports, by the one definition of both modes (with crypto,
        ``_finish`` moves it inside the encrypted update). ``values_clipped``: values the
        codec will clip to +-crypto.clip, counted here (none without crypto)."""
        clipped = 0
        if self._encryptor is not None:
            clipped = count_clipped(delta * weight, self.codec.clip)
        return client_statistics(self.cfg, weight, train_loss, evaluated, clipped)

    def _strategy_options(self) -> dict[str, Any]:
        """What the strategy asks of clients (FedProx's mu), from this site's config."""
        if getattr(self, "_options", None) is None:
            from fedray.strategies import build_strategy

            self._options = dict(build_strategy(self.cfg.strategy).client_options())
        return self._options

    def _privacy_plan(self):
        """This site's DP plan (clip norm, noise share), from its own config: a plan the
        server sent could switch a victim's noise off or its clipping away. With crypto
        on it exists only once the codec does (``configure_crypto`` builds it)."""
        if self.cfg.privacy.name != "dp":
            return None
        if self._plan is None:
            from fedray.privacy import build_privacy

            if self._identity is not None and self._encryptor is None:
                raise PermissionError("no DP plan before this host's crypto is configured")
            codec = self.codec if self._encryptor is not None else None
            self._plan = build_privacy(self.cfg).client_plan(codec)
        return self._plan

    def _finish(self, result: ClientResult, delta: np.ndarray, noise) -> ClientResult:
        """Check the update, then attach it (plaintext) or keep it for ``_seal`` (crypto)."""
        if not np.all(np.isfinite(delta)):
            result.error = "update has NaN or infinite values (diverged); lower lr"
            return result
        if self._encryptor is not None:
            stats, result.stats = result.stats or {}, None  # it travels encrypted only
            self._to_seal[result.client_id] = (delta, result.weight, noise, stats)
        elif self.cfg.compression.name != "none":
            from fedray.compression import compress

            result.compressed = compress(
                delta, self.cfg.compression.name, self.cfg.compression.topk_fraction
            )
            result.bytes_up = result.compressed.nbytes
        else:
            result.delta = delta
            result.bytes_up = delta.nbytes
        return result

    def _seal(self, task: RoundTask, results: list[ClientResult]) -> None:
        """Encrypt this call's updates: one sum for all its clients (``crypto.host_sum``),
        or one update per client. Each is signed and deposited with the key holders (with
        their exponent shares) before it goes to the server.

        Per-client numbers (weights and the other statistics) travel only inside the
        ciphertexts, and timings only per host call: every result sent to the server is
        scrubbed of them. With a sum, the first client's result carries it; the server
        accepts those clients with it or rejects them with it.
        """
        ok = [r for r in results if r.error is None and r.client_id in self._to_seal]
        call_seconds = sum(r.train_seconds for r in results)
        for r in results:
            r.weight, r.train_seconds, r.stats = 0.0, 0.0, None
        if not ok:
            return
        ok[0].train_seconds = call_seconds
        groups = [ok] if self.cfg.crypto.host_sum else [[r] for r in ok]
        sealed = []
        for group in groups:
            t1 = time.perf_counter()
            update, shares = self._encryptor.encrypt_sum(
                [self._to_seal[r.client_id] for r in group]
            )
            update.client_ids = tuple(r.client_id for r in group)
            pending = self._deposit(task.round, update, shares)  # all groups' calls at once
            sealed.append((group, update, pending, time.perf_counter() - t1))
        for group, update, pending, seconds in sealed:
            t1 = time.perf_counter()
            accepted = self._await_deposits(pending)
            needed = self._key.threshold
            if accepted < needed:
                for r in group:
                    r.error = f"only {accepted} key holders accepted the update ({needed} needed)"
                continue
            carrier = group[0]
            carrier.encrypted = update
            self._sealed[update.update_id] = update.ciphertexts
            carrier.encrypt_seconds = seconds + time.perf_counter() - t1
            carrier.bytes_up = update.nbytes
            carrier.bytes_to_key_holders = sum(
                len(b) for i, b in enumerate(shares or []) if i != self._host_index
            )

    def _deposit(self, round_num: int, update: Any, shares: list[bytes] | None) -> list:
        """Sign the update's contribution (setting its ``update_id``) and send it to every
        key holder, each with its exponent shares; returns the pending calls."""
        from fedray.runtime.keys import Contribution, digest, new_update_id

        update.update_id = new_update_id(self._host_index)
        contribution = Contribution(
            key_id=self._key.fingerprint,
            round=int(round_num),
            update_id=update.update_id,
            host=self._host_index,
            client_ids=tuple(int(c) for c in update.client_ids),
            ciphertext_sha256=digest(update.ciphertexts),
            share_sha256=tuple(digest(b) for b in shares) if shares else (),
            model_sha256=self._model_sha256,
            job_sha256=self._job_sha256,
        )
        signed = self._identity.sign(contribution)
        self._signed[update.update_id] = signed  # relayed to other sites' holders (cross_org)
        return [
            holder.deposit.remote(signed, self._holder_share(i, shares))
            for i, holder in enumerate(self._holders)
        ]

    def _holder_share(self, i: int, shares: list[bytes] | None) -> bytes | None:
        """The exponent shares for ``self._holders[i]`` (holder ``i + 1``)."""
        return shares[i] if shares else None

    def _await_deposits(self, pending: list) -> int:
        """How many key holders accepted; waits, so the deposits are in before the server
        can ask for the sum. A dead or slow holder is skipped: the others may suffice."""
        import ray

        accepted = 0
        for ref in pending:
            try:
                accepted += bool(ray.get(ref, timeout=DEPOSIT_TIMEOUT_S))
            except Exception:
                continue
        return accepted


def client_actor_class(host_class: type | None = None):
    """The Ray actor form of :class:`ClientHost` (restarted by Ray if its process dies).

    A restarted host reloads its clients' data and makes a new signing identity, which
    the driver registers with the key holders before the next round; calls that were
    running when it died fail (the server counts those clients as failed this round).
    """
    import ray

    from fedray.runtime.facade import public_facade

    # Public methods only: ``_train_many`` and the like would bypass ``train``'s guard.
    return ray.remote(max_restarts=-1, max_task_retries=0)(public_facade(host_class or ClientHost))
