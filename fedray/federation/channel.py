"""The cross-organisation channel: gRPC with mutual TLS between a coordinator and sites.

A site **dials out** (:func:`dial` → :class:`Site`); the coordinator **listens**
(:func:`listen` → :class:`Coordinator`). Over one bidirectional stream per site the
coordinator sends requests (a closed list: train, approve, share-sum) and the site
answers each with its reply or a one-line :class:`Refused`. docs/federation.md has the
API and the checks; in short, on every connection and every frame:

* TLS: both sides present a certificate of the federation CA (``require_client_auth``;
  the CA file must be the manifest's ``ca_sha256``). The coordinator checks the client
  certificate's SHA-256 against the manifest on the gRPC connection itself; the site,
  whose gRPC API does not show the server's certificate, checks it on a TLS probe just
  before, and relies on the Welcome signed by the manifest's coordinator key for the
  session (docs/federation.md says exactly what that does and does not cover).
* Every message but a blob chunk is an ``Envelope`` signed (Ed25519, the party's key in
  the manifest) over the bytes as sent; the signature is checked before the bytes are
  parsed. Envelopes carry the session (both parties' nonces) and a sequence number that
  must be exactly one more than the last: a replayed, reordered or foreign message is
  refused and the stream closed.
* Blobs (weights, ciphertexts) stream after a signed header (id, size, SHA-256, dtype,
  shape) in chunks of at most 4 MiB, each with its own SHA-256, written into one
  buffer of the declared size (at most the receive cap); the whole digest is checked
  before the message that refers to the blob is handed over. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import random
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedray.federation import federation_pb2 as pb
from fedray.federation.messages import (
    ENVELOPE_DOMAIN,
    HEADER_DOMAIN,
    MAX_CHUNK_BYTES,
    MAX_ENVELOPE_BYTES,
    PROTOCOL_VERSION,
    REQUESTS,
    SESSION_DOMAIN,
    FederationError,
    ProtocolError,
    _check_no_unknown_fields,
    array_header,
    array_payload,
    check_envelope,
    check_header,
    check_id,
    ciphertext_header,
    decode_array,
    decode_ciphertexts,
    job_mismatch,
)
from fedray.federation.policy import PolicyRefusal

log = logging.getLogger("fedray.federation")

SERVICE = "fedray.federation.v1.Federation"
METHOD = f"/{SERVICE}/Connect"
DEFAULT_MAX_BLOB_BYTES = 256 * 1024 * 1024
# gRPC's own cap on one message: above a chunk's 4 MiB so the channel's check (with its
# clear error) is what refuses an oversized chunk, low enough that nothing huge is buffered.
GRPC_MAX_MESSAGE = 2 * MAX_CHUNK_BYTES
# A stream must say hello within this long; and one certificate has at most one
# handshake in flight (a second is refused at once), so a site that opens streams and
# never says hello holds one worker for at most this long, not the others' (M1).
HANDSHAKE_TIMEOUT_S = 3.0
# At most this many blobs announced before one message, each counted against the
# receive cap with its header bytes plus this fixed cost (H2): zero-size blobs and
# long headers cannot pile up in memory.
MAX_BLOBS_PER_MESSAGE = 64
BLOB_OVERHEAD_BYTES = 256
BIND_WAIT_S = 30.0  # how long the coordinator retries a port still in use (a restart)
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
]


class Refused(FederationError):
    """Raised by a site's handler: the request is not carried out; ``str()`` is one line."""


class PeerRefused(FederationError):
    """The peer answered a request with a Refusal (its one line is the message)."""


class Unreachable(FederationError):
    """The coordinator could not be reached (down, or the network): the site retries."""


# --- the manifest and the party's own files ----------------------------------------------


@dataclass(frozen=True)
class Party:
    id: str
    cert_sha256: str  # hex SHA-256 of the certificate's DER
    signing_key: bytes  # raw Ed25519 public key (32 bytes)


@dataclass(frozen=True)
class Manifest:
    """Who is in the federation, as each party holds it locally (``federation.json``)."""

    coordinator: Party
    sites: dict[str, Party]
    ca_sha256: str = ""  # hex SHA-256 of the CA certificate's DER ("" = not pinned)

    @classmethod
    def load(cls, path) -> Manifest:
        try:
            raw = json.loads(Path(path).read_text())
            if raw.get("format") != "fedray-federation-manifest" or raw.get("version") != 1:
                raise ValueError("not a fedray federation manifest of version 1")

            def party(pid, entry) -> Party:
                fp = str(entry["cert_sha256"])
                if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
                    raise ValueError(f"{pid}: cert_sha256 is not 64 hex digits")
                key = bytes.fromhex(entry["signing_key"])
                if len(key) != 32:
                    raise ValueError(f"{pid}: signing_key is not 32 bytes of hex")
                return Party(check_id(pid, "party id"), fp, key)

            coord = raw["coordinator"]
            sites = {s: party(s, e) for s, e in raw["sites"].items()}
            ca_fp = str(raw["ca_sha256"])
            if len(ca_fp) != 64 or any(c not in "0123456789abcdef" for c in ca_fp):
                raise ValueError("ca_sha256 is not 64 hex digits")
            manifest = cls(party(coord["id"], coord), sites, ca_fp)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FederationError(f"federation manifest {path}: {exc}") from None
        if manifest.coordinator.id in sites:
            raise FederationError(f"federation manifest {path}: the coordinator is also a site")
        # One key and one certificate per party: a key listed twice would sign (approve,
        # attest, contribute) as two parties and count twice towards a threshold.
        parties = [manifest.coordinator, *sites.values()]
        for what in ("signing_key", "cert_sha256"):
            owners: dict[object, str] = {}
            for party in parties:
                value = getattr(party, what)
                if value in owners:
                    raise FederationError(
                        f"federation manifest {path}: {owners[value]} and {party.id} have the "
                        f"same {what} (each party needs its own)"
                    )
                owners[value] = party.id
        return manifest

    def keys(self) -> dict[str, bytes]:
        """Every party's Ed25519 public key by id (a relayed blob keeps its signer's)."""
        return {self.coordinator.id: self.coordinator.signing_key} | {
            s: p.signing_key for s, p in self.sites.items()
        }

    def site_by_fingerprint(self, cert_sha256: str) -> Party | None:
        for party in self.sites.values():
            if secrets.compare_digest(party.cert_sha256, cert_sha256):
                return party
        return None


