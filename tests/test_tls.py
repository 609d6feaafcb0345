"""Ray's gRPC over TLS on loopback: a fedray job runs on a TLS cluster that speaks only TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import time
from pathlib import Path

import pytest

from fedray.runtime.cluster import loopback_node_ip
from tests.conftest import (
    free_port,
    isolated_home,
    node_failed,
    run_cli,
    start_ray_node,
    stop_ray_nodes,
)

SMALL_KEY = ["crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


def _self_signed(directory: Path, ips: list[str]) -> tuple[Path, Path]:
    """A self-signed CA-capable certificate for localhost and ``ips`` (test use only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedray-test")])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "node.crt", directory / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _tls_handshake(port: int, ca: Path) -> str:
    """The TLS version the port negotiates, verifying its certificate against ``ca``."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])  # gRPC
    ip = loopback_node_ip()
    with (
        socket.create_connection((ip, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=ip) as tls,
    ):
        return tls.version()


@pytest.fixture(scope="module")
def tls_head(tmp_path_factory):
    """A `ray start --head` on loopback with RAY_USE_TLS and token auth, in its own session."""
    directory = tmp_path_factory.mktemp("tls")
    # The node's IP (Ray would turn 127.0.0.1 into this machine's reachable address), and
    # 127.0.0.1, which some of its local clients dial. Not the machine's own address: a
    # TLS connection to it would fail here, as no traffic may leave loopback.
    cert, key = _self_signed(directory, sorted({"127.0.0.1", loopback_node_ip()}))
    env = {
        **isolated_home(directory),  # its own HOME and token
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(cert),
        "RAY_TLS_SERVER_KEY": str(key),
        "RAY_TLS_CA_CERT": str(cert),
    }
    head_log = directory / "head.log"
    port = free_port()
    head = start_ray_node(
        [
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--dashboard-agent-listen-port={free_port()}",
        ],
        env,
        head_log,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _tls_handshake(port, cert)
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    node_failed("the TLS Ray head did not come up within 90 s", head, head_log)
                time.sleep(0.5)
        yield port, env, cert
    finally:
        stop_ray_nodes([head], port)


def test_encrypted_job_runs_on_a_tls_cluster_that_speaks_only_tls(tls_head, tmp_path):
    port, env, cert = tls_head
    # The GCS port completes a TLS 1.3 handshake against our CA, and drops a plaintext
    # HTTP/2 (gRPC) preface without answering.
    assert _tls_handshake(port, cert) == "TLSv1.3"
    with socket.create_connection((loopback_node_ip(), port), timeout=5) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        raw.settimeout(10)
        assert raw.recv(100) == b""
    proc = run_cli(
        [
            f"ray.address={loopback_node_ip()}:{port}",
            "rounds=2",
            *SMALL_KEY,
            f"hydra.run.dir={tmp_path}",
        ],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["crypto"] == "paillier"
    assert summary["final_accuracy"] > 0.8
