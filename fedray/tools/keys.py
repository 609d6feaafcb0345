"""``python -m fedray.tools.keys deal --certs DIR --dealer a --out KEYS``: the federation's key.

Across organisations the threshold Paillier key is made once, by a **dealer run at a site**
named in the federation manifest (never by the coordinator), from that site's own files
(``DIR/<dealer>/signing.key``) and the *public* certificates of every site
(``DIR/<site>/cert.pem``, each checked against the manifest's ``cert_sha256``). It writes::

    KEYS/federation_key.json   the public key (n, hs, t of h holders = the manifest's sites
                               in manifest order), its verification data, the manifest's
                               SHA-256, signed by the dealer's Ed25519 manifest key
    KEYS/<site>.share          that site's decryption share, end-to-end encrypted to its
                               certificate's P-256 key (ECDH + HKDF-SHA256 + AES-256-GCM,
                               bound to the site, its index, the key and the manifest),
                               the whole file signed by the dealer

so every file can travel through anyone (the coordinator included): only the site opens
its share, and a swapped, edited or replayed-for-another-site file is refused.

Trust assumption: the dealer's process sees the whole key while it deals (it draws the
factors, shares the decryption exponent, encrypts each share and forgets them when it
exits). A dealer-free generation among the sites is the next step (docs/federation.md,
"Who makes the key").

Share verification. Besides its signature, ``federation_key.json`` carries a ciphertext
``c0`` of a random public plaintext ``m0`` and every holder's partial decryption of it,
``c0^(s_j) mod n^2`` (the *verification keys* of Shoup and Damgård–Jurik, with ``v = c0``;
publishing them reveals nothing beyond ``m0``, which is public). Anyone holding the file
checks that the holders' values lie on one polynomial of degree ``t - 1`` whose constant
term opens ``c0`` to ``m0`` (``h - t + 1`` combinations), and each site checks that its own
decrypted share gives its published value. So a site knows, at load time, that its share
works with any ``t - 1`` others; no zero-knowledge proof of partial decryptions during
rounds is made (the values here are what such proofs would be checked against).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path

import gmpy2

from fedray.crypto.paillier import PublicKey
from fedray.crypto.threshold import (
    DecryptionShare,
    ThresholdPublicKey,
    combine_partial_decryptions,
    deal_threshold_key,
)
from fedray.errors import FedrayError

KEY_FORMAT = "fedray-federation-key"
SHARE_FORMAT = "fedray-key-share"
VERSION = 1
KEY_NAME = "federation_key.json"
SHARE_SUFFIX = ".share"
MIN_KEY_BITS = 2048
MAX_FILE_BYTES = 1 << 20  # a key or share file; a 4096-bit key with 64 holders is ~70 KiB

KEY_DOMAIN = b"fedray-federation-key-v1\0"  # the dealer's signature over federation_key.json
SHARE_DOMAIN = b"fedray-key-share-v1\0"  # the dealer's signature over a share file
SEAL_DOMAIN = b"fedray-key-share-seal-v1\0"  # HKDF info and AES-GCM AAD of a share


KEY_FIELDS = frozenset(
    [
        "format",
        "version",
        "manifest_sha256",
        "dealer",
        "holders",
        "threshold",
        "n",
        "hs",
        "fingerprint",
        "verification",
    ]
)
SHARE_FIELDS = frozenset(
    [
        "format",
        "version",
        "manifest_sha256",
        "dealer",
        "site",
        "index",
        "key_fingerprint",
        "federation_key_sha256",
        "recipient_cert_sha256",
        "ephemeral_public",
        "nonce",
        "ciphertext",
    ]
)


class KeyFileError(FedrayError, ValueError):
    """A key or share file (or an argument of the deal) is wrong: the message is one line."""


# --- small helpers ------------------------------------------------------------------------


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hex(value: int) -> str:
    return format(int(value), "x")


_HEX = re.compile(r"0|[1-9a-f][0-9a-f]*")


def _int(text, path, what: str) -> int:
    if not isinstance(text, str) or not text or len(text) > 8192:
        raise KeyFileError(f"{path}: {what} is not a hex string")
    if not _HEX.fullmatch(text):
        raise KeyFileError(f"{path}: {what} is not a lowercase hex number without leading zeros")
    return int(text, 16)


def _read(path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"{path}: the {what} is over {MAX_FILE_BYTES} bytes")
    return data


def _manifest(manifest_path):
    """(Manifest, SHA-256 hex of its bytes, site ids in manifest order)."""
    from fedray.federation.channel import Manifest
    from fedray.federation.messages import FederationError

    raw = _read(manifest_path, "federation manifest")
    try:
        manifest = Manifest.load(manifest_path)
    except FederationError as exc:
        raise KeyFileError(str(exc)) from None
    return manifest, hashlib.sha256(raw).hexdigest(), list(manifest.sites)


def _signed_json(path, what: str, fmt: str, fields: frozenset) -> tuple[dict, bytes]:
    """The file's object without its signature, and the signature (not yet checked)."""
    try:
        obj = json.loads(_read(path, what))
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(f"{path}: the {what} is not JSON") from None
    if not isinstance(obj, dict):
        raise KeyFileError(f"{path}: the {what} is not a JSON object")
    if obj.get("format") != fmt or obj.get("version") != VERSION:
        raise KeyFileError(
            f"{path}: not a {fmt} file of version {VERSION} "
            f"(format {obj.get('format')!r}, version {obj.get('version')!r})"
        )
    sig = obj.pop("signature", None)
    if not isinstance(sig, str) or len(sig) != 128:
        raise KeyFileError(f"{path}: the {what} has no Ed25519 signature (128 hex digits)")
    if set(obj) != fields:
        odd = sorted(set(obj) ^ fields)
        raise KeyFileError(f"{path}: the {what} has unknown or missing fields: {', '.join(odd)}")
    try:
        return obj, bytes.fromhex(sig)
    except ValueError:
        raise KeyFileError(f"{path}: the {what}'s signature is not hex") from None


