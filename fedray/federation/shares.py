"""Exponent shares across organisations: sealed by the sending site to the receiving site.

The fast path (``crypto.fast_decrypt``, :mod:`fedray.crypto.threshold`) has each host
give every key holder one Shamir share of its update's obfuscator exponents. In one
cluster a host deposits them directly; across organisations a site's host deposits its
own holder's share at home, and the share of every *other* site's holder travels through
the coordinator, **sealed to that site**: the ECIES of the key dealer's share files
(:func:`fedray.tools.keys._seal`: ephemeral P-256 ECDH with the recipient's certificate
key, HKDF-SHA256, AES-256-GCM), with its own domain and binding. The KDF's info and the
AEAD's associated data bind the format, the key, the manifest, the sending and receiving
sites, the receiving holder's index and its certificate, the round and the update id (and
the ephemeral key), so the coordinator, which relays it, cannot open it, nor move it to
another update, round, holder or site: the receiver rebuilds the binding from its own
files and from the update's contribution, as its host signed it, never from the wire.

The share's *content* is under the sender's signature too: the signed contribution names
the SHA-256 of each holder's share blob (``share_sha256``), and the receiving key holder
refuses a share whose digest is not the one signed for its index
(:meth:`fedray.runtime.keys.KeyHolder.deposit`).

A sealed share travels as a ``SealedShare`` message (update id, holder, ephemeral key,
nonce) and a raw ``uint8`` blob (the AES-GCM ciphertext and tag).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from fedray.tools.keys import KeyFileError, _canonical, _open, _seal

FORMAT = "fedray-exponent-share"
VERSION = 1
SEAL_DOMAIN = b"fedray-exponent-share-seal-v1\0"  # HKDF info and AES-GCM AAD of a share
TAG_BYTES = 16  # AES-GCM's tag, after the sealed share
POINT_BYTES = 65  # an uncompressed P-256 point
NONCE_BYTES = 12


class ShareSealError(PermissionError):
    """A sealed exponent share does not open, or is not the one expected: one line."""


@dataclass(frozen=True)
class ShareContext:
    """What one sealed exponent share is for: the receiver rebuilds it from its own files
    (key, manifest, its site id, index and certificate) and from the update's signed
    contribution (round, update id, the sending site = the manifest site of its host)."""

    key_fingerprint: str
    manifest_sha256: str
    round: int
    update_id: str
    sender: str  # the site whose host signed the update (and sealed the share)
    recipient: str  # the site whose key holder the share is for
    holder: int  # that holder's index, 1-based (its position in the manifest + 1)
    recipient_cert_sha256: str

    def body(self) -> dict:
        return dict(asdict(self), format=FORMAT, version=VERSION, round=int(self.round))


def _binding(body: dict) -> bytes:
    """HKDF info and AES-GCM AAD of a sealed exponent share: the context and the ephemeral
    key, canonical JSON behind this format's own domain (never a key file's)."""
    fields = (*ShareContext.__dataclass_fields__, "format", "version", "ephemeral_public")
    return SEAL_DOMAIN + _canonical({k: body.get(k) for k in fields})


@dataclass(frozen=True)
class SealedShare:
    """One exponent-share blob sealed to one site's key holder, as it travels."""

    holder: int
    ephemeral_public: bytes  # POINT_BYTES
    nonce: bytes  # NONCE_BYTES
    sealed: bytes  # AES-256-GCM ciphertext of the share blob, then its TAG_BYTES tag

    def __repr__(self) -> str:
        return f"SealedShare(holder={self.holder}, {len(self.sealed)} bytes)"


def manifest_sha256(manifest_path) -> str:
    """SHA-256 (hex) of the manifest file's bytes (every party holds the same file)."""
    with open(manifest_path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def recipient_key(cert_pem: bytes, site: str, cert_sha256: str):
    """Site ``site``'s P-256 certificate key (what its shares are sealed to), once the
    certificate is the manifest's (relayed by the coordinator, so checked here)."""
    try:
        return _certificate_key(bytes(cert_pem), site, cert_sha256)
    except KeyFileError as exc:
        raise ShareSealError(str(exc)) from None


def _certificate_key(pem: bytes, site: str, cert_sha256: str):
    from fedray.tools.keys import certificate_public_key

    return certificate_public_key(pem, site, cert_sha256, f"site {site}'s relayed certificate")


def seal_share(recipient_public, context: ShareContext, share: bytes) -> SealedShare:
    """Seal one holder's share blob to its site's certificate key, bound to ``context``."""
    sealed = _seal(recipient_public, context.body(), bytes(share), _binding)
    return SealedShare(
        int(context.holder),
        bytes.fromhex(sealed["ephemeral_public"]),
        bytes.fromhex(sealed["nonce"]),
        bytes.fromhex(sealed["ciphertext"]),
    )


def open_share(
    site_key, context: ShareContext, sealed: SealedShare, expected_bytes: int | None = None
) -> bytes:
    """The share blob ``sealed`` holds, opened with the receiving site's TLS private key
    ``site_key``, if it was sealed to this site, for this holder and exactly ``context``
    (ShareSealError otherwise); ``expected_bytes``: the share blob's size, checked first."""
    where = f"round {context.round}: update {context.update_id!r}'s exponent share"
    if int(sealed.holder) != int(context.holder):
        raise ShareSealError(f"{where} is for holder {sealed.holder}, not {context.holder}")
    if len(sealed.ephemeral_public) != POINT_BYTES or len(sealed.nonce) != NONCE_BYTES:
        raise ShareSealError(f"{where} is malformed (ephemeral key or nonce)")
    if expected_bytes is not None and len(sealed.sealed) != int(expected_bytes) + TAG_BYTES:
        raise ShareSealError(
            f"{where} has {len(sealed.sealed)} bytes, not the {int(expected_bytes) + TAG_BYTES} "
            "of a share of this update"
        )
    body = dict(
        context.body(),
        ephemeral_public=bytes(sealed.ephemeral_public).hex(),
        nonce=bytes(sealed.nonce).hex(),
        ciphertext=bytes(sealed.sealed).hex(),
    )
    try:
        return _open(where, site_key, body, _binding)
    except KeyFileError as exc:
        raise ShareSealError(str(exc)) from None
