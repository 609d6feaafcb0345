"""Key custody at run time: the one-shot key dealer, and the key holders at the sites.

Threat model (threshold custody, the default). The server is honest-but-curious and may
deviate from the protocol with what it holds: the public key, every ciphertext, the
decrypted aggregates, and a Ray handle to every client host and key holder (so it can call
any of their methods with any arguments). It must not learn one client's update. So:

* **No single process holds the private key after set-up.** :class:`KeyDealer` makes the
  key, pushes one decryption share to each :class:`KeyHolder` (holder -> never returned),
  drops the factors and is killed by the driver. No method of any actor returns key
  material; ``install`` is one-shot.
* **Key holders decide themselves what they help decrypt.** Each host signs (Ed25519) a
  :class:`Contribution` for every encrypted update it sends: round, update id, which of
  *its* clients it covers, digests of the ciphertexts and of each holder's exponent
  shares. The hosts' verification keys and the client -> host assignment are given to
  each holder at construction by the driver (the trusted set-up party), so the server
  cannot add Sybil contributions. An update id lives in its host's namespace
  (``h<host>-`` and 128 random bits, :func:`new_update_id`): a holder takes a contribution
  only under an id of the host that signed it, so no host -- nor a server with one --
  can file its own contribution under another host's id and have it summed in that
  update's place. A holder helps decrypt a sum only if every update in it
  was deposited with a valid signature for that round, the updates cover at least
  ``min_clients`` distinct clients with none counted twice, and the round is not older
  than the last one it released. It releases at most one sum per round (asking again
  for the *same* sum is answered again).
* **One sum per round is the data owners' rule, not only the holders'.** Once a cohort is
  fixed, every host with an update in the sum signs (key, round, the sorted update ids)
  -- at most one list per round -- and a holder opens a sum only if every host in it
  signed exactly that list with the identity that signed its updates. Holders alone
  could not enforce it: two t-sets of h holders meet in 2t - h holders, so c >= 2t - h
  holders colluding with the server (one when h is odd) could open a cohort without a
  victim with one set and with it with another, and subtract. With host approvals, two
  different sums of one round that share an honest host's update need that host to sign
  two lists, which it never does. The bound: the server together with any t - 1 key
  holders and any k colluding clients learns nothing about one honest client's update
  beyond the sum of the at least ``min_clients - k`` honest clients of a released sum.
* **Restarted hosts.** A restarted host has a new identity (and no memory of what the
  dead one approved); only the driver can vouch for it (a registration signed with the
  driver's set-up key, with a per-host epoch that only grows), never the server, and
  only from the round after the one in flight: it never deposits in a round its
  predecessor may have approved a sum of.

Within one Ray cluster this protects against a curious server process (and what it
receives, logs and checkpoints). Ray runs the submitted job's code on every node: a site
that does not trust the submitter must run only fedray and job code it installed itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import gmpy2

from fedray.crypto.paillier import (
    PrivateKey,
    check_ciphertexts,
    ciphertext_chunks,
    multiply_into,
)
from fedray.crypto.secure_aggregation import FOLD_CHUNK
from fedray.crypto.threshold import (
    DecryptionShare,
    ThresholdPublicKey,
    add_share_blobs,
    deal_threshold_key,
    partial_decrypt,
)

log = logging.getLogger("fedray.keys")

KEEP_ROUNDS = 2  # deposits of older rounds (stragglers' leftovers) are dropped
# How long the slow path waits for a host to hand back an update's ciphertexts (a host
# still busy with a late call answers after it; a hung one must not hang the round).
PAYLOAD_FETCH_TIMEOUT_S = 300.0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_UPDATE_ID = re.compile(r"h(0|[1-9][0-9]{0,5})-[0-9A-Za-z_-]{1,56}")


def new_update_id(host: int) -> str:
    """A fresh id for one of ``host``'s updates: ``h<host>-`` and 128 random bits (hex).

    The prefix is the host's namespace: a key holder takes a contribution only under an
    id of the host that signed it (:func:`update_id_host`), so a colluding host cannot
    file its own contribution under an honest host's id (to have it summed in the honest
    update's place, a step of opening that update alone)."""
    import secrets

    return f"h{int(host)}-{secrets.token_hex(16)}"


