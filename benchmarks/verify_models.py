"""What the hosts' model checks cost (issue #24): per key holder and round, the bytes it
fetches and the CPU seconds of attesting an opened sum; per host and round, the CPU
seconds of recomputing the model from it.

    .venv/bin/python benchmarks/verify_models.py                       # the default job
    .venv/bin/python benchmarks/verify_models.py --values 1000000 --uploads 10

A key holder attests by multiplying the round's deposited updates itself (one modular
product per ciphertext per upload) and checking the claimed opening of all ciphertexts at
once (one multi-exponentiation with random 64-bit weights and one power of hs,
``fedray.crypto.threshold.opens_product``), then signing. Real classes (KeyHolder, Lineage), a
real threshold key, no Ray: the cost of the check itself, not of moving the bytes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.secure_aggregation import ClientEncryptor, UpdateLayout
from fedray.crypto.threshold import Unmasker, deal_threshold_key, ints_to_bytes
from fedray.runtime.keys import (
    Contribution,
    HostIdentity,
    KeyHolder,
    cohort_message,
    digest,
    round_ticket_message,
)
from fedray.runtime.lineage import Lineage, Release, model_digest, plaintext_width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--values", type=int, default=4_226, help="values per update (4,226: the default job's MLP)"
    )
    parser.add_argument(
        "--uploads", type=int, default=2, help="updates in the sum (2: the default job's host sums)"
    )
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    uploads, values = args.uploads, args.values

    t0 = time.perf_counter()
    key, shares = deal_threshold_key(args.key_bits, holders=3, threshold=2)
    print(f"key: {args.key_bits}-bit threshold, 2 of 3 holders ({time.perf_counter() - t0:.1f} s)")
    codec = PackedPaillierCodec.for_key(key.public, num_values=values, max_summands=uploads)
    layout = UpdateLayout.for_key(key.public, codec)
    sites = [HostIdentity() for _ in range(uploads)]
    authority = HostIdentity()
    holders = []
    for j in (1, 2):
        h = KeyHolder(
            j,
            {i: s.public_bytes() for i, s in enumerate(sites)},
            {i: i for i in range(uploads)},
            min_clients=2,
            authority=authority.public_bytes(),
            max_rounds=1,
        )
        h.install(key, shares[j - 1])
        h.open_round(1, authority.sign_bytes(round_ticket_message(key.fingerprint, 1)))
        holders.append(h)

    pool = None
    if args.processes > 1 and layout.num_ciphertexts >= 1000:
        from fedray.crypto.parallel import ParallelCrypto

        pool = ParallelCrypto(key, args.processes)
    weights = np.zeros(values, dtype=np.float32)
    rng = np.random.default_rng(0)
    payloads, ids = [], []
    t0 = time.perf_counter()
    for i, site in enumerate(sites):
        enc = ClientEncryptor(key, layout, pool=pool)
        update, blobs = enc.encrypt_sum([(rng.uniform(-0.01, 0.01, values), 1.0, None, {})])
        c = Contribution(
            key.fingerprint,
            1,
            f"h{i}-u{i}",
            i,
            (i,),
            digest(update.ciphertexts),
            tuple(digest(b) for b in blobs),
            model_sha256=model_digest(weights),
        )
        for h in holders:
            h.deposit(site.sign(c), blobs[h.index - 1])
        payloads.append(update.ciphertexts)
        ids.append(f"h{i}-u{i}")
    print(
        f"{uploads} uploads of {values:,} values: {layout.num_ciphertexts:,} ciphertexts each "
        f"({time.perf_counter() - t0:.1f} s to encrypt)"
    )
    if pool is not None:
        pool.close()
    message = cohort_message(key.fingerprint, 1, ids)
    approvals = {i: s.sign_bytes(message) for i, s in enumerate(sites)}
    sums = {h.index: h.share_sum(1, ids, approvals) for h in holders}
    unmasker = Unmasker(key, uploads)
    exponents = unmasker.exponents(sums, uploads)
    product = holders[0]._product(1, [holders[0]._deposits[u] for u in ids], payloads, 0, None)
    plaintexts = unmasker.unmask(product, exponents)
    opened = ints_to_bytes(plaintexts, plaintext_width(key.public.n))

    attestations, first, steady = {}, [], []
    for h in holders:
        for times in (first, steady):  # twice: the same sum may be attested again
            c0 = time.process_time()
            attestations[h.index] = h.attest(1, ids, approvals, payloads, opened, exponents)
            times.append(time.process_time() - c0)
    fetched = sum(len(p) for p in payloads) + len(opened)
    cpu = max(steady)
    print(
        f"key holder, per round: fetches {fetched / 1e6:.2f} MB ({uploads} uploads "
        f"+ the opened sum), attests in {cpu:.2f} s CPU ({max(first):.2f} s the first "
        f"time); {cpu / uploads / max(values, 1) * 1e6:.2f} s per 1M values per upload "
        "(at small sizes the batch check's fixed cost, a few ms, dominates this ratio)"
    )
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min)")

    from hydra import compose, initialize_config_dir

    from fedray.config import register_configs, to_config

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = to_config(compose("config", overrides=["crypto=paillier"]))
    lineage = Lineage(cfg, key, layout, {h.index: h.attestation_key() for h in holders}, weights)
    release = Release(1, model_digest(weights), uploads, opened, attestations)
    c0 = time.process_time()
    lineage.advance(release)
    host_cpu = time.process_time() - c0
    print(
        f"client host, per round: receives {len(opened) / 1e6:.3f} MB (the opened sum), "
        f"recomputes the model in {host_cpu:.3f} s CPU"
    )


if __name__ == "__main__":
    main()
