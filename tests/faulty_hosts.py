"""Client hosts that misbehave on purpose, and a server that records its attempts, for the
fault tests (shipped to Ray workers by value)."""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedray.runtime.client import ClientHost, ClientResult, RoundTask
from fedray.runtime.server import Server


class CrashingHost(ClientHost):
    """Kills its own process mid-round (after training started) in the planned rounds.

    Subclass it in a test with ``plan`` = {(round, first client id of the host)} and a
    ``marker_dir`` (the test's tmp_path: a marker file there says "already crashed",
    since a restarted actor forgets); a class made in a test is shipped to Ray by value.
    """

    plan: frozenset = frozenset()
    marker_dir: str = ""

    def train(self, task: RoundTask, global_weights: np.ndarray) -> list[ClientResult]:
        marker = os.path.join(self.marker_dir, f"crashed-{task.round}-{self.client_ids[0]}")
        if (task.round, self.client_ids[0]) in self.plan and not os.path.exists(marker):
            open(marker, "w").close()  # crash once per planned round, not after restart
            self._train_one(task.client_ids[0], task, global_weights)
            os._exit(1)
        return super().train(task, global_weights)


class FailingHost(ClientHost):
    """Every client's training fails in round 1 (the task raises, as a bug or a crafted
    model would make it); later rounds train as usual."""

    def _train_one(self, cid, task, global_weights):
        if task.round == 1:
            raise FloatingPointError(f"client {cid}: the loss overflowed")
        return super()._train_one(cid, task, global_weights)


class SlowHost(ClientHost):
    """Host 0 stalls for 8 s in round 2 (a straggler, well past a 4 s deadline)."""

    def train(self, task, global_weights):
        if task.round == 2 and 0 in self.client_ids:
            time.sleep(8.0)
        return super().train(task, global_weights)


class CorruptingHost(ClientHost):
    """Corrupts one update per host per round, each round a different way.

    Plaintext: the first client's delta. Encrypted: the first client's own update, or
    with ``crypto.host_sum`` host 0's whole sum (so half the cohort is rejected).
    """

    KINDS = ("nan", "inf", "shape", "dtype", "huge", "foreign_key", "outside", "not_unit")

    def _kind(self, task) -> str:
        return self.KINDS[(task.round - 1) % len(self.KINDS)]

    def _train_one(self, cid, task, global_weights):
        result = super()._train_one(cid, task, global_weights)
        if cid != self.client_ids[0] or result.error or result.delta is None:
            return result
        kind, delta = self._kind(task), result.delta
        if kind == "nan":
            delta[0] = np.nan
        elif kind == "inf":
            delta[-1] = np.inf
        elif kind == "shape":
            result.delta = delta[:-1]
        elif kind == "dtype":
            result.delta = delta.astype(np.float64)
        elif kind == "huge":
            result.delta = delta * 1e6
        return result

    def _seal(self, task, results):
        super()._seal(task, results)
        carrier = next((r for r in results if r.encrypted is not None), None)
        if carrier is None:
            return
        if self.cfg.crypto.host_sum and 0 not in self.client_ids:
            return  # a sum is all of a host's clients: corrupt only host 0's
        if not self.cfg.crypto.host_sum and carrier.client_id != self.client_ids[0]:
            return
        kind, enc = self._kind(task), carrier.encrypted
        width = len(enc.ciphertexts) // self.layout.num_ciphertexts
        n = self._key.n
        if kind in ("nan", "foreign_key"):
            carrier.encrypted = replace(enc, key_id="0" * 16)
        elif kind in ("inf", "outside"):
            bad = (n * n + 1).to_bytes(width, "little")
            carrier.encrypted = replace(enc, ciphertexts=bad + enc.ciphertexts[width:])
        elif kind in ("shape", "not_unit"):
            bad = n.to_bytes(width, "little")
            carrier.encrypted = replace(enc, ciphertexts=bad + enc.ciphertexts[width:])
        else:  # dtype / huge: a truncated payload
            carrier.encrypted = replace(enc, ciphertexts=enc.ciphertexts[:-3])


