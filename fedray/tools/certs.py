"""``python -m fedray.tools.certs DIR --coordinator NAME --sites a,b,c``: a federation to try.

Makes a federation CA (ECDSA P-256), and for the coordinator and each site a TLS
certificate signed by it plus an Ed25519 signing key, and the federation manifest
``DIR/federation.json`` that every party holds: the site ids and the coordinator's id,
each with the SHA-256 of its certificate (DER) and its Ed25519 public key. Layout::

    DIR/ca.pem  DIR/ca.key  DIR/federation.json
    DIR/<party>/cert.pem  DIR/<party>/key.pem  DIR/<party>/signing.key

Keys are written 0600. Existing keys are never overwritten without ``--force``.
This is for trying fedray out: a real deployment issues the certificates from its own
PKI (the CA key stays offline there) and writes the manifest from their fingerprints
(``fingerprint(cert_pem)``); see docs/federation.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import json
import os
import sys
from pathlib import Path

from fedray.errors import FedrayError

MANIFEST_FORMAT = "fedray-federation-manifest"
MANIFEST_NAME = "federation.json"


class CertError(FedrayError, ValueError):
    """A bad argument or an existing key: the message is one line."""


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 (hex) of a certificate's DER encoding, as the manifest lists it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if secret:
        os.chmod(path, 0o600)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(days: int = 365):
    """A new federation CA: (certificate PEM, private key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedray federation CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key


def issue(ca_pem: bytes, ca_key, party: str, hosts: list[str], server: bool, days: int = 365):
    """A party certificate signed by the CA: (certificate PEM, key PEM). ``server`` adds
    the serverAuth use (the coordinator); every party gets clientAuth."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list = [x509.DNSName(party)]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def signing_key():
    """A new Ed25519 signing key: (private PEM, raw public key hex)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return _key_pem(key), public.hex()


def _check_party(name: str) -> str:
    from fedray.federation.messages import ID_RE

    if not ID_RE.fullmatch(name):
        raise CertError(f"party name {name!r} is not an identifier ([A-Za-z0-9_-], at most 64)")
    return name


def make_federation(
    directory,
    coordinator: str,
    sites: list[str],
    hosts=("localhost", "127.0.0.1"),
    days: int = 365,
    force: bool = False,
    clients: dict[str, int] | None = None,
) -> Path:
    """Write a CA, every party's certificate and keys, and the manifest; return its path.

    ``clients``: each site's number of clients, written to the manifest (``"clients"``):
    every party then derives the same client ids (site k of the manifest hosts the next
    ``clients`` ids), which the key holders check contributions against."""
    directory = Path(directory)
    parties = [_check_party(coordinator)] + [_check_party(s) for s in sites]
    if not sites:
        raise CertError("--sites names no site")
    if len(set(parties)) != len(parties):
        raise CertError(f"party names must be distinct: {', '.join(parties)}")
    keys = [directory / "ca.key"] + [
        directory / p / f for p in parties for f in ("key.pem", "signing.key")
    ]
    existing = [str(k) for k in keys if k.exists()]
    if existing and not force:
        raise CertError(
            f"{existing[0]} exists; pass --force to replace every key in {directory} "
            "(certificates made from the old CA stop working)"
        )
    clients = dict(clients or {})
    unknown = sorted(set(clients) - set(sites))
    if unknown:
        raise CertError(f"--clients names {', '.join(unknown)}, not among --sites")
    bad = [s for s, n in clients.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise CertError(f"--clients: site {bad[0]} needs a whole number of clients >= 1")
    ca_pem, ca_key = make_ca(days)
    _write(directory / "ca.pem", ca_pem, secret=False)
    _write(directory / "ca.key", _key_pem(ca_key), secret=True)
    entries = {}
    for party in parties:
        cert_pem, key_pem = issue(ca_pem, ca_key, party, list(hosts), party == coordinator, days)
        sign_pem, sign_pub = signing_key()
        _write(directory / party / "cert.pem", cert_pem, secret=False)
        _write(directory / party / "key.pem", key_pem, secret=True)
        _write(directory / party / "signing.key", sign_pem, secret=True)
        entries[party] = {"cert_sha256": fingerprint(cert_pem), "signing_key": sign_pub}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "ca_sha256": fingerprint(ca_pem),
        "coordinator": {"id": coordinator, **entries[coordinator]},
        "sites": {
            s: {**entries[s], **({"clients": clients[s]} if s in clients else {})} for s in sites
        },
    }
    path = directory / MANIFEST_NAME
    _write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), secret=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedray.tools.certs",
        description="Make a federation CA, coordinator and site certificates, and a manifest.",
    )
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--coordinator", required=True, help="the coordinator's party id")
    parser.add_argument("--sites", required=True, help="comma-separated site ids, e.g. a,b,c")
    parser.add_argument(
        "--host",
        default="localhost,127.0.0.1",
        help="comma-separated DNS names / IPs in every certificate (default localhost,127.0.0.1)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default 365)")
    parser.add_argument("--force", action="store_true", help="replace existing keys")
    parser.add_argument(
        "--clients",
        default="",
        help="each site's number of clients for federation=cross_org, e.g. a=4,b=3,c=3",
    )
    args = parser.parse_args(argv)
    try:
        counts = {}
        for item in filter(None, (c.strip() for c in args.clients.split(","))):
            site, _, count = item.partition("=")
            count = count.strip()
            if not (count.isascii() and count.isdigit()):
                raise CertError(f"--clients {item!r}: expected SITE=N, e.g. a=4")
            if site.strip() in counts:
                raise CertError(f"--clients names site {site.strip()} twice")
            counts[site.strip()] = int(count)
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
        hosts = [h.strip() for h in args.host.split(",") if h.strip()]
        if args.days < 1:
            raise CertError("--days must be at least 1")
        path = make_federation(
            args.dir, args.coordinator, sites, hosts, args.days, args.force, counts
        )
    except (CertError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"federation of {args.coordinator} and {', '.join(sites)}: manifest {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
