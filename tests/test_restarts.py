"""Restarted hosts fail closed (issue #22): real Ray, real keys, real training.

Ray restarts a dead client host from its constructor's arguments: no key, no key
holders, weight_ref 1.0, a new signing identity. Before, such a host trained anyway: the
server received its clients' updates in the clear, its DP plan was cached without the
codec (no noise for the rest of the run), and in plaintext jobs its FedAvg weights went
to n_k / 1.0 for good. Here one host dies inside a round and another between rounds, and
the server records everything it receives and every sum it opens.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

import tests.faulty_hosts as faulty
import tests.test_restarts as this
from fedray.runtime.driver import run_experiment
from fedray.runtime.server import Server
from tests.conftest import compose

ray.cloudpickle.register_pickle_by_value(this)
ray.cloudpickle.register_pickle_by_value(faulty)

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]
# 6 clients of different sizes on 3 hosts of 2; every client in every round.
BASE = [
    "num_clients=6",
    "clients_per_round=6",
    "min_clients_per_round=2",
    "cluster.num_actors=3",
    "client.num_cpus=0.5",
    "dataset.partition=dirichlet",
    "dataset.share_label_counts=true",  # clients.json gives the test each n_k
    "rounds=4",
    "checkpoint.every=0",
    "local_epochs=1",
]


def _noise_probe(host) -> list:
    """Inside a host: the noise shares its DP plan gives one clipped delta, twice."""
    from fedray.privacy.dp import privatize_update

    plan = host._privacy_plan()
    delta = np.full(host.view.size, 0.01, dtype=np.float32)
    return [privatize_update(delta, plan, 0)[1] for _ in range(2)]


class RestartRecordingServer(Server):
    """Kills host 2 between rounds 2 and 3 (when round 3 samples its cohort); writes what
    it receives from hosts (``_fetch``), each released sum's total weight and clients,
    and in the last round the restarted hosts' noise shares, into ``record_dir``."""

    record_dir = ""

    def _write(self, kind, payload) -> None:
        name = f"{self.round:03d}-{kind}-{uuid.uuid4().hex}.json"
        (Path(self.record_dir) / name).write_text(json.dumps(payload))

    def _sample_cohort(self):
        import ray

        from fedray.runtime.client import RoundTask
        from fedray.runtime.cluster import call_when_available

        marker = Path(self.record_dir) / "killed"
        if self.round == 3 and not marker.exists():
            marker.touch()
            ray.kill(self.hosts[2], no_restart=False)
            # As a server may: ask the restarted host to train before the driver has
            # set it up again. It must refuse, sending nothing. (Wait until the new
            # instance answers: the old one may still be dying.)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if not ray.get(self.hosts[2].trainable.remote(), timeout=30):
                        break
                time.sleep(0.2)
            task = RoundTask(3, [4], {})
            try:
                answer = call_when_available(self.hosts[2].train, task, self.weights)
                self._write("early", [r.delta is not None or r.error for r in answer])
            except Exception as exc:
                self._write("early", str(exc).strip().splitlines()[-1])
            # Nor may the server set it up itself, or read a site's size from it.
            probes = {}
            for name, args in (("set_weight_ref", (1000.0,)), ("running_max_examples", (0.0,))):
                try:
                    probes[name] = repr(ray.get(getattr(self.hosts[2], name).remote(*args)))
                except Exception as exc:
                    probes[name] = str(exc).strip().splitlines()[-1]
            self._write("setup", probes)
        return super()._sample_cohort()

    def _fetch(self, ref):
        answer = super()._fetch(ref)
        if isinstance(answer, list):
            for r in answer:
                if type(r).__name__ == "ClientResult":
                    self._write(
                        "result",
                        {
                            "client": r.client_id,
                            "weight": r.weight,
                            "delta": r.delta is not None,
                            "stats": r.stats,
                            "compressed": r.compressed is not None,
                            "encrypted": r.encrypted is not None,
                            "error": r.error,
                        },
                    )
        return answer

    def _release(self, acc, results, metrics):
        stats = super()._release(acc, results, metrics)
        self._write(
            "release",
            {"weight": stats["weight"], "clients": sorted(r.client_id for r in results)},
        )
        if self.round == self.cfg.rounds and self.cfg.privacy.name == "dp":
            import ray

            probes = ray.get([h.__ray_call__.remote(_noise_probe) for h in self.hosts[1:]])
            self._write(
                "noise",
                [[None if n is None else n.tolist() for n in pair] for pair in probes],
            )
        return stats


