"""The site agent of a cross-organisation federation (``python -m fedray.site``).

A site runs this in *its own* Ray cluster (embedded by default, or ``ray.address=`` for
the site's own multi-node cluster). It starts the site's client host (its clients' data,
read from the site's own paths, and its encryptor) and its key holder, then dials out to
the coordinator over the mTLS channel (:mod:`fedray.federation.channel`); the site opens
no inbound port. The coordinator reaches the site only through the channel's closed list
of typed requests, and the agent decides each one itself:

* ``train_request``: the round's global weights (a raw float32 array of the shape the
  site's own model has) and the site's clients in the cohort. The agent checks the task,
  the model and the hyper-parameters (its policy, if it has one), opens the round for its
  key holder, and has its host train, clip, noise (its own DP settings) and encrypt one
  sum of those clients under the federation's threshold key. The reply is that sum's
  ciphertexts and the contribution the host signed with the site's manifest key, and with
  the fast path (``crypto.fast_decrypt``) the update's exponent shares for the other
  sites' key holders, each sealed to that site's certificate key (checked against the
  manifest) by the host (:mod:`fedray.federation.shares`).
* ``approve_request``: the host signs the list of updates of the round's sum, once per
  round (the consistency step; a second, different list is refused).
* ``share_sum_request``: the agent's key holder checks every update's contribution
  against its host's manifest key and every host's approval of exactly this list. The fast
  path (``OPENING_SHARE_SUM``): the agent opens each other site's exponent share sealed to
  this site (bound to the round, the update, the sender and this holder), the holder
  checks it against the digest the sender's host signed, and answers its share sum. Else
  (``OPENING_PARTIAL_DECRYPTION``) the holder checks each update's ciphertexts against the
  digest its host signed, multiplies them itself and answers its partial decryption of
  the product (never of a sum it was handed).

The key holder's authority (round tickets, the host's configuration) is this agent's own
key, made here: across organisations no party but the site sets up what the site runs.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedray.config import FedrayConfig, min_clients
from fedray.errors import ConfigError, DataError
from fedray.federation import channel as ch
from fedray.federation import federation_pb2 as pb
from fedray.federation.coordinator import MODEL_REFUSAL
from fedray.runtime.client import ClientHost, RoundTask
from fedray.runtime.lineage import LineageError, Release

log = logging.getLogger("fedray.site")

CONTRIBUTION_FIELDS = {
    "key_id": str,
    "round": int,
    "update_id": str,
    "host": int,
    "client_ids": list,
    "ciphertext_sha256": str,
    "share_sha256": list,
    "model_sha256": str,
    "job_sha256": str,
}


class SiteHost(ClientHost):
    """A site's client host: the same host as in one cluster, signing with the site's
    manifest key (so every other site's key holder can check its contributions and
    approvals against the manifest it holds) and depositing only with its own site's key
    holder; the other sites' holders receive each contribution, as this host signed it,
    with the request to open the sum."""

    def __init__(self, cfg, client_ids, info, weight_ref=1.0, authority=None, identity=b""):
        super().__init__(cfg, client_ids, info, weight_ref, authority)
        if self._init_error is None and identity:
            from fedray.runtime.keys import CohortApprover, HostIdentity

            self._identity = HostIdentity.from_pem(identity)
            self._approver = CohortApprover(self._identity)
            self._job_sha256 = job_digest(cfg)  # signed into every contribution
        # update id -> (round, every holder's exponent-share blob): the fast path's shares
        # for the other sites' holders, sealed to them on the agent's request (this round's)
        self._shares: dict[str, tuple[int, list[bytes]]] = {}

    def num_parameters(self) -> int:
        """Values this site's model exchanges: the shape it accepts global weights in."""
        return int(self.view.size)

    def num_ciphertexts(self) -> int:
        """Ciphertexts per update (and exponent shares per holder, the fast path)."""
        return int(self.layout.num_ciphertexts)

    def _holder_share(self, i: int, shares: list[bytes] | None) -> bytes | None:
        """Its one holder is its own site's, holder ``host index + 1``: that one's share."""
        return shares[self._host_index] if shares else None

    def _deposit(self, round_num: int, update: Any, shares: list[bytes] | None) -> list:
        pending = super()._deposit(round_num, update, shares)
        for old in [u for u, (r, _) in self._shares.items() if r != int(round_num)]:
            del self._shares[old]
        if shares:
            self._shares[update.update_id] = (int(round_num), list(shares))
        return pending

    def sealed_shares(
        self,
        round_num: int,
        update_id: str,
        recipients: dict[int, tuple[str, bytes, str]],
        manifest_sha256: str,
        sender: str,
    ) -> list:
        """The exponent shares of an update this host sealed this round, one for each
        other site's key holder, each sealed to that site's certificate key and bound to
        the round, the update and the holder (:mod:`fedray.federation.shares`).

        ``recipients``: holder index -> (site id, its PEM certificate, the manifest's
        SHA-256 of it); every holder but this site's own must be named."""
        from fedray.federation.shares import ShareContext, recipient_key, seal_share

        entry = self._shares.get(str(update_id))
        if entry is None or entry[0] != int(round_num):
            raise LookupError(f"round {round_num}: no exponent shares of update {update_id!r}")
        shares = entry[1]
        own = self._host_index + 1
        wanted = {j for j in range(1, len(shares) + 1) if j != own}
        if set(recipients) != wanted:
            raise LookupError(
                f"round {round_num}: exponent shares go to holders {sorted(wanted)}, not "
                f"{sorted(recipients)}"
            )
        out = []
        for j in sorted(wanted):
            site, pem, cert_sha256 = recipients[j]
            context = ShareContext(
                self._key.fingerprint,
                manifest_sha256,
                int(round_num),
                str(update_id),
                sender,
                site,
                j,
                cert_sha256,
            )
            out.append(seal_share(recipient_key(pem, site, cert_sha256), context, shares[j - 1]))
        return out

    def signed_contribution(self, round_num: int, update_id: str) -> tuple[bytes, bytes]:
        """The statement this host signed for an update it sealed this round, and the
        signature (relayed to the other sites' key holders)."""
        signed = self._signed.get(str(update_id)) if int(round_num) == self._sealed_round else None
        if signed is None:
            raise LookupError(f"round {round_num}: no update {update_id!r} sealed here")
        return signed.contribution.message(), signed.signature

    def _await_deposits(self, pending: list) -> int:
        """Only the site's own holder is on this side; the others check the signed
        contribution when asked to open the sum. Counted as enough once it accepted."""
        accepted = super()._await_deposits(pending)
        return self._key.threshold if accepted == len(pending) and accepted else 0