def update_id_host(update_id: str) -> int | None:
    """The host whose namespace ``update_id`` is in, or None if it is in none."""
    match = _UPDATE_ID.fullmatch(update_id) if isinstance(update_id, str) else None
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Contribution:
    """What a host vouches for about one encrypted update it sent (signed, Ed25519)."""

    key_id: str
    round: int
    update_id: str
    host: int
    client_ids: tuple[int, ...]
    ciphertext_sha256: str
    share_sha256: tuple[str, ...] = ()  # one per key holder; () when no shares travel
    # Digest of the global weights the update was trained from: a sum mixes only updates
    # of the same model, so the server cannot send one site crafted weights that zero its
    # update and leave another site's update alone in a "sum" (model inconsistency).
    model_sha256: str = ""
    # Across organisations: the SHA-256 of the job its site declared
    # (fedray.federation.site.job_digest): a key holder sums only updates of its own
    # site's job, so a coordinator that told two sites different jobs gets no sum of both.
    job_sha256: str = ""

    def message(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedContribution:
    contribution: Contribution
    signature: bytes


class HostIdentity:
    """A host's Ed25519 signing key. Made in the host's process; only the public half leaves."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.generate()

    @classmethod
    def from_private_key(cls, key: Any) -> HostIdentity:
        """An identity with a given Ed25519 private key: across organisations, a site's
        host signs with the site's own manifest key, which every key holder knows."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"an Ed25519 private key is needed, not a {type(key).__name__}")
        identity = cls.__new__(cls)
        identity._key = key
        return identity

    @classmethod
    def from_pem(cls, pem: bytes) -> HostIdentity:
        """An identity from a PEM Ed25519 private key file's bytes (a site's signing.key)."""
        from cryptography.hazmat.primitives import serialization

        return cls.from_private_key(serialization.load_pem_private_key(bytes(pem), None))

    def __repr__(self) -> str:
        return "HostIdentity(<secret>)"

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, contribution: Contribution) -> SignedContribution:
        return SignedContribution(contribution, self._key.sign(contribution.message()))

    def sign_bytes(self, message: bytes) -> bytes:
        return self._key.sign(message)


class CohortApprover:
    """A host's side of the consistency step: it signs the list of updates of one sum per
    round, with its identity, and never another list for that round.

    The same list again gets the same signature (the server may open it by a second
    path); a different list of that round, or a list of an older round, is refused; so
    is a list that holds none of the updates ``own`` (this host's of the round)."""

    def __init__(self, identity: HostIdentity):
        self._identity = identity
        self._last: tuple[int, tuple[str, ...], bytes] | None = None

    def __repr__(self) -> str:
        return "CohortApprover(<identity>)"

    def approve(self, key_id: str, round_num: int, update_ids, own) -> bytes:
        round_num = int(round_num)
        ids = tuple(sorted(str(u) for u in update_ids))
        if not ids or len(set(ids)) != len(ids):
            raise PermissionError("a sum must name distinct updates")
        if self._last is not None and self._last[0] == round_num:
            if self._last[1] != ids:
                raise PermissionError(
                    f"round {round_num}: this host already approved a different sum"
                )
            return self._last[2]
        if self._last is not None and round_num < self._last[0]:
            raise PermissionError(f"round {round_num} is older than one already approved")
        if not set(ids) & {str(u) for u in own}:
            raise PermissionError(f"round {round_num}: the sum holds no update of this host")
        signature = self._identity.sign_bytes(cohort_message(key_id, round_num, ids))
        self._last = (round_num, ids, signature)
        return signature


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def configure_message(
    key_id: str,
    host: int,
    holder_ids: list[str],
    holder_keys: dict[int, bytes] | None = None,
    root: bytes | None = None,
) -> bytes:
    """What the driver signs so a host accepts its key and key holders (and no others);
    with model checks, also the holders' attestation keys and the chain's start
    (:func:`fedray.runtime.lineage.root_message`)."""
    body: dict[str, Any] = {"key": key_id, "host": host, "holders": list(holder_ids)}
    if holder_keys is not None:
        body["attest"] = {str(j): bytes(k).hex() for j, k in sorted(holder_keys.items())}
        body["root"] = hashlib.sha256(root or b"").hexdigest()
    return json.dumps(body, sort_keys=True).encode()


def weight_ref_message(weight_ref: float) -> bytes:
    """What the driver signs so a host accepts the federation's weight reference."""
    return json.dumps({"weight_ref": float(weight_ref)}, sort_keys=True).encode()


def scaling_message(scaling: dict) -> bytes:
    """What the driver signs so a host prepares its data with the federation's feature
    scaling (:class:`~fedray.data.datasets.FeatureScaling`, as a dict)."""
    return json.dumps({"feature_scaling": scaling}, sort_keys=True).encode()


