"""Paillier throughput on one 2048-bit key: phe per value versus fedray's packed codec,
in threshold custody (the default: public-key encryption, t of h key holders open a sum)
and shared custody (every host holds the key).

    .venv/bin/python benchmarks/crypto.py                 # docs/benchmarks/encryption.md
    .venv/bin/python benchmarks/crypto.py --params 1000000 --clients 10 --holders 10
    .venv/bin/python benchmarks/crypto.py --params 4194304 --skip-table   # Llama-2-7B LoRA

Single-process rows are per core. The last block encrypts ``--params`` values per client
for ``--clients`` clients over a process pool, sums them, and opens the sum the default
way: each of t key holders adds its exponent shares, the server interpolates and strips
the obfuscators. Key holders run in parallel at their sites; the figure adds the slowest
holder's time to the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time

import gmpy2
import numpy as np
import psutil
from _report import figure
from phe import paillier

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.paillier import (
    Decryptor,
    KeyHolderEncryptor,
    PrivateKey,
    PublicKey,
    from_bytes,
    to_bytes,
    window_for,
)
from fedray.crypto.parallel import ParallelCrypto
from fedray.crypto.threshold import (
    PublicEncryptor,
    ThresholdPublicKey,
    Unmasker,
    add_share_blobs,
    combine_partial_decryptions,
    deal_threshold_key,
    partial_decrypt,
    share_exponents,
)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live children (the pool workers):
    on a loaded machine, CPU / processes estimates the wall time on idle cores."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += sum(child.cpu_times()[:2])
    return total


def timed(fn, clock=time.perf_counter):
    t = clock()
    out = fn()
    return out, clock() - t


def cpu_timed(fn):
    """``timed`` by this process's CPU time: the single-process rows are rates per core
    (values per CPU-second), which other work on a shared machine does not inflate."""
    return timed(fn, clock=time.process_time)


def _shared_rows(args, rng, rows):
    pub_phe, priv_phe = paillier.generate_paillier_keypair(n_length=args.key_bits)
    public = PublicKey(int(pub_phe.n))
    private = PrivateKey(public, int(priv_phe.p), int(priv_phe.q))
    floats = rng.uniform(-1, 1, args.phe_values).tolist()
    enc_phe, t = cpu_timed(lambda: [pub_phe.encrypt(x) for x in floats])
    rows.append(("phe encrypt (one value per ciphertext)", f"{len(floats) / t:,.0f}", "512"))
    _, t = cpu_timed(lambda: [priv_phe.decrypt(c) for c in enc_phe])
    rows.append(("phe decrypt", f"{len(floats) / t:,.0f}", ""))
    codec = PackedPaillierCodec.for_key(public, num_values=args.values, max_summands=args.clients)
    values = rng.uniform(-1, 1, args.values)
    bpv = public.ciphertext_bytes / codec.slots_per_ciphertext
    plaintexts, t_encode = cpu_timed(lambda: codec.encode(values))
    enc = KeyHolderEncryptor(private, "fixed_base")
    cts, t = cpu_timed(lambda: enc.encrypt_many(plaintexts))
    rate = args.values / (t + t_encode)
    rows.append(
        ("shared custody: encrypt with the private key (CRT)", f"{rate:,.0f}", f"{bpv:.2f}")
    )
    n2 = gmpy2.mpz(public.n) ** 2
    sums = [a * b % n2 for a, b in zip(cts, enc.encrypt_many(plaintexts), strict=True)]
    out, t = cpu_timed(lambda: codec.decode_sum(Decryptor(private).decrypt_many(sums), 2))
    rows.append(
        ("shared custody: decrypt + decode (private key, CRT)", f"{args.values / t:,.0f}", "")
    )
    assert np.max(np.abs(out / 2 - values)) <= codec.error_bound(2, 2.0) + 1e-12


def _threshold_rows(args, rng, rows, key: ThresholdPublicKey, shares, targets, table_setup):
    public = key.public
    codec = PackedPaillierCodec.for_key(public, num_values=args.values, max_summands=args.clients)
    values = rng.uniform(-1, 1, args.values)
    bpv = public.ciphertext_bytes / codec.slots_per_ciphertext
    plaintexts, t_encode = cpu_timed(lambda: codec.encode(values))
    enc = PublicEncryptor(key)
    (cts, xs), t = cpu_timed(lambda: enc.encrypt_many(plaintexts))
    rate = args.values / (t + t_encode)
    rows.append(
        (
            "threshold: encrypt with the public key, obfuscators made on the spot",
            f"{rate:,.0f}",
            f"{bpv:.2f}",
        )
    )
    _, t_pre = cpu_timed(lambda: enc.precompute(len(plaintexts)))
    rows.append(
        (
            f"threshold: precompute obfuscators (idle time; {key.exponent_bits}-bit hs^x)",
            f"{args.values / t_pre:,.0f}",
            "",
        )
    )
    (cts2, xs2), t = cpu_timed(lambda: enc.encrypt_many(plaintexts))
    online = args.values / (t + t_encode)
    rows.append(
        (
            "threshold: encrypt, obfuscators precomputed (online part)",
            f"{online:,.0f}",
            f"{bpv:.2f}",
        )
    )
    targets.append(
        f"public-key encryption, online part: {online:,.0f} values/s per core "
        f"(floor 200,000: {'met' if online >= 200_000 else 'MISSED'}); with the "
        f"obfuscators made on the spot {rate:,.0f}"
    )
    blobs, t = cpu_timed(lambda: share_exponents(key, xs))
    others = (key.holders - 1) * key.share_width() / codec.slots_per_ciphertext
    rows.append(
        (
            f"threshold: exponent shares for {key.holders} holders (+B/value to the others)",
            f"{args.values / t:,.0f}",
            f"+{others:.2f}",
        )
    )
    blobs2 = share_exponents(key, xs2)
    n2 = gmpy2.mpz(public.n) ** 2
    summed = [a * b % n2 for a, b in zip(cts, cts2, strict=True)]
    holders = list(range(1, key.threshold + 1))
    share_sums, t_holder = cpu_timed(
        lambda: {j: add_share_blobs(key, [blobs[j - 1], blobs2[j - 1]]) for j in holders}
    )
    unmasker = Unmasker(key, args.clients)
    _, t_table = cpu_timed(lambda: unmasker._table)  # once per key and run: set-up, not opening
    table_setup.append(t_table)

    def open_sum():
        return unmasker.unmask(summed, unmasker.exponents(share_sums, 2))

    plain, t_server = cpu_timed(open_sum)
    out = codec.decode_sum(plain, 2)
    assert np.max(np.abs(out / 2 - values)) <= codec.error_bound(2, 2.0) + 1e-12
    t_open = t_holder / len(holders) + t_server
    rows.append(
        (
            "threshold: open a sum of 2 (t holders' share sums + server)",
            f"{args.values / t_open:,.0f}",
            "",
        )
    )
    few = summed[: max(1, len(summed) // 20)]
    parts, t = cpu_timed(lambda: {j: partial_decrypt(shares[j - 1], few) for j in holders})
    combined, t_comb = cpu_timed(lambda: combine_partial_decryptions(key, parts))
    assert combined == plain[: len(few)]
    rate = len(few) * codec.slots_per_ciphertext / (t / len(holders) + t_comb)
    rows.append(("threshold: decrypt by partial decryptions (the fallback)", f"{rate:,.0f}", ""))


class PeakRSS:
    """Samples the RSS of this process plus its children (pool workers) every 0.1 s."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _client_memory(args, key, big, window) -> tuple[float, float]:
    """A client host's peak RSS above its plaintext state (the float update in memory),
    encrypting one update and sharing its exponents: (MiB with its pool, MiB of the pool
    alone at rest: the workers' tables)."""
    update = np.random.default_rng(1).uniform(-0.5, 0.5, args.params)
    base = PeakRSS.now()
    with ParallelCrypto(key, args.processes, window=window) as par:
        rest = PeakRSS.now() - base
        with PeakRSS() as peak:
            payload, blobs = par.encrypt_and_share(big.encode(update))
            del payload, blobs
    return (peak.peak - base) / 2**20, rest / 2**20