def _check_dealer(path, body: dict, manifest, manifest_sha: str, sites: list[str], what: str):
    """Made for this manifest, by a site of it, signed by that site: returns the dealer id."""
    if body.get("manifest_sha256") != manifest_sha:
        raise KeyFileError(
            f"{path}: the {what} was made for another federation manifest "
            f"({str(body.get('manifest_sha256'))[:16]}..., this one is {manifest_sha[:16]}...)"
        )
    dealer = body.get("dealer")
    if not isinstance(dealer, str) or dealer not in manifest.sites:
        raise KeyFileError(
            f"{path}: the {what}'s dealer {dealer!r} is not a site of the manifest "
            f"(sites: {', '.join(sites)})"
        )
    return dealer


def _verify(path, public_raw: bytes, signature: bytes, message: bytes, who: str, what: str):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise KeyFileError(
            f"{path}: the {what} is not signed by dealer {who}'s manifest key "
            "(altered, or signed by someone else)"
        ) from None


def _write(path: Path, data: bytes) -> None:
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def majority(holders: int) -> int:
    """The smallest majority of ``holders``: floor(h/2) + 1 (the default threshold)."""
    return holders // 2 + 1


def _check_threshold(threshold: int, holders: int, where: str) -> None:
    if not majority(holders) <= threshold <= holders:
        raise KeyFileError(
            f"{where}threshold {threshold} of {holders} holders is not a majority: "
            f"allowed {majority(holders)}..{holders}"
        )


# --- the public part ------------------------------------------------------------------------


def key_digest(body: dict) -> str:
    """SHA-256 (hex) of what the dealer signed for ``federation_key.json``: a share names it."""
    return hashlib.sha256(KEY_DOMAIN + _canonical(body)).hexdigest()


def _dealer_signed(path, loaded_manifest, what: str, fmt: str, fields, domain: bytes):
    """A key or share file's body and its dealer: a site of the manifest, whose Ed25519
    manifest key signed ``domain`` + the canonical body."""
    manifest, manifest_sha, sites = loaded_manifest
    body, sig = _signed_json(path, what, fmt, fields)
    dealer = _check_dealer(path, body, manifest, manifest_sha, sites, what)
    _verify(path, manifest.sites[dealer].signing_key, sig, domain + _canonical(body), dealer, what)
    return body, dealer


