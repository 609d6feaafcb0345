"""Paillier throughput on one 2048-bit key: phe per value versus fedray's packed codec.

    .venv/bin/python benchmarks/crypto.py                 # the README table
    .venv/bin/python benchmarks/crypto.py --params 1000000 --clients 10

Single-process rows are per core. The last block encrypts, sums over ``--clients`` and
decrypts one ``--params``-value update with a process pool over all cores.
"""

from __future__ import annotations

import argparse
import os
import time

import gmpy2
import numpy as np
from phe import paillier

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.paillier import (
    Decryptor,
    KeyHolderEncryptor,
    KnownObfuscatorDecryptor,
    PrivateKey,
    PublicKey,
    from_bytes,
    obfuscators_from_bytes,
    to_bytes,
)
from fedray.crypto.parallel import ParallelCrypto


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--clients", type=int, default=10, help="summands per ciphertext slot")
    ap.add_argument("--values", type=int, default=20_000, help="values for per-core rows")
    ap.add_argument("--phe-values", type=int, default=200)
    ap.add_argument("--params", type=int, default=1_000_000, help="size of the big update")
    ap.add_argument("--processes", type=int, default=os.cpu_count())
    args = ap.parse_args()

    pub_phe, priv_phe = paillier.generate_paillier_keypair(n_length=args.key_bits)
    public = PublicKey(int(pub_phe.n))
    private = PrivateKey(public, int(priv_phe.p), int(priv_phe.q))
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, str]] = []

    # phe: one EncryptedNumber per float.
    floats = rng.uniform(-1, 1, args.phe_values).tolist()
    enc_phe, t = timed(lambda: [pub_phe.encrypt(x) for x in floats])
    rows.append(("phe encrypt (one value per ciphertext)", f"{len(floats) / t:,.0f}", "512"))
    _, t = timed(lambda: [priv_phe.decrypt(c) for c in enc_phe])
    rows.append(("phe decrypt", f"{len(floats) / t:,.0f}", ""))

    codec = PackedPaillierCodec.for_key(public, num_values=args.values, max_summands=args.clients)
    values = rng.uniform(-1, 1, args.values)
    bpv = public.ciphertext_bytes / codec.slots_per_ciphertext
    plaintexts, t_encode = timed(lambda: codec.encode(values))
    for obfuscator in ("standard", "fixed_base"):
        enc = KeyHolderEncryptor(private, obfuscator)
        n = len(plaintexts) if obfuscator == "fixed_base" else max(1, len(plaintexts) // 10)
        cts, t = timed(lambda enc=enc, n=n: enc.encrypt_many(plaintexts[:n]))
        rate = n * codec.slots_per_ciphertext / (t + t_encode * n / len(plaintexts))
        rows.append((f"fedray packed encrypt, {obfuscator} (CRT)", f"{rate:,.0f}", f"{bpv:.2f}"))
    enc = KeyHolderEncryptor(private, "fixed_base")
    _, t_pre = timed(lambda: enc.precompute(len(plaintexts)))
    cts, t = timed(lambda: enc.encrypt_many(plaintexts))
    rows.append(
        (
            "fedray packed encrypt, precomputed obfuscators (online part)",
            f"{args.values / (t + t_encode):,.0f}",
            f"{bpv:.2f}",
        )
    )
    n2 = gmpy2.mpz(public.n) ** 2
    other = KeyHolderEncryptor(private).encrypt_many(plaintexts)
    _, t = timed(lambda: [a * b % n2 for a, b in zip(cts, other, strict=True)])
    rows.append(("fedray homomorphic sum (per added update)", f"{args.values / t:,.0f}", ""))
    dec = Decryptor(private)
    sums = [a * b % n2 for a, b in zip(cts, other, strict=True)]
    out, t = timed(lambda: codec.decode_sum(dec.decrypt_many(sums), 2))
    rows.append(("fedray decrypt + decode (private key, CRT)", f"{args.values / t:,.0f}", ""))
    assert np.max(np.abs(out / 2 - values)) <= codec.error_bound(2, 2.0) + 1e-12
    # The key holder's fast path: the sum of k updates whose obfuscators it was given.
    fast = KnownObfuscatorDecryptor(private)
    enc = KeyHolderEncryptor(private, "fixed_base")
    sealed = [enc.encrypt_keeping_obfuscators(plaintexts) for _ in range(args.clients)]
    for k in sorted({2, args.clients}):
        partial = [gmpy2.mpz(1)] * len(plaintexts)
        for c, _ in sealed[:k]:
            partial = [a * b % n2 for a, b in zip(partial, c, strict=True)]
        out, t = timed(
            lambda k=k, partial=partial: codec.decode_sum(
                fast.decrypt_sum(partial, [o for _, o in sealed[:k]]), k
            )
        )
        assert np.max(np.abs(out / k - values)) <= codec.error_bound(k, k) + 1e-12
        rows.append(
            (
                f"fedray decrypt + decode, key holder (obfuscators of {k} updates)",
                f"{args.values / t:,.0f}",
                "",
            )
        )

    print(
        f"key {public.key_bits} bits, {codec.slots_per_ciphertext} values per ciphertext "
        f"(quant_bits={codec.quant_bits}, up to {args.clients} summands), "
        f"{public.ciphertext_bytes} bytes per ciphertext, 1 process\n"
    )
    print(f"| {'operation':<64} | {'values/s per core':>17} | {'bytes/value':>11} |")
    print(f"|{'-' * 66}|{'-' * 19}:|{'-' * 12}:|")
    for name, rate, b in rows:
        print(f"| {name:<64} | {rate:>17} | {b:>11} |")

    # One big update over all cores.
    big = PackedPaillierCodec.for_key(public, num_values=args.params, max_summands=args.clients)
    updates = [rng.uniform(-0.5, 0.5, args.params) for _ in range(args.clients)]
    obfuscator_sets = []
    with ParallelCrypto(private, args.processes) as par:
        t_enc = 0.0
        acc = None
        t_sum = 0.0
        for u in updates:
            (payload, obfs), t = timed(lambda u=u: par.encrypt_keeping_obfuscators(big.encode(u)))
            t_enc += t
            obfuscator_sets.append(obfuscators_from_bytes(public, obfs))
            cts = from_bytes(public, payload)
            t0 = time.perf_counter()
            acc = cts if acc is None else [a * c % n2 for a, c in zip(acc, cts, strict=True)]
            t_sum += time.perf_counter() - t0
        total, t_dec = timed(
            lambda: big.decode_sum(par.decrypt(to_bytes(public, acc)), args.clients)
        )
    fast_total, t_fast = timed(
        lambda: big.decode_sum(fast.decrypt_sum(acc, obfuscator_sets), args.clients)
    )
    assert np.array_equal(fast_total, total)
    err = np.max(np.abs(total / args.clients - np.mean(updates, axis=0)))
    print(
        f"\n{args.params:,}-parameter update, {args.clients} clients, {args.processes} processes: "
        f"encrypt {t_enc / args.clients:.2f}s per client, homomorphic sum of "
        f"{args.clients} {t_sum:.2f}s, decrypt+decode {t_dec:.2f}s with the private key "
        f"({args.processes} processes) or {t_fast:.2f}s by the key holder with the deposited "
        f"obfuscators (1 process); "
        f"{big.num_ciphertexts:,} ciphertexts, {big.num_ciphertexts * public.ciphertext_bytes / 2**20:.1f} MiB "
        f"per client on the wire (and as much again of obfuscators to the key holder); "
        f"max error {err:.2e} (bound {big.error_bound(args.clients, args.clients):.2e})"
    )


if __name__ == "__main__":
    main()