def _online(key, big, values, window) -> tuple[float, float, float, float]:
    """One client with obfuscators precomputed in idle time (in-process): seconds to
    precompute, to encode + encrypt online (wall, CPU), and to pack the ciphertexts."""
    enc = PublicEncryptor(key, window=window)
    _, t_pre = timed(lambda: enc.precompute(big.num_ciphertexts))
    t0, c0 = time.perf_counter(), time.process_time()
    cts, _ = enc.encrypt_many(big.encode(values))
    t_online, cpu_online = time.perf_counter() - t0, time.process_time() - c0
    _, t_bytes = timed(lambda: to_bytes(key.public, cts))
    return t_pre, t_online, cpu_online, t_bytes


def _big_update(args, rng, key: ThresholdPublicKey, targets: list[str], steps: list[str]) -> str:
    public = key.public
    big = PackedPaillierCodec.for_key(public, num_values=args.params, max_summands=args.clients)
    window = window_for(big.num_ciphertexts)
    n2 = gmpy2.mpz(public.n) ** 2
    blob_sets = []
    acc = None
    first = None
    mean = np.zeros(args.params)
    t_enc = t_sum = cpu_enc = 0.0
    client_mib, tables_mib = _client_memory(args, key, big, window)
    with ParallelCrypto(key, args.processes, window=window) as par:
        for i in range(args.clients):
            u = rng.uniform(-0.5, 0.5, args.params)  # one update at a time, as a host has
            first = u if i == 0 else first
            mean += u / args.clients
            c0 = cpu_seconds()
            # As a client host does: the workers encrypt and share the exponents.
            (payload, blobs), t = timed(lambda u=u: par.encrypt_and_share(big.encode(u)))
            t_enc += t
            cpu_enc += cpu_seconds() - c0
            blob_sets.append(blobs)
            t0 = time.perf_counter()
            cts = from_bytes(public, payload)
            acc = cts if acc is None else [a * c % n2 for a, c in zip(acc, cts, strict=True)]
            t_sum += time.perf_counter() - t0
            del payload, cts, blobs
    t_pre, t_online, cpu_online, t_bytes = _online(key, big, first, window)
    holder_times = []
    share_sums = {}
    for j in range(1, key.threshold + 1):
        share_sums[j], t = timed(lambda j=j: add_share_blobs(key, [b[j - 1] for b in blob_sets]))
        holder_times.append(t)
    opener_base = PeakRSS.now()
    with PeakRSS() as opener_peak:
        c0 = cpu_seconds()
        opener, t_setup = timed(
            lambda: ParallelCrypto(key, args.processes, unmask_summands=args.clients, window=window)
        )
        cpu_setup = cpu_seconds() - c0  # the workers' tables: once per run, not per round
        tables_server = (PeakRSS.now() - opener_base) / 2**20
        with opener:
            unmasker = Unmasker(key, args.clients, window=window, pool=opener)
            # The opening, step by step (wall, and CPU of the server and its workers).
            c0 = cpu_seconds()
            exponents, t_interp = timed(lambda: unmasker.exponents(share_sums, args.clients))
            c1, p1 = cpu_seconds(), time.process_time()
            plain, t_unmask = timed(lambda: unmasker.unmask(acc, exponents))
            c2, p2 = cpu_seconds(), time.process_time()
            total, t_decode = timed(lambda: big.decode_sum(plain, args.clients))
            c3 = cpu_seconds()
        t_server = t_interp + t_unmask + t_decode
        cpu_server = c3 - c0
        steps.append(
            f"server's opening, step by step (wall s / CPU s of the server and its "
            f"workers): interpolate X {t_interp:.2f} / {c1 - c0:.2f}; strip hs^X over the "
            f"pool {t_unmask:.2f} / {c2 - c1:.2f} (of which the server process "
            f"{p2 - p1:.2f}: chunks to bytes and back); decode {t_decode:.2f} / "
            f"{c3 - c2:.2f}; the pool's {window}-bit tables, built once per run at "
            f"set-up: {t_setup:.2f}s wall, {cpu_setup:.2f} CPU-s, +{tables_server:.0f} MiB"
        )
    err = np.max(np.abs(total / args.clients - mean))
    ct_bytes = big.num_ciphertexts * public.ciphertext_bytes
    share_bytes = (key.holders - 1) * big.num_ciphertexts * key.share_width()
    server_mib = (opener_peak.peak - opener_base) / 2**20
    t_open = max(holder_times) + t_server
    figure(f"open a sum of {args.clients} {args.params:,}-value updates", t_open, "s wall")
    # On a shared machine the wall time counts other work; the CPU spread over the
    # server's processes is what idle cores would take.
    t_idle = max(holder_times) + cpu_server / args.processes
    verdict = ""
    if args.params == 1_000_000 and args.processes == 2:
        verdict = f" (target 1.5 s: {'met' if min(t_open, t_idle) <= 1.5 else 'MISSED'})"
    targets.append(
        f"open a sum of {args.clients} {args.params:,}-value updates on {args.processes} "
        f"processes: {t_open:.2f}s wall, CPU {cpu_server:.2f}s (server and its workers) "
        f"+ slowest holder {max(holder_times):.2f}s = {t_idle:.2f}s from the CPU time "
        f"on idle cores"
        f"{verdict}; encrypt one with obfuscators precomputed: online {t_online:.2f}s "
        f"(CPU {cpu_online:.2f}s) in one process, after {t_pre:.1f}s of precomputation in "
        f"idle time; obfuscators made on the spot, encrypt and share {t_enc / args.clients:.2f}s wall, "
        f"{cpu_enc / args.clients / args.processes:.2f}s from the CPU time on idle cores"
    )
    return (
        f"{args.params:,}-parameter update, {args.clients} clients, {key.holders} key holders "
        f"(any {key.threshold} decrypt), {args.processes} processes per client and server, "
        f"{window}-bit fixed-base windows: encrypt and share the exponents "
        f"{t_enc / args.clients:.2f}s (CPU {cpu_enc / args.clients:.2f}s) per client (with obfuscators precomputed in "
        f"idle time, {t_pre:.1f}s in one process: online encode + encrypt "
        f"{t_online:.2f}s (CPU {cpu_online:.2f}s) + to bytes {t_bytes:.2f}s); homomorphic sum of "
        f"{args.clients} {t_sum:.2f}s; open the sum {t_open:.2f}s "
        f"(slowest holder {max(holder_times):.2f}s + server {t_server:.2f}s, CPU {cpu_server:.2f}s); per client "
        f"{ct_bytes / args.params:.2f} B/value of ciphertexts to the server + "
        f"{share_bytes / args.params:.2f} B/value of shares to the other holders "
        f"= {(ct_bytes + share_bytes) / args.params:.2f} B/value; max error {err:.2e} "
        f"(bound {big.error_bound(args.clients, args.clients):.2e}); peak RSS above the "
        f"plaintext state (RSS of the process and its pool workers): a client host "
        f"+{client_mib:.0f} MiB encrypting and sharing one update (of which its pool's tables "
        f"{tables_mib:.0f} MiB), the server +{server_mib:.0f} MiB opening the sum"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--clients", type=int, default=10, help="summands per ciphertext slot")
    ap.add_argument("--holders", type=int, default=10, help="key holders (sites)")
    ap.add_argument("--threshold", type=int, default=None, help="t; default a majority")
    ap.add_argument("--values", type=int, default=20_000, help="values for per-core rows")
    ap.add_argument("--phe-values", type=int, default=200)
    ap.add_argument("--params", type=int, default=1_000_000, help="size of the big update")
    ap.add_argument("--processes", type=int, default=os.cpu_count())
    ap.add_argument("--skip-table", action="store_true", help="only the big-update line")
    args = ap.parse_args()
    t = args.threshold or args.holders // 2 + 1
    rng = np.random.default_rng(0)
    key, shares = deal_threshold_key(args.key_bits, args.holders, t)
    targets: list[str] = []
    load = "load average {:.2f} {:.2f} {:.2f} (1, 5, 15 min) on {} cores".format
    print(f"at the start: {load(*os.getloadavg(), os.cpu_count())}\n")
    if not args.skip_table:
        rows: list[tuple[str, str, str]] = []
        table_setup: list[float] = []
        _shared_rows(args, rng, rows)
        _threshold_rows(args, rng, rows, key, shares, targets, table_setup)
        codec = PackedPaillierCodec.for_key(key.public, num_values=10, max_summands=args.clients)
        print(
            f"key {key.public.key_bits} bits, {codec.slots_per_ciphertext} values per "
            f"ciphertext (quant_bits={codec.quant_bits}, up to {args.clients} summands), "
            f"{key.public.ciphertext_bytes} bytes per ciphertext, threshold {t} of "
            f"{args.holders} holders, {key.exponent_bits}-bit secret exponents (DJN: "
            f"ceil(k/2)), {key.share_width()}-byte exponent shares, 1 process; the server's "
            f"fixed-base table, built once per key, took {table_setup[0]:.2f}s (not in the "
            f"opening rate); rates per core are values per CPU-second of this process\n"
        )
        print(f"| {'operation':<72} | {'values/s per core':>17} | {'bytes/value':>11} |")
        print(f"|{'-' * 74}|{'-' * 19}:|{'-' * 12}:|")
        for name, rate, b in rows:
            print(f"| {name:<72} | {rate:>17} | {b:>11} |")
            with contextlib.suppress(ValueError):
                figure(name.strip(), float(rate.replace(",", "")), "values/s per core", "higher")
            with contextlib.suppress(ValueError):
                figure(f"{name.strip()}: bytes", float(b.replace(",", "")), "bytes per value")
        figure("values per ciphertext", codec.slots_per_ciphertext, "values", better="higher")
        print()
    steps: list[str] = []
    print(_big_update(args, rng, key, targets, steps))
    print()
    for line in steps:
        print(f"- {line}")
    for line in targets:
        print(f"- {line}")
    print(f"- at the end: {load(*os.getloadavg(), os.cpu_count())}")


if __name__ == "__main__":
    main()
