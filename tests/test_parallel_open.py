"""Opening a sum over a process pool, with wide fixed-base windows, gives exactly the
plaintexts that one process with 8-bit windows gives (issue 14: big updates)."""

from __future__ import annotations

import secrets

import gmpy2
import numpy as np
import pytest

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.paillier import ObfuscatorPool, _FixedBaseTable, from_bytes
from fedray.crypto.parallel import ParallelCrypto
from fedray.crypto.threshold import (
    EXPONENT_BITS,
    PublicEncryptor,
    Unmasker,
    add_share_blobs,
    deal_threshold_key,
    share_exponents,
)


@pytest.fixture(scope="module")
def key():
    return deal_threshold_key(512, 3, 2)[0]  # tests only: small keys


def test_pooled_open_makes_few_jobs_at_a_time(key):
    """Opening over a pool makes each job's input (a chunk of the sum as bytes) only as
    a worker is ready for it: a few chunks per process at a time, never the whole sum
    again (``Executor.map`` would make them all at once)."""
    from fedray.crypto.parallel import OPEN_CHUNK, _unmask

    with ParallelCrypto(key, 2, unmask_summands=3) as pool:
        assert all(b - a <= OPEN_CHUNK for a, b in pool._bounds(100 * OPEN_CHUNK, OPEN_CHUNK))
        made = []

        def jobs():
            for i in range(40):
                made.append(i)
                yield (b"", [], 3, 8)

        taken = 0
        for taken, part in enumerate(pool._map_few_at_a_time(_unmask, jobs()), 1):
            assert part == [] and len(made) - taken < 2 * pool.processes
        assert taken == 40


@pytest.mark.parametrize("window", [5, 8, 12])
def test_fixed_base_table_is_a_power(key, window):
    n2 = gmpy2.mpz(key.n) ** 2
    table = _FixedBaseTable(key.hs, int(n2), EXPONENT_BITS, window)
    for x in [0, 1, (1 << EXPONENT_BITS) - 1, *(secrets.randbits(EXPONENT_BITS) for _ in range(5))]:
        assert table.pow(x) == gmpy2.powmod(key.hs, x, n2)
        assert table.pow(x, gmpy2.mpz(7)) == 7 * gmpy2.powmod(key.hs, x, n2) % n2
    with pytest.raises(OverflowError):
        table.pow(1 << (window * table.num_digits))


def test_pooled_open_is_bit_identical(key):
    values = 3000
    codec = PackedPaillierCodec.for_key(key.public, num_values=values, max_summands=3)
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-0.5, 0.5, values) for _ in range(3)]
    enc = PublicEncryptor(key, window=12)
    n2 = gmpy2.mpz(key.n) ** 2
    acc, blob_sets = None, []
    for u in updates:
        cts, xs = enc.encrypt_many(codec.encode(u))
        blob_sets.append(share_exponents(key, xs))
        acc = cts if acc is None else [a * c % n2 for a, c in zip(acc, cts, strict=True)]
    sums = {j: add_share_blobs(key, [b[j - 1] for b in blob_sets]) for j in (1, 3)}
    alone = Unmasker(key, 3)  # one process, 8-bit windows
    exponents = alone.exponents(sums, 3)
    expected = alone.unmask(acc, exponents)
    assert expected is not None
    total = codec.decode_sum(expected, 3)
    assert np.max(np.abs(total - sum(updates))) <= codec.error_bound(3, 1.0) * 3 + 1e-12
    with ParallelCrypto(key, 2, unmask_summands=3, window=12) as pool:
        pooled = Unmasker(key, 3, window=12, pool=pool)
        assert pooled.unmask(acc, exponents) == expected  # same order, same integers
        wrong = list(exponents)
        wrong[-1] += 1  # the last chunk does not open: the whole sum does not
        assert pooled.unmask(acc, wrong) is None
        assert alone.unmask(acc, wrong) is None
    # The encryption workers (12-bit windows) agree with the opener, whether they return
    # the exponents or share them themselves (chunk by chunk; any t holders open).
    with ParallelCrypto(key, 2, window=12) as pool:
        payload, xs = pool.encrypt(codec.encode(updates[0]))
        payload2, shared = pool.encrypt_and_share(codec.encode(updates[1]))
    one = Unmasker(key, 3)
    for data, blobs, u, holders in [
        (payload, share_exponents(key, xs), updates[0], (1, 2)),
        (payload2, shared, updates[1], (2, 3)),
    ]:
        assert len(blobs) == key.holders
        sums = {j: blobs[j - 1] for j in holders}
        plain = one.unmask(from_bytes(key.public, data), one.exponents(sums, 1))
        assert plain == codec.encode(u)


def test_obfuscator_pool_uses_each_precomputed_one_once():
    made = iter(range(1000))
    pool = ObfuscatorPool(lambda: next(made))
    assert pool.precompute(5) == 5
    assert pool.precompute(5, should_stop=lambda: True) == 0
    assert len(pool) == 5
    taken = [pool.next() for _ in range(7)]
    assert sorted(taken[:5]) == [0, 1, 2, 3, 4] and taken[5:] == [5, 6]  # then fresh ones
    assert len(pool) == 0