def _as_manifest(manifest) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)


def _check_ca(manifest: Manifest, ca_pem: bytes, ca_path) -> None:
    """The CA file must be the one the manifest names (L4): a party handed another CA
    would otherwise trust whatever that CA signs."""
    if not manifest.ca_sha256:
        return
    try:
        fp = _pem_sha256(ca_pem)
    except (ValueError, UnicodeDecodeError):
        raise FederationError(f"the CA file {ca_path} is not a PEM certificate") from None
    if not secrets.compare_digest(fp, manifest.ca_sha256):
        raise FederationError(
            f"the CA file {ca_path} ({fp[:16]}...) is not the manifest's CA "
            f"({manifest.ca_sha256[:16]}...)"
        )


def _read(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FederationError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _der_sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _pem_sha256(pem: bytes) -> str:
    return _der_sha256(ssl.PEM_cert_to_DER_cert(pem.decode()))


def _load_signing_key(signing_key):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(signing_key, Ed25519PrivateKey):
        return signing_key
    key = serialization.load_pem_private_key(_read(signing_key, "signing key"), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise FederationError(f"{signing_key} is not an Ed25519 private key")
    return key


def _public_raw(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _check_own(party: Party | None, cert_pem: bytes, key, who: str) -> None:
    """A party's own files must be the ones the manifest lists (a clear error, not a
    handshake that fails later for no visible reason)."""
    if party is None:
        raise FederationError(f"{who} is not in the federation manifest")
    if _pem_sha256(cert_pem) != party.cert_sha256:
        raise FederationError(f"{who}: its certificate is not the one the manifest lists")
    if _public_raw(key) != party.signing_key:
        raise FederationError(f"{who}: its signing key is not the one the manifest lists")


# --- blobs -------------------------------------------------------------------------------


@dataclass
class Blob:
    """A received blob: its header (signature and whole digest already checked) and its
    bytes, one buffer. Read it with :meth:`array` or :meth:`ciphertexts`."""

    header: pb.BlobHeader
    data: bytearray
    signer: str

    def array(self, dtype, shape):
        return decode_array(self.header, self.data, dtype, shape)

    def ciphertexts(self, width: int, count: int | None = None):
        return decode_ciphertexts(self.header, self.data, width, count)


@dataclass
class OutgoingBlob:
    """A blob to send: a header and the bytes it describes (not copied until chunked)."""

    header: pb.BlobHeader
    data: memoryview

    @classmethod
    def from_array(cls, blob_id: str, array, name: str = "") -> OutgoingBlob:
        return cls(array_header(blob_id, array, name), array_payload(array))

    @classmethod
    def from_ciphertexts(cls, blob_id: str, data, width: int, name: str = "") -> OutgoingBlob:
        view = memoryview(data).cast("B")
        return cls(ciphertext_header(blob_id, view, width, name), view)

    @property
    def ref(self) -> pb.BlobRef:
        return pb.BlobRef(
            blob_id=self.header.blob_id, size=self.header.total_size, sha256=self.header.sha256
        )


@dataclass
class Message:
    """One received, verified message: ``kind`` (the body's field name), ``body`` (the
    typed message), the blobs that came with it (by id)."""

    kind: str
    body: object
    envelope: pb.Envelope
    blobs: dict[str, Blob] = field(default_factory=dict)

    def blob(self, ref: pb.BlobRef) -> Blob:
        """The blob ``ref`` names, refused unless its id, size and SHA-256 all match."""
        blob = self.blobs.get(ref.blob_id)
        if (
            blob is None
            or blob.header.total_size != ref.size
            or not secrets.compare_digest(blob.header.sha256, ref.sha256)
        ):
            raise ProtocolError(f"{self.kind}: blob {ref.blob_id[:64]!r} did not arrive intact")
        return blob


# --- signing and verifying frames (both sides) ---------------------------------------------


class _Sender:
    def __init__(self, me: str, peer: str, key):
        self.me, self.peer, self._key = me, peer, key
        self.seq = 0
        self.session = b""

    def envelope(self, kind: str, body, request_id: int = 0, in_reply_to: int = 0) -> bytes:
        self.seq += 1
        env = pb.Envelope(
            protocol=PROTOCOL_VERSION,
            sender=self.me,
            recipient=self.peer,
            session=self.session,
            seq=self.seq,
            request_id=request_id,
            in_reply_to=in_reply_to,
        )
        getattr(env, kind).CopyFrom(body)
        data = env.SerializeToString(deterministic=True)
        signature = self._key.sign(ENVELOPE_DOMAIN + data)
        return pb.Frame(signed=pb.Signed(envelope=data, signature=signature)).SerializeToString()

    def blob(self, blob: OutgoingBlob) -> tuple[bytes, Iterator[bytes]]:
        """The signed header frame now (its sequence number taken in order) and an
        iterator that cuts the chunks lazily, one 4 MiB copy at a time."""
        header = blob.header.SerializeToString(deterministic=True)
        signed = pb.SignedBlobHeader(
            header=header, signature=self._key.sign(HEADER_DOMAIN + header), signer=self.me
        )
        return self.envelope("blob_header", signed), _chunks(blob)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _chunk_frame(blob_id: bytes, offset: int, piece) -> bytes:
    """``Frame(chunk=BlobChunk(...)).SerializeToString()``, written by hand so a 4 MiB
    piece is copied once (protobuf's builder copies it twice); the receiver parses it
    with protobuf like any frame (a test checks both encodings agree)."""
    digest = hashlib.sha256(piece).digest()
    head = b"\x0a" + _varint(len(blob_id)) + blob_id
    if offset:
        head += b"\x10" + _varint(offset)
    data_head = b"\x1a" + _varint(len(piece))
    tail = b"\x22\x20" + digest
    size = len(head) + len(data_head) + len(piece) + len(tail)
    return b"".join((b"\x12", _varint(size), head, data_head, piece, tail))


def _chunks(blob: OutgoingBlob) -> Iterator[bytes]:
    data, blob_id = blob.data, blob.header.blob_id.encode()
    for offset in range(0, len(data), MAX_CHUNK_BYTES):
        yield _chunk_frame(blob_id, offset, data[offset : offset + MAX_CHUNK_BYTES])


class _Receiver:
    """Checks every frame from one peer, in order; assembles blobs. Raises ProtocolError
    (one line) on the first frame that breaks a rule; the caller then closes the stream."""

    def __init__(self, me: str, peer: str, keys: dict[str, bytes], max_blob_bytes: int):
        self.me, self.peer, self.keys = me, peer, keys
        self.max_blob_bytes = int(max_blob_bytes)
        self.seq = 0
        self.session: bytes | None = None  # None until the handshake has set it
        self._open: tuple[pb.BlobHeader, bytearray, str, object] | None = None
        self._received = 0
        self._blobs: dict[str, Blob] = {}
        self._pending_bytes = 0

    def feed(self, raw: bytes) -> Message | None:
        """The next frame: a verified message, or None (a blob header or chunk). Every
        failure is a ProtocolError (one line): anything else a hostile frame might make a
        check raise is turned into one, so the caller's handling closes the stream (H1)."""
        try:
            return self._feed(raw)
        except ProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug or a crafted frame: refuse, never die
            raise ProtocolError(
                f"a frame from {self.peer} could not be checked ({type(exc).__name__})"
            ) from None

    def _feed(self, raw: bytes) -> Message | None:
        try:
            frame = pb.Frame.FromString(raw)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise ProtocolError(f"a frame from {self.peer} does not parse") from None
        _check_no_unknown_fields(frame)
        which = frame.WhichOneof("kind")
        if which == "chunk":
            self._chunk(frame.chunk)
            return None
        if which != "signed":
            raise ProtocolError(f"an empty frame from {self.peer}")
        if self._open is not None:
            header = self._open[0]
            raise ProtocolError(
                f"blob {header.blob_id} from {self.peer} truncated at {self._received} of "
                f"{header.total_size} bytes"
            )
        signed = frame.signed
        if len(signed.envelope) > MAX_ENVELOPE_BYTES:
            raise ProtocolError(
                f"a message from {self.peer} is over {MAX_ENVELOPE_BYTES} bytes (blobs carry data)"
            )
        if not _verify(self.keys[self.peer], signed.signature, ENVELOPE_DOMAIN + signed.envelope):
            raise ProtocolError(f"a message from {self.peer} has a bad signature")
        try:
            env = pb.Envelope.FromString(signed.envelope)
        except Exception:  # noqa: BLE001
            raise ProtocolError(f"a signed message from {self.peer} does not parse") from None
        kind = check_envelope(env)
        if env.sender != self.peer or env.recipient != self.me:
            raise ProtocolError(
                f"a message from {env.sender} to {env.recipient} on the stream {self.peer} -> {self.me}"
            )
        if env.seq != self.seq + 1:
            raise ProtocolError(
                f"message {env.seq} from {self.peer} is replayed or out of order "
                f"(expected {self.seq + 1})"
            )
        if self.session is not None and not secrets.compare_digest(env.session, self.session):
            raise ProtocolError(f"a message from {self.peer} belongs to another session")
        self.seq = env.seq
        if kind == "blob_header":
            self._start_blob(env.blob_header)
            return None
        blobs, self._blobs, self._pending_bytes = self._blobs, {}, 0
        return Message(kind, getattr(env, kind), env, blobs)

    def _start_blob(self, signed: pb.SignedBlobHeader) -> None:
        key = self.keys.get(signed.signer)
        if key is None:
            raise ProtocolError(f"a blob from {self.peer} is signed by an unknown party")
        if not _verify(key, signed.signature, HEADER_DOMAIN + signed.header):
            raise ProtocolError(f"a blob header from {self.peer} has a bad signature")
        try:
            header = pb.BlobHeader.FromString(signed.header)
        except Exception:  # noqa: BLE001
            raise ProtocolError(f"a blob header from {self.peer} does not parse") from None
        check_header(header, self.max_blob_bytes)
        if len(self._blobs) >= MAX_BLOBS_PER_MESSAGE:
            raise ProtocolError(
                f"{self.peer} sent more than {MAX_BLOBS_PER_MESSAGE} blobs for one message"
            )
        cost = header.total_size + len(signed.header) + BLOB_OVERHEAD_BYTES
        if self._pending_bytes + cost > self.max_blob_bytes:
            raise ProtocolError(
                f"blobs from {self.peer} for one message exceed the receive cap of "
                f"{self.max_blob_bytes} bytes"
            )
        if header.blob_id in self._blobs:
            raise ProtocolError(f"blob {header.blob_id} from {self.peer} sent twice")
        self._open = (header, bytearray(header.total_size), signed.signer, hashlib.sha256())
        self._received = 0
        self._pending_bytes += cost
        if header.total_size == 0:
            self._finish()

    def _chunk(self, chunk: pb.BlobChunk) -> None:
        if self._open is None:
            raise ProtocolError(f"a blob chunk from {self.peer} without a blob header")
        header, buf, _, whole = self._open
        data = chunk.data  # one copy out of the message
        n = len(data)
        if chunk.blob_id != header.blob_id:
            raise ProtocolError(
                f"a chunk of blob {chunk.blob_id[:64]!r} inside blob {header.blob_id}"
            )
        if n == 0 or n > MAX_CHUNK_BYTES:
            raise ProtocolError(
                f"a chunk of {n} bytes from {self.peer} (1 to {MAX_CHUNK_BYTES} allowed)"
            )
        if chunk.offset != self._received:
            raise ProtocolError(
                f"a chunk of blob {header.blob_id} at offset {chunk.offset}, expected "
                f"{self._received} (replayed, reordered or lost)"
            )
        if self._received + n > header.total_size:
            raise ProtocolError(
                f"blob {header.blob_id} from {self.peer} runs past its declared "
                f"{header.total_size} bytes"
            )
        if not secrets.compare_digest(hashlib.sha256(data).digest(), chunk.sha256):
            raise ProtocolError(
                f"a chunk of blob {header.blob_id} at offset {chunk.offset} does not match its digest"
            )
        buf[self._received : self._received + n] = data
        whole.update(data)
        self._received += n
        if self._received == header.total_size:
            self._finish()

    def _finish(self) -> None:
        header, buf, signer, whole = self._open
        self._open = None
        if not secrets.compare_digest(whole.digest(), header.sha256):
            raise ProtocolError(f"blob {header.blob_id} from {self.peer} does not match its digest")
        self._blobs[header.blob_id] = Blob(header, buf, signer)

    def end_of_stream(self) -> None:
        if self._open is not None:
            header = self._open[0]
            raise ProtocolError(
                f"blob {header.blob_id} from {self.peer} truncated at {self._received} of "
                f"{header.total_size} bytes"
            )


_CLOSE = object()


class _Link:
    """One authenticated session over one gRPC stream, the same on both sides."""

    def __init__(self, me: str, peer: str, signing_key, keys: dict[str, bytes], max_blob_bytes):
        import queue

        self.sender = _Sender(me, peer, signing_key)
        self.receiver = _Receiver(me, peer, keys, max_blob_bytes)
        self._out: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.closed = False

    def send(self, kind, body, blobs: Iterable[OutgoingBlob] = (), request_id=0, in_reply_to=0):
        with self._lock:  # a message's headers, chunks and envelope stay together, in order
            if self.closed:
                raise FederationError(f"the channel to {self.sender.peer} is closed")
            for blob in blobs:
                header, chunks = self.sender.blob(blob)
                self._out.put(header)
                self._out.put(chunks)
            self._out.put(self.sender.envelope(kind, body, request_id, in_reply_to))

    def set_session(self, session: bytes) -> None:
        self.sender.session = session
        self.receiver.session = session

    def close(self, final=_CLOSE) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._out.put(final)

    def frames(self) -> Iterator:
        """What goes on the wire, in order; ends (or yields the final item) on close."""
        while True:
            item = self._out.get()
            if item is _CLOSE:
                return
            if isinstance(item, bytes):
                yield item
            elif isinstance(item, _Abort):
                yield item
                return
            else:
                yield from item


@dataclass
class _Abort:
    code: grpc.StatusCode
    details: str


def _session_id(hello_nonce: bytes, welcome_nonce: bytes) -> bytes:
    return hashlib.sha256(SESSION_DOMAIN + hello_nonce + welcome_nonce).digest()


# --- coordinator side ----------------------------------------------------------------------


class _Pending:
    def __init__(self):
        self.event = threading.Event()
        self.message: Message | None = None
        self.error: Exception | None = None


class SitePeer:
    """The coordinator's handle on one connected site: :meth:`call` sends a request
    (with its blobs) and returns the site's verified reply."""

    def __init__(self, site_id: str, link: _Link, policy_fingerprint: bytes):
        self.site_id = site_id
        self.policy_fingerprint = policy_fingerprint
        self._link = link
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self.error: Exception | None = None

    @property
    def connected(self) -> bool:
        return self.error is None

    def call(self, kind: str, body, blobs: Iterable[OutgoingBlob] = (), timeout=None) -> Message:
        if kind not in REQUESTS:
            raise ValueError(f"{kind!r} is not a request (allowed: {', '.join(REQUESTS)})")
        pending = _Pending()
        with self._lock:
            if self.error is not None:
                raise FederationError(f"site {self.site_id} is not connected: {self.error}")
            rid = next(self._ids)
            self._pending[rid] = pending
        try:
            self._link.send(kind, body, blobs, request_id=rid)
            if not pending.event.wait(timeout):
                raise FederationError(f"site {self.site_id} did not answer {kind} in {timeout} s")
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        msg = pending.message
        if msg.kind == "refusal":
            raise PeerRefused(f"site {self.site_id} refused {kind}: {msg.body.reason}")
        if msg.kind != REQUESTS[kind]:
            raise ProtocolError(f"site {self.site_id} answered {kind} with {msg.kind}")
        return msg

    def _deliver(self, msg: Message) -> None:
        with self._lock:
            pending = self._pending.get(msg.envelope.in_reply_to)
        if pending is None or msg.kind not in set(REQUESTS.values()) | {"refusal"}:
            raise ProtocolError(f"site {self.site_id} sent {msg.kind} that answers no request")
        pending.message = msg
        pending.event.set()

    def _fail(self, error: Exception) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            for pending in self._pending.values():
                pending.error = error
                pending.event.set()

    def close(self, reason: str = "closed by the coordinator") -> None:
        self._fail(FederationError(f"site {self.site_id}: {reason}"))
        self._link.close()

    def say_goodbye(self, reason: str) -> None:
        """Tell the site the run is over (it stops serving instead of reconnecting), then
        close its stream."""
        with contextlib.suppress(Exception):  # a site already gone needs no goodbye
            if self.error is None:
                self._link.send("bye", pb.Bye(reason=" ".join(reason.split())[:300]))
        self.close(reason)


class Coordinator:
    """The coordinator's endpoint (made by :func:`listen`)."""

    def __init__(
        self,
        manifest: Manifest,
        allowed: set[str],
        signing_key,
        max_blob_bytes: int,
        policy_fingerprint: bytes,
        job: bytes = b"",
    ):
        self.manifest = manifest
        self.allowed = allowed
        self.port = 0
        self._key = signing_key
        self._max_blob_bytes = max_blob_bytes
        self._policy_fingerprint = policy_fingerprint
        self._job = bytes(job)  # the job every site must declare alike (messages.job_mismatch)
        self._refused: dict[str, str] = {}  # site -> why its job was refused (fails wait_for)
        self._sites: dict[str, SitePeer] = {}
        self._handshaking: dict[str, object] = {}  # site -> its one handshake in flight
        # site -> the PEM certificate its TLS handshake showed (pinned by the manifest's
        # SHA-256): relayed to the other sites, which seal exponent shares to its key.
        self._certificates: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    # What the round calls ------------------------------------------------------------------

    def connected(self) -> list[str]:
        with self._cond:
            return sorted(s for s, p in self._sites.items() if p.connected)

    def site(self, site_id: str) -> SitePeer:
        with self._cond:
            peer = self._sites.get(site_id)
        if peer is None or not peer.connected:
            raise FederationError(f"site {site_id} is not connected")
        return peer

    def wait_for(self, site_ids: Iterable[str], timeout: float) -> dict[str, SitePeer]:
        """Block until every one of ``site_ids`` is connected (or raise after ``timeout``)."""
        wanted = set(site_ids)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not wanted <= {s for s, p in self._sites.items() if p.connected}:
                refused = sorted(wanted & set(self._refused))
                if refused:  # it will not join this run: say why now, not after the timeout
                    raise FederationError(self._refused[refused[0]])
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(wanted - set(self.connected_unlocked()))
                    raise FederationError(
                        f"sites not connected after {timeout} s: {', '.join(missing)}"
                    )
                self._cond.wait(left)
            return {s: self._sites[s] for s in wanted}

    def certificates(self) -> dict[str, bytes]:
        """The PEM certificates of the sites that have connected (each one's SHA-256 is
        its manifest entry's ``cert_sha256``: the TLS handshake was pinned to it)."""
        with self._cond:
            return dict(self._certificates)

    def connected_unlocked(self) -> list[str]:
        return [s for s, p in self._sites.items() if p.connected]

    def close(self, grace: float = 1.0) -> None:
        with self._cond:
            peers = list(self._sites.values())
        for peer in peers:
            peer.close("the coordinator is shutting down")
        if self._server is not None:
            self._server.stop(grace).wait()

    # The gRPC handler --------------------------------------------------------------------

    def _identify(self, context) -> Party:
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        fp = _pem_sha256(pems[0])
        party = self.manifest.site_by_fingerprint(fp)
        if party is None:
            log.warning("refused a connection: certificate %s... is not in the manifest", fp[:16])
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate {fp[:16]}... is not a site of the federation manifest",
            )
        if party.id not in self.allowed:
            log.warning("refused site %s: not allowed in this run", party.id)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"site {party.id} is not allowed in this run"
            )
        with self._cond:
            self._certificates[party.id] = bytes(pems[0])
        return party

    def _connect(self, request_iterator, context):
        party = self._identify(context)
        token = object()
        with self._cond:
            busy = party.id in self._handshaking
            if not busy:
                self._handshaking[party.id] = token

        def handshake_done() -> None:
            with self._cond:
                if self._handshaking.get(party.id) is token:
                    del self._handshaking[party.id]

        if busy:
            log.warning("refused site %s: a handshake of it is already in progress", party.id)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"site {party.id} already has a handshake in progress",
            )
        try:
            yield from self._serve(party, request_iterator, context, handshake_done)
        finally:
            handshake_done()

    def _serve(self, party: Party, request_iterator, context, handshake_done):
        link = _Link(
            self.manifest.coordinator.id,
            party.id,
            self._key,
            self.manifest.keys(),
            self._max_blob_bytes,
        )
        timer = threading.Timer(HANDSHAKE_TIMEOUT_S, context.cancel)
        timer.start()
        try:
            msg = link.receiver.feed(next(request_iterator))
            if msg is None or msg.kind != "hello":
                raise ProtocolError(f"site {party.id} did not open with hello")
            hello = msg.body
            if hello.site_id != party.id:
                raise ProtocolError(
                    f"hello names site {hello.site_id} but the certificate is {party.id}"
                )
            if hello.protocol_version != PROTOCOL_VERSION:
                raise ProtocolError(f"site {party.id} speaks protocol {hello.protocol_version}")
            mismatch = job_mismatch(
                self._job, hello.job, self.manifest.coordinator.id, f"site {party.id}"
            )
            if mismatch:
                with self._cond:
                    self._refused[party.id] = mismatch
                    self._cond.notify_all()
                raise ProtocolError(mismatch)
            nonce = secrets.token_bytes(32)
            link.set_session(_session_id(hello.nonce, nonce))
            link.send(
                "welcome",
                pb.Welcome(
                    coordinator_id=self.manifest.coordinator.id,
                    protocol_version=PROTOCOL_VERSION,
                    policy_fingerprint=self._policy_fingerprint,
                    nonce=nonce,
                    job=self._job,
                ),
            )
        except StopIteration:
            return
        except ProtocolError as exc:
            log.warning("refused site %s: %s", party.id, exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.RpcError:
            return  # cancelled (the hello timeout) or the site went away
        finally:
            timer.cancel()
        peer = SitePeer(party.id, link, bytes(hello.policy_fingerprint))
        handshake_done()
        with self._cond:
            self._refused.pop(party.id, None)
            old = self._sites.get(party.id)
            self._sites[party.id] = peer
            self._cond.notify_all()
        if old is not None:
            old.close("replaced by a new connection")
        log.info("site %s connected", party.id)
        threading.Thread(
            target=self._read,
            args=(peer, link, request_iterator),
            name=f"fedray-federation-{party.id}",
            daemon=True,
        ).start()
        for item in link.frames():
            if isinstance(item, _Abort):
                context.abort(item.code, item.details)
            yield item

    def _read(self, peer: SitePeer, link: _Link, request_iterator) -> None:
        try:
            for raw in request_iterator:
                msg = link.receiver.feed(raw)
                if msg is not None:
                    peer._deliver(msg)
            link.receiver.end_of_stream()
            peer._fail(FederationError(f"site {peer.site_id} disconnected"))
            link.close()
        except ProtocolError as exc:
            log.warning("refused site %s: %s", peer.site_id, exc)
            peer._fail(exc)
            link.close(_Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        except grpc.RpcError:
            peer._fail(FederationError(f"site {peer.site_id} disconnected"))
            link.close()
        except Exception as exc:  # noqa: BLE001 - never leave a peer 'connected' and mute
            log.exception("refused site %s: its stream failed", peer.site_id)
            error = ProtocolError(f"site {peer.site_id}: its stream failed ({type(exc).__name__})")
            peer._fail(error)
            link.close(_Abort(grpc.StatusCode.INTERNAL, str(error)))
        else:
            log.info("site %s disconnected", peer.site_id)
        with self._cond:
            self._cond.notify_all()


def listen(
    host_port: str,
    cert,
    key,
    ca,
    allowed_sites: Iterable[str] | None = None,
    *,
    manifest,
    signing_key,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    policy_fingerprint: bytes = b"",
    job: bytes = b"",
) -> Coordinator:
    """Serve the federation endpoint on ``host_port`` (``"127.0.0.1:0"`` picks a port:
    ``.port``). ``cert``/``key``/``ca`` are PEM files; only sites of the manifest that are
    in ``allowed_sites`` (default: all of them) get in, and only if they declare ``job``
    (``fedray.federation.site.agreed_job``; a site declaring another is refused, naming
    the settings that differ, and :meth:`Coordinator.wait_for` fails with that line)."""
    manifest = _as_manifest(manifest)
    key_obj = _load_signing_key(signing_key)
    cert_pem, key_pem, ca_pem = _read(cert, "certificate"), _read(key, "key"), _read(ca, "CA")
    _check_own(manifest.coordinator, cert_pem, key_obj, f"coordinator {manifest.coordinator.id}")
    _check_ca(manifest, ca_pem, ca)
    allowed = set(manifest.sites) if allowed_sites is None else set(allowed_sites)
    unknown = allowed - set(manifest.sites)
    if unknown:
        raise FederationError(f"allowed sites not in the manifest: {', '.join(sorted(unknown))}")
    coordinator = Coordinator(
        manifest, allowed, key_obj, int(max_blob_bytes), policy_fingerprint, job
    )
    creds = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    deadline = time.monotonic() + BIND_WAIT_S
    while True:
        # Each stream holds a worker while it lasts; a site holds at most one session and
        # one handshake (a second is refused), so 2 per site plus a few for refusals
        # suffice, and gRPC answers RESOURCE_EXHAUSTED past that rather than queueing (M1).
        server = grpc.server(
            ThreadPoolExecutor(max_workers=2 * len(allowed) + 4),
            options=_GRPC_OPTIONS + [("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=2 * len(allowed) + 4,
        )
        handler = grpc.stream_stream_rpc_method_handler(coordinator._connect)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler}),)
        )
        try:
            port = server.add_secure_port(host_port, creds)
        except RuntimeError:
            port = 0
        if port:
            break
        server.stop(None)
        if not _port_in_use(host_port) or time.monotonic() >= deadline:
            raise FederationError(
                f"cannot listen on {host_port} (in use, or not an address of this machine; "
                f"waited {BIND_WAIT_S:g} s)"
            )
        # A coordinator restarted after a crash: the old process may hold the port for a
        # few seconds more while it is torn down.
        log.warning("cannot listen on %s yet (in use?); retrying", host_port)
        time.sleep(1.0)
    server.start()
    coordinator.port, coordinator._server = port, server
    log.info("federation endpoint of %s listening on port %d", manifest.coordinator.id, port)
    return coordinator


