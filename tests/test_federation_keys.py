"""The federation's key across organisations: a one-shot dealer at a site, shares sealed
end to end to each site's certificate (fedray/tools/keys.py). 512-bit keys, no Ray.

Each party is played with only what it holds: the coordinator loads federation_key.json
with the manifest; a site loads its share with its own TLS key; the forger holds the
dealer's (or another party's) signing key and rewrites files.
"""

from __future__ import annotations

import itertools
import json
import shutil
import stat
from pathlib import Path

import pytest

from fedray.crypto.threshold import (
    PublicEncryptor,
    combine_partial_decryptions,
    deal_threshold_key,
    partial_decrypt,
)
from fedray.tools import certs, keys
from fedray.tools.keys import KeyFileError, load_federation_key, load_share

SITES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A CA, coordinator hub and sites a, b, c; a key dealt at site a (2 of 3)."""
    root = tmp_path_factory.mktemp("fed")
    certs.make_federation(root / "certs", "hub", SITES)
    key, files = keys.deal(root / "certs", "a", root / "keys", bits=512, allow_insecure=True)
    return root, key, files


@pytest.fixture(scope="module")
def other_fed(tmp_path_factory):
    """Another federation with the same party names (another CA, other keys)."""
    root = tmp_path_factory.mktemp("other")
    certs.make_federation(root / "certs", "hub", SITES)
    return root


def _manifest(root: Path) -> Path:
    return root / "certs" / "federation.json"


def _load(root: Path, site: str, share: Path | None = None, key_pem: str | None = None, **kw):
    share = share or root / "keys" / f"{site}.share"
    pem = root / "certs" / (key_pem or site) / "key.pem"
    return load_share(share, _manifest(root), site, pem, allow_insecure=True, **kw)


def _copy_keys(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    shutil.copytree(root / "keys", out)
    return out


def _signer(root: Path, party: str):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(
        (root / "certs" / party / "signing.key").read_bytes(), None
    )


def _resign(path: Path, out: Path, signer, domain: bytes, change=lambda body: None) -> dict:
    """Rewrite a key or share file: change its body, sign it with ``signer``."""
    body = json.loads(path.read_bytes())
    del body["signature"]
    change(body)
    body["signature"] = signer.sign(domain + keys._canonical(body)).hex()
    out.write_bytes(keys._canonical(body) + b"\n")
    return body


# --- what each party gets ---------------------------------------------------------------------


def test_each_site_opens_its_share_and_any_t_of_them_decrypt(fed):
    root, dealt, files = fed
    assert [f.name for f in files] == ["federation_key.json", "a.share", "b.share", "c.share"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    coordinator_key = load_federation_key(files[0], _manifest(root), allow_insecure=True)
    assert coordinator_key == dealt
    assert (dealt.holders, dealt.threshold) == (3, 2)  # the default: the smallest majority
    shares = {}
    for j, site in enumerate(SITES, start=1):
        key, share = _load(root, site)
        assert key == dealt and share.index == j
        shares[j] = share
    plaintexts = [0, 1, 123456789, dealt.n - 1]
    cts, _ = PublicEncryptor(coordinator_key).encrypt_many(plaintexts)
    partials = {j: partial_decrypt(s, cts) for j, s in shares.items()}
    for pair in itertools.combinations(partials, 2):
        picked = {j: partials[j] for j in pair}
        assert combine_partial_decryptions(coordinator_key, picked) == plaintexts


def test_a_key_under_2048_bits_is_refused_without_allow_insecure(fed):
    root, _, files = fed
    with pytest.raises(KeyFileError, match="a key of 512 bits; at least 2048"):
        load_federation_key(files[0], _manifest(root))
    with pytest.raises(KeyFileError, match="a key of 512 bits; at least 2048"):
        load_share(files[2], _manifest(root), "b", root / "certs" / "b" / "key.pem")


def test_share_files_hold_no_share_in_the_clear(fed, tmp_path, monkeypatch):
    """The dealer's shares, caught as it deals, appear in no file it writes (decimal, hex,
    big- or little-endian bytes)."""
    root, _, _ = fed
    dealt = []

    def spy(*args):
        key, shares = deal_threshold_key(*args)
        dealt.extend(shares)
        return key, shares

    monkeypatch.setattr(keys, "deal_threshold_key", spy)
    _, files = keys.deal(root / "certs", "b", tmp_path, bits=512, allow_insecure=True)
    blobs = [f.read_bytes() for f in files]
    assert len(dealt) == 3 and len(blobs) == 4
    for value in (share.value for share in dealt):
        size = (value.bit_length() + 7) // 8
        needles = [
            str(value).encode(),
            format(value, "x").encode(),
            format(value, "X").encode(),
            value.to_bytes(size, "big"),
            value.to_bytes(size, "little"),
        ]
        for blob, needle in itertools.product(blobs, needles):
            assert needle not in blob
    # the same values are what the sites open
    opened = [_load(root, s, share=tmp_path / f"{s}.share")[1].value for s in SITES]
    assert opened == [share.value for share in dealt]


# --- a share only its site opens, for its place only ------------------------------------------


def test_a_share_does_not_open_with_another_sites_key(fed):
    root, _, _ = fed
    with pytest.raises(KeyFileError, match="does not open with this site's key"):
        _load(root, "b", key_pem="a")


def test_a_share_renamed_or_replayed_to_another_site_is_refused(fed, tmp_path):
    root, _, _ = fed
    keys_dir = _copy_keys(root, tmp_path)
    shutil.copy(keys_dir / "a.share", keys_dir / "b.share")
    with pytest.raises(KeyFileError, match="the share is for site 'a', not 'b'"):
        _load(root, "b", share=keys_dir / "b.share")
    # even the site whose share it is cannot pass it off as another site's
    with pytest.raises(KeyFileError, match="the share is for site 'a', not 'b'"):
        _load(root, "b", share=keys_dir / "b.share", key_pem="a")


def test_a_share_the_dealer_made_with_a_wrong_index_or_recipient_is_refused(fed, tmp_path):
    root, _, _ = fed
    keys_dir = _copy_keys(root, tmp_path)
    signer = _signer(root, "a")
    share = keys_dir / "b.share"
    _resign(share, share, signer, keys.SHARE_DOMAIN, lambda b: b.update(index=3))
    with pytest.raises(KeyFileError, match="index 3; site b is holder 2"):
        _load(root, "b", share=share)
    shutil.copy(root / "keys" / "b.share", share)
    c_cert = json.loads(_manifest(root).read_text())["sites"]["c"]["cert_sha256"]
    _resign(
        share, share, signer, keys.SHARE_DOMAIN, lambda b: b.update(recipient_cert_sha256=c_cert)
    )
    with pytest.raises(KeyFileError, match="sealed to another certificate"):
        _load(root, "b", share=share)


def _deal_sealed(root: Path, out: Path, site: str, inner: dict) -> None:
    """Site ``site``'s share file, sealed and signed as the dealer does, with ``inner`` inside."""
    from cryptography import x509

    fresh = json.loads((root / "keys" / f"{site}.share").read_bytes())
    head = {k: fresh[k] for k in fresh if k not in {"ephemeral_public", "nonce", "ciphertext"}}
    del head["signature"]
    cert = x509.load_pem_x509_certificate((root / "certs" / site / "cert.pem").read_bytes())
    sealed = keys._seal(cert.public_key(), head, keys._canonical(inner))
    sealed["signature"] = _signer(root, "a").sign(keys.SHARE_DOMAIN + keys._canonical(sealed)).hex()
    out.write_bytes(keys._canonical(sealed) + b"\n")