def registration_message(
    key_id: str, host: int, public_key: bytes, epoch: int, from_round: int
) -> bytes:
    """What the driver signs so key holders accept a restarted host's new identity, for
    its deposits of rounds ``from_round`` on (never the round it was restarted in)."""
    return json.dumps(
        {
            "key": key_id,
            "host": host,
            "identity": public_key.hex(),
            "epoch": epoch,
            "from_round": from_round,
        },
        sort_keys=True,
    ).encode()


def round_ticket_message(key_id: str, round_num: int) -> bytes:
    """What the driver signs to open a round: key holders take deposits of, and open sums
    of, only rounds the driver opened, so the server cannot run ahead of the driver (and
    of the round the driver registers restarted hosts after)."""
    return json.dumps({"key": key_id, "open_round": int(round_num)}, sort_keys=True).encode()


def cohort_message(key_id: str, round_num: int, update_ids: list[str] | tuple[str, ...]) -> bytes:
    """What each host whose update is in a sum signs, once per round, before any key
    holder helps open it: the key, the round and the sorted list of the sum's update ids
    (the consistency step of Bonawitz et al., CCS 2017)."""
    return json.dumps(
        {"key": key_id, "round": int(round_num), "updates": sorted(str(u) for u in update_ids)},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


@dataclass
class _Deposit:
    round: int
    host: int
    client_ids: tuple[int, ...]
    ciphertext_sha256: str
    shares: bytes | None
    model_sha256: str = ""
    identity: bytes = b""  # the host's public key that signed it: only it approves a sum


class KeyHolder:
    """One site's key holder: a decryption share, a ledger of signed contributions.

    ``peers`` maps host index -> Ed25519 public key, ``assignment`` client id -> host
    index, ``authority`` is the driver's set-up public key (re-registers restarted hosts).
    With ``custody="shared"`` it is given the whole private key instead of a share.
    ``max_rounds`` is the job's ``rounds``: the holder helps open sums of rounds
    1..max_rounds only, one per round, so a server cannot have more sums opened (with
    fresh DP noise to average away, or cohorts to difference) than the privacy accounting
    planned for. :meth:`restrict` narrows that window (a resume, a privacy target).
    """

    def __init__(
        self,
        index: int,
        peers: dict[int, bytes],
        assignment: dict[int, int],
        min_clients: int,
        authority: bytes,
        custody: str = "threshold",
        *,
        max_rounds: int,
        identity: bytes = b"",
        job_sha256: str = "",
        feature_sums: bool = False,
    ):
        """``identity``: a PEM Ed25519 private key to attest with (across organisations,
        the site's manifest key, which every other site checks attestations with); by
        default a fresh one made here. ``job_sha256``: across organisations, the digest of
        the job this holder's site declared; it takes contributions of that job only.
        ``feature_sums``: the job opens the federation's feature sums before round 1, as
        the one sum of round 0 (:meth:`restrict` to round 1 on closes it)."""
        if min_clients < 2:
            raise ValueError(f"min_clients={min_clients}: key holders need at least 2")
        if int(max_rounds) < 1:
            raise ValueError(f"max_rounds={max_rounds}: must be at least 1")
        self._first_round, self._max_rounds = 0 if feature_sums else 1, int(max_rounds)
        self._opened = 0  # the latest round the driver opened (see open_round)
        self.index = int(index)
        self.key: ThresholdPublicKey | None = None
        self.custody = custody
        self._peers = {int(h): bytes(k) for h, k in peers.items()}
        self._epochs = {h: 0 for h in self._peers}
        # a re-registered host: later
        self._from_round = {h: self._first_round for h in self._peers}
        self._assignment = {int(c): int(h) for c, h in assignment.items()}
        self._min_clients = int(min_clients)
        self._authority = bytes(authority)
        self._secret: DecryptionShare | PrivateKey | None = None
        self._deposits: dict[str, _Deposit] = {}
        self._released: dict[int, tuple[str, ...]] = {}
        self._last_round = 0
        # Signs attestations of opened sums (see attest); only its public half leaves.
        self._identity = HostIdentity.from_pem(identity) if identity else HostIdentity()
        self._job_sha256 = str(job_sha256)

    def __repr__(self) -> str:
        return f"KeyHolder(index={self.index})"

    def attestation_key(self) -> bytes:
        """The public key hosts check this holder's attestations of opened sums with."""
        return self._identity.public_bytes()

    # -- set-up -------------------------------------------------------------------------
    def install(self, key: ThresholdPublicKey, secret: DecryptionShare | PrivateKey) -> bool:
        """Take the key and this holder's share (shared custody: the private key). Once."""
        if self._secret is not None:
            raise PermissionError("this key holder already holds its key material")
        if isinstance(secret, DecryptionShare):
            if self.custody != "threshold" or secret.key != key or secret.index != self.index:
                raise ValueError("a decryption share for another key, holder or custody")
        elif isinstance(secret, PrivateKey):
            if self.custody != "shared" or secret.public != key.public:
                raise ValueError("a private key is accepted only in shared custody, same key")
        else:
            raise TypeError(f"cannot install a {type(secret).__name__}")
        self.key, self._secret = key, secret
        return True

    def ready(self) -> bool:
        return self._secret is not None

    def register(
        self, host: int, public_key: bytes, epoch: int, from_round: int, signature: bytes
    ) -> bool:
        """Accept a restarted host's new identity, vouched for by the driver's set-up key,
        for its deposits of rounds ``from_round`` on.

        The driver sets ``from_round`` past the round in flight: the dead identity may
        already have approved a sum of that round, and a new one (with no memory of it)
        must not add a second approval of the same clients' updates."""
        host, epoch, from_round = int(host), int(epoch), int(from_round)
        if self.key is None:
            raise PermissionError("this key holder holds no key yet")
        if host not in self._peers:
            raise PermissionError(f"host {host} is not part of this federation")
        if epoch <= self._epochs[host]:
            raise PermissionError(f"registration epoch {epoch} for host {host} is not new")
        message = registration_message(
            self.key.fingerprint, host, bytes(public_key), epoch, from_round
        )
        if not verify(self._authority, bytes(signature), message):
            raise PermissionError("registration not signed by the job's set-up key")
        self._peers[host] = bytes(public_key)
        self._epochs[host] = epoch
        # Never in a round already opened: the dead identity may have approved its sum.
        self._from_round[host] = max(self._from_round[host], from_round, self._opened + 1)
        return True

    def open_round(self, round_num: int, signature: bytes) -> bool:
        """The driver opens ``round_num`` (signed with its set-up key): from here on this
        holder takes deposits of, and opens sums of, rounds up to it. Only grows."""
        if self.key is None:
            raise PermissionError("this key holder holds no key yet")
        round_num = int(round_num)
        if not verify(
            self._authority, bytes(signature), round_ticket_message(self.key.fingerprint, round_num)
        ):
            raise PermissionError("round ticket not signed by the job's set-up key")
        self._opened = max(self._opened, round_num)
        return True

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    # -- contributions --------------------------------------------------------------------
    def deposit(self, signed: SignedContribution, shares: bytes | None = None) -> bool:
        """Record one host's signed contribution (and this holder's exponent shares)."""
        c = signed.contribution
        if self.key is None:
            raise PermissionError("this key holder holds no key yet")
        if not isinstance(c, Contribution) or c.key_id != self.key.fingerprint:
            raise PermissionError("a contribution for another key")
        host = self._peers.get(c.host)
        if host is None or not verify(host, signed.signature, c.message()):
            raise PermissionError(f"contribution {c.update_id!r} is not signed by host {c.host}")
        if update_id_host(c.update_id) != int(c.host):
            raise PermissionError(
                f"update id {c.update_id!r} is not in host {c.host}'s namespace "
                f"(h{c.host}-<hex>): a host files only its own updates"
            )
        if c.job_sha256 != self._job_sha256:
            raise PermissionError(
                f"contribution {c.update_id!r} was made under another job than this key "
                "holder's site declared (a coordinator told the sites different jobs?)"
            )
        self._check_round(c.round)  # never opened: not kept either
        if int(c.round) < self._from_round[c.host]:
            raise PermissionError(
                f"host {c.host} was restarted; it takes part again from round "
                f"{self._from_round[c.host]}, not in round {c.round}"
            )
        ids = tuple(int(i) for i in c.client_ids)
        if not ids or len(set(ids)) != len(ids):
            raise PermissionError("a contribution must name distinct clients")
        if any(self._assignment.get(i) != c.host for i in ids):
            raise PermissionError(f"host {c.host} vouches for clients it does not host")
        deposit = _Deposit(
            int(c.round), int(c.host), ids, c.ciphertext_sha256, shares, c.model_sha256, host
        )
        before = self._deposits.get(c.update_id)
        # The one second deposit taken: the very same signed contribution, first deposited
        # without this holder's exponent shares (a partial-decryption request), now with
        # them. A sum's shares can then open it; which sums may open is unchanged.
        attaching = (
            before is not None
            and before.shares is None
            and shares is not None
            and before == replace(deposit, shares=None)
        )
        if not c.update_id or (before is not None and not attaching):
            raise PermissionError(f"update id {c.update_id!r} is empty or already deposited")
        if shares is not None and (
            len(c.share_sha256) != self.key.holders
            or digest(shares) != c.share_sha256[self.index - 1]
        ):
            raise PermissionError("exponent shares do not match the signed digest")
        if shares is not None:
            self._check_share_range(c, shares)
        self._deposits[c.update_id] = deposit
        return True

    def _check_share_range(self, c: Contribution, shares: bytes) -> None:
        """Each exponent share is a whole number of fixed-width values, none above the
        largest an honest sharing makes: a host's oversized share would overflow every
        holder's share sum (and the honest holders would be the ones seen failing)."""
        from fedray.crypto.threshold import ints_from_bytes

        try:
            values = ints_from_bytes(shares, self.key.share_width())
        except ValueError:
            raise PermissionError(
                f"host {c.host}'s exponent shares of update {c.update_id!r} are not whole values"
            ) from None
        if values and max(values) > self.key.exponent_share_bound():
            raise PermissionError(
                f"host {c.host}'s exponent shares of update {c.update_id!r} exceed the bound "
                "of an honest sharing"
            )

    def restrict(self, first_round: int, last_round: int) -> bool:
        """Narrow the rounds this holder helps open to ``first_round..last_round``; it
        never widens them, so whoever calls it (the server holds this handle too) can only
        make the holder refuse more.

        The driver calls it at set-up: on a resume ``first_round`` is the checkpoint's
        round + 1 (the new holders must not open the rounds the old key already released,
        which the privacy ledger counted), and with ``privacy.target_epsilon_vs_server``
        ``last_round`` is the last round within that target if every client were in every
        round: the key holders enforce it, whatever the server does."""
        self._first_round = max(self._first_round, int(first_round))
        self._max_rounds = min(self._max_rounds, int(last_round))
        return True

    def _check_round(self, round_num: int) -> None:
        """PermissionError unless ``round_num`` is one of the rounds this holder opens: in
        the driver's window and not past the latest round the driver opened."""
        if not self._first_round <= int(round_num) <= self._max_rounds:
            raise PermissionError(
                f"round {round_num} is outside this job's rounds "
                f"{self._first_round}..{self._max_rounds}"
            )
        if int(round_num) > self._opened:
            raise PermissionError(
                f"round {round_num} was not opened by the driver (the latest it opened is "
                f"round {self._opened})"
            )

    def _authorize(
        self, round_num: int, update_ids: list[str], approvals: dict[int, bytes]
    ) -> list[_Deposit]:
        """The deposits of a sum this holder may help decrypt, or PermissionError.

        ``approvals``: host index -> that host's signature over :func:`cohort_message` of
        exactly this sum. Every host with an update in the sum must have signed it, with
        the identity that signed the update. An honest host signs one list per round, so
        two different sums of one round that share an honest host's update cannot both
        be opened, whichever t holders (honest or colluding with the server) are asked:
        the once-per-round rule no longer rests on the holders' intersection."""
        round_num = int(round_num)
        ids = tuple(update_ids)
        self._check_round(round_num)
        if round_num < self._last_round:
            raise PermissionError(
                f"round {round_num} is older than round {self._last_round}, already released"
            )
        if round_num in self._released and self._released[round_num] != ids:
            raise PermissionError(f"round {round_num}: a different sum was already released")
        if not ids or len(set(ids)) != len(ids):
            raise PermissionError("a sum must name distinct updates")
        deposits = []
        for u in ids:
            d = self._deposits.get(u)
            if d is None or d.round != round_num:
                raise PermissionError(f"update {u!r} was not deposited for round {round_num}")
            deposits.append(d)
        if len({d.model_sha256 for d in deposits}) != 1:
            raise PermissionError("the sum mixes updates trained from different global models")
        clients = [c for d in deposits for c in d.client_ids]
        if len(set(clients)) != len(clients):
            raise PermissionError("the sum counts a client twice")
        if round_num == 0 and set(clients) != set(self._assignment):
            raise PermissionError(
                "round 0: the federation's feature sums are opened with every client of the "
                "federation in them (a sum of some sites would be those sites' statistics)"
            )
        if len(clients) < self._min_clients:
            raise PermissionError(
                f"refusing to decrypt a sum of {len(clients)} clients (fewer than the "
                f"{self._min_clients} a round must have)"
            )
        message = cohort_message(self.key.fingerprint, round_num, ids)
        approvals = approvals if isinstance(approvals, dict) else {}
        for d in deposits:
            signature = approvals.get(d.host)
            if not isinstance(signature, bytes) or not verify(d.identity, signature, message):
                raise PermissionError(
                    f"round {round_num}: host {d.host} did not approve exactly this sum "
                    "(every host in a sum signs its list of updates, once per round)"
                )
        return deposits

    def _release(self, round_num: int, update_ids: list[str]) -> None:
        round_num = int(round_num)
        self._released[round_num] = tuple(update_ids)
        self._last_round = max(self._last_round, round_num)
        for k in [k for k, d in self._deposits.items() if d.round <= round_num - KEEP_ROUNDS]:
            del self._deposits[k]
        for r in [r for r in self._released if r <= round_num - KEEP_ROUNDS]:
            del self._released[r]

    def share_sum(
        self, round_num: int, update_ids: list[str], approvals: dict[int, bytes]
    ) -> bytes:
        """Fast path: this holder's share of the summed obfuscator exponents of a sum
        (``approvals``: see :meth:`_authorize`)."""
        if not isinstance(self._secret, DecryptionShare):
            raise PermissionError("this key holder holds no share")
        deposits = self._authorize(round_num, update_ids, approvals)
        if any(d.shares is None for d in deposits):
            raise PermissionError("an update of this sum deposited no exponent shares")
        total = add_share_blobs(self.key, [d.shares for d in deposits])
        self._release(round_num, update_ids)
        return total

    def partial_decrypt(
        self,
        round_num: int,
        update_ids: list[str],
        approvals: dict[int, bytes],
        payloads: list[Any],
        start: int = 0,
        stop: int | None = None,
    ) -> list[int]:
        """Slow path: ``c^(s_j)`` of ciphertexts ``start:stop`` of the sum (threshold), or
        their plaintexts (shared custody). The holder checks each update's ciphertexts
        against the signed digest and multiplies them itself.

        ``payloads``: per update, its ciphertext bytes, or an ObjectRef to them (the
        server asks the sealing host for it: it keeps no update's bytes). Refs are
        fetched one at a time and folded in chunks, so this holder holds one payload
        beside the running product."""
        if self._secret is None:
            raise PermissionError("this key holder holds no key material")
        deposits = self._authorize(round_num, update_ids, approvals)
        if len(payloads) != len(deposits):
            raise PermissionError("one ciphertext payload per update is needed")
        product = self._product(int(round_num), deposits, payloads, start, stop)
        self._release(round_num, update_ids)
        if isinstance(self._secret, DecryptionShare):
            return partial_decrypt(self._secret, product)
        from fedray.crypto.paillier import Decryptor

        return Decryptor(self._secret).decrypt_many(product)

    def attest(
        self,
        round_num: int,
        update_ids: list[str],
        approvals: dict[int, bytes],
        payloads: list[Any],
        plaintexts: bytes,
        exponents: list[int] | None = None,
    ) -> bytes:
        """Check that ``plaintexts`` open the product of this sum's deposited updates, and
        sign that (:func:`fedray.runtime.lineage.release_message`); PermissionError if not.

        The holder multiplies the updates itself (each checked against its signed digest).
        Threshold custody: ``exponents`` are the summed obfuscator exponents X the server
        interpolated, and each ciphertext must equal ``(1 + M n) hs^X mod n^2``: for a
        claimed ``M`` off by anything mod n no X makes that hold (the quotient would be an
        n-th residue equal to a power of ``1 + n``), checked for all ciphertexts at once
        with fresh random weights (:func:`fedray.crypto.threshold.opens_product`: a wrong
        claim passes with probability at most 2^-64). Shared custody: the holder decrypts.
        Attesting counts as this round's release of this sum (no other sum of the round
        is opened or attested after it)."""
        from fedray.crypto.threshold import ints_from_bytes, opens_product
        from fedray.runtime.lineage import plaintext_width, release_message

        if self._secret is None:
            raise PermissionError("this key holder holds no key material")
        deposits = self._authorize(round_num, update_ids, approvals)
        if len(payloads) != len(deposits):
            raise PermissionError("one ciphertext payload per update is needed")
        product = self._product(int(round_num), deposits, payloads, 0, None)
        claimed = ints_from_bytes(bytes(plaintexts), plaintext_width(self.key.public.n))
        if len(claimed) != len(product):
            raise PermissionError(
                f"round {round_num}: the opened sum has {len(claimed)} plaintexts, the "
                f"deposited updates {len(product)} ciphertexts"
            )
        if isinstance(self._secret, DecryptionShare):
            if exponents is None or len(exponents) != len(product):
                raise PermissionError(
                    f"round {round_num}: no summed exponents to check the opened sum with"
                )
            bound = len(deposits) << self.key.exponent_bits
            if not all(isinstance(x, int) and 0 <= x < bound for x in exponents):
                raise PermissionError(f"round {round_num}: summed exponents out of range")
            # one batch check (soundness 2^-64 per claim; claims outside [0, n) refused),
            # not a power of hs per ciphertext
            opens = opens_product(self.key, product, claimed, list(exponents))
        else:
            from fedray.crypto.paillier import Decryptor

            opened = Decryptor(self._secret).decrypt_many(product)
            opens = [int(m) for m in opened] == claimed
        if not opens:
            raise PermissionError(
                f"round {round_num}: the opened sum is not the decryption of the deposited updates"
            )
        self._release(round_num, update_ids)
        count = sum(len(d.client_ids) for d in deposits)
        return self._identity.sign_bytes(
            release_message(
                self.key.fingerprint,
                int(round_num),
                deposits[0].model_sha256,
                count,
                digest(bytes(plaintexts)),
                self._job_sha256,
            )
        )

    def _product(self, round_num: int, deposits: list[_Deposit], payloads, start, stop) -> list:
        """Ciphertexts ``start:stop`` of the product of the payloads, each checked against
        its signed digest and for validity (all of it, not only the range)."""
        public = self.key.public
        n2 = gmpy2.mpz(public.n) ** 2
        product, size, lo, hi = None, None, 0, 0
        for d, source in zip(deposits, payloads, strict=True):
            payload = _fetch_payload(round_num, source)
            if digest(payload) != d.ciphertext_sha256:
                raise PermissionError("a ciphertext payload does not match its signed digest")
            if size is None:
                size = len(payload)
                lo, hi, _ = slice(start, stop).indices(size // public.ciphertext_bytes)
            elif len(payload) != size:
                raise PermissionError("updates of different lengths cannot be summed")
            first = product is None
            if first:
                product = []
            for i, cts in ciphertext_chunks(public, payload, FOLD_CHUNK):
                problem = check_ciphertexts(public, cts, offset=i)
                if problem:
                    raise PermissionError(problem)
                a, b = max(lo, i), min(hi, i + len(cts))
                if a < b and first:
                    product.extend(cts[a - i : b - i])
                elif a < b:
                    multiply_into(product, a - lo, cts[a - i : b - i], n2)
            del payload  # before the next one is fetched
        return product


def _fetch_payload(round_num: int, source: Any) -> bytes:
    """An update's ciphertext bytes: given, or fetched from the host that sealed them."""
    if isinstance(source, bytes | bytearray):
        return source
    import ray

    if not isinstance(source, ray.ObjectRef):
        raise PermissionError(f"a ciphertext payload is a {type(source).__name__}, not bytes")
    try:
        payload = ray.get(source, timeout=PAYLOAD_FETCH_TIMEOUT_S)
    except Exception as exc:  # the host died or restarted since it sealed the update
        text = str(exc).strip()
        why = text.splitlines()[-1] if text else type(exc).__name__
        raise LookupError(
            f"round {round_num}: an update's ciphertexts are no longer on its host ({why})"
        ) from None
    if not isinstance(payload, bytes | bytearray):
        raise PermissionError(f"a ciphertext payload is a {type(payload).__name__}, not bytes")
    return payload


class KeyDealer:
    """Makes the key, gives each holder its share directly, then forgets the factors.

    ``deal`` returns only the public key; the driver kills the actor right after.
    """

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def deal(
        self,
        key_bits: int,
        holders: list[Any],
        threshold: int,
        custody: str = "threshold",
        hosts: list[Any] | None = None,
    ) -> ThresholdPublicKey:
        import ray

        if custody == "threshold":
            key, shares = deal_threshold_key(key_bits, len(holders), threshold)
            ray.get([h.install.remote(key, s) for h, s in zip(holders, shares, strict=True)])
            del shares
            return key
        # Shared custody (BatchCrypt): every holder and every host gets the whole key.
        from fedray.crypto.threshold import shared_public_key

        key, private = shared_public_key(key_bits, len(holders))
        ray.get([h.install.remote(key, private) for h in holders])
        ray.get([h.install_private_key.remote(private) for h in hosts or []])
        del private
        return key


def key_holder_class():
    import ray

    from fedray.runtime.facade import public_facade

    # A dead holder stays dead (a restarted one would hold no share): max_restarts=0.
    # Public methods only: each applies the holder's checks (fedray/runtime/facade.py).
    return ray.remote(num_cpus=0, max_restarts=0)(public_facade(KeyHolder))


def key_dealer_class():
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(KeyDealer)


def find_key_material(
    root: Any, n: int, max_depth: int = 16, known_secrets: set[int] | frozenset = frozenset()
) -> list[str]:
    """Where, inside ``root``'s object graph, something could decrypt or factor ``n``.

    Flags private keys (fedray's or phe's), decryption shares, signing identities; any
    integer (also written as a string, or as bytes) that shares a factor with ``n``, is a
    multiple of the group order (lambda, phi, d: ``r^x = 1 mod n`` for a random ``r``),
    or is ``p + q`` (``x^2 - 4n`` a square); and any of ``known_secrets`` (tests pass the
    key holders' share values). Used by the curious-server tests on everything the server
    holds and everything it is answered.
    """
    import secrets as _secrets

    import gmpy2
    import numpy as np

    from fedray.crypto.threshold import DecryptionShare

    found: list[str] = []
    seen: set[int] = set()
    n_mpz = gmpy2.mpz(n)
    probe = gmpy2.mpz(_secrets.randbelow(n - 3) + 2)
    known = {int(k) for k in known_secrets}

    def reveals(x: int) -> str | None:
        if x in known:
            return "a key holder's secret share"
        x = abs(x)
        if x < 2:
            return None
        g = gmpy2.gcd(gmpy2.mpz(x), n_mpz)
        if 1 < g < n_mpz:
            return "an integer sharing a factor with n"
        if x.bit_length() <= 4 * n.bit_length() and gmpy2.powmod(probe, x, n_mpz) == 1:
            return "a multiple of the group order (lambda, phi or d)"
        disc = gmpy2.mpz(x) * x - 4 * n_mpz
        if disc > 0 and gmpy2.is_square(disc):
            return "p + q"
        return None

    def walk(obj: Any, path: str, depth: int) -> None:
        if depth > max_depth or id(obj) in seen:
            return
        seen.add(id(obj))
        name = type(obj).__name__
        if isinstance(obj, PrivateKey | DecryptionShare | HostIdentity) or name in (
            "PaillierPrivateKey",
            "Ed25519PrivateKey",
        ):
            found.append(f"{path}: {name}")
            return
        if isinstance(obj, bool):
            return
        if isinstance(obj, int) or name == "mpz":
            why = reveals(int(obj))
            if why:
                found.append(f"{path}: {why}")
            return
        if isinstance(obj, str):
            text = obj.strip()
            for base in (10, 16):
                try:
                    value = int(text, base)
                except ValueError:
                    continue
                why = reveals(value)
                if why:
                    found.append(f"{path}: a string encoding {why}")
                    return
            return
        if isinstance(obj, bytes | bytearray | memoryview):
            data = bytes(obj)
            width = (n.bit_length() + 7) // 8
            chunks = [data] if len(data) <= 4 * width else []
            chunks += [data[i : i + width] for i in range(0, min(len(data), 1 << 20), width)]
            for chunk in chunks:
                for order in ("little", "big"):
                    x = int.from_bytes(chunk, order)
                    if x > 1 and 1 < gmpy2.gcd(gmpy2.mpz(x), n_mpz) < n_mpz:
                        found.append(f"{path}: bytes encoding a factor of n")
                        return
            return
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                for i, v in enumerate(obj.ravel().tolist()):
                    walk(v, f"{path}[{i}]", depth + 1)
            return
        if (
            isinstance(obj, float | complex | type)
            or callable(obj)
            and not hasattr(obj, "__dict__")
        ):
            return
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                walk(k, f"{path}[{k!r}]", depth + 1)
                walk(v, f"{path}[{k!r}]", depth + 1)
            return
        if isinstance(obj, list | tuple | set | frozenset):
            for i, v in enumerate(list(obj)):
                walk(v, f"{path}[{i}]", depth + 1)
            return
        if type(obj).__module__.startswith(("ray.", "torch", "numpy", "logging")):
            return
        attrs = getattr(obj, "__dict__", None)
        if attrs is not None:
            for k, v in list(attrs.items()):
                walk(v, f"{path}.{k}", depth + 1)
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                walk(getattr(obj, slot), f"{path}.{slot}", depth + 1)

    walk(root, "root", 0)
    return found
