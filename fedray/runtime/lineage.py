"""Model lineage: a client host trains only on a global model it recomputed itself.

Every global model is a deterministic function of the agreed starting model and the sums
that were opened: ``W_r = strategy.apply(W_{r-1}, decode(M_r) / weight_r)``. So a host
keeps its own copy of the chain and refuses to train on weights that are not, bit for
bit, the next link (a crafted model: a NaN trap that fails training only on some sites'
data, a trap layer that makes one site's records dominate a sum).

Who checks what:

* **The start.** A host builds the initial model itself, from its installed task and
  its own ``seed`` (the same code the server runs). On a resume the driver, the job's
  set-up authority, vouches for the checkpoint it resumes from (its round, weights and
  strategy state, in the host's signed configuration): the chain restarts there.
* **The opened sum.** After a sum is opened, key holders *attest* it: each multiplies the
  round's deposited ciphertexts itself (checked against the hosts' signed digests) and
  checks that the claimed plaintexts ``M`` open that product: with the summed exponents
  ``X`` of the fast path, ``(1 + M n) hs^X = prod c_i mod n^2`` (sound, not a spot check:
  for ``M' != M mod n`` the two sides differ by ``(1+n)^(M-M')``, which is no n-th residue,
  while ``hs^(X'-X)`` always is); in shared custody the holder decrypts the product. It
  then signs ``(key, round, model the round trained from, count, sha256(M))``. A host
  accepts a sum only with ``t`` such signatures from distinct key holders whose keys the
  driver gave it: with at most ``t - 1`` holders colluding with the server, one honest
  holder checked it.
* **The step.** The host decodes ``M`` with its own codec and applies its own strategy
  (its own config: learning rate, momentum, Adam moments, DP denominator), the same code
  as the server's, so an honest server's model matches bit for bit.

Verifiable: the mean strategies (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad:
elementwise steps) with ``crypto=paillier`` opened by share sums (``crypto.fast_decrypt``)
or in shared custody. Not verifiable: plaintext rounds (no opened sum anyone can check:
the server sees each update and could claim any delta), and sums opened by threshold
partial decryptions (no proof of a partial's correctness yet).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("fedray.lineage")

VERIFIABLE_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class LineageError(PermissionError):
    """A global model (or an opened sum) that fails a host's lineage check."""


def model_digest(weights: np.ndarray) -> str:
    """SHA-256 of exact weights (dtype, shape and bytes, nothing converted)."""
    arr = np.ascontiguousarray(weights)
    h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def why_not_verifiable(cfg: Any) -> str | None:
    """Why this job's global models cannot be checked by its hosts, or None if they can."""
    if cfg.crypto.name != "paillier":
        return (
            "crypto=none (the server sees each update and no key holder opens a sum a host "
            "could check); use crypto=paillier"
        )
    if cfg.strategy.name not in VERIFIABLE_STRATEGIES:
        return f"strategy={cfg.strategy.name} (verifiable: {', '.join(VERIFIABLE_STRATEGIES)})"
    if cfg.crypto.custody == "threshold" and not cfg.crypto.fast_decrypt:
        return (
            "crypto.fast_decrypt=false (key holders check an opened sum with the summed "
            "exponents of the fast path; threshold partial decryptions carry no proof yet)"
        )
    return None


def verifies_models(cfg: Any) -> bool:
    """``cluster.verify_models``: auto is on wherever the job is verifiable."""
    setting = str(cfg.cluster.verify_models).lower()
    if setting == "false":
        return False
    return why_not_verifiable(cfg) is None


def release_message(
    key_id: str,
    round_num: int,
    model_sha256: str,
    count: int,
    plaintexts_sha256: str,
    job_sha256: str = "",
) -> bytes:
    """What a key holder signs when it attests an opened sum: of which job (the SHA-256 of
    the job every party declared, across organisations; "" in one cluster), so a sum
    attested in one job is no release of another under the same key."""
    return json.dumps(
        {
            "attest": key_id,
            "job": job_sha256,
            "round": int(round_num),
            "model": model_sha256,
            "count": int(count),
            "sum": plaintexts_sha256,
        },
        sort_keys=True,
    ).encode()


def root_message(key_id: str, host: int, root: dict[str, Any] | None) -> bytes:
    """What the driver signs with a resumed host's starting point (None: round 0, the
    host's own initial model)."""
    if root is None:
        return json.dumps({"root": key_id, "host": int(host), "round": 0}).encode()
    strategy = hashlib.sha256()
    for name in sorted(root["strategy"]):
        strategy.update(
            name.encode() + b"|" + model_digest(np.asarray(root["strategy"][name])).encode()
        )
    return json.dumps(
        {
            "root": key_id,
            "host": int(host),
            "round": int(root["round"]),
            "weights": model_digest(np.asarray(root["weights"])),
            "strategy": strategy.hexdigest(),
        },
        sort_keys=True,
    ).encode()


@dataclass(frozen=True)
class Release:
    """One opened sum, as the server hands it to the hosts with the next model."""

    round: int
    model_sha256: str  # the global model this round trained from
    count: int  # clients in the sum
    plaintexts: bytes  # the opened sum, each plaintext in the key's width
    attestations: dict[int, bytes] = field(default_factory=dict)  # holder index -> sig


def plaintext_width(n: int) -> int:
    return (int(n).bit_length() + 7) // 8


def min_client_weight(weight_ref: float, frac_bits: int) -> float:
    """The least weight an honest client's encoding holds: its examples over weight_ref,
    at least 1 / weight_ref, rounded to the statistics' grid (0 if that is coarser)."""
    return max(0.0, 1.0 / float(weight_ref) - 2.0 ** -(frac_bits + 1))


