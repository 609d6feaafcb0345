"""Hand-written mutants of the runtime paths: apply one, run the tests that guard it, revert.

Each mutant is a one-line change to a real code path (string replace on the file). The
named test files are run with pytest; a mutant is *killed* when they fail, *survived* when
they pass. The file is restored in a ``finally`` block, whatever happens. Not part of
``make test``: run it with ``make mutants`` (or ``python tests/mutants/run_hand_mutants.py
[NAME ...]`` for some of them). It takes long (each mutant runs real Ray jobs).

The exit status is 1 if any mutant survived (or could not be applied), else 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str
    select: str = ""  # pytest -k expression: the tests of those files that guard it


MUTANTS = [
    Mutant(
        "client-noise-off",
        "fedray/privacy/dp.py",
        "    return clipped, np.rint(noise).astype(np.int64)",
        "    return clipped, None",
        ("tests/test_privacy.py",),
        "privatize_update returns no noise share (distributed client-level DP off)",
        "noise",
    ),
    Mutant(
        "client-noise-off-in-job",
        "fedray/privacy/dp.py",
        "    return clipped, np.rint(noise).astype(np.int64)",
        "    return clipped, None",
        ("tests/test_dp_noise_in_jobs.py",),
        "the same change, caught in a real job's released model",
        "distributed",
    ),
    Mutant(
        "client-noise-halved",
        "fedray/privacy/dp.py",
        "noise = gaussian(clipped.shape, plan.noise_std / plan.quant_step,",
        "noise = gaussian(clipped.shape, plan.noise_std / 2 / plan.quant_step,",
        ("tests/test_dp_noise_in_jobs.py",),
        "each client's noise share has half its standard deviation",
        "distributed",
    ),
    Mutant(
        "central-noise-off",
        "fedray/privacy/dp.py",
        "        return total + gaussian(total.shape, std, rng, secure=not self.reproducible_noise)",
        "        return total",
        ("tests/test_dp_noise_in_jobs.py",),
        "the server adds no central noise to the plaintext sum (crypto=none)",
        "central",
    ),
    Mutant(
        "central-noise-halved",
        "fedray/privacy/dp.py",
        "        return total + gaussian(total.shape, std, rng, secure=not self.reproducible_noise)",
        "        return total + gaussian(total.shape, std / 2, rng, secure=not self.reproducible_noise)",
        ("tests/test_dp_noise_in_jobs.py",),
        "the server's central noise has half its standard deviation",
        "central",
    ),
    Mutant(
        "opacus-no-noise",
        "fedray/tasks/tabular.py",
        "noise_multiplier=plan.noise_multiplier,",
        "noise_multiplier=0.0,",
        ("tests/test_dp_noise_in_jobs.py",),
        "Opacus DP-SGD given noise_multiplier=0 inside the client",
        "opacus",
    ),
    Mutant(
        "opacus-noise-halved",
        "fedray/tasks/tabular.py",
        "noise_multiplier=plan.noise_multiplier,",
        "noise_multiplier=plan.noise_multiplier / 2,",
        ("tests/test_dp_noise_in_jobs.py",),
        "Opacus DP-SGD given half the noise multiplier inside the client",
        "opacus",
    ),
    Mutant(
        "plaintext-beside-ciphertext",
        "fedray/runtime/client.py",
        "            carrier.encrypted = update\n",
        "            carrier.encrypted = update\n"
        "            carrier.delta = self._to_seal[carrier.client_id][0]\n",
        ("tests/test_server_view.py",),
        "ClientHost._seal sends the plaintext delta beside the ciphertext",
        "threshold-host-sums or shared",
    ),
    Mutant(
        "server-steals-a-share",
        "fedray/runtime/server.py",
        "        self.key_holders = list(key_holders or [])\n",
        "        self.key_holders = list(key_holders or [])\n"
        "        self._loot = [__import__('ray').get(h.__ray_call__.remote(lambda s: s._secret)) "
        "for h in self.key_holders]\n",
        ("tests/test_custody.py",),
        "Server.set_up fetches the holders' DecryptionShares through their handles",
        "no_process_but_the_holders",
    ),
    Mutant(
        "holders-min-clients-2",
        "fedray/runtime/custody.py",
        "            min_clients(cfg),\n",
        "            2,\n",
        ("tests/test_custody.py",),
        "set_up_keys wires the key holders with min_clients=2, not the job's minimum",
        "holders_refuse",
    ),
    Mutant(
        "holders-min-clients-1",
        "fedray/runtime/custody.py",
        "            min_clients(cfg),\n",
        "            1,\n",
        ("tests/test_custody.py",),
        "set_up_keys wires the key holders with min_clients=1 (they would open one update)",
        "holders_refuse",
    ),
    Mutant(
        "resume-skips-optimizer",
        "fedray/runtime/server.py",
        '        self.strategy.load_state_dict(state["strategy"])',
        "        pass",
        ("tests/test_resume.py",),
        "Server.load_state_dict drops the server optimizer's state",
        "bit_identical",
    ),
    Mutant(
        "resume-skips-accountant",
        "fedray/runtime/server.py",
        '            self.privacy.load_state_dict(state["privacy"])',
        "            pass",
        ("tests/test_resume.py",),
        "Server.load_state_dict drops the privacy accountant's state (equivalent on the resume "
        "path: the driver then loads the newer privacy ledger; see docs/testing.md)",
        "bit_identical",
    ),
    Mutant(
        "accountant-loads-nothing",
        "fedray/privacy/dp.py",
        '        self.steps = int(state["steps"])\n'
        '        self.participation = {int(k): int(v) for k, v in state.get("participation", '
        "{}).items()}",
        "        pass",
        ("tests/test_resume.py",),
        "the client-level accountant restores nothing on resume (checkpoint or ledger)",
        "bit_identical",
    ),
    Mutant(
        "deposit-unsigned",
        "fedray/runtime/keys.py",
        "        if host is None or not verify(host, signed.signature, c.message()):",
        "        if host is None:",
        ("tests/test_custody.py",),
        "KeyHolder.deposit accepts a contribution without checking its signature",
        "forged or every_method",
    ),
    Mutant(
        "second-sum-released",
        "fedray/runtime/keys.py",
        "        if round_num in self._released and self._released[round_num] != ids:",
        "        if False:",
        ("tests/test_custody.py",),
        "KeyHolder opens a second, different sum in a round it already released one",
        "one_sum_per_round or holders_refuse",
    ),
    Mutant(
        "too-few-clients-still-applied",
        "fedray/runtime/server.py",
        "        if len(results) < min_clients(self.cfg):\n",
        "        if False:\n",
        ("tests/test_aggregation_e2e.py",),
        "a round with too few clients still updates the model (then is retried)",
        "too_few",
    ),
    Mutant(
        "fedavg-unweighted",
        "fedray/runtime/client.py",
        "        else:\n            result.weight = min(1.0, n / self.weight_ref)",
        "        else:\n            result.weight = 1.0",
        ("tests/test_aggregation_e2e.py",),
        "clients send weight 1 instead of their example count over the largest client's",
        "fedavg and plain",
    ),
    Mutant(
        "dp-statistics-released",
        "fedray/runtime/round_stats.py",
        "    if metrics_released(cfg):\n        return STATS_FIELDS",
        "    if True:\n        return STATS_FIELDS",
        ("tests/test_privacy_runs.py",),
        "under client-level DP the hosts send their losses and validation figures too",
        "same_seed",
    ),
    Mutant(
        "mean-over-count",
        "fedray/runtime/server.py",
        '                delta = total / stats["weight"]',
        "                delta = total / acc.count",
        ("tests/test_runtime.py", "tests/test_aggregation_e2e.py"),
        "the server divides the weighted sum by the number of updates, not the total weight",
        "fedavg_matches or fedavg_releases",
    ),
    # -- issue #22: the hosts' approval rule, fail-closed restarts, the server's view --------
    Mutant(
        "holder-skips-host-approvals",
        "fedray/runtime/keys.py",
        "            if not isinstance(signature, bytes) or not verify(d.identity, signature, message):",
        "            if False:",
        ("tests/test_collusion.py",),
        "a key holder opens a sum without every host's approval of exactly that list",
    ),
    Mutant(
        "host-approves-any-list",
        "fedray/runtime/keys.py",
        "        if self._last is not None and self._last[0] == round_num:",
        "        if False:",
        ("tests/test_collusion.py", "tests/test_custody.py"),
        "a host signs every list it is shown (the 2t-h coalition opens two sums of a round)",
        "coalition or approves_one_list",
    ),
    Mutant(
        "approval-from-the-hosts-current-identity",
        "fedray/runtime/keys.py",
        "not verify(d.identity, signature, message)",
        "not verify(self._peers[d.host], signature, message)",
        ("tests/test_collusion.py",),
        "a restarted host's new identity approves updates its dead predecessor deposited",
        "identity_that_signed",
    ),
    Mutant(
        "restarted-host-deposits-in-the-round-in-flight",
        "fedray/runtime/keys.py",
        "        if int(c.round) < self._from_round[c.host]:",
        "        if False:",
        ("tests/test_collusion.py",),
        "a re-registered host deposits in the round its predecessor may have approved",
        "identity_that_signed",
    ),
    Mutant(
        "model-digest-as-float32",
        "fedray/runtime/client.py",
        "    arr = np.ascontiguousarray(weights)",
        "    arr = np.ascontiguousarray(weights, dtype=np.float32)",
        ("tests/test_collusion.py",),
        "hosts hash the weights they received as float32, not their exact bytes",
        "exact_bytes",
    ),
    Mutant(
        "model-digest-constant",
        "fedray/runtime/client.py",
        "    h.update(arr.tobytes())",
        "    h.update(b'')",
        ("tests/test_collusion.py",),
        "hosts sign a digest that does not depend on the weights they received",
        "different_models",
    ),
    Mutant(
        "restarted-host-trains-unconfigured",
        "fedray/runtime/client.py",
        "        if self._identity is not None and self._encryptor is None:\n            raise PermissionError(\n                \"this host's crypto is not configured (restarted)",
        "        if False:\n            raise PermissionError(\n                \"this host's crypto is not configured (restarted)",
        ("tests/test_restarts.py",),
        "a host Ray restarted trains before its crypto is configured (plaintext to the server)",
        "paillier and not dp",
    ),
    Mutant(
        "restarted-host-keeps-weight-ref-1",
        "fedray/runtime/client.py",
        "        self._awaiting_weight_ref = bool(restarted)",
        "        self._awaiting_weight_ref = False",
        ("tests/test_restarts.py",),
        "a host Ray restarted trains with weight_ref 1.0 until (and unless) the driver resets it",
        "plaintext",
    ),
    Mutant(
        "dp-plan-without-codec",
        "fedray/runtime/client.py",
        "            codec = self.codec if self._encryptor is not None else None",
        "            codec = None",
        ("tests/test_restarts.py",),
        "a host's DP plan is built without the codec's grid (no noise in encrypted updates)",
        "paillier_dp",
    ),
    Mutant(
        "server-view-count-in-result-field",
        "fedray/runtime/client.py",
        "            r.weight, r.train_seconds, r.stats = 0.0, 0.0, None\n",
        "            r.weight, r.train_seconds, r.stats = 0.0, 0.0, None\n            r.bytes_to_key_holders = len(self.data[r.client_id][0])\n",
        ("tests/test_server_view.py",),
        "each sealed result carries its client's example count in bytes_to_key_holders",
        "everything_the_server_receives and host-sums",
    ),
    Mutant(
        "server-view-count-new-field",
        "fedray/runtime/client.py",
        "            r.weight, r.train_seconds, r.stats = 0.0, 0.0, None\n",
        "            r.weight, r.train_seconds, r.stats = 0.0, 0.0, None\n            r.num_examples = len(self.data[r.client_id][0])\n",
        ("tests/test_server_view.py",),
        "each sealed result gains a new attribute carrying its client's example count",
        "everything_the_server_receives and host-sums",
    ),
    Mutant(
        "server-view-count-in-bytes-up",
        "fedray/runtime/client.py",
        "            carrier.bytes_up = update.nbytes",
        "            carrier.bytes_up = update.nbytes + len(self.data[carrier.client_id][0])",
        ("tests/test_server_view.py",),
        "the carrier's bytes_up smuggles its client's example count",
        "everything_the_server_receives and host-sums",
    ),
    Mutant(
        "server-view-count-on-update",
        "fedray/runtime/client.py",
        "            update.client_ids = tuple(r.client_id for r in group)\n",
        "            update.client_ids = tuple(r.client_id for r in group)\n            update.num_examples = sum(len(self.data[r.client_id][0]) for r in group)\n",
        ("tests/test_server_view.py",),
        "the EncryptedUpdate gains a field with its clients' example count",
        "everything_the_server_receives and host-sums",
    ),
    Mutant(
        "too-few-clients-applied-in-faults",
        "fedray/runtime/server.py",
        "        if len(results) < min_clients(self.cfg):\n",
        "        if False:\n",
        ("tests/test_faults.py",),
        "an attempt with too few clients (a host died) still releases its partial sum",
        "too_few_clients_is_retried or out_of_retries",
    ),
    Mutant(
        "holder-double-count",
        "fedray/runtime/keys.py",
        "        if len(set(clients)) != len(clients):\n",
        "        if False:\n",
        ("tests/test_custody.py",),
        "a key holder opens a sum in which one client is covered by two different signed updates",
        "double_counts",
    ),
    # -- issue #22: DJN exponent length and the base's Jacobi symbol ---------------------
    Mutant(
        "djn-base-jacobi-minus-one",
        "fedray/crypto/threshold.py",
        "    h = (-y * y) % n if gmpy2.jacobi(n - 1, n) == 1 else y * y % n",
        "    h = (-y * y) % n",
        ("tests/test_threshold.py",),
        "the old base -y^2 on every key: its Jacobi symbol gives away each exponent's parity",
        "jacobi or obfuscator_base",
    ),
    Mutant(
        "djn-leaking-base-accepted",
        "fedray/crypto/threshold.py",
        "        if gmpy2.jacobi(gmpy2.mpz(self.hs) % n, n) != 1:",
        "        if False:",
        ("tests/test_threshold.py",),
        "a key whose base has Jacobi symbol -1 is accepted",
        "refused",
    ),
    Mutant(
        "djn-exponent-448",
        "fedray/crypto/threshold.py",
        "    return (int(n).bit_length() + 1) // 2",
        "    return 448",
        ("tests/test_threshold.py", "tests/test_crypto.py"),
        "secret exponents back to 448 bits",
        "ceil_k or 2048_bit_fast_path",
    ),
    Mutant(
        "djn-exponent-floor",
        "fedray/crypto/threshold.py",
        "    return (int(n).bit_length() + 1) // 2",
        "    return int(n).bit_length() // 2",
        ("tests/test_threshold.py",),
        "floor(k/2) instead of ceil(k/2) on odd-length moduli",
        "ceil_k",
    ),
    Mutant(
        "djn-draws-448-bits",
        "fedray/crypto/threshold.py",
        "        x = secrets.randbits(self.exponent_bits)",
        "        x = secrets.randbits(448)",
        ("tests/test_threshold.py",),
        "the encryptor draws 448-bit exponents whatever the key",
        "ceil_k",
    ),
    Mutant(
        "unmask-table-one-exponent-wide",
        "fedray/crypto/threshold.py",
        "            bits = self.key.exponent_bits + self.max_summands.bit_length()",
        "            bits = self.key.exponent_bits",
        ("tests/test_threshold.py",),
        "the server's table covers one exponent, not a sum of max_summands",
        "cover_exactly",
    ),
    # -- issue #22: full-entropy DP-SGD generators, colluding clients, qN, quantization ------
    Mutant(
        "opacus-noise-32-bit-seed",
        "fedray/privacy/mechanisms.py",
        "        return full_entropy_torch_generator()",
        '        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)',
        ("tests/test_mechanisms.py",),
        "DP-SGD generators seeded from 63 urandom bits, which torch cuts to 32",
        "32_bit_seed",
    ),
    Mutant(
        "opacus-masks-other-generator",
        "fedray/tasks/tabular.py",
        "generator=mechanisms.torch_generator(seed),  # Opacus's Poisson masks",
        "generator=torch.Generator().manual_seed(torch.seed()),",
        ("tests/test_privacy.py",),
        "Opacus's Poisson masks drawn from a generator fedray did not fill",
        "full_entropy_generators",
    ),
    Mutant(
        "shares-sized-for-m-min",
        "fedray/privacy/dp.py",
        "return self.noise_multiplier * self.clip_norm / math.sqrt(self.honest_clients)",
        "return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)",
        ("tests/test_dp_units.py", "tests/test_dp_noise_in_jobs.py"),
        "noise shares sized for m_min, ignoring privacy.max_colluding_clients",
        "colluders or honest or issue_22 or encrypted_poisson",
    ),
    Mutant(
        "vs-server-counts-colluder-shares",
        "fedray/privacy/dp.py",
        "                noise_multiplier=self.noise_multiplier_vs_server,",
        "                noise_multiplier=self.accounting_noise_multiplier,",
        ("tests/test_dp_units.py",),
        "epsilon_vs_server counts the shares colluders can subtract",
        "colluders or issue_22",
    ),
    Mutant(
        "model-epsilon-ignores-extra-noise",
        "fedray/privacy/dp.py",
        "            max(1, self.min_clients) / self.honest_clients",
        "            1.0",
        ("tests/test_dp_units.py",),
        "epsilon ignores the larger shares' extra noise in the released model",
        "colluders",
    ),
    Mutant(
        "colluders-up-to-m-min",
        "fedray/config.py",
        "or not 0 <= k < m:",
        "or not 0 <= k <= m:",
        ("tests/test_dp_units.py",),
        "max_colluding_clients = min_clients_per_round accepted (no honest share left)",
        "colluders_outside",
    ),
    Mutant(
        "summary-colluders-not-null",
        "fedray/runtime/driver.py",
        "            cfg.privacy.max_colluding_clients if privacy is not None else None",
        "            cfg.privacy.max_colluding_clients if privacy is not None else 0",
        ("tests/test_privacy.py",),
        "summary.json reports 0 instead of null without DP",
        "summary_records",
    ),
    Mutant(
        "release-divides-by-count",
        "fedray/runtime/server.py",
        "delta = total / self.privacy.denominator  # fixed: qN, not the count",
        "delta = total / len(results)  # fixed: qN, not the count",
        ("tests/test_dp_noise_in_jobs.py",),
        "client-level DP divides the noised sum by the clients that answered, not qN",
        "poisson",
    ),
    Mutant(
        "quantization-term-dropped",
        "fedray/privacy/dp.py",
        "        return self.clip_norm + step * math.sqrt(values) / 2",
        "        return self.clip_norm",
        ("tests/test_dp_noise_in_jobs.py",),
        "the accountant drops C' = C + s sqrt(d)/2",
        "encrypted_poisson",
    ),
    # -- issue #22: resumes count every release -------------------------------------------
    Mutant(
        "ledger-in-round-folder",
        "fedray/runtime/driver.py",
        "        ledger = checkpoints_dir_of(path) / PRIVACY_LEDGER",
        "        ledger = path / PRIVACY_LEDGER",
        ("tests/test_resume_privacy.py",),
        "the ledger is looked for inside the round folder checkpoint.path names",
        "counts_the_replayed",
    ),
    Mutant(
        "window-from-fresh-accountant",
        "fedray/runtime/driver.py",
        "            privacy.load_state_dict(saved)",
        "            pass  # privacy.load_state_dict(saved)",
        ("tests/test_resume_privacy.py",),
        "the key holders' window on resume is computed without the saved count",
        "key_holders_open",
    ),
    Mutant(
        "restrict-no-op",
        "fedray/runtime/custody.py",
        "        ray.get([h.restrict.remote(first_round, last_round) for h in self.holders])",
        "        pass",
        ("tests/test_resume_privacy.py",),
        "KeyCustody.restrict narrows nothing: holders open released rounds and rounds past the target",
        "key_holders_open",
    ),
    Mutant(
        "resume-ignores-ledger",
        "fedray/runtime/driver.py",
        '        state["privacy"] = later_privacy_state(saved, state.get("privacy"))',
        '        state["privacy"] = later_privacy_state(None, state.get("privacy"))',
        ("tests/test_resume_privacy.py",),
        "a resume counts from the checkpoint alone: releases after it and their replay go uncounted",
        "counts_the_replayed or key_holders_open",
    ),
    Mutant(
        "checkpoints-into-round-folder",
        "fedray/runtime/driver.py",
        '        return checkpoints_dir_of(Path(path)) if path else self.output_dir / "checkpoints"',
        '        return Path(path) if path else self.output_dir / "checkpoints"',
        ("tests/test_resume_privacy.py",),
        "a resume from a round folder writes its checkpoints and ledger inside that round folder",
        "counts_the_replayed",
    ),
    Mutant(
        "saved-config-beside-round-folder",
        "fedray/launch.py",
        "    sources = [checkpoints.parent] if checkpoints is not None else []",
        "    sources = [Path(str(path)).parent] if checkpoints is not None else []",
        ("tests/test_resume_privacy.py",),
        "the saved .hydra/config.yaml is looked for beside the round folder, not beside checkpoints/",
        "refuses_overrides",
    ),
    Mutant(
        "bare-checkpoint-falls-through",
        "fedray/launch.py",
        '        where = Path(str(path)) if path is not None else run_dir / "checkpoints"',
        '        where = checkpoints if checkpoints is not None else run_dir / "checkpoints"',
        ("tests/test_resume_privacy.py",),
        "a round folder without its run's record resumes with the command line's config",
        "refuses_overrides",
    ),
    Mutant(
        "later-state-takes-checkpoint-steps",
        "fedray/runtime/outputs.py",
        "            out[key] = max(a, b)",
        "            out[key] = b",
        ("tests/test_resume_privacy.py",),
        "the checkpoint's stale released-round count wins over the ledger's",
        "counts_the_replayed",
    ),
    Mutant(
        "resume-command-drops-checkpoint-path",
        "fedray/launch.py",
        '        again.append(f"checkpoint.path={_shell_path(checkpoints)}")',
        "        pass",
        ("tests/test_resume_privacy.py",),
        "Ctrl-C during a checkpoint.path resume prints a command that no longer finds its checkpoints",
        "names_the_folder",
    ),
]


def run_one(m: Mutant, python: str, extra: list[str]) -> tuple[str, float, str]:
    path = ROOT / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return "not applied", 0.0, f"{m.old!r} occurs {original.count(m.old)} times"
    select = ["-k", m.select] if m.select else []
    t0 = time.monotonic()
    try:
        path.write_text(original.replace(m.old, m.new))
        proc = subprocess.run(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *select, *extra]
            + list(m.tests),
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(original)
    seconds = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    detail = lines[0] if lines else (proc.stdout.strip().splitlines() or [""])[-1]
    # pytest's 1 is "tests failed"; anything else (5: none selected, 2, 4: a usage error)
    # is no verdict, so a selection that matches nothing cannot pass for a kill.
    verdict = {0: "survived", 1: "killed"}.get(proc.returncode, f"error (exit {proc.returncode})")
    return verdict, seconds, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments")
    args = parser.parse_args()
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"unknown mutant(s) {unknown}; choose from: {', '.join(known)}", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.file:28} {m.what}")
        return 0
    rows = []
    for m in chosen:
        status, seconds, detail = run_one(m, sys.executable, args.pytest_args.split())
        rows.append((m, status, seconds, detail))
        print(f"{m.name:32} {status:12} {seconds:7.0f} s  {detail[:110]}", flush=True)
    print()
    print("| mutant | change | tests run | result |")
    print("|---|---|---|---|")
    for m, status, _, _ in rows:
        tests = ", ".join(m.tests) + (f" -k '{m.select}'" if m.select else "")
        print(f"| {m.name} | {m.what} | {tests} | {status} |")
    killed = sum(status == "killed" for _, status, _, _ in rows)
    print(f"\n{killed}/{len(rows)} killed")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