def _load_key(path, loaded_manifest, allow_insecure: bool):
    manifest, _, sites = loaded_manifest
    body, dealer = _dealer_signed(
        path, loaded_manifest, "federation key", KEY_FORMAT, KEY_FIELDS, KEY_DOMAIN
    )
    if body.get("holders") != sites:
        raise KeyFileError(
            f"{path}: holders {body.get('holders')!r} are not the manifest's sites in "
            f"manifest order ({sites})"
        )
    threshold = body.get("threshold")
    if type(threshold) is not int:
        raise KeyFileError(f"{path}: threshold {threshold!r} is not an integer")
    _check_threshold(threshold, len(sites), f"{path}: ")
    n = _int(body.get("n"), path, "n")
    if n.bit_length() < MIN_KEY_BITS and not allow_insecure:
        raise KeyFileError(
            f"{path}: a key of {n.bit_length()} bits; at least {MIN_KEY_BITS} are required"
        )
    if n < 3 or n % 2 == 0 or gmpy2.is_square(n) or gmpy2.is_prime(n):
        raise KeyFileError(f"{path}: n is not an RSA modulus")
    n2 = n * n
    hs = _int(body.get("hs"), path, "hs")
    if not 1 < hs < n2 or gmpy2.gcd(hs, n) != 1:
        raise KeyFileError(f"{path}: hs is not a unit mod n^2")
    public = PublicKey(n)
    if body.get("fingerprint") != public.fingerprint:
        raise KeyFileError(
            f"{path}: fingerprint {body.get('fingerprint')!r} is not n's ({public.fingerprint})"
        )
    try:
        key = ThresholdPublicKey(public, hs, len(sites), threshold)
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    partials = _check_verification(path, key, body.get("verification"))
    return key, body, manifest, sites, partials


def _check_verification(path, key: ThresholdPublicKey, ver) -> list[int]:
    """Every holder's published c0^(s_j) lies on one polynomial of degree t - 1 that opens
    ``c0`` to ``m0``: the sets {1..t} and {1..t-1, j} for each j > t all open it."""
    if not isinstance(ver, dict) or set(ver) != {"ciphertext", "plaintext", "partials"}:
        raise KeyFileError(f"{path}: verification must hold ciphertext, plaintext and partials")
    n, h, t = key.n, key.holders, key.threshold
    n2 = n * n
    c0 = _int(ver["ciphertext"], path, "the verification ciphertext")
    m0 = _int(ver["plaintext"], path, "the verification plaintext")
    raw = ver["partials"]
    if not isinstance(raw, list) or len(raw) != h:
        raise KeyFileError(f"{path}: verification needs one partial per holder ({h})")
    partials = [_int(v, path, f"partial {j}") for j, v in enumerate(raw, start=1)]
    if not (1 < c0 < n2 and m0 < n and all(1 < v < n2 for v in partials)):
        raise KeyFileError(f"{path}: a verification value is out of range")
    base = list(range(1, t + 1))
    for subset in [base] + [base[:-1] + [j] for j in range(t + 1, h + 1)]:
        try:
            opened = combine_partial_decryptions(key, {j: [partials[j - 1]] for j in subset})
        except (ValueError, ZeroDivisionError):
            opened = None
        if opened != [m0]:
            raise KeyFileError(
                f"{path}: the holders' verification values {subset} do not open the "
                "verification ciphertext (inconsistent shares)"
            )
    return partials


def load_federation_key(path, manifest_path, *, allow_insecure: bool = False) -> ThresholdPublicKey:
    """The federation's public threshold key from ``federation_key.json``, all checks made.

    Made for *this* manifest (SHA-256 of its bytes), by a site of it, signed with that
    site's Ed25519 manifest key; holders are the manifest's sites in order; t a majority;
    n at least ``MIN_KEY_BITS`` bits (``allow_insecure=True``: any size, for tests); hs of
    Jacobi symbol +1; the holders' verification values consistent. What the coordinator
    loads (it holds no key material).
    """
    return _load_key(path, _manifest(manifest_path), allow_insecure)[0]