def _port_in_use(host_port: str) -> bool:
    """Whether binding ``host:port`` fails because something holds the port (worth a
    retry), not because the address is not this machine's or is malformed."""
    import errno

    host, _, port = host_port.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, int(port)))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    except ValueError:
        return False
    return False


# --- site side -----------------------------------------------------------------------------

Handler = Callable[[Message], tuple]  # -> (reply kind, reply body[, blobs]); or raise Refused


class Site:
    """A site's connection to the coordinator (made by :func:`dial`): :meth:`run` dials
    out, waits and retries while the coordinator is down, and answers each request with
    ``handler(message)``."""

    def __init__(
        self,
        target: str,
        cert,
        key,
        ca,
        *,
        site_id: str,
        manifest,
        signing_key,
        handler: Handler,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        policy_fingerprint: bytes = b"",
        job: bytes = b"",
        server_name: str | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
    ):
        self.target = target
        self.site_id = check_id(site_id, "site id")
        self.manifest = _as_manifest(manifest)
        self._cert_path, self._key_path = str(cert), str(key)
        self._cert, self._pkey, self._ca = (
            _read(cert, "certificate"),
            _read(key, "key"),
            _read(ca, "CA"),
        )
        self._ca_path = str(ca)
        _check_ca(self.manifest, self._ca, ca)
        self._signing_key = _load_signing_key(signing_key)
        _check_own(
            self.manifest.sites.get(site_id), self._cert, self._signing_key, f"site {site_id}"
        )
        self.handler = handler
        self.max_blob_bytes = int(max_blob_bytes)
        self.policy_fingerprint = policy_fingerprint
        self.job = bytes(job)  # what this site declares; the coordinator's must be the same
        self.server_name = server_name
        self.backoff = backoff
        self._stop = threading.Event()
        self._call = None
        self._link: _Link | None = None
        self.sessions = 0
        self.farewell: str | None = None  # the coordinator's goodbye, once it said it

    def close(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def run(self, max_wait_s: float | None = None) -> None:
        """Serve until :meth:`close`; reconnect after a lost connection. Raise
        :class:`Unreachable` if the coordinator stays down ``max_wait_s`` seconds, and
        :class:`FederationError` when either side refuses the other (no retry then)."""
        delay, cap = self.backoff
        down_since = None
        while not self._stop.is_set():
            try:
                self._session()
                down_since, delay = None, self.backoff[0]
                continue
            except Unreachable as exc:
                now = time.monotonic()
                down_since = down_since or now
                if max_wait_s is not None and now - down_since >= max_wait_s:
                    raise Unreachable(f"{exc}; gave up after {max_wait_s:g} s") from None
                if max_wait_s is not None:  # the last wait ends at the give-up time
                    delay = min(delay, max_wait_s - (now - down_since))
                log.warning("%s; retrying in %.1f s", exc, delay)
            if self._stop.wait(delay):
                return
            delay = min(cap, delay * 2 * random.uniform(0.8, 1.2))  # jitter within the cap

    def _probe(self) -> None:
        """Before gRPC: one TLS handshake to see the coordinator's certificate, which
        must be the manifest's (gRPC's Python API does not show the server's certificate)."""
        host, _, port = self.target.rpartition(":")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=self._ca.decode())
        ctx.load_cert_chain(self._cert_path, self._key_path)
        ctx.set_alpn_protocols(["h2"])
        expected = self.manifest.coordinator.cert_sha256
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except OSError as exc:
            raise Unreachable(
                f"coordinator at {self.target} unreachable ({exc.strerror or exc})"
            ) from None
        try:
            with ctx.wrap_socket(sock, server_hostname=self.server_name or host.strip("[]")) as tls:
                fp = _der_sha256(tls.getpeercert(binary_form=True))
                if not secrets.compare_digest(fp, expected):
                    raise FederationError(
                        f"the coordinator at {self.target} presents certificate {fp[:16]}..., "
                        f"not the manifest's {expected[:16]}..."
                    )
                tls.settimeout(2)
                # An accepted client hears the server's HTTP/2 settings at once; a refused
                # one hears an alert or the connection closing.
                try:
                    refused = tls.recv(1) == b""
                    reason = "it closed the connection"
                except ssl.SSLError as exc:
                    refused, reason = True, exc.reason
                except (ConnectionError, BrokenPipeError) as exc:
                    refused, reason = True, type(exc).__name__
                except (TimeoutError, OSError):
                    refused = False
                if refused:
                    raise FederationError(
                        f"the coordinator at {self.target} refused this site's certificate "
                        f"({reason})"
                    )
        except ssl.SSLCertVerificationError as exc:
            raise FederationError(
                f"the coordinator at {self.target} is not trusted: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise FederationError(
                f"TLS with the coordinator at {self.target} failed ({exc.reason})"
            ) from None
        except (ConnectionError, TimeoutError) as exc:
            raise Unreachable(f"coordinator at {self.target} unreachable ({exc})") from None
        finally:
            sock.close()

    def _session(self) -> None:
        self._probe()
        coord = self.manifest.coordinator.id
        creds = grpc.ssl_channel_credentials(self._ca, self._pkey, self._cert)
        options = list(_GRPC_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        link = _Link(
            self.site_id, coord, self._signing_key, self.manifest.keys(), self.max_blob_bytes
        )
        nonce = secrets.token_bytes(32)
        link.send(
            "hello",
            pb.Hello(
                site_id=self.site_id,
                protocol_version=PROTOCOL_VERSION,
                policy_fingerprint=self.policy_fingerprint,
                nonce=nonce,
                job=self.job,
            ),
        )
        with grpc.secure_channel(self.target, creds, options=options) as channel:
            call = channel.stream_stream(METHOD)(link.frames())
            self._call, self._link = call, link
            try:
                responses = iter(call)
                msg = link.receiver.feed(next(responses))
                if msg is None or msg.kind != "welcome":
                    raise ProtocolError("the coordinator did not answer hello with welcome")
                session = _session_id(nonce, msg.body.nonce)
                if msg.body.coordinator_id != coord or msg.envelope.session != session:
                    raise ProtocolError("the coordinator's welcome is not for this session")
                if msg.body.protocol_version != PROTOCOL_VERSION:
                    raise ProtocolError(
                        f"the coordinator speaks protocol {msg.body.protocol_version}, "
                        f"this site {PROTOCOL_VERSION}"
                    )
                expected = bytes(msg.body.policy_fingerprint)
                if expected and not secrets.compare_digest(expected, self.policy_fingerprint):
                    raise ProtocolError(
                        "the coordinator expects another site policy (fingerprint "
                        f"{expected.hex()[:16]}..., this site's "
                        f"{bytes(self.policy_fingerprint).hex()[:16] or 'none'}...)"
                    )
                # The site's own check (against a misconfigured coordinator; a hostile one
                # can echo the site's job back: docs/federation.md).
                mismatch = job_mismatch(
                    self.job, msg.body.job, f"site {self.site_id}", "the coordinator"
                )
                if mismatch:
                    raise ProtocolError(mismatch)
                link.set_session(session)
                self.sessions += 1
                log.info("site %s joined the federation at %s", self.site_id, self.target)
                for raw in responses:
                    msg = link.receiver.feed(raw)
                    if msg is not None and msg.kind == "bye":  # the run is over: stop
                        log.info(
                            "site %s: the coordinator said goodbye: %s",
                            self.site_id,
                            msg.body.reason,
                        )
                        self.farewell = msg.body.reason
                        self._stop.set()
                        call.cancel()
                        return
                    if msg is not None:
                        self._answer(link, msg)
                link.receiver.end_of_stream()
                log.warning("site %s: the coordinator closed the connection", self.site_id)
            except ProtocolError as exc:
                log.error("site %s refused the coordinator: %s", self.site_id, exc)
                call.cancel()
                raise
            except grpc.RpcError as exc:
                if self._stop.is_set() or exc.code() == grpc.StatusCode.CANCELLED:
                    return
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    raise Unreachable(
                        f"lost the coordinator at {self.target} ({exc.details()})"
                    ) from None
                raise FederationError(
                    f"the coordinator refused site {self.site_id}: {exc.details()}"
                ) from None
            except StopIteration:
                raise Unreachable(
                    f"the coordinator at {self.target} closed before welcome"
                ) from None
            finally:
                self._call = self._link = None
                link.close()

    def _answer(self, link: _Link, msg: Message) -> None:
        rid = msg.envelope.request_id
        if msg.kind not in REQUESTS or rid == 0:
            raise ProtocolError(f"the coordinator sent {msg.kind}, which is not a request")
        try:
            out = self.handler(msg)
            kind, body = out[0], out[1]
            blobs = out[2] if len(out) > 2 else ()
            if kind != REQUESTS[msg.kind]:
                raise TypeError(f"handler answered {msg.kind} with {kind}")
        except (Refused, PolicyRefusal, ProtocolError) as exc:
            reason = " ".join(str(exc).split())[:300]
            log.warning("site %s refused %s: %s", self.site_id, msg.kind, reason)
            link.send("refusal", pb.Refusal(reason=reason), in_reply_to=rid)
            return
        except Exception:
            log.exception("site %s failed to handle %s", self.site_id, msg.kind)
            link.send(
                "refusal",
                pb.Refusal(reason=f"the site failed to handle {msg.kind} (see its log)"),
                in_reply_to=rid,
            )
            return
        link.send(kind, body, blobs, in_reply_to=rid)


def dial(
    target: str, cert, key, ca, *, site_id: str, manifest, signing_key, handler: Handler, **options
) -> Site:
    """A site's channel to the coordinator at ``target`` (``host:port``); call
    :meth:`Site.run` (blocking) to connect and serve. ``options``: ``max_blob_bytes``,
    ``policy_fingerprint``, ``job``, ``server_name``, ``backoff``."""
    return Site(
        target,
        cert,
        key,
        ca,
        site_id=site_id,
        manifest=manifest,
        signing_key=signing_key,
        handler=handler,
        **options,
    )