def test_a_sealed_share_must_name_its_site_and_match_its_verification_value(fed, tmp_path):
    root, key, _ = fed
    keys_dir = _copy_keys(root, tmp_path)
    good = _load(root, "b")[1].value
    share = keys_dir / "b.share"
    inner = {
        "site": "b",
        "index": 2,
        "key_fingerprint": key.fingerprint,
        "value": format(good, "x"),
    }
    _deal_sealed(root, share, "b", inner)
    assert _load(root, "b", share=share)[1].value == good  # the helper seals as the dealer does
    _deal_sealed(root, share, "b", dict(inner, index=1))
    with pytest.raises(KeyFileError, match="the opened share does not name site b, index 2"):
        _load(root, "b", share=share)
    _deal_sealed(root, share, "b", dict(inner, value=format(good + 1, "x")))
    with pytest.raises(KeyFileError, match="does not match holder 2's verification value"):
        _load(root, "b", share=share)


# --- tampering and forgery ---------------------------------------------------------------------


def test_a_flipped_byte_anywhere_is_refused(fed, tmp_path):
    root, _, _ = fed
    keys_dir = _copy_keys(root, tmp_path)
    for name in ("federation_key.json", "b.share"):
        path = keys_dir / name
        original = path.read_bytes()
        for i in range(len(original)):
            flipped = bytearray(original)
            flipped[i] ^= 0x01
            path.write_bytes(bytes(flipped))
            with pytest.raises(KeyFileError):
                if name == "b.share":
                    _load(root, "b", share=path)
                else:
                    load_federation_key(path, _manifest(root), allow_insecure=True)
        path.write_bytes(original)
    _load(root, "b", share=keys_dir / "b.share")  # restored: it loads again


