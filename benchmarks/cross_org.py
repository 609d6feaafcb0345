"""The cross-organisation channel over loopback with mutual TLS (issue #23).

    .venv/bin/python benchmarks/cross_org.py              # a 4,194,304-value update, 5 times
    .venv/bin/python benchmarks/cross_org.py --values 8388608 --repeats 3

A coordinator (this process) asks a site (a child process, its own certificates) to
train; the site answers with an encrypted update of that many values at 2048-bit keys
(102 values per 512-byte ciphertext: random bytes of that size). Prints the throughput
(MB/s, 10^6 bytes, whole request/reply over mTLS gRPC, signatures and digests included),
the receiver's (coordinator's) and the sender's (site's) peak RSS growth during the
transfer against the target "payload + 64 MiB", and the machine's load. Not a test:
nothing is asserted. (The round-time ratio of 3 site clusters to one cluster, and the
federation's set-up: benchmarks/cross_org_rounds.py.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedray.federation import channel as ch  # noqa: E402
from fedray.federation import federation_pb2 as pb  # noqa: E402
from fedray.tools.certs import make_federation  # noqa: E402

# Both ends declare one job (a real party declares fedray.federation.site.agreed_job)
JOB = b'{"benchmark":"cross_org_transfer"}'

WIDTH, PER_CIPHERTEXT = 512, 102
MiB = 1024 * 1024


class PeakRss:
    """Samples a process's RSS every 2 ms while running; ``peak - base`` is the growth."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / MiB


def site_main(fed: Path, port: int, size: int) -> None:
    payload = os.urandom(size)  # the site's update exists before it is sent
    out = ch.OutgoingBlob.from_ciphertexts("update", payload, WIDTH)

    def handler(msg):
        reply = pb.TrainReply(
            round=msg.body.round,
            update_id=f"u{msg.body.round}",
            contribution=b"{}",
            contribution_signature=b"s" * 64,
            ciphertexts=out.ref,
        )
        return "train_reply", reply, [out]

    site = ch.dial(
        f"127.0.0.1:{port}",
        fed / "a" / "cert.pem",
        fed / "a" / "key.pem",
        fed / "ca.pem",
        site_id="a",
        manifest=fed / "federation.json",
        signing_key=fed / "a" / "signing.key",
        handler=handler,
        job=JOB,
    )
    print("ready", flush=True)
    site.run(max_wait_s=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--values", type=int, default=4_194_304)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--site", nargs=3, metavar=("DIR", "PORT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.site:
        site_main(Path(args.site[0]), int(args.site[1]), int(args.site[2]))
        return
    size = -(-args.values // PER_CIPHERTEXT) * WIDTH
    with tempfile.TemporaryDirectory() as tmp:
        fed = Path(tmp)
        make_federation(fed, "coord", ["a"], hosts=["localhost", "127.0.0.1"])
        coord = ch.listen(
            "127.0.0.1:0",
            fed / "coord" / "cert.pem",
            fed / "coord" / "key.pem",
            fed / "ca.pem",
            manifest=fed / "federation.json",
            signing_key=fed / "coord" / "signing.key",
            job=JOB,
        )
        child = subprocess.Popen(
            [sys.executable, __file__, "--site", str(fed), str(coord.port), str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            child.stdout.readline()
            peer = coord.wait_for(["a"], 60)["a"]
            request = pb.TrainRequest(
                task_id="bench",
                task_version="1",
                model_fingerprint=b"m" * 32,
                global_weights=pb.BlobRef(blob_id="w", size=0, sha256=b"0" * 32),
                client_ids=[0],
            )
            rates, recv_growth, send_growth = [], [], []
            for r in range(1, args.repeats + 1):
                request.round = r
                with PeakRss(os.getpid()) as me, PeakRss(child.pid) as site:
                    t0 = time.perf_counter()
                    reply = peer.call("train_request", request, timeout=300)
                    seconds = time.perf_counter() - t0
                    blob = reply.blob(reply.body.ciphertexts)
                    assert len(blob.data) == size
                    del reply, blob
                rates.append(size / seconds / 1e6)
                recv_growth.append(me.growth_mib)
                send_growth.append(site.growth_mib)
            coord.close(0)
        finally:
            child.kill()
            child.wait()
    load = os.getloadavg()
    print(
        f"payload: {args.values} values -> {size} ciphertext bytes ({size / MiB:.1f} MiB), "
        f"{args.repeats} transfers, site -> coordinator, mTLS over 127.0.0.1"
    )
    print(
        f"throughput MB/s: best {max(rates):.1f}  median {statistics.median(rates):.1f}  "
        f"all {' '.join(f'{x:.1f}' for x in rates)}  (target >= 100)"
    )
    print(
        f"receiver peak RSS growth MiB: max {max(recv_growth):.1f} "
        f"(target <= payload + 64 = {size / MiB + 64:.1f})"
    )
    print(
        f"sender peak RSS growth MiB: max {max(send_growth):.1f} "
        f"(payload held before sending; target growth <= 64)"
    )
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
