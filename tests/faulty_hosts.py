"""Client hosts that misbehave on purpose, for the fault tests (importable by Ray workers)."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from fedray.runtime.client import ClientHost, ClientResult, RoundTask


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


class SlowHost(ClientHost):
    """Host 0 stalls for 3 s in round 2 (a straggler)."""

    def train(self, task, global_weights):
        if task.round == 2 and 0 in self.client_ids:
            time.sleep(3.0)
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


class WrongSharesHost(ClientHost):
    """Gives the key holders exponent shares that are not those of its obfuscators (signed,
    so the holders accept them): the share sums cannot open the sum."""

    def _deposit(self, round_num, update, shares):
        return super()._deposit(round_num, update, [bytes(reversed(b)) for b in shares])


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