def _records(directory: Path, kind: str) -> list[tuple[int, object]]:
    return [
        (int(p.name[:3]), json.loads(p.read_text()))
        for p in sorted(directory.glob(f"*-{kind}-*.json"))
    ]


@pytest.mark.parametrize(
    "mode",
    ["paillier", "paillier_dp", "plaintext"],
)
def test_restarted_hosts_fail_closed_and_get_their_weight_ref_back(ray_2cpus, tmp_path, mode):
    over = {
        # global standardisation: a restarted host waits for the federation's scaling too
        "paillier": [*BASE, *SMALL_KEY, "crypto.host_sum=false", "dataset.standardize=global"],
        "paillier_dp": [*BASE, *SMALL_KEY, "crypto.host_sum=false", "privacy=dp"],
        "plaintext": [*BASE, "crypto=none", "dataset.standardize=global"],
    }[mode]
    record = tmp_path / "record"
    record.mkdir()
    host = type(
        "CrashInRound2",
        (faulty.CrashingHost,),
        {"plan": frozenset({(2, 2)}), "marker_dir": str(tmp_path)},  # host 1 (clients 2, 3)
    )
    server = type("Rec", (RestartRecordingServer,), {"record_dir": str(record)})
    summary = run_experiment(compose(over), tmp_path / "run", host_class=host, server_class=server)
    assert summary["rounds_completed"] == 4
    assert (tmp_path / "crashed-2-2").exists() and (record / "killed").exists()
    clients = json.loads((tmp_path / "run" / "clients.json").read_text())
    n = {int(c): d["num_examples"] for c, d in clients.items()}
    assert len(set(n.values())) > 1  # non-IID sizes: weights differ
    weight_ref = max(n.values())

    # Asked to train before it was set up again, the restarted host refused.
    ((_, early),) = _records(record, "early")
    assert isinstance(early, str) and "trains again once the driver has set it up" in early
    # With crypto the first reason is its unconfigured key (then its lost weight_ref).
    reason = "no weight_ref yet" if mode == "plaintext" else "crypto is not configured"
    assert reason in early
    ((_, setup),) = _records(record, "setup")
    assert "not signed by the job's set-up key" in setup["set_weight_ref"]
    assert "set-up is over" in setup["running_max_examples"]
    results = _records(record, "result")
    releases = _records(record, "release")
    assert [r for r, _ in releases] == [1, 2, 3, 4]
    # Both restarted hosts' clients are back in the last round.
    assert releases[-1][1]["clients"] == [0, 1, 2, 3, 4, 5]
    assert 2 not in releases[1][1]["clients"] and 4 not in releases[2][1]["clients"]
    for round_num, release in releases:
        expected = (
            float(len(release["clients"]))  # client-level DP: uniform weights
            if mode == "paillier_dp"
            else sum(n[c] / weight_ref for c in release["clients"])
        )
        assert release["weight"] == pytest.approx(expected, rel=1e-4), round_num

    if mode == "plaintext":
        # The server sees plaintext weights: each client's is n_k / weight_ref, also
        # from a restarted host (not n_k / 1.0, capped at 1).
        for _, r in results:
            if r["error"] is None:
                assert r["weight"] == pytest.approx(n[r["client"]] / weight_ref, rel=1e-6)
        return
    # With crypto, nothing per client reaches the server in the clear, ever: no
    # plaintext update, no weight, no statistics, from a restarted host either.
    assert results
    for _, r in results:
        assert not r["delta"] and not r["compressed"] and r["stats"] is None
        assert r["weight"] == 0.0
    if mode == "paillier_dp":
        # The restarted hosts' DP plans add noise: two shares for one clipped delta are
        # there and differ.
        ((_, probes),) = _records(record, "noise")
        for first, second in probes:
            assert first is not None and second is not None
            assert np.any(np.asarray(first) != np.asarray(second))
