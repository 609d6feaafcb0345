"""Client hosts that misbehave on purpose, for the fault tests (importable by Ray workers)."""

from __future__ import annotations

import os
import time

import numpy as np

from fedray.crypto.secure_aggregation import EncryptedUpdate
from fedray.runtime.client import ClientHost, ClientResult, RoundTask


class CrashingHost(ClientHost):
    """Kills its own process mid-round (after training started) in the planned rounds.

    Subclass it in a test with ``plan`` = {(round, first client id of the host)} and a
    unique ``token``; a class made in a test is shipped to Ray by value.
    """

    plan: frozenset = frozenset()
    token: str = ""

    def train(self, task: RoundTask, global_weights: np.ndarray) -> list[ClientResult]:
        marker = f"/tmp/fedray-crash-{self.token}-{task.round}-{self.client_ids[0]}"
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
    """Corrupts one client's update per round, each round a different way."""

    KINDS = ("nan", "inf", "shape", "dtype", "huge", "foreign_key", "outside", "not_unit")

    def _train_one(self, cid, task, global_weights):
        result = super()._train_one(cid, task, global_weights)
        if cid != self.client_ids[0] or result.error:
            return result
        kind = self.KINDS[(task.round - 1) % len(self.KINDS)]
        if result.encrypted is None:
            delta = result.delta
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
        enc = result.encrypted
        width = len(enc.ciphertexts) // self.codec.num_ciphertexts
        n = self._private.public.n
        if kind in ("nan", "foreign_key"):
            result.encrypted = EncryptedUpdate(
                "0" * 16, enc.num_values, enc.ciphertexts, enc.weight
            )
        elif kind in ("inf", "outside"):
            bad = (n * n + 1).to_bytes(width, "little")
            result.encrypted = EncryptedUpdate(
                enc.key_id, enc.num_values, bad + enc.ciphertexts[width:], enc.weight
            )
        elif kind in ("shape", "not_unit"):
            bad = n.to_bytes(width, "little")
            result.encrypted = EncryptedUpdate(
                enc.key_id, enc.num_values, bad + enc.ciphertexts[width:], enc.weight
            )
        else:  # dtype / huge: a truncated payload
            result.encrypted = EncryptedUpdate(
                enc.key_id, enc.num_values, enc.ciphertexts[:-3], enc.weight
            )
        return result
