"""The cross-organisation channel (issue #23): mTLS, manifest pinning, signed sequenced
messages, checked chunked blobs, the receive cap, and no pickle anywhere. Loopback only
(127.0.0.1), no Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import stat
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedray.federation import channel as ch
from fedray.federation import federation_pb2 as pb
from fedray.federation.messages import (
    MAX_CHUNK_BYTES,
    ProtocolError,
    decode_array,
)
from fedray.tools import certs

COORD, SITES = "coord", ["a", "b", "c"]
BIG_CIPHERTEXT_BYTES = 4_194_304 // 102 * 512  # a 4,194,304-value update at 2048-bit keys


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    certs.make_federation(root, COORD, SITES, hosts=["localhost", "127.0.0.1"])
    return root


@pytest.fixture(scope="module")
def other_fed(tmp_path_factory) -> Path:
    """Another federation: same party names, another CA."""
    root = tmp_path_factory.mktemp("other")
    certs.make_federation(root, COORD, SITES, hosts=["localhost", "127.0.0.1"])
    return root


def _ca_key(fed: Path):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key((fed / "ca.key").read_bytes(), None)


def _extra_party(fed: Path, out: Path, name: str, server: bool, signing_from: str | None = None):
    """A certificate of ``fed``'s CA that ``fed``'s manifest does not list, and a manifest
    copy (``out/federation.json``) that lists it instead of / besides the real parties."""
    out.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = certs.issue(
        (fed / "ca.pem").read_bytes(), _ca_key(fed), name, ["localhost", "127.0.0.1"], server
    )
    (out / "cert.pem").write_bytes(cert_pem)
    (out / "key.pem").write_bytes(key_pem)
    if signing_from:
        (out / "signing.key").write_bytes((fed / signing_from / "signing.key").read_bytes())
    else:
        sign_pem, _ = certs.signing_key()
        (out / "signing.key").write_bytes(sign_pem)
    return cert_pem


def _sign_pub_hex(path: Path) -> str:
    return ch._public_raw(ch._load_signing_key(path)).hex()


def listen(fed: Path, allowed=None, **kw) -> ch.Coordinator:
    return ch.listen(
        "127.0.0.1:0",
        fed / COORD / "cert.pem",
        fed / COORD / "key.pem",
        fed / "ca.pem",
        allowed,
        manifest=kw.pop("manifest", fed / "federation.json"),
        signing_key=fed / COORD / "signing.key",
        **kw,
    )


def make_site(fed: Path, site: str, port: int, handler, party_dir=None, manifest=None, **kw):
    party_dir = party_dir or fed / site
    return ch.dial(
        f"127.0.0.1:{port}",
        party_dir / "cert.pem",
        party_dir / "key.pem",
        fed / "ca.pem",
        site_id=site,
        manifest=manifest or fed / "federation.json",
        signing_key=party_dir / "signing.key",
        handler=handler,
        backoff=kw.pop("backoff", (0.05, 0.2)),
        **kw,
    )


class Running:
    """A site's run() in a thread; ``error`` is what it raised."""

    def __init__(self, site: ch.Site, **run_kw):
        self.site, self.error = site, None
        self.thread = threading.Thread(target=self._run, kwargs=run_kw, daemon=True)
        self.thread.start()

    def _run(self, **kw):
        try:
            self.site.run(**kw)
        except Exception as exc:  # noqa: BLE001
            self.error = exc

    def stop(self):
        self.site.close()
        self.thread.join(10)

    def wait_error(self, timeout=15.0) -> Exception:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the site did not stop"
        assert self.error is not None
        return self.error


def weights_request(round_num=1, blob: ch.OutgoingBlob | None = None, **kw) -> pb.TrainRequest:
    return pb.TrainRequest(
        round=round_num,
        task_id=kw.pop("task_id", "tabular"),
        task_version="1.0",
        model_fingerprint=b"m" * 32,
        global_weights=blob.ref if blob else pb.BlobRef(blob_id="w", size=0, sha256=b"0" * 32),
        client_ids=kw.pop("client_ids", [0, 1]),
        **kw,
    )


def echo_handler(msg: ch.Message):
    """Train: decode the float32[4,3] weights, send back their sum as 'ciphertexts'."""
    w = msg.blob(msg.body.global_weights).array("<f4", (4, 3))
    out = ch.OutgoingBlob.from_ciphertexts("upd", (w * 2).astype("<f4").tobytes(), 4)
    reply = pb.TrainReply(
        round=msg.body.round,
        update_id="u1",
        contribution=b'{"round":1}',
        contribution_signature=b"s" * 64,
        ciphertexts=out.ref,
    )
    return "train_reply", reply, [out]


@pytest.fixture
def coordinator(fed):
    coord = listen(fed)
    yield coord
    coord.close(0)


def connect(fed, coord, site="a", handler=echo_handler, **kw):
    running = Running(make_site(fed, site, coord.port, handler, **kw))
    peer = coord.wait_for([site], 15)[site]
    return running, peer


# --- the certs tool ----------------------------------------------------------------------------