def step(
    strategy: Any,
    weights: np.ndarray,
    total: np.ndarray,
    weight: float,
    denominator,
    count: int | None = None,
    min_weight: float = 0.0,
):
    """The server's step, one definition for the server and every host that checks it:
    the next model, or ValueError for a sum no honest cohort gives (then the strategy's
    state, its momentum or Adam moments, is as it was). Without a DP denominator the
    summed weight divides the sum, so it must be one ``count`` honest clients can give:
    each in (0, 1], at least ``min_weight`` (a party that knows weight_ref passes it)."""
    if not denominator:
        # Honest weights are in (0, 1] per client (a failed client's too); a colluding
        # client's crafted ciphertexts (no range proofs) can wrap the summed weight to 0,
        # to one grid step (the sum times 2^24: a wrecked, finite model) or past count.
        if not weight > 0:
            raise ValueError(f"the summed weight {weight:g} is not positive")
        if count is not None and weight > count * (1 + 1e-9):
            raise ValueError(f"the summed weight {weight:g} exceeds its {count} clients' 1 each")
        if count is not None and weight < count * min_weight:
            raise ValueError(
                f"the summed weight {weight:g} is below its {count} clients' least "
                f"({min_weight:g} each)"
            )
    saved = copy.deepcopy(strategy.state_dict())
    delta = total / denominator if denominator else total / weight
    with np.errstate(over="ignore", invalid="ignore"):
        new = strategy.apply(weights, delta)
    if not np.all(np.isfinite(new)):
        strategy.load_state_dict(saved)
        raise ValueError("the next model is not finite")
    return new


class Lineage:
    """A host's copy of the chain of global models, advanced one opened sum at a time."""

    def __init__(
        self,
        cfg: Any,
        key: Any,
        layout: Any,
        holder_keys: dict[int, bytes],
        initial_weights: np.ndarray,
        root: dict[str, Any] | None = None,
        job_sha256: str = "",
    ):
        from fedray.strategies import build_strategy

        self.key = key
        self.job_sha256 = str(job_sha256)  # attestations of another job do not count
        self.layout = layout
        self.holder_keys = {int(j): bytes(k) for j, k in holder_keys.items()}
        self.strategy = build_strategy(cfg.strategy)
        self.denominator = None
        if cfg.privacy.name == "dp":
            from fedray.privacy import build_privacy

            self.denominator = getattr(build_privacy(cfg), "denominator", None)
        self.round = 0
        self.min_client_weight = 0.0  # set by whoever knows weight_ref (min_client_weight)
        self.weights = np.array(initial_weights, copy=True)
        if root is not None:
            self.round = int(root["round"])
            self.weights = np.array(root["weights"], copy=True)
            self.strategy.load_state_dict(root["strategy"])

    def advance(self, release: Release) -> None:
        """Take the next opened sum (older ones are skipped), or raise LineageError."""
        from fedray.crypto.threshold import ints_from_bytes
        from fedray.runtime.keys import digest, verify

        r = int(release.round)
        if r <= self.round:
            return
        if r != self.round + 1:
            raise LineageError(
                f"round {r}: lineage check failed: the opened sums of rounds "
                f"{self.round + 1}..{r - 1} are missing"
            )
        if release.model_sha256 != model_digest(self.weights):
            raise LineageError(
                f"round {r}: lineage check failed: the opened sum was trained from another "
                f"model than round {self.round}'s verified one"
            )
        message = release_message(
            self.key.fingerprint,
            r,
            release.model_sha256,
            release.count,
            digest(release.plaintexts),
            self.job_sha256,
        )
        signers = {
            j
            for j, sig in dict(release.attestations).items()
            if j in self.holder_keys and verify(self.holder_keys[j], bytes(sig), message)
        }
        if len(signers) < self.key.threshold:
            raise LineageError(
                f"round {r}: attestation check failed: {len(signers)} key holders attest the "
                f"opened sum, {self.key.threshold} needed"
            )
        if not 1 <= int(release.count) <= self.layout.codec.max_summands:
            raise LineageError(f"round {r}: attestation check failed: count {release.count}")
        plaintexts = ints_from_bytes(release.plaintexts, plaintext_width(self.key.public.n))
        total, stats = self.layout.decode_sum(plaintexts, int(release.count))
        # A refused step leaves the strategy's state as it was, so a crafted release cannot
        # leave its mark on a later check.
        try:
            weights = step(
                self.strategy,
                self.weights,
                total,
                stats["weight"],
                self.denominator,
                int(release.count),
                self.min_client_weight,
            )
        except ValueError as e:
            raise LineageError(f"round {r}: sum check failed: {e}") from None
        self.weights = weights
        self.round = r

    def check(self, round_num: int, weights: np.ndarray, releases: list[Release]) -> None:
        """Advance through ``releases``, then require ``weights`` to be, bit for bit, the
        model after round ``round_num - 1``; else LineageError (nothing is trained)."""
        for release in sorted(releases or [], key=lambda r: r.round):
            if release.round < round_num:
                self.advance(release)
        if self.round != round_num - 1:
            raise LineageError(
                f"round {round_num}: lineage check failed: the opened sums up to round "
                f"{round_num - 1} are missing (verified up to round {self.round})"
            )
        w = np.asarray(weights)
        same = (
            w.dtype == self.weights.dtype
            and w.shape == self.weights.shape
            and w.tobytes() == self.weights.tobytes()
        )
        if not same:
            raise LineageError(
                f"round {round_num}: lineage check failed: the global model is not the one "
                f"recomputed from round {self.round}'s opened sum (bit for bit)"
            )