class WeightlessHost(ClientHost):
    """Seals its clients' sum with weight 0 in round 2: valid ciphertexts of a plaintext
    the honest encoding refuses (its right: there are no range proofs), so the opened
    summed weight is 0 and the step would divide by it."""

    def _seal(self, task, results):
        layout = self._encryptor.layout
        if task.round != 2:
            return super()._seal(task, results)

        def weightless(entries):
            delta = layout.codec.encode_sum(
                [(np.zeros_like(u, dtype=np.float64), n) for u, _, n, _ in entries]
            )
            return delta + layout.stats.encode_sum([{**s, "weight": 0.0} for *_, s in entries])

        object.__setattr__(layout, "encode_sum", weightless)
        try:
            return super()._seal(task, results)
        finally:
            object.__delattr__(layout, "encode_sum")


class LostBeforeApprovalHost(ClientHost):
    """Host 0 dies in round 2 after it sent its sealed update, when the server asks
    whether it still holds it (before anyone approves the sum): once (``marker_dir``: a
    restarted actor forgets)."""

    marker_dir: str = ""

    def holds(self, round_num, update_ids):
        marker = os.path.join(self.marker_dir, "lost-before-approval")
        if round_num == 2 and 0 in self.client_ids and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return super().holds(round_num, update_ids)


class WrongSharesHost(ClientHost):
    """Gives the key holders exponent shares that are not those of its obfuscators (signed,
    so the holders accept them: each value stays within an honest sharing's bound, one more
    than it should be): the share sums cannot open the sum."""

    def _deposit(self, round_num, update, shares):
        from fedray.crypto.threshold import ints_from_bytes, ints_to_bytes

        width = self._key.share_width()
        wrong = [ints_to_bytes([v + 1 for v in ints_from_bytes(b, width)], width) for b in shares]
        return super()._deposit(round_num, update, wrong)


class HolderKillingHost(ClientHost):
    """Host 0 kills the last key holder as round 2 starts (mid-run, before the deposits)."""

    def train(self, task, global_weights):
        if task.round == 2 and 0 in self.client_ids:
            import ray

            ray.kill(self._holders[-1])
        return super().train(task, global_weights)


class ForgetfulHost(ClientHost):
    """Has lost its sealed updates when the slow path asks for them in round 2, as a host
    that Ray restarted after the server folded its update would have."""

    def sealed_payload(self, round_num, update_id):
        if round_num == 2:
            self._sealed.clear()
        return super().sealed_payload(round_num, update_id)


class OpenedStatsServer(Server):
    """Writes each round's opened statistics (what the server learns besides the model)
    as one JSON line to ``record``."""

    record = ""

    def _release(self, acc, results, metrics):
        import json

        stats = super()._release(acc, results, metrics)
        with open(self.record, "a") as fh:
            fh.write(json.dumps({"round": self.round, "clients": len(results), **stats}) + "\n")
        return stats


class AttemptRecordingServer(Server):
    """Writes one record per attempt at a round into ``record_dir``: the global weights
    before and after it, and every plaintext update it received from the hosts (client,
    delta, weight), whatever it then did with them; and after each ``run_round`` call
    (also one that raised), the weights it holds. A test recomputes the released model
    from the updates by hand and checks that an attempt with too few clients changed
    nothing."""

    record_dir = ""

    def _write(self, kind: str, record: dict) -> None:
        self._seq = getattr(self, "_seq", 0) + 1
        path = Path(self.record_dir) / f"{self._seq:04d}-{kind}.pkl"
        path.write_bytes(pickle.dumps(record))

    def _attempt(self, ray):
        self._received = []
        before = self.weights.copy()
        try:
            return super()._attempt(ray)
        finally:
            self._write(
                "attempt",
                {
                    "round": self.round,
                    "before": before,
                    "after": self.weights.copy(),
                    "received": self._received,
                },
            )

    def run_round(self):
        try:
            return super().run_round()
        finally:
            self._write("run_round", {"round": self.round, "weights": self.weights.copy()})

    def _fetch(self, ref):
        obj = super()._fetch(ref)
        for r in obj if isinstance(obj, list) else []:
            if isinstance(r, ClientResult) and r.error is None and r.delta is not None:
                self._received.append((r.client_id, np.array(r.delta), float(r.weight)))
        return obj