def test_a_key_file_signed_by_another_party_is_refused(fed, tmp_path):
    root, _, files = fed
    forged = tmp_path / "federation_key.json"
    for party in ("b", "hub"):  # another site, the coordinator: not dealer a's signature
        _resign(files[0], forged, _signer(root, party), keys.KEY_DOMAIN)
        with pytest.raises(KeyFileError, match="not signed by dealer a's manifest key"):
            load_federation_key(forged, _manifest(root), allow_insecure=True)
    _resign(
        files[0], forged, _signer(root, "hub"), keys.KEY_DOMAIN, lambda b: b.update(dealer="hub")
    )
    with pytest.raises(KeyFileError, match="dealer 'hub' is not a site of the manifest"):
        load_federation_key(forged, _manifest(root), allow_insecure=True)
    # a share file signed by another site than the dealer
    keys_dir = _copy_keys(root, tmp_path / "x")
    _resign(keys_dir / "c.share", keys_dir / "c.share", _signer(root, "b"), keys.SHARE_DOMAIN)
    with pytest.raises(KeyFileError, match="share file is not signed by dealer a's"):
        _load(root, "c", share=keys_dir / "c.share")


def test_a_key_made_for_another_manifest_is_refused(fed, other_fed, tmp_path):
    root, _, files = fed
    with pytest.raises(KeyFileError, match="federation key was made for another federation"):
        load_federation_key(files[0], _manifest(other_fed), allow_insecure=True)
    with pytest.raises(KeyFileError, match="share file was made for another federation manifest"):
        load_share(
            files[2],
            _manifest(other_fed),
            "b",
            other_fed / "certs" / "b" / "key.pem",
            federation_key_path=files[0],
            allow_insecure=True,
        )
    # this federation's share beside a key the other federation's site a dealt
    theirs, _ = keys.deal(
        other_fed / "certs", "a", tmp_path / "theirs", bits=512, allow_insecure=True
    )
    with pytest.raises(KeyFileError, match="federation key was made for another federation"):
        _load(root, "b", federation_key_path=tmp_path / "theirs" / "federation_key.json")
    # a share file the dealer signed for another manifest, beside this manifest's key
    keys_dir = _copy_keys(root, tmp_path)
    other_sha = keys._manifest(_manifest(other_fed))[1]
    _resign(
        keys_dir / "b.share",
        keys_dir / "b.share",
        _signer(root, "a"),
        keys.SHARE_DOMAIN,
        lambda b: b.update(manifest_sha256=other_sha),
    )
    with pytest.raises(KeyFileError, match="share file was made for another federation manifest"):
        _load(root, "b", share=keys_dir / "b.share")