def contribution_from_statement(statement: bytes, signature: bytes):
    """A relayed contribution, parsed strictly: one JSON object with exactly the fields of
    :class:`~fedray.runtime.keys.Contribution`, of their types, in canonical form (the bytes
    the host signed are the bytes it would sign), or PermissionError."""
    from fedray.runtime.keys import Contribution, SignedContribution

    try:
        raw = json.loads(bytes(statement).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PermissionError("a relayed contribution is not a JSON statement") from None
    if not isinstance(raw, dict) or set(raw) != set(CONTRIBUTION_FIELDS):
        raise PermissionError("a relayed contribution has other fields than a contribution")
    for name, kind in CONTRIBUTION_FIELDS.items():
        value = raw[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PermissionError(f"a relayed contribution's {name} is not a {kind.__name__}")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in raw["client_ids"]):
        raise PermissionError("a relayed contribution's client ids are not integers")
    if not all(isinstance(d, str) for d in raw["share_sha256"]):
        raise PermissionError("a relayed contribution's share digests are not strings")
    c = Contribution(
        raw["key_id"],
        raw["round"],
        raw["update_id"],
        raw["host"],
        tuple(raw["client_ids"]),
        raw["ciphertext_sha256"],
        tuple(raw["share_sha256"]),
        raw["model_sha256"],
        raw["job_sha256"],
    )
    if c.message() != bytes(statement):
        raise PermissionError("a relayed contribution is not in canonical form")
    return SignedContribution(c, bytes(signature))


def federation_clients(manifest_path: str | Path) -> dict[str, list[int]]:
    """Each site's client ids, from the manifest's ``clients`` counts (every party holds
    the same manifest): site k of the manifest hosts the next ``clients`` ids."""
    raw = json.loads(Path(manifest_path).read_text())
    out, next_id = {}, 0
    for site, entry in raw["sites"].items():
        count = entry.get("clients")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(
                f"federation manifest {manifest_path}: site {site} has no 'clients' count "
                "(python -m fedray.tools.certs ... --clients a=N,b=M writes them)"
            )
        out[site] = list(range(next_id, next_id + count))
        next_id += count
    return out


class Paths:
    """The files of a party, in the layouts of ``fedray.tools.certs`` and
    ``fedray.tools.keys`` (see :class:`fedray.config.FederationConfig`)."""

    def __init__(self, cfg: FedrayConfig, party: str | None = None):
        fed = cfg.federation
        if not fed.certs or not fed.keys:
            raise ConfigError(
                "federation=cross_org needs federation.certs (the folder of python -m "
                "fedray.tools.certs) and federation.keys (the folder of python -m "
                "fedray.tools.keys deal)"
            )
        certs, keys = Path(fed.certs), Path(fed.keys)
        self.manifest = certs / "federation.json"
        self.ca = certs / "ca.pem"
        manifest = ch.Manifest.load(self.manifest)
        self.party = party or fed.party or manifest.coordinator.id
        self.cert = certs / self.party / "cert.pem"
        self.key = certs / self.party / "key.pem"
        self.signing_key = certs / self.party / "signing.key"
        self.federation_key = keys / "federation_key.json"
        self.share = keys / f"{self.party}.share"
        self.rounds = Path(fed.state) if fed.state else keys / f"{self.party}.rounds.json"
        self.sites = list(manifest.sites)
        self.manifest_obj = manifest


class RoundRecord:
    """A site's durable record of the last round it took part in (trained, helped open or
    attested), per federation key, whatever the job: a restarted site, or any new run
    under the same key, is never made to take part in a round at or before it again.
    Without it a fresh process would re-train a round the coordinator chooses
    (deterministically, without DP) and help open a second sum of it, which a coordinator
    with ``t - 1`` colluding sites could difference against the first (review of
    2026-12-04). Per key, not per declared job: a job with one setting changed that does
    not change training (answer padding, model checks) trains round 1 as the first did
    (review of 2026-12-04, second). The record is written (and fsync'ed) before anything
    of the round leaves."""

    def __init__(self, path: Path, key_id: str):
        self.path = Path(path)
        self.name = str(key_id)
        data = self._load()
        # rounds up to here: an earlier process's (a record written per key and job by an
        # earlier fedray counts too)
        self.floor = max(
            (v for k, v in data.items() if k == self.name or k.startswith(self.name + ":")),
            default=0,
        )
        self.last = self.floor
        self._save(data)  # fails now, at start, if the file cannot be written

    def _load(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"federation.state {self.path}: unreadable ({exc})") from None
        if not isinstance(data, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()
        ):
            raise ConfigError(
                f"federation.state {self.path}: not a record of rounds (a JSON object of "
                "round numbers >= 0)"
            )
        return data

    def _save(self, data: dict[str, int]) -> None:
        import os

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                json.dump(data, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise ConfigError(
                f"federation.state {self.path}: cannot be written ({exc}); a site records "
                "the rounds it took part in (set federation.state to a writable file)"
            ) from None

    def take_part(self, round_num: int, what: str) -> None:
        """Refuse a round at or before an earlier process's last one, or one another
        process of this site (another job under this key, running at the same time) has
        recorded since; else record it. A retry of this process's round is the same round."""
        import fcntl

        self.refuse_taken(round_num, what)
        if round_num <= self.last:
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one read-modify-write at a time
            data = self._load()
            stored = int(data.get(self.name, 0))
            if stored >= round_num:
                raise ch.Refused(
                    f"round {round_num}: another process of this site took part in rounds up "
                    f"to {stored} under this key (federation.state {self.path}); it {what} "
                    "no round twice (a new job needs a new key)"
                )
            data[self.name] = int(round_num)
            self._save(data)
            self.last = int(round_num)

    def refuse_taken(self, round_num: int, what: str) -> None:
        """Refuse a round at or before an earlier process's last one (records nothing)."""
        if round_num <= self.floor:
            raise ch.Refused(
                f"round {round_num}: this site took part in rounds up to {self.floor} under "
                f"this key before (an earlier run, process or job, federation.state "
                f"{self.path}); it {what} no round twice (a new job needs a new key)"
            )


def check_site_config(cfg: FedrayConfig) -> None:
    """What a site's job config must say (one line each)."""
    if cfg.federation.name != "cross_org":
        raise ConfigError("python -m fedray.site runs federation=cross_org only")
    if not cfg.federation.party or not cfg.federation.connect:
        raise ConfigError(
            "a site needs federation.party (its id in the manifest) and federation.connect "
            "(the coordinator's HOST:PORT)"
        )
    check_cross_org_job(cfg)
    cfg.dataset.check_table_path()  # a site reads its own tables; the coordinator none
    if cfg.dataset.weight_ref is None:
        raise ConfigError(
            "federation=cross_org: set dataset.weight_ref (the example count that maps to "
            "FedAvg weight 1.0, the same at every site: sites do not share their sizes)"
        )


def check_cross_org_job(cfg: FedrayConfig) -> None:
    """What the coordinator and every site need alike across organisations."""
    if cfg.crypto.name != "paillier" or cfg.crypto.custody != "threshold":
        raise ConfigError(
            "federation=cross_org needs crypto=paillier with crypto.custody=threshold "
            "(the sites hold the key shares)"
        )
    if not cfg.crypto.host_sum:
        raise ConfigError(
            "federation=cross_org needs crypto.host_sum=true (one update per site and round; "
            "the federation=cross_org group sets it)"
        )
    if cfg.privacy.name == "dp" and cfg.privacy.mode == "sample":
        raise ConfigError(
            "federation=cross_org supports privacy=dp with privacy.mode=client only (the "
            "sample-level accountant needs every site's size)"
        )
    if cfg.dataset.name == "csv":
        from fedray.data.datasets import agreed_csv_info

        agreed_csv_info(cfg.dataset)  # dataset.features declared, or one line


# What each party sets for itself and may differ: where its tables are and how it treats
# their extra columns and empty cells, the coordinator's own test set, where a site's copy
# of a Hugging Face model is and the precision it trains in. Everything else of the
# dataset and the model, and the codec, makes the one model every party must hold alike.
_OWN_DATASET_KEYS = frozenset(
    {
        "path", "test_path", "extra_columns", "missing", "test_samples",
        "test_samples_per_client", "holdout_fraction", "share_label_counts",
    }
)  # fmt: skip
_OWN_MODEL_KEYS = frozenset({"path", "precision"})
_CODEC_KEYS = ("name", "custody", "key_bits", "quant_bits", "clip")


def agreed_job(cfg: FedrayConfig) -> bytes:
    """The job this party declares in its Hello or Welcome (canonical JSON, flat keys):
    ``num_clients``, ``seed`` (the built-in datasets' split), local training
    (``local_epochs``, ``batch_size``, ``lr``, ``momentum``), the dataset's and the model's
    settings but each party's own (above), and the codec. The coordinator refuses a site
    that declares another job, and a site a coordinator that does, naming the settings that
    differ: without it, a site whose ``dataset.features`` are in another order trains on
    misaligned columns without a word, and one with another model or codec cannot decode
    the weights or sends an update the sum cannot use."""
    from dataclasses import asdict

    from fedray.crypto.secure_aggregation import codec_settings

    def prefixed(prefix: str, settings: dict, skip=frozenset()) -> dict[str, Any]:
        # A dict value (kwargs, categorical) stays one value, {} as null: no two shapes
        # share a key.
        return {
            f"{prefix}{key}": (value or None) if isinstance(value, dict) else value
            for key, value in settings.items()
            if key not in skip
        }

    model = asdict(cfg.model)
    lora = model.pop("lora")  # the one settings group: one key per setting
    job: dict[str, Any] = {
        "num_clients": cfg.num_clients,
        "seed": cfg.seed,
        # how every client trains each round: one job, not each site's own choice
        "local_epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        **prefixed("dataset.", asdict(cfg.dataset), _OWN_DATASET_KEYS),
        **prefixed("model.", model, _OWN_MODEL_KEYS),
        **prefixed("model.lora.", lora),
        **prefixed("task.", asdict(cfg.task)),
        **prefixed("crypto.", {k: getattr(cfg.crypto, k) for k in _CODEC_KEYS}),
    }
    # What the codec derives (clip and summand count follow clients_per_round and, under
    # client-level DP, the privacy plan): the same codec at every party, or a wrong sum.
    clip, max_summands = codec_settings(cfg)
    job.update({"codec.clip": clip, "codec.max_summands": max_summands})
    # Model checks: every site recomputes the coordinator's step, so the step's settings
    # (the strategy's, the DP denominator) are the job's too.
    from fedray.runtime.lineage import verifies_models

    job["model_checks"] = verifies_models(cfg)
    if job["model_checks"]:
        job.update(prefixed("strategy.", asdict(cfg.strategy)))
        if cfg.privacy.name == "dp":
            from fedray.privacy import build_privacy

            job["privacy.denominator"] = getattr(build_privacy(cfg), "denominator", None)
    return json.dumps(job, sort_keys=True, separators=(",", ":"), default=str).encode()


def job_digest(cfg: FedrayConfig) -> str:
    """SHA-256 (hex) of :func:`agreed_job`: what a site's host signs into each
    contribution and its key holder requires of every contribution it takes."""
    import hashlib

    return hashlib.sha256(agreed_job(cfg)).hexdigest()


def check_key_size(cfg: FedrayConfig, key: Any) -> None:
    """The dealt key is the one the job says (summary.json reports crypto.key_bits)."""
    bits = int(key.public.n).bit_length()
    if bits != cfg.crypto.key_bits:
        raise ConfigError(
            f"crypto.key_bits={cfg.crypto.key_bits}, but the federation key has {bits} bits: "
            f"set crypto.key_bits={bits}"
        )


class SiteAgent:
    """One site: its Ray cluster's host and key holder, and the handler of the channel."""

    def __init__(self, cfg: FedrayConfig):
        check_site_config(cfg)
        self.cfg = cfg
        self.paths = Paths(cfg, cfg.federation.party)
        if self.paths.party not in self.paths.sites:
            raise ConfigError(
                f"federation.party={self.paths.party!r} is not a site of the manifest "
                f"(sites: {', '.join(self.paths.sites)})"
            )
        self.site_id = self.paths.party
        self.index = self.paths.sites.index(self.site_id)  # its host index; holder index + 1
        clients = federation_clients(self.paths.manifest)
        total = sum(len(c) for c in clients.values())
        if cfg.num_clients != total:
            raise ConfigError(
                f"num_clients={cfg.num_clients}, but the manifest's sites have {total} clients"
            )
        self.client_ids = clients[self.site_id]
        self.job_sha256 = job_digest(cfg)
        self.assignment = {c: h for h, s in enumerate(self.paths.sites) for c in clients[s]}
        self.policy = None
        if cfg.federation.policy:
            from fedray.federation.policy import load_policy

            self.policy = load_policy(cfg.federation.policy)
        # The longer of the site's config and its policy: each pads, neither shortens.
        self.answer_after_s = max(
            cfg.federation.answer_after_s,
            self.policy.answer_after_s if self.policy is not None else 0.0,
        )
        self.started_ray = False
        self.channel: ch.Site | None = None
        self._opened = 0
        self._trained = 0  # the round this site last sealed an update of
        self._deposited: set[str] = set()
        # deposited for a partial-decryption request, without this holder's exponent
        # share: a later share-sum request attaches it (KeyHolder.deposit takes that once)
        self._without_share: set[str] = set()
        # update id -> the statement filed with this site's holder under it: a relayed
        # statement under a filed id must be that very one (a colluding site could sign
        # its own contribution under an honest site's id and have it filed first; the
        # holder sums what is filed, so the sum this agent checks must be what it sums)
        self._filed: dict[str, bytes] = {}
        self._lock = threading.Lock()

    # -- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the key share, start the site's Ray (its own cluster), its key holder and
        its host, and set them up with this agent's own authority key."""
        import ray

        from fedray.runtime.client import client_actor_class
        from fedray.runtime.cluster import loopback_node_ip
        from fedray.runtime.keys import (
            HostIdentity,
            configure_message,
            key_holder_class,
            weight_ref_message,
        )
        from fedray.tools.keys import load_share

        cfg, paths = self.cfg, self.paths
        self.key, share = load_share(
            paths.share,
            paths.manifest,
            self.site_id,
            paths.key,
            allow_insecure=cfg.crypto.allow_insecure_keys,
        )
        check_key_size(cfg, self.key)
        self._check_coalition()
        self.rounds = RoundRecord(paths.rounds, self.key.fingerprint)
        info = self.data_info()  # the site's tables checked before its Ray starts
        if cfg.ray.address is None:
            ray.init(
                address="local",
                num_cpus=cfg.ray.num_cpus,
                num_gpus=cfg.ray.num_gpus,
                include_dashboard=False,
                _node_ip_address=loopback_node_ip(),  # not 127.0.0.1: see there
                _temp_dir=tempfile.mkdtemp(prefix=f"fr-{self.site_id[:8]}-", dir="/tmp"),
                logging_level=logging.WARNING,
            )
            self.started_ray = True
        else:
            ray.init(address=cfg.ray.address, logging_level=logging.WARNING)
        log.info("site %s: Ray is up; starting its key holder and client host", self.site_id)
        self.authority = HostIdentity()  # this agent's; never leaves this process
        manifest = paths.manifest_obj
        peers = {h: manifest.sites[s].signing_key for h, s in enumerate(paths.sites)}
        identity = Path(paths.signing_key).read_bytes()
        self.holder = key_holder_class().remote(
            self.index + 1,
            peers,
            self.assignment,
            min_clients(cfg),
            self.authority.public_bytes(),
            max_rounds=cfg.rounds,
            identity=identity,  # it attests opened sums with the site's manifest key
            job_sha256=self.job_sha256,  # it sums updates of this site's job only
        )
        ray.get(self.holder.install.remote(self.key, share))
        del share
        options = {"num_cpus": cfg.client.num_cpus, "num_gpus": cfg.client.num_gpus}
        self.host = (
            client_actor_class(SiteHost)
            .options(**options)
            .remote(cfg, self.client_ids, info, 1.0, self.authority.public_bytes(), identity)
        )
        ready = ray.get(self.host.ready.remote())
        if ready is not True:
            raise ConfigError(f"site {self.site_id}: its client host failed: {ready}")
        holder_ids = [self.holder._actor_id.hex()]
        # Model checks: the host recomputes every global model from opened sums that t key
        # holders attested, each with its site's manifest key; the chain starts at the
        # host's own initial model (root None: built from its installed task and the seed).
        from fedray.runtime.lineage import root_message, verifies_models

        holder_keys = None
        if verifies_models(cfg):
            holder_keys = {j: manifest.sites[s].signing_key for j, s in enumerate(paths.sites, 1)}
        root = None if holder_keys is None else root_message(self.key.fingerprint, self.index, None)
        signature = self.authority.sign_bytes(
            configure_message(self.key.fingerprint, self.index, holder_ids, holder_keys, root)
        )
        ray.get(
            self.host.configure_crypto.remote(
                self.key, [self.holder], self.index, signature, holder_keys, None
            )
        )
        weight_ref = float(cfg.dataset.weight_ref)
        answer = ray.get(
            self.host.set_weight_ref.remote(
                weight_ref, self.authority.sign_bytes(weight_ref_message(weight_ref))
            )
        )
        if answer is not True:
            raise ConfigError(f"site {self.site_id}: {answer}")
        self.num_values = ray.get(self.host.num_parameters.remote())
        # The fast path: what this site seals its exponent shares to (the other sites'
        # certificates, relayed by the coordinator and checked against the manifest) and
        # opens the others' with (its TLS key, as the dealer's share file).
        from fedray.federation.shares import manifest_sha256
        from fedray.tools.keys import _site_private_key

        self.manifest_sha256 = manifest_sha256(paths.manifest)
        self.num_ciphertexts = ray.get(self.host.num_ciphertexts.remote())
        self.share_bytes = self.num_ciphertexts * self.key.share_width()
        self._tls_key = _site_private_key(paths.key)
        self._certificates: dict[str, bytes] = {}
        log.info(
            "site %s: %d clients, key %s, holder %d of %d (any %d open a sum)",
            self.site_id,
            len(self.client_ids),
            self.key.fingerprint[:16],
            self.index + 1,
            self.key.holders,
            self.key.threshold,
        )

    def serve(self, max_wait_s: float | None = None) -> None:
        """Dial the coordinator and answer until it says goodbye or :meth:`close`."""
        paths = self.paths
        cap = self.cfg.federation.reconnect_max_s  # the longest wait between two dials
        self.channel = ch.dial(
            self.cfg.federation.connect,
            paths.cert,
            paths.key,
            paths.ca,
            site_id=self.site_id,
            manifest=paths.manifest_obj,
            signing_key=paths.signing_key,
            handler=self.handle,
            max_blob_bytes=self._receive_cap(),
            job=agreed_job(self.cfg),
            backoff=(min(0.5, cap), cap),
        )
        self.channel.run(max_wait_s=max_wait_s)

    def close(self) -> None:
        import ray

        if self.channel is not None:
            self.channel.close()
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    def _update_bytes(self) -> int:
        return 2 * self.num_values * 8 + (1 << 20)

    def _receive_cap(self) -> int:
        """The most blob bytes one request may bring: the global weights with every
        attested sum of the run (a rejoining site is sent them all at once), or a whole
        sum's uploads with the claimed opening (an attest request), whichever is more."""
        from fedray.federation.coordinator import exponent_sum_width
        from fedray.runtime.lineage import plaintext_width

        cts, sites = self.num_ciphertexts, len(self.paths.sites)
        opened = cts * plaintext_width(self.key.public.n)
        uploads = sites * cts * self.key.public.ciphertext_bytes
        exponents = cts * exponent_sum_width(self.key, sites)
        return max(
            256 << 20,
            4 * self._update_bytes(),
            self._update_bytes() + self.cfg.rounds * opened,
            uploads + opened + exponents,
        ) + (1 << 20)

    # -- the requests ---------------------------------------------------------------------
    def handle(self, msg: ch.Message) -> tuple:
        """One request of the coordinator, in order (the channel calls this). What the
        site's host or key holder refuses (a second list in a round, a sum it cannot
        check) goes back as the refusal's one line."""
        import ray

        answer = {"train_request": self._train, "approve_request": self._approve}
        answer["share_sum_request"] = self._open
        if msg.kind not in answer:
            raise ch.Refused(f"{msg.kind} is not a request this site answers")
        with self._lock:
            try:
                return answer[msg.kind](msg)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, LineageError):  # the host's own log has the line too
                    raise ch.Refused(MODEL_REFUSAL + _one_line(cause)) from None
                if isinstance(cause, PermissionError | LookupError | ValueError):
                    raise ch.Refused(_one_line(cause)) from None
                raise
            except (PermissionError, LookupError) as exc:
                raise ch.Refused(_one_line(exc)) from None

    def _open_round(self, round_num: int) -> None:
        """Let this site's holder take deposits of, and open one sum of, ``round_num``."""
        import ray

        from fedray.runtime.keys import round_ticket_message

        if round_num > self._opened:
            ticket = self.authority.sign_bytes(
                round_ticket_message(self.key.fingerprint, round_num)
            )
            ray.get(self.holder.open_round.remote(round_num, ticket))
            self._opened = round_num

    def _train(self, msg: ch.Message) -> tuple:
        import ray

        body, cfg = msg.body, self.cfg
        came = time.monotonic()
        round_num = int(body.round)
        if round_num < 1 or round_num > cfg.rounds:
            raise ch.Refused(f"round {round_num} is outside this site's rounds 1..{cfg.rounds}")
        clients = [int(c) for c in body.client_ids]
        foreign = sorted(set(clients) - set(self.client_ids))
        if foreign:
            raise ch.Refused(f"round {round_num}: clients {foreign[:5]} are not this site's")
        fed = cfg.federation
        self.rounds.refuse_taken(round_num, "trains")  # first: nothing else is looked at
        if self.policy is None and (body.task_id, body.task_version) != (
            fed.task_id,
            fed.task_version,
        ):
            raise ch.Refused(
                f"task {body.task_id}@{body.task_version} is not this site's "
                f"({fed.task_id}@{fed.task_version})"
            )
        options = self._options(body)
        weights = np.array(
            msg.blob(body.global_weights).array(np.float32, (self.num_values,)), copy=True
        )
        releases = self._releases(msg) if body.releases else None
        recipients = self._recipients(round_num, body) if cfg.crypto.fast_decrypt else None
        # The request's checks first: one the site refuses (a crafted model) counts the
        # round in neither its policy nor its record, nor opens it at its key holder.
        ray.get(
            self.host.check_model.remote(RoundTask(round_num, clients, options, releases), weights)
        )
        if self.policy is not None:
            from fedray.federation.policy import TrainRequest

            self.policy.check_request(
                TrainRequest(
                    round_num,
                    body.task_id,
                    body.task_version,
                    bytes(body.model_fingerprint),
                    {
                        k: (v.real if v.WhichOneof("value") == "real" else v.integer)
                        for k, v in body.hyperparameters.items()
                    },
                )
            )
        self.rounds.take_part(round_num, "trains")  # before anything of the round leaves
        self._open_round(round_num)
        task = RoundTask(round_num, clients, options, None)  # the sums: checked above
        results = ray.get(self.host.train.remote(task, weights))
        carrier = next((r for r in results if r.encrypted is not None), None)
        failures = [
            pb.ClientFailure(client_id=r.client_id, reason=" ".join(str(r.error).split())[:300])
            for r in results
            if r.error
        ]
        if carrier is None:
            reasons = "; ".join(f"client {f.client_id}: {f.reason}" for f in failures[:3])
            raise ch.Refused(f"round {round_num}: no update was sealed ({reasons or 'no client'})")
        update = carrier.encrypted
        statement, signature = ray.get(
            self.host.signed_contribution.remote(round_num, update.update_id)
        )
        self._deposited.add(update.update_id)
        self._filed[update.update_id] = bytes(statement)
        self._trained = round_num
        if self.policy is not None:
            self.policy.check_upload(len(update.ciphertexts), round_num)
        out = ch.OutgoingBlob.from_ciphertexts(
            f"u{round_num}", update.ciphertexts, self.key.public.ciphertext_bytes
        )
        blobs, sealed_shares = [out], []
        if recipients is not None:
            sealed = ray.get(
                self.host.sealed_shares.remote(
                    round_num, update.update_id, recipients, self.manifest_sha256, self.site_id
                )
            )
            for share in sealed:
                blob = ch.OutgoingBlob.from_array(
                    f"s{round_num}-{share.holder}", np.frombuffer(share.sealed, dtype=np.uint8)
                )
                blobs.append(blob)
                sealed_shares.append(
                    pb.SealedShare(
                        update_id=update.update_id,
                        holder=share.holder,
                        ephemeral_public=share.ephemeral_public,
                        nonce=share.nonce,
                        sealed=blob.ref,
                    )
                )
        padded = self.answer_after_s > 0
        reply = pb.TrainReply(
            round=round_num,
            update_id=update.update_id,
            contribution=statement,
            contribution_signature=signature,
            ciphertexts=out.ref,
            failures=failures,
            # A site that pads its answers sends no timings: they would undo the padding.
            train_seconds=0.0 if padded else float(sum(r.train_seconds for r in results)),
            encrypt_seconds=0.0 if padded else float(sum(r.encrypt_seconds for r in results)),
            sealed_shares=sealed_shares,
        )
        # Not before answer_after_s: when the update comes must not say how training went.
        time.sleep(max(0.0, self.answer_after_s - (time.monotonic() - came)))
        return "train_reply", reply, blobs

    def _releases(self, msg: ch.Message) -> list[Release]:
        """The opened sums a train request carries, for the host's lineage check (which
        checks their attestations, their order and every bit of the model they give)."""
        from fedray.runtime.lineage import plaintext_width

        size = self.num_ciphertexts * plaintext_width(self.key.public.n)
        body = msg.body
        data = bytes(
            msg.blob(body.release_plaintexts).array(np.uint8, (len(body.releases) * size,))
        )
        return [
            Release(
                int(r.round),
                str(r.model_sha256),
                int(r.count),
                data[k * size : (k + 1) * size],
                {int(a.holder): bytes(a.signature) for a in r.attestations},
            )
            for k, r in enumerate(body.releases)
        ]

    def _recipients(self, round_num: int, body) -> dict[int, tuple[str, bytes, str]]:
        """Every other site's key holder (by index) with its site's certificate, relayed by
        the coordinator (or relayed before) and checked against the manifest's SHA-256:
        what this site seals its update's exponent shares to. Checked before training, so
        nothing leaves for a request this site cannot seal for."""
        from fedray.federation.shares import ShareSealError, recipient_key

        manifest = self.paths.manifest_obj
        relayed = dict(body.site_certificates)
        out = {}
        for j, site in enumerate(self.paths.sites, start=1):
            if site == self.site_id:
                continue
            pem = relayed.get(site, self._certificates.get(site))
            if pem is None:
                raise ch.Refused(
                    f"round {round_num}: no certificate of site {site} to seal its key "
                    "holder's exponent shares to"
                )
            expected = manifest.sites[site].cert_sha256
            try:
                recipient_key(pem, site, expected)
            except ShareSealError as exc:
                raise ch.Refused(f"round {round_num}: {exc}") from None
            self._certificates[site] = bytes(pem)
            out[j] = (site, bytes(pem), expected)
        return out

    def _options(self, body) -> dict[str, Any]:
        """The strategy's client options the coordinator may set (FedProx's mu), within
        the site's policy when it has one; anything else is refused."""
        options: dict[str, Any] = {}
        for key, number in body.hyperparameters.items():
            value = number.real if number.WhichOneof("value") == "real" else number.integer
            if key != "proximal_mu" or not math.isfinite(value) or value < 0:
                raise ch.Refused(f"hyper-parameter {key}={value!r} is not one this site takes")
            options[key] = float(value)
        return options

    def _approve(self, msg: ch.Message) -> tuple:
        """Sign the round's list of updates, once per round, only for a sum this site can
        check: every contribution signed by its host's manifest key, this site's own
        update in it, at least ``max_colluding_sites + 2`` sites, and (with a policy) its
        ``min_sum`` and own-clients rule. The release is in the ledger before the
        signature leaves."""
        import ray

        body = msg.body
        round_num, ids = int(body.round), list(body.update_ids)
        if round_num != self._trained:
            raise ch.Refused(
                f"round {round_num}: this site trained round {self._trained or 'none'} last; "
                "it approves a sum of that round only"
            )
        signed = [contribution_from_statement(s.statement, s.signature) for s in body.contributions]
        for contribution, uid in zip(signed, ids, strict=True):
            self._check_statement(contribution, round_num, uid)
        self._check_sum(round_num, signed)
        signature = ray.get(self.host.approve.remote(round_num, ids))
        if self.policy is not None:
            self.policy.record_release(round_num, ids, self.key.fingerprint)
        approval = pb.Approval(round=round_num, update_ids=ids, signature=signature)
        approval.host = self.index
        return "approval", approval

    def _check_sum(self, round_num: int, signed: list) -> None:
        """Refuse a sum of too few sites (the coordinator alone, or with the sites it
        colludes with, would have one site's update opened), or one the policy refuses."""
        hosts = {s.contribution.host for s in signed}
        need = self.colluding_sites() + 2
        if len(hosts) < need:
            raise ch.Refused(
                f"round {round_num}: a sum of {len(hosts)} site(s); this site helps open only "
                f"sums of at least {need} sites, two honest ones beside the colluding "
                f"({self._colluding_text()})"
            )
        if self.policy is not None:
            clients = [c for s in signed for c in s.contribution.client_ids]
            # this site's own clients: from its own host's signed contribution only
            own = sum(
                len(s.contribution.client_ids) for s in signed if s.contribution.host == self.index
            )
            self.policy.check_sum(round_num, len(clients), len(hosts), own)

    def data_info(self) -> Any:
        """The model's input width and class count. ``dataset=csv``: every one of this
        site's tables is read and checked in full here, before any training, and the
        shape is the job's declared one, the same at every party (no party reads another's
        tables); a label outside ``dataset.num_classes`` is refused in one line."""
        cfg = self.cfg
        if cfg.dataset.name != "csv":
            from fedray.runtime.driver import _dataset_info  # bundled/synthetic: no site call

            return _dataset_info(cfg, None)
        from fedray.data.datasets import agreed_csv_info, csv_metadata

        info = agreed_csv_info(cfg.dataset)
        _, max_label = csv_metadata(cfg.dataset, self.client_ids)
        if max_label >= info.num_classes:
            raise DataError(
                f"site {self.site_id}: its tables hold label {max_label}; "
                f"dataset.num_classes={info.num_classes} allows labels 0.."
                f"{info.num_classes - 1} (every party must declare the same count)"
            )
        return info

    def colluding_sites(self) -> int:
        """The coalition of sites this site defends against: federation.max_colluding_sites,
        or (null, the default) t - 1 for the federation key's threshold t."""
        k = self.cfg.federation.max_colluding_sites
        return int(k) if k is not None else int(self.key.threshold) - 1

    def _colluding_text(self) -> str:
        k = self.cfg.federation.max_colluding_sites
        if k is not None:
            return f"federation.max_colluding_sites={k}"
        return f"federation.max_colluding_sites=null: t - 1 = {self.key.threshold - 1}"

    def _check_coalition(self) -> None:
        """At start: a federation too small to ever form a sum this site signs is refused
        now, in one line, not at its first round."""
        need, sites = self.colluding_sites() + 2, len(self.paths.sites)
        if need > sites:
            raise ConfigError(
                f"{self._colluding_text()}: every sum needs at least {need} sites, and the "
                f"manifest has {sites}; with fewer, the colluding sites' own updates subtract "
                "out and leave one honest site's. Allowed: federation.max_colluding_sites "
                f"from 0 to {sites - 2}"
            )

    def _check_statement(self, signed: Any, round_num: int, update_id: str) -> None:
        """A relayed contribution is checked here, before anything counts it (the site's
        policy counts clients from these): signed by its host's manifest key, of this
        key, this round and this place in the sum. The key holder checks it again."""
        from fedray.runtime.keys import update_id_host, verify

        c = signed.contribution
        if c.update_id != update_id:
            raise ch.Refused(f"round {round_num}: contributions are not in the sum's order")
        if c.key_id != self.key.fingerprint or int(c.round) != round_num:
            raise ch.Refused(
                f"round {round_num}: contribution {c.update_id!r} is of another key or round"
            )
        sites = self.paths.sites
        host_key = (
            self.paths.manifest_obj.sites[sites[c.host]].signing_key
            if 0 <= c.host < len(sites)
            else None
        )
        if host_key is None or not verify(host_key, signed.signature, c.message()):
            raise ch.Refused(
                f"round {round_num}: contribution {c.update_id!r} is not signed by its host's "
                "manifest key"
            )
        if c.job_sha256 != self.job_sha256:
            raise ch.Refused(
                f"round {round_num}: contribution {c.update_id!r} was made under another job "
                "than this site's (its digest differs: the coordinator told the sites "
                "different jobs, or a site runs another)"
            )
        # What the key holders enforce at deposit, checked here too, before this site's
        # policy counts anything from it: a colluding site could otherwise show this site
        # a statement under another site's id, or naming another site's clients (this
        # site's own, to pass its own-clients rule), and have the holders sum another.
        if update_id_host(c.update_id) != int(c.host):
            raise ch.Refused(
                f"round {round_num}: update id {c.update_id!r} is not in its host "
                f"{sites[c.host]}'s namespace"
            )
        foreign = [i for i in c.client_ids if self.assignment.get(int(i)) != int(c.host)]
        if foreign:
            raise ch.Refused(
                f"round {round_num}: site {sites[c.host]}'s contribution {c.update_id!r} names "
                f"clients it does not host ({', '.join(map(str, foreign[:5]))})"
            )
        filed = self._filed.get(c.update_id)
        if filed is not None and filed != c.message():
            raise ch.Refused(
                f"round {round_num}: update {c.update_id!r} is relayed as another contribution "
                "than the one filed with this site's key holder under that id"
            )

    def _open(self, msg: ch.Message) -> tuple:
        import ray

        from fedray.crypto.paillier import to_bytes

        body = msg.body
        round_num, ids = int(body.round), list(body.update_ids)
        width = self.key.public.ciphertext_bytes
        fast = body.opening == pb.OPENING_SHARE_SUM
        attest = body.opening == pb.OPENING_ATTEST
        signed, payloads, statements = [], [], {}
        for k, (statement, uid) in enumerate(zip(body.contributions, ids, strict=True)):
            contribution = contribution_from_statement(statement.statement, statement.signature)
            self._check_statement(contribution, round_num, uid)
            signed.append(contribution)
            statements[uid] = bytes(statement.statement)
            if not fast:
                payloads.append(bytes(msg.blob(body.ciphertexts[k]).ciphertexts(width)))
        self._check_sum(round_num, signed)
        approvals = {}
        for a in body.approvals:
            if int(a.round) != round_num or list(a.update_ids) != ids:
                raise ch.Refused(f"round {round_num}: an approval is of another sum")
            approvals[int(a.host)] = bytes(a.signature)
        self.rounds.take_part(round_num, "helps open")
        self._open_round(round_num)
        if fast:
            return self._open_share_sum(msg, round_num, ids, signed, approvals, statements)
        for s in signed:  # the others' contributions, checked by the holder on deposit
            uid = s.contribution.update_id
            if uid not in self._deposited:
                ray.get(self.holder.deposit.remote(s, None))
                self._filed[uid] = statements[uid]  # the holder took it: filed
                self._deposited.add(uid)
                self._without_share.add(uid)
        if attest:
            return self._attest(msg, round_num, ids, approvals, payloads)
        partials = ray.get(self.holder.partial_decrypt.remote(round_num, ids, approvals, payloads))
        out = ch.OutgoingBlob.from_ciphertexts(
            f"p{round_num}", to_bytes(self.key.public, partials), width
        )
        reply = pb.ShareSumReply(
            round=round_num, holder_id=self.site_id, partial_decryption=out.ref
        )
        return "share_sum_reply", reply, [out]

    def _attest(self, msg: ch.Message, round_num: int, ids, approvals, payloads) -> tuple:
        """Model checks: the holder multiplies the updates' ciphertexts itself (each
        checked against its signed digest) and signs, with the site's manifest key, that
        the claimed plaintexts open the product with the summed exponents given (see
        ``KeyHolder.attest``); a claim off by anything is refused."""
        import ray

        from fedray.crypto.threshold import ints_from_bytes
        from fedray.federation.coordinator import exponent_sum_width
        from fedray.runtime.lineage import plaintext_width

        body, n = msg.body, self.num_ciphertexts
        plaintexts = msg.blob(body.plaintexts).array(
            np.uint8, (n * plaintext_width(self.key.public.n),)
        )
        width = exponent_sum_width(self.key, len(ids))
        exponents = ints_from_bytes(
            bytes(msg.blob(body.exponents).array(np.uint8, (n * width,))), width
        )
        signature = ray.get(
            self.holder.attest.remote(
                round_num, ids, approvals, payloads, bytes(plaintexts), exponents
            )
        )
        reply = pb.ShareSumReply(round=round_num, holder_id=self.site_id, attestation=signature)
        return "share_sum_reply", reply

    def _open_share_sum(
        self, msg: ch.Message, round_num: int, ids, signed, approvals, statements
    ) -> tuple:
        """The fast path: open each other site's exponent share sealed to this site's
        holder (bound to the round, the update and the holder, from the contribution its
        host signed), deposit it with the contribution (the holder checks its digest
        against the signed ``share_sha256``), and answer the holder's share sum. The
        holder's rules are those of any sum: one per round, distinct clients, approvals,
        its window."""
        import ray

        from fedray.federation.shares import TAG_BYTES, SealedShare, ShareContext, open_share

        own = self.index + 1
        sealed = {}
        for share in msg.body.sealed_shares:
            if int(share.holder) != own:
                raise ch.Refused(
                    f"round {round_num}: an exponent share for holder {share.holder}; this "
                    f"site's key holder is holder {own}"
                )
            sealed[share.update_id] = share
        manifest, sites = self.paths.manifest_obj, self.paths.sites
        for s in signed:
            c = s.contribution
            if c.update_id in self._deposited and c.update_id not in self._without_share:
                continue  # its share is with the holder already (this site's own, or asked before)
            share = sealed.get(c.update_id)
            if share is None:
                raise ch.Refused(
                    f"round {round_num}: no exponent share of update {c.update_id!r} for this "
                    "site's key holder"
                )
            context = ShareContext(
                self.key.fingerprint,
                self.manifest_sha256,
                round_num,
                c.update_id,
                sites[c.host],
                self.site_id,
                own,
                manifest.sites[self.site_id].cert_sha256,
            )
            data = msg.blob(share.sealed).array(np.uint8, (self.share_bytes + TAG_BYTES,))
            opened = open_share(
                self._tls_key,
                context,
                SealedShare(
                    share.holder, bytes(share.ephemeral_public), bytes(share.nonce), bytes(data)
                ),
                self.share_bytes,
            )
            ray.get(self.holder.deposit.remote(s, opened))
            self._filed[c.update_id] = statements[c.update_id]
            self._deposited.add(c.update_id)
            self._without_share.discard(c.update_id)
        total = ray.get(self.holder.share_sum.remote(round_num, ids, approvals))
        out = ch.OutgoingBlob.from_ciphertexts(
            f"x{round_num}", total, self.key.share_width(len(ids))
        )
        reply = pb.ShareSumReply(
            round=round_num, holder_id=self.site_id, exponent_share_sum=out.ref
        )
        return "share_sum_reply", reply, [out]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def run_site(cfg: FedrayConfig) -> None:
    """Start the site and serve until the coordinator is done or Ctrl-C."""
    agent = SiteAgent(cfg)
    stop = threading.Event()

    def on_signal(signum, frame):  # Ctrl-C / SIGTERM: close the channel, stop Ray
        stop.set()
        agent.close()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        agent.start()
        print(
            f"[fedray.site] site {agent.site_id}: {len(agent.client_ids)} clients ready; "
            f"dialling the coordinator at {cfg.federation.connect}",
            flush=True,
        )
        agent.serve(max_wait_s=cfg.federation.connect_timeout_s)
    except KeyboardInterrupt:
        pass
    finally:
        agent.close()
        signal.signal(signal.SIGTERM, previous)
