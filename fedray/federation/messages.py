"""The typed messages of the cross-organisation channel, and the checks every one passes.

The schema is ``federation.proto`` (generated: ``federation_pb2``). Nothing here, or in
:mod:`fedray.federation.channel`, unpickles anything or resolves a class or function
from a name on the wire: identifiers are matched against local tables only, weights are
raw little-endian arrays decoded with the dtype and shape the *receiver* expects
(:func:`decode_array`), ciphertexts are fixed-width bytes (:func:`decode_ciphertexts`).

:func:`check_envelope` is the whole schema check a received envelope passes before
anyone reads it: no unknown fields, identifiers of a closed alphabet (no dots, colons or
slashes, so no dotted class path), fixed-length digests and signatures, finite numbers,
sorted distinct update lists, a one-line printable refusal.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np

from fedray.errors import FedrayError
from fedray.federation import federation_pb2 as pb

# 2: cohorts, failures and timings in train messages; sums relayed. 3: the fast path
# (sealed exponent shares relayed, share sums answered, the sites' certificates sent).
# 4: each side declares its job in Hello/Welcome and refuses the other's if it differs.
# 5: model checks: attested opened sums travel with each train request (releases) and key
# holders attest a sum on request (OPENING_ATTEST).
PROTOCOL_VERSION = 5
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # a blob chunk carries at most this many payload bytes
ENVELOPE_DOMAIN = b"fedray-envelope-v1\x00"
HEADER_DOMAIN = b"fedray-blob-header-v1\x00"
SESSION_DOMAIN = b"fedray-session-v1\x00"
MAX_CONTRIBUTION_BYTES = 32 * 1024  # a signed JSON statement, well inside one envelope
MAX_REASON_CHARS = 300
MAX_JOB_BYTES = 16 * 1024  # the job a party declares: a flat JSON object of settings
_SETTING = re.compile(r"[A-Za-z0-9_.\-]{1,80}")  # a declared setting's name
MAX_CERTIFICATE_BYTES = 16 * 1024  # one PEM certificate relayed in a train request
# Caps on what one signed envelope may make the receiver parse and hold (L2): the whole
# serialized envelope (checked before its signature, so before parsing), the entries of
# its map and the items of each repeated field.
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_HYPERPARAMETERS = 64
MAX_LIST_ITEMS = 1024
# A blob's shape: at most this many dimensions, each at most MAX_DIM, checked before any
# arithmetic on them (so a product is small and never a huge integer).
MAX_SHAPE_DIMS = 8
MAX_DIM = 1 << 40

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
VERSION_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")
HYPERPARAMETER_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

# The closed list of dtypes a blob may hold, all little-endian.
DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_F16: np.dtype("<f2"),
    pb.DTYPE_F32: np.dtype("<f4"),
    pb.DTYPE_F64: np.dtype("<f8"),
    pb.DTYPE_I8: np.dtype("i1"),
    pb.DTYPE_I16: np.dtype("<i2"),
    pb.DTYPE_I32: np.dtype("<i4"),
    pb.DTYPE_I64: np.dtype("<i8"),
    pb.DTYPE_U8: np.dtype("u1"),
}

# The requests a coordinator may send and the reply each one expects (a closed list).
REQUESTS = {
    "train_request": "train_reply",
    "approve_request": "approval",
    "share_sum_request": "share_sum_reply",
}
REPLIES = set(REQUESTS.values()) | {"refusal"}


class FederationError(FedrayError, RuntimeError):
    """The channel refused a peer, a message or a payload. The message is one line."""


class ProtocolError(FederationError):
    """A received frame or message breaks the protocol (signature, sequence, schema, size)."""


def _fail(msg: str):
    raise ProtocolError(msg)


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        _fail(f"{what} {value[:80]!r} is not an identifier ([A-Za-z0-9_-], at most 64)")
    return value


def _check_len(value: bytes, sizes: tuple[int, ...], what: str) -> None:
    if len(value) not in sizes:
        _fail(f"{what} has {len(value)} bytes, expected {' or '.join(map(str, sizes))}")


def _check_no_unknown_fields(msg) -> None:
    from google.protobuf import unknown_fields

    if len(unknown_fields.UnknownFieldSet(msg)):
        _fail(f"{msg.DESCRIPTOR.name} carries fields this protocol version does not know")
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = (
                value.values() if field.message_type.fields_by_name["value"].message_type else ()
            )
        elif field.is_repeated:
            values = value
        else:
            values = (value,)
        for sub in values:
            _check_no_unknown_fields(sub)


def _check_count(items, cap: int, what: str) -> None:
    if len(items) > cap:
        _fail(f"{what} has more than {cap} entries")


def _check_update_ids(ids, what: str) -> None:
    _check_count(ids, MAX_LIST_ITEMS, what)
    ids = list(ids)
    if not ids:
        _fail(f"{what} names no update")
    for u in ids:
        check_id(u, "update id")
    if ids != sorted(set(ids)):
        _fail(f"{what} update ids are not sorted and distinct")


def _check_clients(ids, what: str) -> None:
    _check_count(ids, MAX_LIST_ITEMS, what)
    ids = list(ids)
    if not ids:
        _fail(f"{what} names no client")
    if ids != sorted(set(ids)) or ids[0] < 0:
        _fail(f"{what} client ids are not sorted, distinct and >= 0")


def _check_ref(ref: pb.BlobRef, what: str) -> None:
    check_id(ref.blob_id, f"{what} blob id")
    _check_len(ref.sha256, (32,), f"{what} sha256")


def _check_line(text: str, what: str) -> None:
    if len(text) > MAX_REASON_CHARS or not text.isprintable():
        _fail(f"{what} is not one printable line of at most {MAX_REASON_CHARS} characters")


def _check_statement(contribution: bytes) -> None:
    """A contribution is a JSON object (a signed statement), parsed here under a size cap:
    a pickle, or anything else that is not exactly one JSON object, is refused (L3)."""
    if len(contribution) > MAX_CONTRIBUTION_BYTES:
        _fail(f"contribution is over {MAX_CONTRIBUTION_BYTES} bytes")
    if _json_object(contribution) is None:
        _fail("contribution is not a signed JSON statement (a pickle or other bytes)")


def _json_object(data: bytes, **loads) -> dict | None:
    """``data`` parsed as exactly one JSON object (``json.loads`` options), else None."""
    try:
        parsed = json.loads(bytes(data).decode("utf-8"), **loads)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def job_settings(job: bytes, whose: str) -> dict:
    """A declared job (Hello/Welcome ``job``): a flat JSON object of settings, under a
    size cap; empty bytes: none declared (an empty dict)."""
    if not job:
        return {}
    if len(job) > MAX_JOB_BYTES:
        _fail(f"{whose} job is over {MAX_JOB_BYTES} bytes")

    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("a key twice")
        return dict(pairs)

    def finite_only(name):
        raise ValueError(f"{name} is not a setting")

    settings = _json_object(job, object_pairs_hook=no_repeats, parse_constant=finite_only)
    if settings is None:
        _fail(f"{whose} job is not a JSON object of settings")
    if not all(_SETTING.fullmatch(k) for k in settings):  # keys go into log lines
        _fail(f"{whose} job has a setting name outside [A-Za-z0-9_.-]{{1,80}}")
    return settings


def job_mismatch(ours: bytes, theirs: bytes, here: str, there: str) -> str | None:
    """None if the two declared jobs are the same; else one line naming the settings that
    differ, each with its value at ``here`` and at ``there`` (three, then a count)."""
    if bytes(ours) == bytes(theirs):
        return None
    mine, other = job_settings(ours, f"{here}'s"), job_settings(theirs, f"{there}'s")
    if not other:
        return f"{there} declares no job (fedray older than protocol {PROTOCOL_VERSION}?)"
    keys = sorted(k for k in set(mine) | set(other) if mine.get(k, ...) != other.get(k, ...))
    if not keys:  # both sides write the same canonical bytes: another encoding is another job
        return (
            f"{here} and {there} declare their jobs in different encodings (another fedray "
            "version?); every party must declare the same"
        )
    said = [f"{k}: {_said(mine, k)} at {here}, {_said(other, k)} at {there}" for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return (
        f"{here} and {there} declare different jobs: {'; '.join(said)}{more}; every party "
        "must declare the same (docs/federation.md, 'The job every party declares')"
    )


def _said(settings: dict, key: str) -> str:
    if key not in settings:
        return "(not set)"
    return json.dumps(settings[key], separators=(",", ":"))[:120]


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_releases(releases) -> None:
    """A train request's opened sums: distinct rounds >= 1, a model digest of 64 hex
    digits, a blob of plaintexts, attestations of distinct holders >= 1, 64 bytes each."""
    _check_count(releases, MAX_LIST_ITEMS, "train request releases")
    rounds = set()
    for release in releases:
        if release.round < 1 or release.round in rounds:
            _fail(f"train request: release of round {release.round} (rounds from 1, once each)")
        rounds.add(release.round)
        if not _HEX64.fullmatch(release.model_sha256):
            _fail("train request: a release's model digest is not 64 hex digits")
        _check_count(release.attestations, MAX_LIST_ITEMS, "release attestations")
        holders = set()
        for attestation in release.attestations:
            if attestation.holder < 1 or attestation.holder in holders:
                _fail(
                    f"release of round {release.round}: attestation of holder "
                    f"{attestation.holder} (holders from 1, once each)"
                )
            holders.add(attestation.holder)
            _check_len(attestation.signature, (64,), "attestation signature")


def _check_sealed_shares(shares, update_ids, what: str) -> None:
    """Sealed exponent shares: each of an update the message names, for a holder index
    >= 1, with a 65-byte ephemeral point, a 12-byte nonce and a blob; one per (update,
    holder)."""
    _check_count(shares, MAX_LIST_ITEMS, what)
    seen = set()
    for share in shares:
        check_id(share.update_id, "sealed share update id")
        if share.update_id not in update_ids:
            _fail(f"{what}: a sealed share of update {share.update_id!r} it does not name")
        if share.holder < 1:
            _fail(f"{what}: a sealed share for holder {share.holder} (holders count from 1)")
        if (share.update_id, share.holder) in seen:
            _fail(f"{what}: two sealed shares of one update for one holder")
        seen.add((share.update_id, share.holder))
        _check_len(share.ephemeral_public, (65,), "sealed share ephemeral key")
        _check_len(share.nonce, (12,), "sealed share nonce")
        _check_ref(share.sealed, "sealed share")


def check_body(env: pb.Envelope) -> str:
    """The schema rules of the envelope's body; returns its kind (the oneof field name)."""
    kind = env.WhichOneof("body")
    if kind is None:
        _fail("envelope has no body")
    body = getattr(env, kind)
    if kind == "hello":
        check_id(body.site_id, "site id")
        _check_len(body.policy_fingerprint, (0, 32), "policy fingerprint")
        _check_len(body.nonce, (32,), "hello nonce")
        job_settings(body.job, "the site's")
    elif kind == "welcome":
        check_id(body.coordinator_id, "coordinator id")
        _check_len(body.policy_fingerprint, (0, 32), "policy fingerprint")
        _check_len(body.nonce, (32,), "welcome nonce")
        job_settings(body.job, "the coordinator's")
    elif kind == "train_request":
        check_id(body.task_id, "task id")
        if not VERSION_RE.fullmatch(body.task_version):
            _fail(f"task version {body.task_version[:80]!r} is not digits and dots")
        _check_len(body.model_fingerprint, (32,), "model fingerprint")
        _check_count(body.hyperparameters, MAX_HYPERPARAMETERS, "hyper-parameters")
        for key, number in body.hyperparameters.items():
            if not HYPERPARAMETER_RE.fullmatch(key):
                _fail(f"hyper-parameter name {key[:80]!r} is not [a-z][a-z0-9_]*")
            which = number.WhichOneof("value")
            if which is None or (which == "real" and not math.isfinite(number.real)):
                _fail(f"hyper-parameter {key} is not a finite number")
        _check_ref(body.global_weights, "global weights")
        _check_clients(body.client_ids, "train request")
        _check_count(body.site_certificates, MAX_LIST_ITEMS, "site certificates")
        for site, pem in body.site_certificates.items():
            check_id(site, "certificate's site id")
            if not 0 < len(pem) <= MAX_CERTIFICATE_BYTES:
                _fail(f"site {site}'s certificate is empty or over {MAX_CERTIFICATE_BYTES} bytes")
        _check_releases(body.releases)
        if bool(body.releases) != body.HasField("release_plaintexts"):
            _fail("train request: release plaintexts go with releases, and only with them")
        if body.releases:
            _check_ref(body.release_plaintexts, "release plaintexts")
    elif kind == "train_reply":
        check_id(body.update_id, "update id")
        _check_statement(body.contribution)
        _check_len(body.contribution_signature, (64,), "contribution signature")
        _check_ref(body.ciphertexts, "ciphertexts")
        _check_count(body.failures, MAX_LIST_ITEMS, "train reply failures")
        for failure in body.failures:
            if failure.client_id < 0:
                _fail(f"client id {failure.client_id} is negative")
            _check_line(failure.reason, "failure reason")
        for what in ("train_seconds", "encrypt_seconds"):
            value = getattr(body, what)
            if not math.isfinite(value) or value < 0:
                _fail(f"{what} {value!r} is not a finite number >= 0")
        _check_sealed_shares(body.sealed_shares, {body.update_id}, "train reply")
    elif kind == "approve_request":
        _check_update_ids(body.update_ids, "approve request")
        if len(body.contributions) != len(body.update_ids):
            _fail("approve request needs one contribution per update")
        for signed in body.contributions:
            _check_statement(signed.statement)
            _check_len(signed.signature, (64,), "contribution signature")
    elif kind == "approval":
        _check_update_ids(body.update_ids, "approval")
        _check_len(body.signature, (64,), "approval signature")
    elif kind == "share_sum_request":
        _check_update_ids(body.update_ids, "share-sum request")
        _check_count(body.approvals, MAX_LIST_ITEMS, "share-sum request approvals")
        for approval in body.approvals:
            _check_update_ids(approval.update_ids, "approval")
            _check_len(approval.signature, (64,), "approval signature")
        if body.opening == pb.OPENING_SHARE_SUM:
            if body.HasField("plaintexts") or body.HasField("exponents"):
                _fail("share-sum request: plaintexts and exponents go with an attestation only")
            if len(body.contributions) != len(body.update_ids) or body.ciphertexts:
                _fail(
                    "share-sum request for share sums needs one contribution per update, "
                    "no ciphertexts"
                )
            _check_sealed_shares(body.sealed_shares, set(body.update_ids), "share-sum request")
        elif body.opening in (pb.OPENING_PARTIAL_DECRYPTION, pb.OPENING_ATTEST):
            if not len(body.contributions) == len(body.ciphertexts) == len(body.update_ids):
                _fail("share-sum request needs one contribution and one ciphertext blob per update")
            if body.sealed_shares:
                _fail("share-sum request for partial decryptions carries sealed shares")
            attest = body.opening == pb.OPENING_ATTEST
            if attest != body.HasField("plaintexts") or attest != body.HasField("exponents"):
                _fail("share-sum request: plaintexts and exponents go with an attestation only")
            if attest:
                _check_ref(body.plaintexts, "attested plaintexts")
                _check_ref(body.exponents, "attested exponents")
        else:
            _fail(f"share-sum request of unknown opening {body.opening}")
        for signed in body.contributions:
            _check_statement(signed.statement)
            _check_len(signed.signature, (64,), "contribution signature")
        for ref in body.ciphertexts:
            _check_ref(ref, "ciphertexts")
    elif kind == "share_sum_reply":
        check_id(body.holder_id, "holder id")
        answer = body.WhichOneof("answer")
        if answer is None:
            _fail("share-sum reply carries no answer")
        if answer == "attestation":
            _check_len(body.attestation, (64,), "attestation")
        else:
            _check_ref(getattr(body, answer), answer.replace("_", " "))
    elif kind in ("refusal", "bye"):
        _check_line(body.reason, kind)
    elif kind == "blob_header":
        check_id(body.signer, "blob signer")
        _check_len(body.signature, (64,), "blob header signature")
    return kind