def test_a_key_file_with_other_holders_a_minority_threshold_or_bad_verification_is_refused(
    fed, tmp_path
):
    """The dealer itself (it holds a's signing key) cannot get these past a loader."""
    root, _, files = fed
    signer, forged = _signer(root, "a"), tmp_path / "federation_key.json"
    cases = [
        (lambda b: b.update(holders=["b", "a", "c"]), "are not the manifest's sites in manifest"),
        (lambda b: b.update(holders=["a", "b"]), "are not the manifest's sites in manifest"),
        (
            lambda b: b.update(threshold=1),
            "threshold 1 of 3 holders is not a majority: allowed 2..3",
        ),
        (
            lambda b: b.update(threshold=4),
            "threshold 4 of 3 holders is not a majority: allowed 2..3",
        ),
        (lambda b: b.update(fingerprint="0" * 16), "is not n's"),
    ]
    for j in (0, 2):  # holder 1 (in the first set {1, 2}) and holder 3 (only in {1, 3})

        def swap(b, j=j):
            parts = b["verification"]["partials"]
            parts[j] = parts[(j + 1) % 3]

        cases.append((swap, "do not open the verification ciphertext"))
    for change, message in cases:
        _resign(files[0], forged, signer, keys.KEY_DOMAIN, change)
        with pytest.raises(KeyFileError, match=message):
            load_federation_key(forged, _manifest(root), allow_insecure=True)


# --- the deal ---------------------------------------------------------------------------------


def test_the_coordinator_or_a_stranger_cannot_deal(fed, tmp_path):
    root, _, _ = fed
    with pytest.raises(KeyFileError, match="--dealer hub is the coordinator; the dealer must be a"):
        keys.deal(root / "certs", "hub", tmp_path / "k", bits=512, allow_insecure=True)
    with pytest.raises(KeyFileError, match="--dealer 'z' is not a site of the manifest"):
        keys.deal(root / "certs", "z", tmp_path / "k", bits=512, allow_insecure=True)
    assert not (tmp_path / "k").exists()


def test_the_threshold_must_be_a_majority(fed, tmp_path):
    root, _, _ = fed
    with pytest.raises(
        KeyFileError, match="threshold 1 of 3 holders is not a majority: allowed 2..3"
    ):
        keys.deal(root / "certs", "a", tmp_path / "k", bits=512, threshold=1, allow_insecure=True)
    certs.make_federation(tmp_path / "four", "hub", ["a", "b", "c", "d"])
    for t in (2, 5):
        with pytest.raises(KeyFileError, match=f"threshold {t} of 4 holders .* allowed 3..4"):
            keys.deal(
                tmp_path / "four", "d", tmp_path / "k", bits=512, threshold=t, allow_insecure=True
            )
    assert not (tmp_path / "k").exists()
    key, _ = keys.deal(tmp_path / "four", "d", tmp_path / "k", bits=512, allow_insecure=True)
    assert (key.holders, key.threshold) == (4, 3)
    assert (
        load_federation_key(
            tmp_path / "k" / "federation_key.json",
            tmp_path / "four" / "federation.json",
            allow_insecure=True,
        )
        == key
    )


def test_the_dealer_uses_only_the_manifests_certificates_and_its_own_signing_key(
    fed, other_fed, tmp_path
):
    root, _, _ = fed
    mixed = tmp_path / "certs"
    shutil.copytree(root / "certs", mixed)
    shutil.copy(other_fed / "certs" / "b" / "cert.pem", mixed / "b" / "cert.pem")
    with pytest.raises(KeyFileError, match="not site b's certificate of the manifest"):
        keys.deal(mixed, "a", tmp_path / "k", bits=512, allow_insecure=True)
    shutil.copy(root / "certs" / "b" / "cert.pem", mixed / "b" / "cert.pem")
    shutil.copy(other_fed / "certs" / "a" / "signing.key", mixed / "a" / "signing.key")
    with pytest.raises(KeyFileError, match="not site a's signing key of the manifest"):
        keys.deal(mixed, "a", tmp_path / "k", bits=512, allow_insecure=True)
    assert not (tmp_path / "k").exists()


def test_existing_key_files_are_not_replaced_without_force(fed, tmp_path):
    root, _, _ = fed
    out = tmp_path / "k"
    first, _ = keys.deal(root / "certs", "b", out, bits=512, allow_insecure=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "federation_key.json").unlink()  # any one file left is enough to refuse
    before.pop("federation_key.json")
    with pytest.raises(KeyFileError, match=r"a\.share exists; pass --force"):
        keys.deal(root / "certs", "b", out, bits=512, allow_insecure=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second, _ = keys.deal(root / "certs", "b", out, bits=512, force=True, allow_insecure=True)
    assert second.fingerprint != first.fingerprint
    assert _load(root, "c", share=out / "c.share")[0] == second
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())


# --- the command line -------------------------------------------------------------------------


