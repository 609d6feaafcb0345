"""What the server actually receives in a round, recorded inside the real server actor.

With crypto on it may receive ciphertexts (as bytes), the key holders' answers about the
*sum*, per-call timings and errors, and nothing per client in the clear: no plaintext
tensor, no example count, weight, loss or accuracy, no obfuscator, no key material.
"""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

import tests.test_server_view as this
from fedray.crypto.codec import STATS_FIELDS
from fedray.crypto.secure_aggregation import EncryptedUpdate
from fedray.runtime.client import ClientResult
from fedray.runtime.driver import run_experiment
from fedray.runtime.keys import find_key_material
from fedray.runtime.server import Server
from tests.conftest import compose

ray.cloudpickle.register_pickle_by_value(this)

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


class RecordingServer(Server):
    """Pickles everything it receives from hosts and key holders into ``record_dir``."""

    record_dir = ""

    def _fetch(self, ref):
        obj = super()._fetch(ref)
        (Path(self.record_dir) / f"{self.round:03d}-{uuid.uuid4().hex}.pkl").write_bytes(
            pickle.dumps(obj)
        )
        if self.key is not None and not hasattr(self, "_n_written"):
            (Path(self.record_dir) / "n.txt").write_text(str(self.key.n))
            self._n_written = True
        return obj


def _record(tmp_path, overrides):
    record = tmp_path / "received"
    record.mkdir()
    server = type("Recording", (RecordingServer,), {"record_dir": str(record)})
    cfg = compose([*overrides, "rounds=2", "checkpoint.every=0"])
    run_experiment(cfg, tmp_path / "run", server_class=server)
    received = [pickle.loads(p.read_bytes()) for p in sorted(record.glob("*.pkl"))]
    n = int((record / "n.txt").read_text()) if (record / "n.txt").exists() else None
    return received, n


def _walk(obj):
    yield obj
    if isinstance(obj, list | tuple):
        for v in obj:
            yield from _walk(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _walk(v)


@pytest.mark.parametrize(
    "extra",
    [[], ["crypto.custody=shared"], ["crypto.host_sum=false", "crypto.fast_decrypt=false"]],
    ids=["threshold-host-sums", "shared", "per-client-partial-decryptions"],
)
def test_with_crypto_the_server_receives_nothing_per_client_in_the_clear(
    ray_2cpus, tmp_path, extra
):
    received, n = _record(tmp_path, [*SMALL_KEY, *extra])
    results = [
        r
        for batch in received
        if isinstance(batch, list)
        for r in batch
        if isinstance(r, ClientResult)
    ]
    assert len(results) == 2 * 10  # every client's answer, both rounds
    updates = [r.encrypted for r in results if r.encrypted is not None]
    assert updates and all(isinstance(u, EncryptedUpdate) for u in updates)
    for r in results:
        assert r.delta is None, "a plaintext update reached the server"
        assert (r.weight, r.stats) == (0.0, None)  # statistics only inside the ciphertexts
        if r.encrypted is None:
            assert r.train_seconds == 0.0  # timings only per host call, with its update
    for obj in (o for batch in received for o in _walk(batch)):
        assert not isinstance(obj, np.ndarray), "an array reached the server"
    assert find_key_material(received, n) == []


def test_the_recorder_sees_plaintext_updates_when_crypto_is_off(ray_2cpus, tmp_path):
    """The same recorder in a plaintext run: it does see the deltas (the check can fail),
    and each client's statistics: its weight and weight-weighted figures, no example count
    (the same definition as the encrypted statistics)."""
    received, _ = _record(tmp_path, ["crypto=none"])
    results = [r for batch in received for r in batch]
    assert all(isinstance(r.delta, np.ndarray) for r in results)
    assert all(set(r.stats) == set(STATS_FIELDS) for r in results)
    assert all(r.stats["weight"] == r.weight > 0 for r in results)