def check_envelope(env: pb.Envelope) -> str:
    """Every schema rule of a received envelope; returns the body's kind."""
    _check_no_unknown_fields(env)
    if env.protocol != PROTOCOL_VERSION:
        _fail(f"protocol version {env.protocol} (this side speaks {PROTOCOL_VERSION})")
    check_id(env.sender, "sender")
    check_id(env.recipient, "recipient")
    return check_body(env)


# --- blobs -----------------------------------------------------------------------------


def _dtype_code(dtype) -> int:
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    for code, known in DTYPES.items():
        if known == dtype:
            return code
    raise FederationError(
        f"dtype {dtype} cannot travel (allowed: {sorted(map(str, DTYPES.values()))})"
    )


def check_header(header: pb.BlobHeader, max_bytes: int) -> None:
    """A received blob header: its id, its size under the receive cap, and a size that
    agrees with its kind, dtype and shape (so nothing is read past or short of it).

    The shape's length and each dimension are capped *before* any arithmetic on them, and
    no computed size is ever put in a message (a crafted shape cannot make a huge integer
    or a huge string, H1)."""
    _check_no_unknown_fields(header)
    check_id(header.blob_id, "blob id")
    if header.name:
        check_id(header.name, "blob name")
    _check_len(header.sha256, (32,), "blob sha256")
    if header.total_size > max_bytes:
        _fail(
            f"blob {header.blob_id} declares {header.total_size} bytes, over the receive cap "
            f"of {max_bytes} bytes"
        )
    if len(header.shape) > MAX_SHAPE_DIMS:
        _fail(f"blob {header.blob_id} has more than {MAX_SHAPE_DIMS} dimensions")
    if any(d > MAX_DIM for d in header.shape):
        _fail(f"blob {header.blob_id} has a dimension over {MAX_DIM}")
    if header.kind == pb.BLOB_KIND_ARRAY:
        if header.dtype not in DTYPES:
            _fail(f"blob {header.blob_id} has no known dtype")
        expected = math.prod(header.shape) * DTYPES[header.dtype].itemsize
    elif header.kind == pb.BLOB_KIND_CIPHERTEXTS:
        if header.width == 0 or len(header.shape) != 1:
            _fail(f"blob {header.blob_id}: ciphertexts need a width and a shape [count]")
        expected = header.shape[0] * header.width
    else:
        _fail(f"blob {header.blob_id} has no known kind")
    if expected != header.total_size:
        _fail(
            f"blob {header.blob_id} declares {header.total_size} bytes, not what its kind, "
            "dtype and shape hold"
        )