def test_cli_deals_and_prints_one_line_per_file(fed, tmp_path, capsys, monkeypatch):
    root, _, _ = fed
    monkeypatch.setattr(keys, "MIN_KEY_BITS", 512)
    args = ["deal", "--certs", str(root / "certs"), "--dealer", "c", "--out", str(tmp_path)]
    assert keys.main(args + ["--bits", "512"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:4]] == [
        str(tmp_path / name) for name in ("federation_key.json", "a.share", "b.share", "c.share")
    ]
    key = load_federation_key(tmp_path / "federation_key.json", _manifest(root))
    assert len(lines) == 5 and lines[4].startswith(f"key fingerprint {key.fingerprint}")


def _main(argv: list[str]) -> int:
    """``keys.main`` as the shell sees it: argparse's refusals exit, the rest return."""
    try:
        return keys.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dealer", "hub"], "--dealer hub is the coordinator"),
        (["--dealer", "a", "--threshold", "1"], "threshold 1 of 3 holders is not a majority"),
        (["--dealer", "a", "--threshold", "two"], "argument --threshold: invalid int value"),
        (["--dealer", "a", "--bits", "1024"], "--bits 1024: at least 2048"),
        (["--dealer", "a", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: --dealer"),
    ],
)
def test_cli_prints_one_line_and_exits_2_on_a_bad_argument(fed, tmp_path, capsys, extra, message):
    root, _, _ = fed
    args = ["deal", "--certs", str(root / "certs"), "--out", str(tmp_path / "k")]
    assert _main(args + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert message in captured.err, captured.err
    assert not (tmp_path / "k").exists()


def test_a_share_of_an_earlier_deal_is_refused_beside_a_new_key(fed, tmp_path):
    root, _, files = fed
    newer, _ = keys.deal(root / "certs", "a", tmp_path, bits=512, allow_insecure=True)
    with pytest.raises(KeyFileError, match="the share was dealt for another key than"):
        _load(root, "b", federation_key_path=tmp_path / "federation_key.json")
    keys_dir = _copy_keys(root, tmp_path / "x")
    _resign(
        keys_dir / "b.share",
        keys_dir / "b.share",
        _signer(root, "a"),
        keys.SHARE_DOMAIN,
        lambda b: b.update(key_fingerprint=newer.fingerprint),
    )
    with pytest.raises(KeyFileError, match=f"the share is for key '{newer.fingerprint}', not"):
        _load(root, "b", share=keys_dir / "b.share")


def test_a_file_with_a_field_more_or_less_is_refused_and_only_sites_load_shares(fed, tmp_path):
    root, _, files = fed
    signer = _signer(root, "a")
    forged = tmp_path / "federation_key.json"
    _resign(files[0], forged, signer, keys.KEY_DOMAIN, lambda b: b.update(note="hello"))
    with pytest.raises(KeyFileError, match="federation key has unknown or missing fields: note"):
        load_federation_key(forged, _manifest(root), allow_insecure=True)
    keys_dir = _copy_keys(root, tmp_path / "x")
    share = keys_dir / "b.share"
    _resign(share, share, signer, keys.SHARE_DOMAIN, lambda b: b.pop("recipient_cert_sha256"))
    with pytest.raises(KeyFileError, match="unknown or missing fields: recipient_cert_sha256"):
        _load(root, "b", share=share)
    with pytest.raises(KeyFileError, match="site 'hub' is not a site of the manifest"):
        _load(root, "hub", share=files[2])


def test_a_sealed_share_is_bound_to_its_header(fed, tmp_path):
    """Even under the dealer's signature, the sealed part of one deal's share does not open
    under another deal's header (HKDF info and AES-GCM associated data bind the header)."""
    root, _, _ = fed
    keys.deal(root / "certs", "a", tmp_path, bits=512, allow_insecure=True)
    old = json.loads((root / "keys" / "a.share").read_bytes())
    sealed = {k: old[k] for k in ("ephemeral_public", "nonce", "ciphertext")}
    share = tmp_path / "a.share"
    _resign(share, share, _signer(root, "a"), keys.SHARE_DOMAIN, lambda b: b.update(sealed))
    with pytest.raises(KeyFileError, match="does not open with this site's key"):
        _load(root, "a", share=share)