def test_packing_in_chunks_is_identical(monkeypatch):
    import fedray.crypto.codec as codec_module

    codec = PackedPaillierCodec(512, num_values=1000, max_summands=3)
    values = np.random.default_rng(1).uniform(-1.2, 1.2, 1000)
    monkeypatch.setattr(codec_module, "PACK_CHUNK", 10**9)  # one chunk
    whole = codec.encode(values)
    monkeypatch.setattr(codec_module, "PACK_CHUNK", 7)  # chunk edges everywhere
    assert codec.num_ciphertexts > 7
    assert codec.encode(values) == whole
    monkeypatch.setattr(codec_module, "PACK_CHUNK", 10**9)
    slots = codec.unpack(whole)
    monkeypatch.setattr(codec_module, "PACK_CHUNK", 7)
    assert np.array_equal(codec.unpack(whole), slots)
    assert np.allclose(codec.decode_sum(whole, 1), np.clip(values, -1, 1), atol=codec.step)


def test_server_opens_big_sums_over_its_cpus():
    import os

    from fedray.crypto.paillier import BIG_WINDOW, window_for
    from fedray.runtime.client import PARALLEL_MIN_CIPHERTEXTS
    from fedray.runtime.server import opening_processes
    from tests.conftest import compose

    big = PARALLEL_MIN_CIPHERTEXTS
    assert opening_processes(compose([]), big - 1) == 1  # small sum: in-process
    assert opening_processes(compose([]), big) == len(os.sched_getaffinity(0))
    assert opening_processes(compose(["crypto.processes=3"]), 10) == 3  # asked for
    # A 1M-value update is 9,805 ciphertexts: its sum opens with 12-bit windows.
    assert window_for(6_999) == 8 and window_for(7_000) == BIG_WINDOW == 12
    assert window_for(9_805) == BIG_WINDOW


def test_client_encryptor_with_a_pool_shares_in_the_workers(key):
    from fedray.crypto.secure_aggregation import ClientEncryptor, UpdateLayout

    codec = PackedPaillierCodec.for_key(key.public, num_values=500, max_summands=3)
    layout = UpdateLayout.for_key(key.public, codec)
    values = np.random.default_rng(2).uniform(-0.5, 0.5, 500)
    stats = {"values_clipped": 7, "weighted_train_loss": 1.5, "weighted_val_loss": 0.0}
    stats.update(val_weight=0.0, weighted_val_accuracy=0.0)
    with ParallelCrypto(key, 2) as pool:
        encryptor = ClientEncryptor(key, layout, pool=pool)
        assert encryptor.pool_size == 0  # nothing precomputed: the workers encrypt
        update, shares = encryptor.encrypt_sum([(values, 0.5, None, stats)])
    assert shares is not None and len(shares) == key.holders
    one = Unmasker(key, 3)
    plain = one.unmask(
        from_bytes(key.public, update.ciphertexts), one.exponents({1: shares[0], 3: shares[2]}, 1)
    )
    total, got = layout.decode_sum(plain, 1)
    assert np.max(np.abs(total - 0.5 * values)) <= codec.error_bound(1, 1.0) + 1e-12
    assert got["values_clipped"] == 7


def _offline_server(key, shares, layout, blobs, unmasker):
    """A :class:`Server` with what ``_decrypt`` needs, its key holders (1 and 2 of the
    ``threshold_key`` fixture) answering in-process: no Ray, no model."""
    from fedray.runtime.server import Server

    class OfflineServer(Server):
        def __init__(self):  # none of the real set-up
            self.key, self.layout, self.round, self._unmasker = key, layout, 1, unmasker

        def _ask_holders(self, method, update_ids, *args, need):
            from fedray.crypto.threshold import partial_decrypt

            if method == "share_sum":
                return {j: add_share_blobs(key, [b[j - 1] for b in blobs]) for j in (1, 2)}
            assert method == "partial_decrypt"
            cts = self._acc.ciphertexts()  # the holders' own product of the payloads
            return {j: partial_decrypt(shares[j - 1], cts) for j in (1, 2)}

        def _payload_refs(self, acc):
            self._acc = acc
            return []

    return OfflineServer()


def test_a_dead_opening_process_falls_back_and_later_sums_open_in_process(threshold_key):
    """A worker of the server's opening pool is killed (as the OOM killer would): the
    round's sum still opens, by partial decryptions, to the very plaintexts; the broken
    pool is dropped, and the next sum opens by share sums in-process."""
    import os
    import signal
    import time

    from fedray.crypto.secure_aggregation import ClientEncryptor, EncryptedSum, UpdateLayout

    key, shares = threshold_key
    codec = PackedPaillierCodec.for_key(key.public, num_values=600, max_summands=3)
    layout = UpdateLayout.for_key(key.public, codec)
    encryptor, acc, blobs = ClientEncryptor(key, layout), EncryptedSum(key.public, layout), []
    for i in range(3):
        values = np.random.default_rng(i).uniform(-0.5, 0.5, 600)
        update, update_shares = encryptor.encrypt_sum([(values, 1.0, None, {})])
        update.update_id = f"u{i}"
        acc.add(update, source=i)
        blobs.append(update_shares)
    one = Unmasker(key, 3)
    sums = {j: add_share_blobs(key, [b[j - 1] for b in blobs]) for j in (1, 2)}
    expected = one.unmask(acc.ciphertexts(), one.exponents(sums, 3))
    assert expected is not None and layout.fits(expected)

    pool = ParallelCrypto(key, 2, unmask_summands=3)
    server = _offline_server(key, shares, layout, blobs, Unmasker(key, 3, pool=pool))
    victim = next(iter(pool._pool._processes))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not pool._pool._broken and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server._decrypt(acc) == (expected, "partial_decryption")
    assert server._unmasker.pool is None  # dropped: later sums open in-process
    assert server._decrypt(acc) == (expected, "share_sums")