def array_header(blob_id: str, array: np.ndarray, name: str = "") -> pb.BlobHeader:
    """The header of a raw little-endian array blob (``array_payload`` gives its bytes)."""
    array = np.asarray(array)
    return pb.BlobHeader(
        blob_id=check_id(blob_id, "blob id"),
        total_size=array.nbytes,
        sha256=hashlib.sha256(array_payload(array)).digest(),
        kind=pb.BLOB_KIND_ARRAY,
        dtype=_dtype_code(array.dtype),
        shape=list(array.shape),
        name=name,
    )


def array_payload(array: np.ndarray) -> memoryview:
    """The bytes of ``array`` as they travel: C order, little-endian, no copy if already so."""
    array = np.asarray(array)
    if array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return memoryview(np.ascontiguousarray(array)).cast("B")


def ciphertext_header(blob_id: str, data, width: int, name: str = "") -> pb.BlobHeader:
    """The header of fixed-width ciphertexts: ``len(data)`` must be a multiple of ``width``."""
    data = memoryview(data).cast("B")
    if width <= 0 or len(data) % width:
        raise FederationError(f"{len(data)} ciphertext bytes are not a multiple of width {width}")
    return pb.BlobHeader(
        blob_id=check_id(blob_id, "blob id"),
        total_size=len(data),
        sha256=hashlib.sha256(data).digest(),
        kind=pb.BLOB_KIND_CIPHERTEXTS,
        shape=[len(data) // width],
        width=width,
        name=name,
    )


def blob_ref(header: pb.BlobHeader) -> pb.BlobRef:
    return pb.BlobRef(blob_id=header.blob_id, size=header.total_size, sha256=header.sha256)


def decode_array(header: pb.BlobHeader, data, expected_dtype, expected_shape) -> np.ndarray:
    """The array a verified blob holds, read-only, if and only if it is exactly the dtype
    and shape the receiver expects; anything else is refused (nothing is guessed)."""
    expected_dtype = np.dtype(expected_dtype)
    expected_shape = tuple(int(s) for s in expected_shape)
    if header.kind != pb.BLOB_KIND_ARRAY:
        raise ProtocolError(f"blob {header.blob_id} is not an array")
    if header.dtype not in DTYPES or DTYPES[header.dtype] != DTYPES[_dtype_code(expected_dtype)]:
        got = DTYPES.get(header.dtype, "unknown")
        raise ProtocolError(f"blob {header.blob_id} has dtype {got}, expected {expected_dtype}")
    if tuple(header.shape) != expected_shape:
        raise ProtocolError(
            f"blob {header.blob_id} has shape {tuple(header.shape)}, expected {expected_shape}"
        )
    dtype = DTYPES[header.dtype]
    if len(data) != math.prod(expected_shape) * dtype.itemsize:
        raise ProtocolError(f"blob {header.blob_id} holds {len(data)} bytes, not its shape's")
    out = np.frombuffer(data, dtype=dtype).reshape(expected_shape)
    out.flags.writeable = False
    return out


def decode_ciphertexts(header: pb.BlobHeader, data, width: int, count: int | None = None):
    """Fixed-width ciphertexts as a read-only ``(count, width)`` uint8 array (big integers
    are the caller's: ``int.from_bytes(row, ...)``), refused unless width/count match."""
    if header.kind != pb.BLOB_KIND_CIPHERTEXTS or header.width != width:
        raise ProtocolError(f"blob {header.blob_id} is not ciphertexts of {width} bytes")
    n = header.shape[0]
    if (count is not None and n != count) or len(data) != n * width:
        raise ProtocolError(f"blob {header.blob_id} holds {n} ciphertexts, expected {count}")
    out = np.frombuffer(data, dtype=np.uint8).reshape(n, width)
    out.flags.writeable = False
    return out
