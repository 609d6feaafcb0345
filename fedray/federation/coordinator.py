"""The coordinator's side of ``federation=cross_org``: the same server and rounds, with
each site reached through the federation channel instead of a Ray handle.

The launcher's driver starts a :class:`FederationHub` actor in the coordinator's own Ray
cluster. It serves the federation endpoint (mTLS gRPC, :mod:`fedray.federation.channel`)
and waits for the manifest's sites to dial in. The server actor is then given one
:class:`SiteHandle` per site as its client hosts *and* as its key holders: a handle's
``train``, ``approve``, ``sealed_payload``, ``partial_decrypt`` and ``share_sum`` look like
those of a :class:`~fedray.runtime.client.ClientHost` and a
:class:`~fedray.runtime.keys.KeyHolder`
(``handle.train.remote(...)`` returns an ObjectRef), and the hub turns each call into one
typed request to that site. So a round reads the same in both deployments
(:meth:`fedray.runtime.server.Server.run_round`): no forked round logic.

What the coordinator holds: the federation's public key (``federation_key.json``, signed
by the dealer site), the sites' ciphertexts and signed statements, the exponent shares the
sites sealed to each other (relayed unopened: it cannot open one), the holders' share sums
and what the server opens. No key share, no site actor and no handle to anything inside a site: the
coordinator's Ray cluster has the server, the hub and nothing of the sites'.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from fedray.config import FedrayConfig
from fedray.errors import ClusterError, ConfigError

log = logging.getLogger("fedray.coordinator")

# What the server may call on a site through its handle (the closed list of requests).
HANDLE_METHODS = frozenset(
    {
        "train",
        "approve",
        "sealed_payload",
        "partial_decrypt",
        "share_sum",
        "attest",
        "attestation_key",
        "ready",
        "trainable",
        "holds",
    }
)
# How a site's refusal to train on a global model it could not verify begins (the site
# agent writes it; the hub raises it as a LineageError, which stops the run).
MODEL_REFUSAL = "refusing to train: "


class _RemoteMethod:
    def __init__(self, hub: Any, index: int, name: str):
        self._hub, self._index, self._name = hub, index, name

    def remote(self, *args: Any) -> Any:
        return getattr(self._hub, self._name).remote(self._index, *args)


class SiteHandle:
    """Site ``index`` of the manifest as the server sees it: a client host and a key
    holder whose calls go through the hub. Picklable (a hub handle and an index)."""

    def __init__(self, hub: Any, index: int, site_id: str):
        self._hub, self._index, self.site_id = hub, int(index), site_id

    def __getattr__(self, name: str) -> _RemoteMethod:
        if name not in HANDLE_METHODS:
            raise AttributeError(f"a site handle has no method {name!r}")
        return _RemoteMethod(self._hub, self._index, name)

    def __repr__(self) -> str:
        return f"SiteHandle({self.site_id})"


class FederationHub:
    """The federation endpoint, as a Ray actor of the coordinator's cluster (threaded:
    one call per site in flight). Every site request goes out from here."""

    def __init__(self, cfg: FedrayConfig, key: Any, info: Any):
        from fedray.federation import channel as ch
        from fedray.federation.site import Paths, agreed_job, job_digest

        self.cfg = cfg
        self.paths = Paths(cfg)
        self.sites = self.paths.sites
        self.key = key
        self.width = key.public.ciphertext_bytes
        self._info = info
        self._model_facts: tuple[bytes, int] | None = None  # see _model
        self._sealed: dict[str, tuple[int, bytes, bytes, bytes]] = {}  # update -> round, ...
        # update -> holder index -> its exponent share, sealed to that holder's site (the
        # fast path): relayed unopened, the coordinator cannot open one
        self._shares: dict[str, dict[int, tuple[bytes, bytes, bytes]]] = {}
        # Model checks: the last round each site trained in its current session (its chain
        # of models is verified up to the round before): the opened sums it is sent with
        # the next request. A new session (a reconnected or restarted site, whose chain may
        # start again at round 0) is sent every sum again.
        self._trained: dict[int, tuple[Any, int]] = {}
        self._closing = False
        self._job_sha256 = job_digest(cfg)  # every site signs it into each contribution
        self.coord = ch.listen(
            cfg.federation.listen,
            self.paths.cert,
            self.paths.key,
            self.paths.ca,
            manifest=self.paths.manifest_obj,
            signing_key=self.paths.signing_key,
            max_blob_bytes=1 << 30,
            job=agreed_job(cfg),
        )

    def port(self) -> int:
        return int(self.coord.port)

    def wait_for_sites(self, timeout: float) -> list[str]:
        self.coord.wait_for(self.sites, timeout)
        return self.coord.connected()

    def ready(self, index: int) -> bool:
        return self.sites[index] in self.coord.connected()

    def holds(self, index: int, round_num: int, update_ids: list[str]) -> bool:
        """Whether site ``index`` is still the session that sent this round's update (not
        gone, nor back as another process): asked of every site of a sum before any is
        asked to approve it."""
        last_peer, last_round = self._trained.get(index, (None, 0))
        if last_round != int(round_num) or self.sites[index] not in self.coord.connected():
            return False
        try:
            return self._peer(index) is last_peer
        except Exception:  # gone since
            return False

    def trainable(self, index: int) -> bool:
        """A site sets itself up again after a restart: nothing for the driver to do."""
        return True

    def close(self, reason: str = "the run is over") -> bool:
        self._closing = True  # a call still in flight (a holder asked past the t-th) ends quietly
        for site in self.coord.connected():
            try:
                self.coord.site(site).say_goodbye(reason)
            except Exception as exc:  # gone already
                log.debug("site %s: %s", site, exc)
        self.coord.close()
        return True

    def _peer(self, index: int):
        return self.coord.site(self.sites[index])

    def _model(self) -> tuple[bytes, int]:
        """The fingerprint of the model the coordinator runs (names, dtypes, shapes of the
        exchanged parameters: a site's policy accepts only the model it expects) and the
        number of values its updates pack; the model is built once, on first use."""
        if self._model_facts is None:
            from fedray.crypto.secure_aggregation import codec_for
            from fedray.federation.policy import model_fingerprint
            from fedray.models import ParamView
            from fedray.tasks.base import build_task, build_task_model

            model = build_task_model(build_task(self.cfg, self._info), self.cfg.seed)
            size = ParamView(model, self.cfg.model.trainable).size
            self._model_facts = (
                bytes.fromhex(model_fingerprint(model, self.cfg.model.trainable)),
                codec_for(self.cfg, self.key.public, size).num_values,
            )
        return self._model_facts

    def _timeout(self) -> float:
        return float(self.cfg.round_timeout_s or 3600.0)

    # -- a site as a client host ----------------------------------------------------------
    def train(self, index: int, task: Any, weights: Any) -> list:
        """Ask site ``index`` to train its clients of the round; its one sealed update,
        as the server folds it (carried by the first client's result)."""
        import numpy as np

        from fedray.crypto.secure_aggregation import EncryptedUpdate
        from fedray.federation import channel as ch
        from fedray.federation import federation_pb2 as pb
        from fedray.runtime.client import ClientResult

        site = self.sites[index]
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        blob = ch.OutgoingBlob.from_array(f"w{task.round}", weights)
        hyper = {
            k: pb.Number(real=float(v))
            for k, v in task.options.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        peer = self._peer(index)
        releases, plaintexts = self._releases(index, peer, task.releases)
        request = pb.TrainRequest(
            round=int(task.round),
            task_id=self.cfg.federation.task_id,
            task_version=self.cfg.federation.task_version,
            model_fingerprint=self._model()[0],
            hyperparameters=hyper,
            global_weights=blob.ref,
            client_ids=sorted(int(c) for c in task.client_ids),
            site_certificates=self.coord.certificates(),
            releases=releases,
        )
        blobs = [blob]
        if plaintexts is not None:
            request.release_plaintexts.CopyFrom(plaintexts.ref)
            blobs.append(plaintexts)
        try:
            reply = peer.call("train_request", request, blobs, self._timeout())
        except ch.PeerRefused as exc:
            reason = str(exc).split(": ", 1)[-1]
            if reason.startswith(MODEL_REFUSAL):
                from fedray.runtime.lineage import LineageError

                raise LineageError(f"site {site}: {reason}") from None
            raise
        self._trained[index] = (peer, int(task.round))
        body = reply.body
        statement = json.loads(bytes(body.contribution))
        ids = tuple(int(c) for c in statement.get("client_ids", ()))
        if int(body.round) != int(task.round) or statement.get("update_id") != body.update_id:
            raise ClusterError(f"site {site} answered round {task.round} with another update")
        problem = statement_problem(
            bytes(body.contribution),
            bytes(body.contribution_signature),
            self.paths.manifest_obj.sites[site].signing_key,
            index,
            self.key.fingerprint,
            int(task.round),
            {int(c) for c in task.client_ids},
            self._job_sha256,
        )
        if problem:  # what every key holder would refuse: the round would stall, unnamed
            raise ClusterError(f"site {site}'s contribution of round {task.round}: {problem}")
        data = bytes(reply.blob(body.ciphertexts).ciphertexts(self.width))
        shares = {}
        for share in body.sealed_shares:
            holder = int(share.holder)
            if not 1 <= holder <= len(self.sites) or holder == index + 1:
                raise ClusterError(f"site {site} sealed an exponent share for holder {holder}")
            sealed = reply.blob(share.sealed)
            shares[holder] = (
                bytes(share.ephemeral_public),
                bytes(share.nonce),
                bytes(sealed.array(np.uint8, (sealed.header.total_size,))),
            )
        self._sealed[body.update_id] = (
            int(task.round),
            data,
            bytes(body.contribution),
            bytes(body.contribution_signature),
        )
        self._shares[body.update_id] = shares
        for old in [u for u, v in self._sealed.items() if v[0] < int(task.round) - 1]:
            del self._sealed[old]
            self._shares.pop(old, None)
        failed = {int(f.client_id): f.reason for f in body.failures}
        results = []
        for cid in sorted(int(c) for c in task.client_ids):
            if cid in failed:
                results.append(ClientResult(cid, error=failed[cid], node_id=site))
            elif cid in ids:
                results.append(ClientResult(cid, node_id=site))
            else:
                results.append(ClientResult(cid, error="not in the site's update", node_id=site))
        carrier = next((r for r in results if r.client_id in ids), None)
        if carrier is None:
            raise ClusterError(f"site {site} sealed an update of none of the round's clients")
        carrier.encrypted = EncryptedUpdate(
            key_id=str(statement.get("key_id", "")),
            num_values=self._model()[1],
            ciphertexts=data,
            count=len(ids),
            client_ids=ids,
            update_id=body.update_id,
        )
        carrier.bytes_up = len(data)
        carrier.bytes_to_key_holders = sum(len(v[2]) for v in shares.values())  # sealed, relayed
        carrier.train_seconds = float(body.train_seconds)
        carrier.encrypt_seconds = float(body.encrypt_seconds)
        return results

    def _releases(self, index: int, peer: Any, releases: Any) -> tuple[list, Any]:
        """The attested opened sums site ``index`` has not seen in this session (those
        from the last round it trained on), as a train request carries them, and the one
        blob of their plaintexts (None without any)."""
        from fedray.federation import federation_pb2 as pb

        if releases is not None and not isinstance(releases, list | tuple):
            import ray

            releases = ray.get(releases)
        last_peer, last_round = self._trained.get(index, (None, 0))
        since = last_round if last_peer is peer else 0
        out, data = [], []
        for release in sorted(releases or [], key=lambda r: r.round):
            if release.round < since:
                continue
            data.append(bytes(release.plaintexts))
            out.append(
                pb.Release(
                    round=int(release.round),
                    model_sha256=release.model_sha256,
                    count=int(release.count),
                    attestations=[
                        pb.Attestation(holder=int(j), signature=bytes(sig))
                        for j, sig in sorted(release.attestations.items())
                    ],
                )
            )
        if not out:
            return out, None
        # one blob for all of them (a message carries at most 64 blobs)
        return out, self._bytes_blob("m", b"".join(data))

    def approve(self, index: int, round_num: int, update_ids: list[str]) -> bytes:
        from fedray.federation import federation_pb2 as pb

        ids = sorted(str(u) for u in update_ids)
        statements = []
        for uid in ids:
            sealed = self._sealed.get(uid)
            if sealed is None:
                raise ClusterError(f"round {round_num}: no signed contribution for {uid!r}")
            statements.append(pb.SignedStatement(statement=sealed[2], signature=sealed[3]))
        request = pb.ApproveRequest(round=int(round_num), update_ids=ids, contributions=statements)
        reply = self._peer(index).call("approve_request", request, (), self._timeout())
        if int(reply.body.round) != int(round_num) or list(reply.body.update_ids) != ids:
            raise ClusterError(f"site {self.sites[index]} approved another sum")
        if int(reply.body.host) != index:
            raise ClusterError(f"site {self.sites[index]} signed as host {reply.body.host}")
        return bytes(reply.body.signature)

    def sealed_payload(self, index: int, round_num: int, update_id: str) -> bytes:
        """The ciphertexts the site sent with its update (kept here: the coordinator
        received them anyway; the key holders check them against the signed digest)."""
        sealed = self._sealed.get(str(update_id))
        if sealed is None or sealed[0] != int(round_num):
            raise LookupError(f"round {round_num}: no update {update_id!r} from this site")
        return sealed[1]

    # -- a site as a key holder -----------------------------------------------------------
    def partial_decrypt(
        self,
        index: int,
        round_num: int,
        update_ids: list[str],
        approvals: dict[int, bytes],
        payloads: list[Any],
        start: int = 0,
        stop: int | None = None,
    ) -> list[int]:
        """Ask site ``index``'s key holder for its partial decryption of the product of
        these updates: it is sent every update's ciphertexts and signed contribution and
        every host's approval, checks them all and multiplies them itself."""
        from fedray.crypto.paillier import from_bytes

        if start != 0 or stop is not None:
            raise PermissionError("across organisations key holders open whole sums only")
        request, blobs = self._with_ciphertexts(round_num, update_ids, approvals, payloads)
        reply = self._ask_holder(index, round_num, request, blobs, "partial_decryption")
        if reply is None:
            return []
        data = bytes(reply.blob(reply.body.partial_decryption).ciphertexts(self.width))
        return [int(x) for x in from_bytes(self.key.public, data)]

    def attestation_key(self, index: int) -> bytes:
        """The key site ``index``'s holder attests opened sums with: its site's manifest
        signing key (the one every site checks attestations with)."""
        return bytes(self.paths.manifest_obj.sites[self.sites[index]].signing_key)

    def attest(
        self,
        index: int,
        round_num: int,
        update_ids: list[str],
        approvals: dict[int, bytes],
        payloads: list[Any],
        plaintexts: bytes,
        exponents: list[int] | None,
    ) -> bytes:
        """Ask site ``index``'s key holder to attest that ``plaintexts`` open the product
        of these updates' ciphertexts (sent to it with every signed contribution and
        approval, as for a partial decryption), given the summed exponents ``exponents``
        of the fast path: it multiplies them itself, checks and signs
        (``KeyHolder.attest``)."""
        from fedray.crypto.threshold import ints_to_bytes
        from fedray.federation import federation_pb2 as pb

        if exponents is None:
            raise PermissionError("across organisations a sum is attested with its exponents")
        request, blobs = self._with_ciphertexts(round_num, update_ids, approvals, payloads)
        width = exponent_sum_width(self.key, len(update_ids))
        sums = self._bytes_blob("m", bytes(plaintexts))
        xs = self._bytes_blob("x", ints_to_bytes([int(x) for x in exponents], width))
        request.opening = pb.OPENING_ATTEST
        request.plaintexts.CopyFrom(sums.ref)
        request.exponents.CopyFrom(xs.ref)
        reply = self._ask_holder(index, round_num, request, [*blobs, sums, xs], "attestation")
        return b"" if reply is None else bytes(reply.body.attestation)

    def _with_ciphertexts(
        self, round_num: int, update_ids: list[str], approvals: dict[int, bytes], payloads
    ) -> tuple[Any, list]:
        """A share-sum request for a key holder that multiplies the updates itself (a
        partial decryption, an attestation): the sorted ids, every host's approval, and for
        each update its signed contribution and its ciphertexts (one blob each)."""
        import ray

        from fedray.federation import channel as ch
        from fedray.federation import federation_pb2 as pb

        payloads = [p if isinstance(p, bytes | bytearray) else ray.get(p) for p in payloads]
        order = sorted(range(len(update_ids)), key=lambda k: str(update_ids[k]))
        ids = [str(update_ids[k]) for k in order]
        blobs, statements = [], []
        for n, k in enumerate(order):
            statements.append(self._statement(round_num, ids[n]))
            blobs.append(ch.OutgoingBlob.from_ciphertexts(f"c{n}", payloads[k], self.width))
        request = pb.ShareSumRequest(
            round=int(round_num),
            update_ids=ids,
            approvals=_approvals(round_num, ids, approvals),
            contributions=statements,
            ciphertexts=[b.ref for b in blobs],
        )
        return request, blobs

    def _ask_holder(self, index: int, round_num: int, request, blobs, answer: str):
        """Send a share-sum request to site ``index``'s key holder; its reply, checked to
        be of this round, this holder and the ``answer`` asked for (None if the run ended
        meanwhile: a holder asked past the t-th)."""
        try:
            reply = self._peer(index).call("share_sum_request", request, blobs, self._timeout())
        except Exception:
            if self._closing:
                return None
            raise
        body, site = reply.body, self.sites[index]
        if int(body.round) != int(round_num) or body.holder_id != site:
            raise ClusterError(f"site {site} answered for another round or holder")
        if body.WhichOneof("answer") != answer:
            raise ClusterError(f"site {site} answered no {answer.replace('_', ' ')}")
        return reply

    def _statement(self, round_num: int, uid: str):
        """The signed contribution a site's host sent for update ``uid`` of this round, as
        relayed to the other sites (LookupError if there is none)."""
        from fedray.federation import federation_pb2 as pb

        entry = self._sealed.get(uid)
        if entry is None or entry[0] != int(round_num):
            raise LookupError(f"round {round_num}: no signed contribution for {uid!r}")
        return pb.SignedStatement(statement=entry[2], signature=entry[3])

    def share_sum(
        self, index: int, round_num: int, update_ids: list[str], approvals: dict[int, bytes]
    ) -> bytes:
        """The fast path: site ``index``'s key holder's share of the summed obfuscator
        exponents of these updates. It is sent every update's signed contribution, every
        host's approval and, for each other site's update, the exponent share that site
        sealed to it (no ciphertexts); it opens the shares, checks each against the digest
        its host signed and answers under its holder's rules. The server interpolates X
        from ``t`` answers and strips ``hs^X`` itself, as in one cluster."""
        from fedray.federation import federation_pb2 as pb

        holder = index + 1
        ids = sorted(str(u) for u in update_ids)
        statements, sealed, blobs = [], [], []
        for n, uid in enumerate(ids):
            statements.append(self._statement(round_num, uid))
            if int(json.loads(self._sealed[uid][2]).get("host", -1)) == index:
                continue  # the site's own update: its share is at home
            share = self._shares.get(uid, {}).get(holder)
            if share is None:
                raise LookupError(
                    f"round {round_num}: update {uid!r} came with no exponent share for "
                    f"site {self.sites[index]}'s key holder"
                )
            blob = self._bytes_blob(f"s{n}", share[2])
            blobs.append(blob)
            sealed.append(
                pb.SealedShare(
                    update_id=uid,
                    holder=holder,
                    ephemeral_public=share[0],
                    nonce=share[1],
                    sealed=blob.ref,
                )
            )
        request = pb.ShareSumRequest(
            round=int(round_num),
            update_ids=ids,
            approvals=_approvals(round_num, ids, approvals),
            contributions=statements,
            opening=pb.OPENING_SHARE_SUM,
            sealed_shares=sealed,
        )
        reply = self._ask_holder(index, round_num, request, blobs, "exponent_share_sum")
        if reply is None:
            return b""
        width = self.key.share_width(len(ids))
        return bytes(reply.blob(reply.body.exponent_share_sum).ciphertexts(width))

    @staticmethod
    def _bytes_blob(blob_id: str, data: bytes):
        import numpy as np

        from fedray.federation import channel as ch

        return ch.OutgoingBlob.from_array(blob_id, np.frombuffer(data, dtype=np.uint8))


def exponent_sum_width(key: Any, summands: int) -> int:
    """Bytes per summed obfuscator exponent X of ``summands`` updates (each X is below
    ``summands << exponent_bits``): the fixed width an attest request carries them in."""
    return ((int(summands) << key.exponent_bits).bit_length() + 7) // 8


def statement_problem(
    statement: bytes,
    signature: bytes,
    site_key: bytes,
    host: int,
    key_id: str,
    round_num: int,
    clients: set[int],
    job_sha256: str = "",
) -> str:
    """What is wrong with a site's signed contribution, as the key holders would see it
    ("" if nothing): the coordinator checks a train reply's statement when it arrives, so
    a faulty or hostile site is named at once instead of every holder refusing the sum."""
    from fedray.federation.site import contribution_from_statement
    from fedray.runtime.keys import update_id_host, verify

    try:
        c = contribution_from_statement(statement, signature).contribution
    except PermissionError as exc:
        return str(exc)
    if not verify(site_key, signature, statement):
        return "not signed by the site's manifest key"
    if c.key_id != key_id or int(c.round) != int(round_num) or int(c.host) != int(host):
        return "of another key, round or host"
    if update_id_host(c.update_id) != int(host):
        return f"update id {c.update_id!r} is not in the site's namespace"
    if c.job_sha256 != job_sha256:
        return "made under another job than the coordinator's (its declared job's digest differs)"
    outside = sorted(set(c.client_ids) - clients)
    if outside:
        return f"names clients it was not asked to train ({', '.join(map(str, outside[:5]))})"
    return ""


def _approvals(round_num: int, ids: list[str], approvals: dict[int, bytes]) -> list:
    """The hosts' approvals of the sum ``ids``, as a share-sum request carries them."""
    from fedray.federation import federation_pb2 as pb

    return [
        pb.Approval(round=int(round_num), update_ids=ids, signature=sig, host=int(h))
        for h, sig in sorted(approvals.items())
    ]


@dataclass
class RemoteCustody:
    """The driver's view of key custody across organisations: the sites' holders (their
    handles) and the public key. The driver opens no round and registers no host: each
    site's agent is its own holder's authority."""

    key: Any
    holders: list[SiteHandle]
    dealer_node: str | None = None  # "site:<id>" of the site that dealt the key
    holder_nodes: list[str] | None = None

    def restrict(self, first_round: int, last_round: int) -> None:
        if first_round > 1:
            log.info(
                "resuming across organisations from round %d: each site's key holder, "
                "record of rounds and policy decide whether it takes part again",
                first_round,
            )

    def open_round(self, round_num: int) -> None:
        return None

    def re_register(self, index: int, public: bytes, from_round: int) -> None:
        return None


def check_coordinator_config(cfg: FedrayConfig) -> None:
    from fedray.federation.site import check_cross_org_job

    check_cross_org_job(cfg)


def start_sites(job: Any, server_cls: Any) -> None:
    """The driver's set-up across organisations: the public key, the hub, the sites
    dialling in; then the server, wired to them through their handles."""
    import ray

    from fedray.federation.site import Paths, check_key_size, federation_clients
    from fedray.runtime.cluster import Placement
    from fedray.runtime.driver import _dataset_info, _get
    from fedray.tools.keys import load_federation_key

    cfg = job.cfg
    check_coordinator_config(cfg)
    paths = Paths(cfg)
    key = load_federation_key(
        paths.federation_key, paths.manifest, allow_insecure=cfg.crypto.allow_insecure_keys
    )
    check_key_size(cfg, key)
    clients = federation_clients(paths.manifest)
    total = sum(len(c) for c in clients.values())
    if cfg.num_clients != total:
        raise ConfigError(
            f"num_clients={cfg.num_clients}, but the manifest's sites have {total} clients"
        )
    job.placement = Placement(
        "cross_org", [clients[s] for s in paths.sites], [{} for _ in paths.sites]
    )
    job.info = _dataset_info(cfg, job.placement)
    hub_cls = ray.remote(num_cpus=0, max_concurrency=4 * len(paths.sites) + 4)(FederationHub)
    job.hub = hub_cls.remote(cfg, key, job.info)
    port = _get(job.hub.port.remote())
    job.server = server_cls.remote(cfg, job.info)
    if cfg.progress:
        print(
            f"[fedray] federation endpoint on port {port}: waiting up to "
            f"{cfg.federation.connect_timeout_s:g} s for sites {', '.join(paths.sites)}",
            flush=True,
        )
    t0 = time.monotonic()
    _get(job.hub.wait_for_sites.remote(cfg.federation.connect_timeout_s))
    log.info("all %d sites connected in %.1f s", len(paths.sites), time.monotonic() - t0)
    job.hosts = [SiteHandle(job.hub, i, s) for i, s in enumerate(paths.sites)]
    job.described = {
        c: {"node_id": f"site:{s}", "device": "site", "gpu_ids": []}
        for s in paths.sites
        for c in clients[s]
    }
    dealer = json.loads(paths.federation_key.read_text()).get("dealer")
    job.custody = RemoteCustody(
        key, job.hosts, f"site:{dealer}", [f"site:{s}" for s in paths.sites]
    )
    job.public_key = key
    job.weight_ref = None