def test_certs_tool_writes_ca_parties_and_manifest(tmp_path, capsys):
    d = tmp_path / "f"
    assert (
        certs.main([str(d), "--coordinator", "hub", "--sites", "x,y", "--host", "127.0.0.1"]) == 0
    )
    manifest = json.loads((d / "federation.json").read_text())
    assert manifest["coordinator"]["id"] == "hub" and sorted(manifest["sites"]) == ["x", "y"]
    for party, entry in [("hub", manifest["coordinator"])] + list(manifest["sites"].items()):
        assert entry["cert_sha256"] == certs.fingerprint((d / party / "cert.pem").read_bytes())
        assert entry["signing_key"] == _sign_pub_hex(d / party / "signing.key")
        for secret in ("key.pem", "signing.key"):
            assert stat.S_IMODE((d / party / secret).stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    loaded = ch.Manifest.load(d / "federation.json")
    assert loaded.coordinator.id == "hub" and set(loaded.sites) == {"x", "y"}

    before = (d / "x" / "key.pem").read_bytes()
    capsys.readouterr()
    assert certs.main([str(d), "--coordinator", "hub", "--sites", "x,y"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--force" in err and "\n" not in err
    assert (d / "x" / "key.pem").read_bytes() == before  # nothing overwritten
    assert certs.main([str(d), "--coordinator", "hub", "--sites", "x,y", "--force"]) == 0
    assert (d / "x" / "key.pem").read_bytes() != before
    assert certs.main([str(tmp_path / "g"), "--coordinator", "hub", "--sites", "a.b"]) == 2
    assert "not an identifier" in capsys.readouterr().err


# --- the mTLS round trip -----------------------------------------------------------------------


def test_mtls_round_trip_with_blobs(fed, coordinator):
    running, peer = connect(fed, coordinator)
    try:
        weights = np.arange(12, dtype=np.float32).reshape(4, 3)
        blob = ch.OutgoingBlob.from_array("w1", weights)
        reply = peer.call("train_request", weights_request(1, blob), [blob], timeout=15)
        assert reply.kind == "train_reply" and reply.body.update_id == "u1"
        got = reply.blob(reply.body.ciphertexts).ciphertexts(4, 12)
        assert np.array_equal(np.frombuffer(got.tobytes(), "<f4").reshape(4, 3), weights * 2)
        assert coordinator.connected() == ["a"]
        # a second request on the same session (the sequence goes on)
        reply = peer.call("train_request", weights_request(2, blob), [blob], timeout=15)
        assert reply.body.round == 2
    finally:
        running.stop()


def test_refusal_is_one_line_at_the_coordinator(fed, coordinator):
    def refuse(msg):
        raise ch.Refused(f"round {msg.body.round}: task tabular 1.0 is not installed here")

    running, peer = connect(fed, coordinator, handler=refuse)
    try:
        with pytest.raises(ch.PeerRefused, match=r"site a refused train_request: round 3: task"):
            peer.call("train_request", weights_request(3), timeout=15)
    finally:
        running.stop()


# --- who gets in -------------------------------------------------------------------------------


def _raw_call(port, ca: bytes, key: bytes | None = None, cert: bytes | None = None):
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = channel.stream_stream(ch.METHOD)(iter([b""]))
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    return info.value


def test_coordinator_refuses_a_client_without_certificate(fed, coordinator):
    err = _raw_call(coordinator.port, (fed / "ca.pem").read_bytes())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert coordinator.connected() == []


def test_coordinator_refuses_a_certificate_of_another_ca(fed, other_fed, coordinator):
    err = _raw_call(
        coordinator.port,
        (fed / "ca.pem").read_bytes(),
        (other_fed / "a" / "key.pem").read_bytes(),
        (other_fed / "a" / "cert.pem").read_bytes(),
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # the site's own view: its probe sees the coordinator refuse its certificate
    site = make_site(other_fed, "a", coordinator.port, echo_handler)
    site._ca = (fed / "ca.pem").read_bytes()  # it trusts the right CA, its cert is foreign
    real = ch.Manifest.load(fed / "federation.json")
    site.manifest = ch.Manifest(real.coordinator, site.manifest.sites)
    with pytest.raises(ch.FederationError, match="refused this site's certificate"):
        site.run(max_wait_s=5)
    assert coordinator.connected() == []


def test_coordinator_refuses_same_ca_certificate_not_in_manifest(fed, coordinator, tmp_path):
    cert_pem = _extra_party(fed, tmp_path / "d", "d", server=False)
    site_manifest = json.loads((fed / "federation.json").read_text())
    site_manifest["sites"]["d"] = {
        "cert_sha256": certs.fingerprint(cert_pem),
        "signing_key": _sign_pub_hex(tmp_path / "d" / "signing.key"),
    }
    (tmp_path / "site_manifest.json").write_text(json.dumps(site_manifest))
    site = make_site(
        fed,
        "d",
        coordinator.port,
        echo_handler,
        party_dir=tmp_path / "d",
        manifest=tmp_path / "site_manifest.json",
    )
    with pytest.raises(ch.FederationError, match="not a site of the federation manifest"):
        site.run(max_wait_s=5)
    assert coordinator.connected() == []


def test_coordinator_refuses_a_site_not_allowed_in_this_run(fed):
    coord = listen(fed, allowed=["b"])
    try:
        with pytest.raises(ch.FederationError, match="site a is not allowed"):
            make_site(fed, "a", coord.port, echo_handler).run(max_wait_s=5)
    finally:
        coord.close(0)


def test_site_refuses_a_coordinator_of_another_ca(fed, other_fed):
    rogue = listen(other_fed)
    try:
        with pytest.raises(ch.FederationError, match="is not trusted"):
            make_site(fed, "a", rogue.port, echo_handler).run(max_wait_s=5)
        assert rogue.connected() == []
    finally:
        rogue.close(0)


def test_site_refuses_same_ca_coordinator_not_in_manifest(fed, tmp_path):
    """Same CA, same name, even the real coordinator's signing key: only the certificate
    differs from the manifest's, and the site refuses it before it says anything."""
    cert_pem = _extra_party(fed, tmp_path / "rogue", COORD, server=True, signing_from=COORD)
    rogue_manifest = json.loads((fed / "federation.json").read_text())
    rogue_manifest["coordinator"]["cert_sha256"] = certs.fingerprint(cert_pem)
    (tmp_path / "rogue.json").write_text(json.dumps(rogue_manifest))
    rogue = ch.listen(
        "127.0.0.1:0",
        tmp_path / "rogue" / "cert.pem",
        tmp_path / "rogue" / "key.pem",
        fed / "ca.pem",
        manifest=tmp_path / "rogue.json",
        signing_key=fed / COORD / "signing.key",
    )
    running = Running(make_site(fed, "a", rogue.port, echo_handler), max_wait_s=5)
    try:
        err = running.wait_error(10)
        assert isinstance(err, ch.FederationError) and "not the manifest's" in str(err)
        assert rogue.connected() == []
    finally:
        running.stop()
        rogue.close(0)


# --- the job both ends declare -------------------------------------------------------------

JOB_HUB = json.dumps({"dataset.features": ["age", "bmi"], "num_clients": 4}).encode()
JOB_SWAPPED = json.dumps({"dataset.features": ["bmi", "age"], "num_clients": 4}).encode()
SWAP_LINE = f'dataset.features: ["age","bmi"] at {COORD}, ["bmi","age"] at site a'


def test_a_site_declaring_another_job_is_refused_and_the_wait_fails_at_once(fed):
    """The coordinator refuses the hello of a site whose job differs (here its feature
    columns in another order, which would otherwise train misaligned), naming the setting
    and both values; the site stops with that line (no retry), and the coordinator's wait
    for it fails at once with the same line rather than after its timeout."""
    coord = listen(fed, job=JOB_HUB)
    try:
        running = Running(make_site(fed, "a", coord.port, echo_handler, job=JOB_SWAPPED))
        start = time.monotonic()
        with pytest.raises(ch.FederationError, match="declare different jobs") as err:
            coord.wait_for(["a"], 60)
        assert time.monotonic() - start < 30
        assert SWAP_LINE in str(err.value) and "\n" not in str(err.value)
        assert SWAP_LINE in str(running.wait_error())
        assert coord.connected() == []
    finally:
        coord.close(0)


def test_the_same_job_joins(fed):
    coord = listen(fed, job=JOB_HUB)
    try:
        running = Running(make_site(fed, "a", coord.port, echo_handler, job=JOB_HUB))
        assert list(coord.wait_for(["a"], 15)) == ["a"]
        running.stop()
    finally:
        coord.close(0)


def test_a_site_refuses_a_coordinator_whose_job_differs_even_if_it_does_not_check(fed, monkeypatch):
    """A coordinator that skips its own check (or lies about it) still meets the site's:
    the site compares the job in the signed Welcome with its own and refuses."""
    real = ch.job_mismatch

    def only_sites_check(ours, theirs, here, there):
        return None if here == COORD else real(ours, theirs, here, there)

    monkeypatch.setattr(ch, "job_mismatch", only_sites_check)
    coord = listen(fed, job=JOB_HUB)
    try:
        site = make_site(fed, "a", coord.port, echo_handler, job=JOB_SWAPPED)
        with pytest.raises(ch.FederationError, match="declare different jobs") as err:
            site.run(max_wait_s=10)
        assert 'dataset.features: ["bmi","age"] at site a, ["age","bmi"] at the coordinator' in (
            str(err.value)
        )
        assert site.sessions == 0
    finally:
        coord.close(0)


def test_site_refuses_a_coordinator_without_tls(fed):
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(ch.FederationError, match="TLS with the coordinator"):
            make_site(fed, "a", port, echo_handler).run(max_wait_s=5)
    finally:
        server.stop(0)


# --- reconnect ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_site_waits_for_a_coordinator_that_is_down(fed, caplog):
    port = _free_port()
    with pytest.raises(ch.Unreachable, match="gave up after"):
        make_site(fed, "b", port, echo_handler).run(max_wait_s=0.3)
    caplog.set_level(logging.WARNING, logger="fedray.federation")
    running = Running(make_site(fed, "b", port, echo_handler))
    deadline = time.monotonic() + 10
    while "unreachable" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"coordinator at 127.0.0.1:{port} unreachable" in caplog.text
    assert "retrying in" in caplog.text and "Traceback" not in caplog.text
    coord = ch.listen(
        f"127.0.0.1:{port}",
        fed / COORD / "cert.pem",
        fed / COORD / "key.pem",
        fed / "ca.pem",
        manifest=fed / "federation.json",
        signing_key=fed / COORD / "signing.key",
    )
    try:
        peer = coord.wait_for(["b"], 15)["b"]
        blob = ch.OutgoingBlob.from_array("w", np.zeros((4, 3), np.float32))
        assert peer.call("train_request", weights_request(1, blob), [blob], 15).body.update_id
    finally:
        running.stop()
        coord.close(0)


# --- the receiver's rules, frame by frame ---------------------------------------------------------


def _pair(fed, max_blob=1 << 20, signer="a"):
    manifest = ch.Manifest.load(fed / "federation.json")
    sender = ch._Sender("a", COORD, ch._load_signing_key(fed / signer / "signing.key"))
    receiver = ch._Receiver(COORD, "a", manifest.keys(), max_blob)
    sender.session = receiver.session = b"S" * 32
    return sender, receiver


def _reply(update_id="u1") -> pb.TrainReply:
    return pb.TrainReply(
        round=1,
        update_id=update_id,
        contribution=b"{}",
        contribution_signature=b"s" * 64,
        ciphertexts=pb.BlobRef(blob_id="c", size=8, sha256=b"0" * 32),
    )


def test_receiver_accepts_a_good_sequence(fed):
    sender, receiver = _pair(fed)
    blob = ch.OutgoingBlob.from_ciphertexts("c", os.urandom(8), 4)
    header, chunks = sender.blob(blob)
    assert receiver.feed(header) is None
    for frame in chunks:
        assert receiver.feed(frame) is None
    msg = receiver.feed(sender.envelope("train_reply", _reply(), in_reply_to=1))
    assert msg.kind == "train_reply" and msg.blob(blob.ref).data == bytes(blob.data)
    # a reference whose digest or size is not the blob's that arrived is refused
    for ref in (
        pb.BlobRef(blob_id="c", size=8, sha256=b"x" * 32),
        pb.BlobRef(blob_id="c", size=9, sha256=blob.ref.sha256),
        pb.BlobRef(blob_id="d", size=8, sha256=blob.ref.sha256),
    ):
        with pytest.raises(ProtocolError, match="did not arrive intact"):
            msg.blob(ref)


def test_receiver_refuses_a_bad_signature(fed):
    sender, receiver = _pair(fed)
    frame = pb.Frame.FromString(sender.envelope("train_reply", _reply()))
    sig = bytearray(frame.signed.signature)
    sig[0] ^= 1
    frame.signed.signature = bytes(sig)
    with pytest.raises(ProtocolError, match="bad signature"):
        receiver.feed(frame.SerializeToString())


def test_receiver_refuses_a_message_signed_by_another_party(fed):
    sender, receiver = _pair(fed, signer="b")  # b's key on a's stream
    with pytest.raises(ProtocolError, match="bad signature"):
        receiver.feed(sender.envelope("train_reply", _reply()))


def test_receiver_refuses_a_replayed_message(fed):
    sender, receiver = _pair(fed)
    first = sender.envelope("train_reply", _reply("u1"))
    assert receiver.feed(first).kind == "train_reply"
    with pytest.raises(ProtocolError, match="replayed or out of order"):
        receiver.feed(first)
    sender.seq += 5  # a gap: a message was dropped
    with pytest.raises(ProtocolError, match="replayed or out of order"):
        receiver.feed(sender.envelope("train_reply", _reply("u2")))


def test_receiver_refuses_a_message_of_another_session(fed):
    sender, receiver = _pair(fed)
    sender.session = b"T" * 32
    with pytest.raises(ProtocolError, match="another session"):
        receiver.feed(sender.envelope("train_reply", _reply()))


def test_receiver_refuses_a_message_for_another_recipient(fed):
    sender, receiver = _pair(fed)
    sender.peer = "b"
    with pytest.raises(ProtocolError, match="on the stream"):
        receiver.feed(sender.envelope("train_reply", _reply()))


def test_receiver_refuses_unknown_fields(fed):
    sender, receiver = _pair(fed)
    frame = pb.Frame.FromString(sender.envelope("train_reply", _reply()))
    env = frame.signed.envelope + b"\xf8\x07\x01"  # field 127 = 1, not in the schema
    key = ch._load_signing_key(fed / "a" / "signing.key")
    raw = pb.Frame(signed=pb.Signed(envelope=env, signature=key.sign(ch.ENVELOPE_DOMAIN + env)))
    with pytest.raises(ProtocolError, match="does not know"):
        receiver.feed(raw.SerializeToString())


def _blob_frames(sender, data: bytes, chunk=None, header_sha=None, total=None):
    header = pb.BlobHeader(
        blob_id="c",
        total_size=len(data) if total is None else total,
        sha256=header_sha or hashlib.sha256(data).digest(),
        kind=pb.BLOB_KIND_CIPHERTEXTS,
        shape=[(len(data) if total is None else total)],
        width=1,
    )
    frames = [sender.blob(ch.OutgoingBlob(header, memoryview(b"")))[0]]
    step = chunk or MAX_CHUNK_BYTES
    for off in range(0, len(data), step):
        frames.append(ch._chunk_frame(b"c", off, data[off : off + step]))
    return frames


def test_hand_written_chunk_frames_are_protobuf_frames():
    piece = os.urandom(1000)
    for offset in (0, 5, 4 * MAX_CHUNK_BYTES + 3):
        expected = pb.Frame(
            chunk=pb.BlobChunk(
                blob_id="blob-1", offset=offset, data=piece, sha256=hashlib.sha256(piece).digest()
            )
        )
        assert pb.Frame.FromString(ch._chunk_frame(b"blob-1", offset, piece)) == expected


def test_receiver_refuses_an_oversized_chunk(fed):
    sender, receiver = _pair(fed, max_blob=16 << 20)
    data = os.urandom(MAX_CHUNK_BYTES + 1)
    header, chunk = _blob_frames(sender, data, chunk=MAX_CHUNK_BYTES + 1)
    receiver.feed(header)
    with pytest.raises(ProtocolError, match=r"a chunk of 4194305 bytes .*1 to 4194304 allowed"):
        receiver.feed(chunk)


def test_receiver_refuses_a_chunk_whose_digest_does_not_match(fed):
    sender, receiver = _pair(fed)
    header, chunk = _blob_frames(sender, b"0123456789")
    frame = pb.Frame.FromString(chunk)
    frame.chunk.data = b"0123456780"
    receiver.feed(header)
    with pytest.raises(
        ProtocolError, match="chunk of blob c at offset 0 does not match its digest"
    ):
        receiver.feed(frame.SerializeToString())


def test_receiver_refuses_a_blob_whose_whole_digest_does_not_match(fed):
    sender, receiver = _pair(fed)
    frames = _blob_frames(sender, b"0123456789", chunk=4, header_sha=b"\x01" * 32)
    for frame in frames[:-1]:
        receiver.feed(frame)
    with pytest.raises(ProtocolError, match="blob c from a does not match its digest"):
        receiver.feed(frames[-1])


def test_receiver_refuses_a_truncated_blob(fed):
    sender, receiver = _pair(fed)
    frames = _blob_frames(sender, b"0123456789", chunk=4)
    for frame in frames[:-1]:
        receiver.feed(frame)
    with pytest.raises(ProtocolError, match="truncated at 8 of 10 bytes"):
        receiver.feed(sender.envelope("train_reply", _reply()))
    sender, receiver = _pair(fed)
    for frame in _blob_frames(sender, b"0123456789", chunk=4)[:-1]:
        receiver.feed(frame)
    with pytest.raises(ProtocolError, match="truncated at 8 of 10 bytes"):
        receiver.end_of_stream()


def test_receiver_refuses_a_chunk_past_the_declared_size(fed):
    sender, receiver = _pair(fed)
    frames = _blob_frames(sender, b"0123456789", chunk=4, total=6)
    receiver.feed(frames[0])
    receiver.feed(frames[1])
    with pytest.raises(ProtocolError, match="runs past its declared 6 bytes"):
        receiver.feed(frames[2])


def test_receiver_refuses_a_replayed_chunk(fed):
    sender, receiver = _pair(fed)
    frames = _blob_frames(sender, b"0123456789", chunk=4)
    receiver.feed(frames[0])
    receiver.feed(frames[1])
    with pytest.raises(ProtocolError, match="replayed, reordered or lost"):
        receiver.feed(frames[1])


def test_receiver_refuses_a_blob_over_the_cap(fed):
    sender, receiver = _pair(fed, max_blob=9)
    with pytest.raises(ProtocolError, match="over the receive cap of 9 bytes"):
        receiver.feed(_blob_frames(sender, b"0123456789")[0])
    # Two blobs for one message, each 100 bytes + its header + a fixed cost: over 700.
    sender, receiver = _pair(fed, max_blob=700)
    for frame in _blob_frames(sender, b"0123456789" * 10):
        receiver.feed(frame)
    header = pb.BlobHeader(
        blob_id="d",
        total_size=100,
        sha256=b"0" * 32,
        kind=pb.BLOB_KIND_CIPHERTEXTS,
        shape=[100],
        width=1,
    )
    with pytest.raises(ProtocolError, match="exceed the receive cap of 700 bytes"):
        receiver.feed(sender.blob(ch.OutgoingBlob(header, memoryview(b"")))[0])


def test_receiver_refuses_a_blob_header_with_a_bad_signature(fed):
    sender, receiver = _pair(fed)
    frame = pb.Frame.FromString(_blob_frames(sender, b"0123456789")[0])
    env = pb.Envelope.FromString(frame.signed.envelope)
    env.blob_header.header = env.blob_header.header.replace(b"\x0a\x01c", b"\x0a\x01d")
    data = env.SerializeToString()
    key = ch._load_signing_key(fed / "a" / "signing.key")
    raw = pb.Frame(signed=pb.Signed(envelope=data, signature=key.sign(ch.ENVELOPE_DOMAIN + data)))
    with pytest.raises(ProtocolError, match="blob header from a has a bad signature"):
        receiver.feed(raw.SerializeToString())


def test_decode_array_refuses_another_dtype_or_shape():
    blob = ch.OutgoingBlob.from_array("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    data = bytes(blob.data)
    assert decode_array(blob.header, data, np.float32, (2, 3)).sum() == 15
    with pytest.raises(ProtocolError, match="dtype"):
        decode_array(blob.header, data, np.float64, (2, 3))
    with pytest.raises(ProtocolError, match="shape"):
        decode_array(blob.header, data, np.float32, (3, 2))
    with pytest.raises(ProtocolError, match="bytes"):
        decode_array(blob.header, data[:-4], np.float32, (2, 3))


# --- over the network: forged, replayed, oversized, pickled ---------------------------------------


def test_site_refuses_a_replayed_request_and_closes(fed, coordinator, caplog):
    running, peer = connect(fed, coordinator)
    try:
        blob = ch.OutgoingBlob.from_array("w", np.zeros((4, 3), np.float32))
        peer.call("train_request", weights_request(1, blob), [blob], timeout=15)
        peer._link.sender.seq -= 2  # the next request reuses the sequence number of the last
        with pytest.raises(ch.FederationError):
            peer.call("train_request", weights_request(2, blob), [blob], timeout=15)
        err = running.wait_error()
        assert isinstance(err, ProtocolError) and "replayed or out of order" in str(err)
    finally:
        running.stop()


def test_coordinator_refuses_a_forged_reply(fed, coordinator):
    def forged(msg):
        kind, body, blobs = echo_handler(msg)
        running.site._link.sender._key = ch._load_signing_key(fed / "b" / "signing.key")
        return kind, body, blobs

    running, peer = connect(fed, coordinator, handler=forged)
    try:
        blob = ch.OutgoingBlob.from_array("w", np.zeros((4, 3), np.float32))
        with pytest.raises(ProtocolError, match="bad signature"):
            peer.call("train_request", weights_request(1, blob), [blob], timeout=15)
    finally:
        running.stop()


def test_blob_over_the_coordinators_cap_is_refused(fed):
    coord = listen(fed, max_blob_bytes=1000)
    try:

        def big(msg):
            out = ch.OutgoingBlob.from_ciphertexts("upd", os.urandom(2048), 512)
            return (
                "train_reply",
                _reply().__class__(
                    round=1,
                    update_id="u",
                    contribution=b"{}",
                    contribution_signature=b"s" * 64,
                    ciphertexts=out.ref,
                ),
                [out],
            )

        running, peer = connect(fed, coord, handler=big)
        try:
            with pytest.raises(ProtocolError, match="over the receive cap of 1000 bytes"):
                peer.call("train_request", weights_request(1), timeout=15)
        finally:
            running.stop()
    finally:
        coord.close(0)


def test_weights_over_the_sites_cap_are_refused(fed, coordinator):
    running, peer = connect(fed, coordinator, max_blob_bytes=100)
    try:
        blob = ch.OutgoingBlob.from_array("w", np.zeros((4, 30), np.float32))
        with pytest.raises(ch.FederationError):
            peer.call("train_request", weights_request(1, blob), [blob], timeout=15)
        assert "over the receive cap of 100 bytes" in str(running.wait_error())
    finally:
        running.stop()


class _Boom:
    fired = []

    def __reduce__(self):
        return (_Boom.fired.append, ("unpickled!",))


@pytest.fixture
def no_pickle(monkeypatch):
    """Any unpickling during the test raises (and is recorded)."""
    calls = []

    def refuse(*a, **k):
        calls.append(a[:1])
        raise AssertionError("something unpickled a payload")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    import sys

    for name in ("ray.cloudpickle", "cloudpickle"):
        module = sys.modules.get(name)
        if module is not None:
            monkeypatch.setattr(module, "loads", refuse, raising=False)
    return calls


def test_pickles_travel_as_bytes_and_are_never_unpickled(fed, coordinator, no_pickle):
    payload = pickle.dumps(_Boom(), protocol=4)
    assert payload[:2] == b"\x80\x04"
    payload += b"\x00" * (-len(payload) % 8)
    seen = {}

    def handler(msg):
        blob = msg.blob(msg.body.global_weights)
        seen["weights"] = blob.array("<f8", (len(payload) // 8,))
        out = ch.OutgoingBlob.from_ciphertexts("upd", payload, 8)
        return (
            "train_reply",
            pb.TrainReply(
                round=1,
                update_id="u",
                contribution=b"{}",
                contribution_signature=b"s" * 64,
                ciphertexts=out.ref,
            ),
            [out],
        )

    running, peer = connect(fed, coordinator, handler=handler)
    try:
        header = pb.BlobHeader(
            blob_id="w",
            total_size=len(payload),
            sha256=hashlib.sha256(payload).digest(),
            kind=pb.BLOB_KIND_ARRAY,
            dtype=pb.DTYPE_F64,
            shape=[len(payload) // 8],
        )
        blob = ch.OutgoingBlob(header, memoryview(payload))
        reply = peer.call("train_request", weights_request(1, blob), [blob], timeout=15)
        got = reply.blob(reply.body.ciphertexts).ciphertexts(8)
        assert got.tobytes() == payload and seen["weights"].tobytes() == payload
        assert _Boom.fired == [] and no_pickle == []
    finally:
        running.stop()


def test_a_pickled_contribution_is_refused(fed, coordinator, no_pickle):
    def handler(msg):
        return (
            "train_reply",
            pb.TrainReply(
                round=1,
                update_id="u",
                contribution=pickle.dumps(_Boom(), protocol=4),
                contribution_signature=b"s" * 64,
                ciphertexts=pb.BlobRef(blob_id="c", size=0, sha256=b"0" * 32),
            ),
            [],
        )

    running, peer = connect(fed, coordinator, handler=handler)
    try:
        with pytest.raises(ProtocolError, match="a pickle or other bytes"):
            peer.call("train_request", weights_request(1), timeout=15)
        assert _Boom.fired == [] and no_pickle == []
    finally:
        running.stop()


@pytest.mark.parametrize(
    "field,value",
    [
        ("task_id", "os.system"),
        ("task_id", "fedray.runtime.server:ServerActor"),
        ("hyperparameters", "builtins.eval"),
    ],
)
def test_a_class_name_in_a_field_is_refused_by_the_site(fed, coordinator, no_pickle, field, value):
    running, peer = connect(fed, coordinator)
    try:
        request = weights_request(1)
        if field == "task_id":
            request.task_id = value
        else:
            request.hyperparameters[value].real = 1.0
        with pytest.raises(ch.FederationError):
            peer.call("train_request", request, timeout=15)
        err = running.wait_error()
        assert isinstance(err, ProtocolError)
        assert "is not an identifier" in str(err) or "is not [a-z]" in str(err)
        assert no_pickle == []
    finally:
        running.stop()


def test_a_big_encrypted_update_streams_through(fed, coordinator):
    """A 4,194,304-value update's ciphertexts (2048-bit keys, 102 values per ciphertext)."""
    payload = os.urandom(BIG_CIPHERTEXT_BYTES)

    def handler(msg):
        out = ch.OutgoingBlob.from_ciphertexts("upd", payload, 512)
        return (
            "train_reply",
            pb.TrainReply(
                round=1,
                update_id="u",
                contribution=b"{}",
                contribution_signature=b"s" * 64,
                ciphertexts=out.ref,
            ),
            [out],
        )

    running, peer = connect(fed, coordinator, handler=handler)
    try:
        reply = peer.call("train_request", weights_request(1), timeout=120)
        blob = reply.blob(reply.body.ciphertexts)
        assert len(blob.data) == BIG_CIPHERTEXT_BYTES > 5 * MAX_CHUNK_BYTES
        assert hashlib.sha256(blob.data).digest() == hashlib.sha256(payload).digest()
        assert blob.ciphertexts(512, BIG_CIPHERTEXT_BYTES // 512).shape == (41120, 512)
    finally:
        running.stop()


# --- hostile frames that must be refused, never crash a side (review of issue #23) -----------


def _header_frame(sender, header: pb.BlobHeader) -> bytes:
    return sender.blob(ch.OutgoingBlob(header, memoryview(b"")))[0]


_EMPTY = hashlib.sha256(b"").digest()


def _evil_header(dims=2000) -> pb.BlobHeader:
    """A shape of ``dims`` dimensions of 2**64-1 declaring 1 byte: a 4300+-digit product."""
    return pb.BlobHeader(
        blob_id="p",
        total_size=1,
        sha256=hashlib.sha256(b"x").digest(),
        kind=pb.BLOB_KIND_ARRAY,
        dtype=pb.DTYPE_U8,
        shape=[2**64 - 1] * dims,
    )


def test_receiver_refuses_a_huge_shape_before_any_arithmetic(fed):
    sender, receiver = _pair(fed)
    started = time.process_time()
    with pytest.raises(ProtocolError, match="more than 8 dimensions"):
        receiver.feed(_header_frame(sender, _evil_header()))
    assert time.process_time() - started < 0.5
    sender, receiver = _pair(fed)
    with pytest.raises(ProtocolError, match="has a dimension over"):
        receiver.feed(_header_frame(sender, _evil_header(dims=2)))
    # A size mismatch names no computed size (a crafted shape cannot make a huge line).
    sender, receiver = _pair(fed)
    header = _evil_header(dims=1)
    header.shape[:] = [7]
    with pytest.raises(ProtocolError) as info:
        receiver.feed(_header_frame(sender, header))
    assert "7" not in str(info.value).replace("blob p", "")


def test_receiver_turns_any_other_error_into_a_protocol_error(fed, monkeypatch):
    def crash(header, max_bytes):
        raise ValueError("a check tripped over a crafted value")

    monkeypatch.setattr(ch, "check_header", crash)
    sender, receiver = _pair(fed)
    blob = ch.OutgoingBlob.from_ciphertexts("c", b"12345678", 4)
    with pytest.raises(ProtocolError, match=r"could not be checked \(ValueError\)"):
        receiver.feed(sender.blob(blob)[0])


def test_receiver_caps_the_number_of_blobs_and_counts_empty_ones(fed):
    def empty(i):
        return pb.BlobHeader(
            blob_id=f"z{i}", total_size=0, sha256=_EMPTY, kind=pb.BLOB_KIND_CIPHERTEXTS,
            shape=[0], width=1,
        )  # fmt: skip

    sender, receiver = _pair(fed, max_blob=1 << 30)
    for i in range(ch.MAX_BLOBS_PER_MESSAGE):
        receiver.feed(_header_frame(sender, empty(i)))
    with pytest.raises(ProtocolError, match="more than 64 blobs for one message"):
        receiver.feed(_header_frame(sender, empty(64)))
    # Zero-size blobs still cost their header and a fixed amount against the cap.
    sender, receiver = _pair(fed, max_blob=2000)
    with pytest.raises(ProtocolError, match="exceed the receive cap of 2000 bytes"):
        for i in range(10):
            receiver.feed(_header_frame(sender, empty(i)))


def _signed_envelope(sender, kind, body) -> bytes:
    return sender.envelope(kind, body)


def test_receiver_caps_envelope_size_map_entries_and_lists(fed):
    sender, receiver = _pair(fed)
    long_ids = sorted(f"{i:060d}" for i in range(1200))  # ~74 kB of update ids
    with pytest.raises(ProtocolError, match="over 65536 bytes"):
        receiver.feed(sender.envelope("approve_request", pb.ApproveRequest(update_ids=long_ids)))
    sender, receiver = _pair(fed)
    ids = sorted(f"u{i:05d}" for i in range(1025))
    with pytest.raises(ProtocolError, match="more than 1024 entries"):
        receiver.feed(sender.envelope("approve_request", pb.ApproveRequest(update_ids=ids)))
    sender, receiver = _pair(fed)
    request = weights_request(1)
    for i in range(65):
        request.hyperparameters[f"h{i}"].integer = 1
    with pytest.raises(ProtocolError, match="hyper-parameters has more than 64 entries"):
        receiver.feed(sender.envelope("train_request", request))
    sender, receiver = _pair(fed)
    # 1,024 items are allowed (a cohort's clients; an approve request's update ids now come
    # with their signed statements, so the envelope cap binds first there).
    assert receiver.feed(
        sender.envelope("train_request", weights_request(1, client_ids=list(range(1024))))
    )


@pytest.mark.parametrize(
    "contribution,ok",
    [
        (b'{"round": 1}', True),
        (b"{" + pickle.dumps(object), False),  # a pickle behind a brace
        (b"[1, 2]", False),  # JSON, but not a statement
        (b'{"a": 1} trailing', False),
        (b"\xff{}", False),
    ],
)
def test_a_contribution_must_parse_as_one_json_object(fed, contribution, ok):
    sender, receiver = _pair(fed)
    reply = _reply()
    reply.contribution = contribution
    frame = sender.envelope("train_reply", reply)
    if ok:
        assert receiver.feed(frame).kind == "train_reply"
    else:
        with pytest.raises(ProtocolError, match="not a signed JSON statement"):
            receiver.feed(frame)


def test_a_crafted_shape_from_a_site_fails_the_call_not_the_coordinator(fed, coordinator):
    """The coordinator's reader refuses the site and call() returns an error (no hang)."""
    evil = ch.OutgoingBlob(_evil_header(), memoryview(b"x"))

    def handler(msg):
        reply = _reply()
        reply.ciphertexts.CopyFrom(pb.BlobRef(blob_id="p", size=1, sha256=evil.header.sha256))
        return "train_reply", reply, [evil]

    running, peer = connect(fed, coordinator, handler=handler)
    try:
        started = time.monotonic()
        with pytest.raises(ProtocolError, match="more than 8 dimensions"):
            peer.call("train_request", weights_request(1), timeout=20)
        assert time.monotonic() - started < 10 and not peer.connected
    finally:
        running.stop()


def test_a_crafted_shape_from_the_coordinator_is_refused_by_the_site(fed, coordinator):
    evil = ch.OutgoingBlob(_evil_header(), memoryview(b"x"))
    running, peer = connect(fed, coordinator)
    try:
        with pytest.raises(ch.FederationError):
            peer.call("train_request", weights_request(1, evil), [evil], timeout=20)
        err = running.wait_error()
        assert isinstance(err, ProtocolError) and "more than 8 dimensions" in str(err)
    finally:
        running.stop()


def test_a_reader_failure_fails_the_peer_instead_of_hanging(fed, coordinator, monkeypatch):
    def broken(self, msg):
        raise RuntimeError("a bug in delivery")

    monkeypatch.setattr(ch.SitePeer, "_deliver", broken)
    running, peer = connect(fed, coordinator)
    try:
        blob = ch.OutgoingBlob.from_array("w", np.zeros((4, 3), np.float32))
        with pytest.raises(ProtocolError, match="its stream failed"):
            peer.call("train_request", weights_request(1, blob), [blob], timeout=20)
        assert not peer.connected
    finally:
        running.stop()


def test_a_policy_refusal_reaches_the_coordinator_as_its_line(fed, coordinator):
    from fedray.federation.policy import PolicyRefusal

    def handler(msg):
        raise PolicyRefusal("round 3: task x@1 is not installed/allowed at this site")

    running, peer = connect(fed, coordinator, handler=handler)
    try:
        with pytest.raises(ch.PeerRefused, match="refused train_request: round 3: task x@1"):
            peer.call("train_request", weights_request(3), timeout=15)
    finally:
        running.stop()


def test_one_handshake_in_flight_per_certificate(fed, coordinator):
    """Streams that never say hello: a second one of the same site is refused at once, and
    another site still gets in (M1)."""
    creds = grpc.ssl_channel_credentials(
        (fed / "ca.pem").read_bytes(),
        (fed / "a" / "key.pem").read_bytes(),
        (fed / "a" / "cert.pem").read_bytes(),
    )
    stop = threading.Event()

    def never():
        stop.wait(30)
        return
        yield

    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{coordinator.port}", creds, options=options) as chan:
        first = chan.stream_stream(ch.METHOD)(never())
        time.sleep(0.5)
        second = chan.stream_stream(ch.METHOD)(never())
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            next(iter(second))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "handshake in progress" in info.value.details()
        assert time.monotonic() - started < ch.HANDSHAKE_TIMEOUT_S
        running = Running(make_site(fed, "b", coordinator.port, echo_handler))
        try:
            coordinator.wait_for(["b"], 10)
        finally:
            stop.set()
            first.cancel()
            running.stop()


def test_site_refuses_a_welcome_expecting_another_policy(fed):
    coord = listen(fed, policy_fingerprint=b"P" * 32)
    try:
        running = Running(
            make_site(fed, "a", coord.port, echo_handler, policy_fingerprint=b"Q" * 32)
        )
        err = running.wait_error()
        assert isinstance(err, ProtocolError) and "expects another site policy" in str(err)
        running = Running(
            make_site(fed, "a", coord.port, echo_handler, policy_fingerprint=b"P" * 32)
        )
        try:
            coord.wait_for(["a"], 15)
        finally:
            running.stop()
    finally:
        coord.close(0)


def test_the_ca_file_must_be_the_manifests(fed, other_fed, tmp_path):
    with pytest.raises(ch.FederationError, match="is not the manifest's CA"):
        ch.listen(
            "127.0.0.1:0",
            fed / COORD / "cert.pem",
            fed / COORD / "key.pem",
            other_fed / "ca.pem",
            manifest=fed / "federation.json",
            signing_key=fed / COORD / "signing.key",
        )
    with pytest.raises(ch.FederationError, match="is not the manifest's CA"):
        ch.dial(
            "127.0.0.1:1",
            fed / "a" / "cert.pem",
            fed / "a" / "key.pem",
            other_fed / "ca.pem",
            site_id="a",
            manifest=fed / "federation.json",
            signing_key=fed / "a" / "signing.key",
            handler=echo_handler,
        )
    raw = json.loads((fed / "federation.json").read_text())
    del raw["ca_sha256"]
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(ch.FederationError, match="ca_sha256"):
        ch.Manifest.load(tmp_path / "m.json")


@pytest.mark.parametrize(
    ("field", "first", "second"),
    [
        ("signing_key", "a", "b"),
        ("signing_key", "coordinator", "a"),
        ("cert_sha256", "b", "c"),
    ],
)
def test_a_manifest_giving_two_parties_one_key_or_certificate_is_refused(
    fed, tmp_path, field, first, second
):
    """A signing key listed for two parties would approve, attest and contribute as both,
    counting twice towards a threshold (review of 2026-12-04): refused on load, naming
    both parties."""
    raw = json.loads((fed / "federation.json").read_text())

    def entry(pid):
        return raw["coordinator"] if pid == "coordinator" else raw["sites"][pid]

    entry(second)[field] = entry(first)[field]
    path = tmp_path / "federation.json"
    path.write_text(json.dumps(raw))
    names = {"coordinator": COORD}
    with pytest.raises(ch.FederationError, match=f"have the same {field}") as err:
        ch.Manifest.load(path)
    assert names.get(first, first) in str(err.value) and names.get(second, second) in str(err.value)