# --- shares -----------------------------------------------------------------------------------


def _binding(body: dict) -> bytes:
    """HKDF info and AES-GCM AAD: what a sealed share is for (format, site, index, key,
    manifest, dealer, the recipient's certificate and the sender's ephemeral key)."""
    fields = (
        "format",
        "version",
        "site",
        "index",
        "key_fingerprint",
        "federation_key_sha256",
        "manifest_sha256",
        "dealer",
        "recipient_cert_sha256",
        "ephemeral_public",
    )
    return SEAL_DOMAIN + _canonical({k: body.get(k) for k in fields})


def _aes_key(shared_secret: bytes, binding: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=binding).derive(shared_secret)


def _point(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _seal(recipient_public, body: dict, plaintext: bytes, binding_of=_binding) -> dict:
    """ECIES to a P-256 key: ephemeral ECDH + HKDF-SHA256 + AES-256-GCM (AAD = binding).

    ``binding_of(body)`` is the HKDF info and the AEAD's associated data (a share file's
    :func:`_binding` by default; a relayed exponent share has its own,
    :mod:`fedray.federation.shares`)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ephemeral = ec.generate_private_key(ec.SECP256R1())
    body = dict(body, ephemeral_public=_point(ephemeral.public_key()).hex())
    binding = binding_of(body)
    key = _aes_key(ephemeral.exchange(ec.ECDH(), recipient_public), binding)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext, binding)
    return dict(body, nonce=nonce.hex(), ciphertext=sealed.hex())


def _open(path, site_key, body: dict, binding_of=_binding) -> bytes:
    """The plaintext :func:`_seal` sealed, if ``body`` (with the binding ``binding_of``
    makes of it) is exactly what it was sealed under and ``site_key`` the recipient's."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), bytes.fromhex(body["ephemeral_public"])
        )
        nonce = bytes.fromhex(body["nonce"])
        sealed = bytes.fromhex(body["ciphertext"])
    except (KeyError, TypeError, ValueError):
        raise KeyFileError(f"{path}: the sealed share is malformed") from None
    binding = binding_of(body)
    try:
        key = _aes_key(site_key.exchange(ec.ECDH(), ephemeral), binding)
        return AESGCM(key).decrypt(nonce, sealed, binding)
    except (InvalidTag, ValueError):
        raise KeyFileError(
            f"{path}: the share does not open with this site's key "
            "(encrypted to another site, or altered)"
        ) from None


