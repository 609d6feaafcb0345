"""Servers that craft what the hosts train on (tests/test_lineage.py). Shipped to Ray by
value (Ray workers import nothing from tests/). Each plays a server with exactly what it
holds: its own weights, the opened sum, the key holders' handles."""

from __future__ import annotations

import numpy as np

from fedray.runtime.server import Server


class NaNTrapServer(Server):
    """Round 1 starts from a model with one NaN bias (training fails on some data only)."""

    def _dispatch(self, ray, cohort):
        if self.round == 1:
            self.weights = self.weights.copy()
            self.weights[-1] = np.float32("nan")
        return super()._dispatch(ray, cohort)


class NudgingServer(Server):
    """Round 2's model is the true one with one value moved by one float32 ulp."""

    def _dispatch(self, ray, cohort):
        if self.round == 2:
            self.weights = self.weights.copy()
            self.weights[0] = np.nextafter(self.weights[0], np.float32(np.inf))
        return super()._dispatch(ray, cohort)


class TrapLayerServer(Server):
    """Round 2's model has a "trap" first layer (Robbing-the-Fed style): large weights
    written over the first values, so a few inputs dominate the sum."""

    def _dispatch(self, ray, cohort):
        if self.round == 2:
            self.weights = self.weights.copy()
            self.weights[:64] = np.linspace(-5, 5, 64, dtype=np.float32)
        return super()._dispatch(ray, cohort)


class FabricatedSumServer(Server):
    """Claims an opened sum of round 1 with one slot raised by one, and asks the key
    holders to attest it (they multiply the deposited updates themselves)."""

    def _open_with_share_sums(self, acc, layout, unmasker):
        plaintexts = super()._open_with_share_sums(acc, layout, unmasker)
        if self.round == 1:
            plaintexts = [plaintexts[0] + 1, *plaintexts[1:]]
        return plaintexts


class ForgedReleaseServer(Server):
    """Gets round 1's true sum attested, then steps from a fabricated one (one slot
    raised) and hands the hosts that fabricated sum with the true attestations."""

    def _record_release(self, acc, plaintexts, attestations):
        from fedray.crypto.threshold import ints_to_bytes
        from fedray.runtime.lineage import plaintext_width

        if self.round == 1:
            forged = [plaintexts[0] + (1 << 20), *plaintexts[1:]]
            width = plaintext_width(self.key.public.n)
            self._opened_bytes = ints_to_bytes(forged, width)
            total, stats = self.layout.decode_sum(forged, acc.count)
            from fedray.strategies import build_strategy  # FedAvg: a stateless step

            strategy = build_strategy(self.cfg.strategy)
            self.weights = strategy.apply(self.previous, total / stats["weight"])
        super()._record_release(acc, plaintexts, attestations)

    def _dispatch(self, ray, cohort):
        self.previous = self.weights.copy()
        return super()._dispatch(ray, cohort)


class LyingStateServer(Server):
    """Rounds are honest, but the state it hands the driver to checkpoint after round 2
    carries a trap (a resume's hosts would start from it)."""

    def state_dict(self):
        state = super().state_dict()
        if state["round"] == 2:
            state["weights"] = state["weights"].copy()
            state["weights"][-1] = np.float32("nan")
        return state