def _site_private_key(path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(_read(path, "site key"), None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyFileError(f"{path}: not an ECDSA P-256 private key (the site's TLS key)")
    return key


def load_share(
    path,
    manifest_path,
    site_id: str,
    site_key_pem_path,
    *,
    federation_key_path=None,
    allow_insecure: bool = False,
) -> tuple[ThresholdPublicKey, DecryptionShare]:
    """Site ``site_id``'s decryption share from its share file, opened with its TLS key.

    Checks the federation key (as :func:`load_federation_key`; ``federation_key_path``
    defaults to ``federation_key.json`` beside the share), the dealer's signature over the
    share file, that it is for this manifest, this site and its index (its position among
    the manifest's sites), this key (fingerprint and the SHA-256 of what the dealer signed
    for the key file) and that the decrypted share gives the holder's published
    verification value.
    """
    key_path = (
        Path(path).with_name(KEY_NAME) if federation_key_path is None else federation_key_path
    )
    manifest, _, sites = loaded = _manifest(manifest_path)
    if site_id not in manifest.sites:
        raise KeyFileError(f"site {site_id!r} is not a site of the manifest ({', '.join(sites)})")
    body, dealer = _dealer_signed(
        path, loaded, "share file", SHARE_FORMAT, SHARE_FIELDS, SHARE_DOMAIN
    )
    key, key_body, _, _, partials = _load_key(key_path, loaded, allow_insecure)
    if body.get("site") != site_id:
        raise KeyFileError(f"{path}: the share is for site {body.get('site')!r}, not {site_id!r}")
    index = sites.index(site_id) + 1
    if body.get("index") != index:
        raise KeyFileError(
            f"{path}: the share has index {body.get('index')!r}; site {site_id} is holder {index}"
        )
    if dealer != key_body["dealer"] or body.get("federation_key_sha256") != key_digest(key_body):
        raise KeyFileError(f"{path}: the share was dealt for another key than {key_path}")
    if body.get("key_fingerprint") != key.fingerprint:
        raise KeyFileError(
            f"{path}: the share is for key {body.get('key_fingerprint')!r}, not {key.fingerprint}"
        )
    if body.get("recipient_cert_sha256") != manifest.sites[site_id].cert_sha256:
        raise KeyFileError(f"{path}: the share was sealed to another certificate than {site_id}'s")
    plain = _open(path, _site_private_key(site_key_pem_path), body)
    try:
        inner = json.loads(plain)
        ok = isinstance(inner, dict) and set(inner) == {"site", "index", "key_fingerprint", "value"}
    except (ValueError, TypeError):
        ok = False
    if not ok or (inner["site"], inner["index"], inner["key_fingerprint"]) != (
        site_id,
        index,
        key.fingerprint,
    ):
        raise KeyFileError(f"{path}: the opened share does not name site {site_id}, index {index}")
    value = _int(inner["value"], path, "the share")
    n2 = gmpy2.mpz(key.n) ** 2
    c0 = gmpy2.mpz(int(key_body["verification"]["ciphertext"], 16))
    if gmpy2.powmod(c0, value, n2) != partials[index - 1]:
        raise KeyFileError(
            f"{path}: the share does not match holder {index}'s verification value in {key_path}"
        )
    return key, DecryptionShare(key, index, value)


# --- the deal -------------------------------------------------------------------------------


def _site_public_key(cert_path: Path, site: str, expected_sha256: str):
    """The P-256 public key of ``site``'s certificate, once it is the manifest's."""
    pem = _read(cert_path, f"certificate of site {site}")
    return certificate_public_key(pem, site, expected_sha256, cert_path)


def certificate_public_key(pem: bytes, site: str, expected_sha256: str, cert_path="certificate"):
    """The P-256 public key of ``site``'s PEM certificate, once its SHA-256 is the
    manifest's ``expected_sha256`` (what a share is sealed to); KeyFileError if not."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedray.tools.certs import fingerprint

    try:
        fp = fingerprint(pem)
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise KeyFileError(f"{cert_path}: not a PEM certificate") from None
    if not secrets.compare_digest(fp, expected_sha256):
        raise KeyFileError(
            f"{cert_path}: not site {site}'s certificate of the manifest "
            f"(SHA-256 {fp[:16]}..., the manifest lists {expected_sha256[:16]}...)"
        )
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise KeyFileError(f"{cert_path}: site {site}'s certificate key is not ECDSA P-256")
    return public


def _dealer_signing_key(path, public_raw: bytes, dealer: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    own = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if not secrets.compare_digest(own, public_raw):
        raise KeyFileError(f"{path}: not site {dealer}'s signing key of the manifest")
    return key


def deal(
    certs_dir,
    dealer: str,
    out_dir,
    *,
    bits: int = 2048,
    threshold: int | None = None,
    force: bool = False,
    allow_insecure: bool = False,
) -> tuple[ThresholdPublicKey, list[Path]]:
    """Deal the federation's key at site ``dealer``: returns (public key, files written).

    Reads ``certs_dir/federation.json``, ``certs_dir/<dealer>/signing.key`` and each site's
    ``certs_dir/<site>/cert.pem``; writes ``out_dir/federation_key.json`` and
    ``out_dir/<site>.share`` for every site (0600; none overwritten without ``force``).
    """
    certs_dir, out_dir = Path(certs_dir), Path(out_dir)
    manifest_path = certs_dir / "federation.json"
    manifest, manifest_sha, sites = _manifest(manifest_path)
    if dealer == manifest.coordinator.id:
        raise KeyFileError(
            f"--dealer {dealer} is the coordinator; the dealer must be a site "
            f"({', '.join(sites)}): no coordinator process may hold key material"
        )
    if dealer not in manifest.sites:
        raise KeyFileError(
            f"--dealer {dealer!r} is not a site of the manifest ({', '.join(sites)})"
        )
    h = len(sites)
    if h < 2:
        raise KeyFileError(f"{manifest_path}: a threshold key needs at least 2 sites, not {h}")
    t = majority(h) if threshold is None else int(threshold)
    _check_threshold(t, h, "--threshold: ")
    if bits < MIN_KEY_BITS and not allow_insecure:
        raise KeyFileError(f"--bits {bits}: at least {MIN_KEY_BITS} (e.g. 2048, 3072)")
    targets = [out_dir / KEY_NAME] + [out_dir / f"{s}{SHARE_SUFFIX}" for s in sites]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{existing[0]} exists; pass --force to replace the federation's key")
    signer = _dealer_signing_key(
        certs_dir / dealer / "signing.key", manifest.sites[dealer].signing_key, dealer
    )
    recipients = {
        s: _site_public_key(certs_dir / s / "cert.pem", s, manifest.sites[s].cert_sha256)
        for s in sites
    }

    key, shares = deal_threshold_key(bits, h, t)  # the factors are gone when it returns
    n2 = gmpy2.mpz(key.n) ** 2
    m0 = secrets.randbelow(key.n)
    x = secrets.randbits(key.exponent_bits)
    c0 = (1 + gmpy2.mpz(m0) * key.n) * gmpy2.powmod(key.hs, x, n2) % n2
    body = {
        "format": KEY_FORMAT,
        "version": VERSION,
        "manifest_sha256": manifest_sha,
        "dealer": dealer,
        "holders": sites,
        "threshold": t,
        "n": _hex(key.n),
        "hs": _hex(key.hs),
        "fingerprint": key.fingerprint,
        "verification": {
            "ciphertext": _hex(c0),
            "plaintext": _hex(m0),
            "partials": [_hex(gmpy2.powmod(c0, s.value, n2)) for s in shares],
        },
    }
    signature = signer.sign(KEY_DOMAIN + _canonical(body)).hex()
    files = {targets[0]: _canonical(dict(body, signature=signature)) + b"\n"}
    digest = key_digest(body)
    for site, share, path in zip(sites, shares, targets[1:], strict=True):
        head = {
            "format": SHARE_FORMAT,
            "version": VERSION,
            "manifest_sha256": manifest_sha,
            "dealer": dealer,
            "site": site,
            "index": share.index,
            "key_fingerprint": key.fingerprint,
            "federation_key_sha256": digest,
            "recipient_cert_sha256": manifest.sites[site].cert_sha256,
        }
        inner = {
            "site": site,
            "index": share.index,
            "key_fingerprint": key.fingerprint,
            "value": _hex(share.value),
        }
        sealed = _seal(recipients[site], head, _canonical(inner))
        del inner
        sealed["signature"] = signer.sign(SHARE_DOMAIN + _canonical(sealed)).hex()
        files[path] = _canonical(sealed) + b"\n"
    del shares, share  # the dealer keeps no share; Python cannot wipe the integers' memory
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        _write(path, data)
    return key, list(files)


# --- the command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (as fedray.tools.certs)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m fedray.tools.keys",
        description="Make the federation's threshold key at a site (a one-shot dealer).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("deal", help="deal the key: federation_key.json and one .share per site")
    p.add_argument(
        "--certs",
        required=True,
        help="directory with federation.json, DEALER/signing.key and every SITE/cert.pem",
    )
    p.add_argument(
        "--dealer", required=True, help="the dealing site's id (a site, never the coordinator)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bits", type=int, default=2048, help="key size (default 2048, at least 2048)")
    p.add_argument(
        "--threshold",
        type=int,
        default=None,
        help="t of the h sites (default: the smallest majority, h//2 + 1)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key's files")
    args = parser.parse_args(argv)
    try:
        key, files = deal(
            args.certs,
            args.dealer,
            args.out,
            bits=args.bits,
            threshold=args.threshold,
            force=args.force,
        )
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in files:
        what = "public key, signed" if path.name == KEY_NAME else "share, sealed to its site"
        print(f"wrote {path} ({what})")
    print(f"key fingerprint {key.fingerprint}: {key.threshold} of {key.holders} sites decrypt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
