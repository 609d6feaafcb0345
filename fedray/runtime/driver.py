"""Run one federated job: connect to Ray, place actors, run rounds, write the outputs.

This is the plain function behind ``python -m fedray.launch``; tests call it directly
with a config from Hydra's ``compose``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedray.config import FedrayConfig, min_clients, standardization
from fedray.errors import ClusterError, ConfigError, DataError, FedrayError, Interrupted
from fedray.runtime.outputs import (
    MetricsWriter,
    TensorBoardWriter,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    write_json,
)
from fedray.runtime.round_stats import metrics_released

log = logging.getLogger("fedray")

READY_TIMEOUT_S = 180.0
# The DP accountant after every released round, next to the checkpoints (see resume).
PRIVACY_LEDGER = "privacy_ledger.json"
# The federation's feature scaling (dataset.standardize=global, missing=impute_mean).
FEATURE_SCALING = "feature_scaling.json"


def _progress(cfg: FedrayConfig, m: dict[str, Any]) -> None:
    if not cfg.progress:
        return
    eps = f" | eps {m['epsilon']:.3g}" if m.get("epsilon") is not None else ""
    if m.get("epsilon_vs_server") is not None:
        eps += f" (vs server {m['epsilon_vs_server']:.3g})"
    crypto = (
        f" | enc {m['encrypt_seconds']:.2f}s dec {m['decrypt_seconds']:.2f}s"
        if cfg.crypto.name != "none"
        else ""
    )
    train_loss = m["train_loss"]  # NaN under DP: withheld (the driver said so once)
    train = "withheld" if math.isnan(train_loss) else f"{train_loss:.4f}"
    failed = f"{m['clients_failed']} failed" if m["clients_failed"] else ""
    if _poisson_cohorts(cfg):  # the cohort's size varies around clients_per_round
        expected = "; ".join(x for x in (f"{cfg.clients_per_round} expected", failed) if x)
        clients = f"clients {m['clients_ok']} ({expected})"
    else:
        clients = f"clients {m['clients_ok']}/{cfg.clients_per_round}"
        clients += f" ({failed})" if failed else ""
    print(
        f"[fedray] round {m['round']:>3}/{cfg.rounds} | train_loss {train} | "
        f"{_accuracy_shown(cfg, m)} | {clients}{eps}{crypto} | {m['seconds']:.2f}s",
        flush=True,
    )


def _poisson_cohorts(cfg: FedrayConfig) -> bool:
    """Client-level DP samples each client with probability clients_per_round/num_clients
    (see ClientLevelDP.sample_cohort), so a round has about, not exactly, that many."""
    return cfg.privacy.name == "dp" and cfg.privacy.mode == "client"


def _no_number(value: Any) -> bool:
    return value is None or math.isnan(value)


def _accuracy_shown(cfg: FedrayConfig, m: dict[str, Any]) -> str:
    """The server's test figures; without a server test set (NaN: a csv job with no
    dataset.test_path), the clients' validation accuracy of the model they received at
    the start of the round (fed_val_accuracy), or why there is none."""
    if not _no_number(m["test_accuracy"]):
        return f"test_loss {m['test_loss']:.4f} | test_acc {m['test_accuracy']:.4f}"
    val = m.get("fed_val_accuracy")
    if not _no_number(val):
        return f"val_acc {val:.4f} (clients' validation, start of round; no server test set)"
    why = "withheld under DP" if not metrics_released(cfg) else "none"
    return f"no server test set; clients' validation {why}"


def _wait_ready(hosts: list[Any], timeout: float) -> None:
    import ray

    refs = [h.ready.remote() for h in hosts]
    try:
        answers = ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(
            f"client actors could not be placed within {timeout:.0f}s: the cluster lacks the "
            "resources asked for (client.num_cpus / num_gpus / resources, cluster.sites)"
        ) from None
    except ray.exceptions.RayActorError as exc:
        raise ClusterError(f"a client actor failed to start: {str(exc).splitlines()[0]}") from None
    for answer in answers:
        if answer is not True:
            raise DataError(answer)


def _get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` that re-raises a remote FedrayError as itself (one clear line)."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, FedrayError):
            raise exc.cause from None
        raise


def _with_features(cfg: FedrayConfig, features: list[str]) -> FedrayConfig:
    """The job's config with dataset.features fixed (every site is read with this list)."""
    from dataclasses import replace

    return replace(cfg, dataset=replace(cfg.dataset, features=list(features)))


def _site_features(cfg: FedrayConfig, placement) -> FedrayConfig:
    """dataset=csv without dataset.features (and not checked before Ray): take client 0's
    columns (its header, no value) at its own site, so every site is matched to them."""
    import ray

    from fedray.data.datasets import site_columns
    from fedray.data.tables import TableSpec, resolve_features

    if cfg.dataset.name != "csv" or cfg.dataset.features is not None:
        return cfg
    if cfg.task._target_ or cfg.model.name == "hf":
        return cfg
    hosts = zip(placement.host_clients, placement.host_options, strict=True)
    opts = next(o for cids, o in hosts if 0 in cids)
    task = ray.remote(site_columns).options(**{k: v for k, v in opts.items() if k != "num_gpus"})
    columns = _get(task.remote(cfg.dataset.path, 0), timeout=READY_TIMEOUT_S)
    first = cfg.dataset.path.format(client_id=0)
    return _with_features(cfg, resolve_features(TableSpec.from_config(cfg.dataset), first, columns))


def _dataset_info(cfg: FedrayConfig, placement) -> Any:
    """Feature width and class count; for csv, each site's table is read and checked at
    the site before any training (only the width and the largest label leave it)."""
    import ray

    from fedray.data.datasets import csv_metadata, dataset_info, job_table_spec
    from fedray.data.tables import read_table

    if cfg.task._target_ or cfg.model.name == "hf":
        return None  # the task knows its own data and model
    if cfg.dataset.name != "csv":
        return dataset_info(cfg.dataset)
    if cfg.federation.name == "cross_org":  # the coordinator reads no site's table
        from fedray.data.datasets import agreed_csv_info

        return agreed_csv_info(cfg.dataset)
    task = ray.remote(csv_metadata)
    refs = [
        task.options(**{k: v for k, v in opts.items() if k != "num_gpus"}).remote(cfg.dataset, cids)
        for cids, opts in zip(placement.host_clients, placement.host_options, strict=True)
    ]
    metas = _get(refs, timeout=READY_TIMEOUT_S)
    widths = {w for w, _ in metas}
    if len(widths) != 1:
        raise DataError(
            f"sites' CSV files disagree on the number of feature columns: {sorted(widths)}"
        )
    max_label = max(m for _, m in metas)
    if cfg.dataset.test_path:
        xt, yt = read_table(cfg.dataset.test_path, job_table_spec(cfg.dataset))
        if xt.shape[1] not in widths:
            raise DataError(
                f"{cfg.dataset.test_path}: has {xt.shape[1]} feature columns, the sites have "
                f"{widths.pop()}"
            )
        max_label = max(max_label, int(yt.max()))
    return dataset_info(cfg.dataset, observed_classes=max_label + 1, num_features=widths.pop())


def _reserve(placement) -> tuple[list[dict[str, Any]], Any]:
    """Silo mode: reserve every site's resources at once in a placement group.

    Either the whole federation fits (each bundle on a node offering that site's
    resources) or the job fails here, before any actor starts: no half-placed federation
    waiting for a site that never comes. Simulation pools are placed actor by actor.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if placement.mode != "silo":
        return placement.host_options, None
    bundles = []
    for opts in placement.host_options:
        bundle = {"CPU": opts.get("num_cpus", 0), "GPU": opts.get("num_gpus", 0)}
        bundle.update(opts.get("resources", {}))
        bundles.append({k: v for k, v in bundle.items() if v})
    if not all(bundles):  # a client asking for nothing cannot be a bundle
        return placement.host_options, None
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise ClusterError(
            f"the cluster cannot host all {len(bundles)} sites at once (placement group of "
            f"{bundles[0]} x {len(bundles)} not placed within {READY_TIMEOUT_S:.0f}s); check "
            "client.num_cpus / num_gpus and cluster.sites against `ray status`"
        ) from None
    options = [
        {
            **opts,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i
            ),
        }
        for i, opts in enumerate(placement.host_options)
    ]
    return options, pg


def _resume_state(cfg: FedrayConfig, output_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from (``checkpoint.path`` may name the checkpoints folder,
    its ``latest`` or a ``round_NNNNN`` folder), its ``privacy`` replaced under DP by the
    true count: the larger, count by count, of the checkpoint's accountant and the privacy
    ledger of its checkpoints folder (the ledger also counts the rounds released after the
    checkpoint, whose replay is a second release). A DP resume without its ledger is
    refused: no checkpoint can show that nothing was released after it (each round's
    ledger entry is written before its checkpoint, and a crash can fall in between)."""
    from fedray.runtime.outputs import checkpoint_folder, checkpoints_dir_of, later_privacy_state

    if not cfg.resume:
        return None
    path = Path(cfg.checkpoint.path) if cfg.checkpoint.path else output_dir / "checkpoints"
    if checkpoint_folder(path) is None:
        raise FedrayError(
            f"resume=true but there is no checkpoint at {path}; pass the old run's directory "
            "with hydra.run.dir=... or checkpoint.path=..."
        )
    state = load_checkpoint(path)
    if cfg.privacy.name == "dp":
        ledger = checkpoints_dir_of(path) / PRIVACY_LEDGER
        if not ledger.is_file():
            raise FedrayError(
                f"resume=true with privacy=dp needs the privacy ledger {ledger} (it counts the "
                "rounds released after the checkpoint, whose replay is released again), and "
                "it is not there; pass checkpoint.path=<the old run's checkpoints folder, "
                f"with its {PRIVACY_LEDGER}> or put the ledger back"
            )
        saved = json.loads(ledger.read_text())["privacy"]
        state["privacy"] = later_privacy_state(saved, state.get("privacy"))
    if _sites_check_models(cfg):
        from fedray.runtime.outputs import load_releases

        try:  # the sites' hosts check the next model against these (they keep running)
            state["releases"] = load_releases(checkpoints_dir_of(path), int(state["round"]))
        except ValueError as exc:
            raise FedrayError(
                f"resume=true across organisations with model checks needs every attested "
                f"sum up to the checkpoint's round (the sites check the next model against "
                f"them): {exc}; a checkpoints folder without its releases/ (removed, or "
                "written by a fedray that did not keep them) cannot be resumed"
            ) from None
    return state


def _checkpoint_due(job: _Job, round_num: int) -> bool:
    """``checkpoint.every``; across organisations every round, whatever it says: the
    sites' approvers and key holders have moved on to the last round run, and a resume
    from an earlier checkpoint would ask them for a round they signed or opened."""
    every = job.cfg.checkpoint.every
    return job.cfg.federation.name == "cross_org" or bool(every and round_num % every == 0)


def _sites_check_models(cfg: FedrayConfig) -> bool:
    """Across organisations with model checks: the sites' hosts outlive the coordinator,
    so a resumed coordinator must give them the opened sums they have not checked yet
    (the checkpoints folder keeps them: ``releases/``)."""
    from fedray.runtime.lineage import verifies_models

    return cfg.federation.name == "cross_org" and verifies_models(cfg)


class _StopOnSigint:
    """Ctrl-C during the rounds: finish the round in flight, checkpoint it, then stop.

    The first SIGINT only sets ``requested`` (the round's work is not thrown away); a
    second one stops at once with KeyboardInterrupt (the last checkpoint on disk stands).
    Only the main thread can own signal handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


_CARRIED = (
    "round_seconds",
    "bytes_up",
    "updates_up",
    "bytes_down",
    "client_failures",
    "clients_rejected",
    "final_accuracy",
    "final_test_loss",
    "final_fed_val_accuracy",
    "epsilon",
)


def _carry_over(summary: dict[str, Any], output_dir: Path, resume_round: int) -> None:
    """On resume, start the summary's totals from the rounds already done (not from 0)."""
    old_path = output_dir / "summary.json"
    old = json.loads(old_path.read_text()) if old_path.exists() else {}
    if old.get("rounds_completed") == resume_round:
        summary.update({k: old[k] for k in _CARRIED if k in old})
        return
    rows = [r for r in read_metrics(output_dir / "metrics.csv") if int(r["round"]) <= resume_round]
    if not rows:
        return

    def num(value: str) -> float | None:
        return float(value) if value not in ("", None) else None

    summary["round_seconds"] = [num(r["seconds"]) for r in rows]
    for key, column in (
        ("bytes_up", "bytes_up"),
        ("updates_up", "updates_up"),
        ("bytes_down", "bytes_down"),
        ("client_failures", "clients_failed"),
        ("clients_rejected", "clients_rejected"),
    ):
        summary[key] = sum(int(num(r[column]) or 0) for r in rows)
    last = rows[-1]
    summary["final_accuracy"] = num(last["test_accuracy"])
    summary["final_test_loss"] = num(last["test_loss"])
    summary["final_fed_val_accuracy"] = num(last["fed_val_accuracy"])
    summary["epsilon"] = num(last["epsilon"])


@dataclass
class _Job:
    """A running job: what set-up built, what the rounds use, what clean-up releases."""

    cfg: FedrayConfig
    output_dir: Path
    t_start: float
    resumed: bool
    started: bool  # this call started Ray (embedded), so it shuts it down
    reservation: Any = None  # silo mode's placement group
    hub: Any = None  # federation=cross_org: the federation endpoint's actor
    placement: Any = None
    info: Any = None
    authority: Any = None
    hosts: list[Any] = field(default_factory=list)
    described: dict[int, dict[str, Any]] = field(default_factory=dict)
    custody: Any = None
    public_key: Any = None
    privacy: Any = None
    server: Any = None
    first_round: int = 1
    last_round: int = 0  # the last round the key holders open (set up with the server)
    lineage: Any = None  # with model checks: the driver's own chain (see _checked_state)
    releases_saved: int = 0  # across organisations: the last round in checkpoints/releases/
    # (weight_ref, the driver's signature of it): given back to restarted hosts
    weight_ref: tuple[float, bytes] | None = None
    # (the federation's feature scaling, the driver's signature): to restarted hosts too
    scaling: tuple[dict[str, Any], bytes] | None = None
    metrics_writer: MetricsWriter | None = None
    tensorboard: TensorBoardWriter | None = None
    sigint: _StopOnSigint | None = None
    warned_clipping: bool = False

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints and the privacy ledger go: on a resume from
        ``checkpoint.path=RUN/checkpoints/round_NNNNN`` (or ``.../latest``), RUN/checkpoints."""
        from fedray.runtime.outputs import checkpoints_dir_of

        path = self.cfg.checkpoint.path
        return checkpoints_dir_of(Path(path)) if path else self.output_dir / "checkpoints"

    @property
    def ledger_path(self) -> Path:
        return self.checkpoint_dir / PRIVACY_LEDGER


def run_experiment(
    cfg: FedrayConfig,
    output_dir: str | Path,
    *,
    host_class: type | None = None,
    server_class: type | None = None,
) -> dict[str, Any]:
    """Run the job described by ``cfg`` and write its files into ``output_dir``.

    ``host_class`` / ``server_class`` replace :class:`~fedray.runtime.client.ClientHost`
    / :class:`~fedray.runtime.server.Server` (subclasses), e.g. to inject faults in tests
    or to record what the server receives.
    """
    import ray

    from fedray.runtime.client import client_actor_class
    from fedray.runtime.cluster import connect, release
    from fedray.runtime.server import server_actor_class

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_state = _resume_state(cfg, output_dir)
    t_start = time.perf_counter()
    # Load torch before connecting. The TensorBoard writer imports it (through
    # tensorboardX) later, and there, in the first job on a fresh two-node `ray start`
    # cluster on one machine, oneMKL failed to load libtorch_cpu.so and killed the driver
    # (exit 2, or a segfault); tests/test_job_submit.py. Likely cause: both nodes share
    # the session's runtime_resources, and setting up the job's working_dir for the
    # other node's actors replaces the directory the driver runs in (the same message is
    # reported after getcwd() fails). Importing first is cheap: the hosts need it anyway.
    import torch  # noqa: F401

    if cfg.dataset.name == "csv" and cfg.ray.address is None and cfg.federation.name == "none":
        # Embedded Ray: every site's file is on this machine; check them all before Ray
        # (the built-in task's tables: each header's columns by name, no value read).
        from fedray.data.datasets import check_site_files, check_site_tables

        check_site_files(cfg.dataset.path, cfg.num_clients)
        if not (cfg.task._target_ or cfg.model.name == "hf"):
            cfg = _with_features(cfg, check_site_tables(cfg.dataset, cfg.num_clients))
    job = _Job(cfg, output_dir, t_start, resumed=resume_state is not None, started=connect(cfg))
    try:
        # Set-up: hosts, weights and keys, the server (with the checkpoint on resume).
        if cfg.federation.name == "cross_org":  # the sites' own clusters, over the channel
            from fedray.federation.coordinator import start_sites

            start_sites(job, server_actor_class(server_class))
            sizes: dict[int, int] = {}
        else:
            _start_hosts(job, client_actor_class(host_class), server_actor_class(server_class))
            sizes = _set_up_hosts(job, _lineage_root(resume_state))
        _describe_federation(job)
        counts = _start_server(job, sizes, resume_state)
        summary = _open_outputs(job, counts)
        # Rounds, then the summary.
        _run_rounds(job, summary)
        return _write_summary(job, summary)
    finally:
        if job.hub is not None:  # cross_org: tell the sites the run is over
            with contextlib.suppress(Exception):
                ray.get(job.hub.close.remote(), timeout=30)
        if job.sigint is not None:
            job.sigint.__exit__()
        if job.metrics_writer is not None:
            job.metrics_writer.close()
        if job.tensorboard is not None:
            job.tensorboard.close()
        if job.reservation is not None:  # placement groups outlive their actors otherwise
            ray.util.remove_placement_group(job.reservation)
        release(cfg, job.started)  # stops the Ray it started (a multirun keeps it)


def _start_hosts(job: _Job, actor_cls: Any, server_cls: Any) -> None:
    """Place the client hosts (silo mode: every site reserved at once), start the server
    (model and test set only: it is wired to the federation in :func:`_start_server`)
    while they load their clients' data, wait until each host is ready, and ask each
    where it runs."""
    import ray

    from fedray.runtime.cluster import plan_placement

    cfg = job.cfg
    job.placement = plan_placement(cfg, ray.cluster_resources())
    job.cfg = cfg = _site_features(cfg, job.placement)
    job.info = _dataset_info(cfg, job.placement)
    from fedray.runtime.keys import HostIdentity

    # The job's set-up key (every mode): signs host config, weight_ref and round tickets;
    # never leaves the driver.
    job.authority = HostIdentity()
    authority = job.authority
    host_options, job.reservation = _reserve(job.placement)
    job.hosts = [
        actor_cls.options(**opts).remote(
            cfg, cids, job.info, 1.0, authority.public_bytes() if authority else None
        )
        for cids, opts in zip(job.placement.host_clients, host_options, strict=True)
    ]
    job.server = server_cls.remote(cfg, job.info)
    _wait_ready(job.hosts, READY_TIMEOUT_S)
    for answer in ray.get([h.describe.remote() for h in job.hosts]):
        job.described.update(answer)


def _lineage_root(resume_state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where the hosts' model checks start on a resume: the checkpoint's round, weights
    and strategy state, vouched for by the driver (None: each host's own initial model)."""
    if resume_state is None:
        return None
    import numpy as np

    return {
        "round": int(resume_state["round"]),
        "weights": np.asarray(resume_state["weights"], dtype=np.float32),  # as the server
        "strategy": resume_state["strategy"],
    }


def _set_up_hosts(job: _Job, lineage_root: dict[str, Any] | None = None) -> dict[int, int]:
    """Close the hosts' set-up: weight_ref, then (with crypto) the keys. Returns the
    site sizes that sample-level DP's accountant needs ({} otherwise)."""
    import ray

    cfg, hosts = job.cfg, job.hosts
    # weight_ref: the example count that maps to FedAvg weight 1.0 (weights n_k / ref
    # must lie in (0, 1], and should be near 1 for the largest site so its update
    # keeps the codec's precision). A public dataset.weight_ref reveals nothing.
    # Otherwise the hosts pass a running maximum along a chain of object refs: each
    # host sees only the maximum of those before it; the driver fetches only the
    # final maximum (the largest site's count, not which site) and the server is not
    # sent it, nor any count it could be worked out from (fedray/runtime/round_stats.py).
    # The intermediate values are in the object store, owned by the driver, which never
    # reads them. FedAvg stays exactly example-weighted: the server
    # divides by the sum of the weights.
    if cfg.dataset.weight_ref is not None:
        weight_ref = float(cfg.dataset.weight_ref)
    else:
        running: Any = 0.0
        for h in hosts:
            running = h.running_max_examples.remote(running)
        weight_ref = ray.get(running)
    sizes: dict[int, int] = {}
    if cfg.privacy.name == "dp" and cfg.privacy.mode == "sample":
        # Sample-level DP's accountant needs each site's count (the server learns them in
        # this mode: docs/explanations/differential-privacy.md, Sample-level DP). Asked
        # before set_weight_ref closes set-up.
        for answer in ray.get([h.dp_client_sizes.remote() for h in hosts]):
            sizes.update(answer)
    # Keys last: configuring a host's crypto closes its set-up calls.
    from fedray.runtime.keys import weight_ref_message

    weight_ref_signature = job.authority.sign_bytes(weight_ref_message(weight_ref))
    job.weight_ref = (weight_ref, weight_ref_signature)
    if cfg.crypto.name == "paillier":
        from fedray.config import needs_feature_statistics
        from fedray.runtime.custody import set_up_keys

        job.custody = set_up_keys(
            cfg,
            hosts,
            job.placement.assignment,
            job.authority,
            lineage_root,
            feature_sums=needs_feature_statistics(cfg) and not job.resumed,
        )
    job.public_key = job.custody.key if job.custody else None
    for answer in ray.get(
        [h.set_weight_ref.remote(weight_ref, weight_ref_signature) for h in hosts]
    ):
        if answer is not True:
            raise ConfigError(answer)
    return sizes


def _describe_federation(job: _Job) -> None:
    """Say what was set up (with cfg.progress) and write clients.json."""
    cfg, described, public_key = job.cfg, job.described, job.public_key
    if cfg.progress:
        print(
            f"[fedray] {cfg.num_clients} clients on {len(job.hosts)} actors "
            f"({job.placement.mode} mode), "
            f"{len({d['node_id'] for d in described.values()})} node(s); "
            f"crypto={cfg.crypto.name}"
            + (
                f" ({cfg.crypto.key_bits}-bit, {cfg.crypto.custody} custody: "
                f"{public_key.threshold} of {len(job.custody.holders)} key holders decrypt)"
                if public_key
                else ""
            )
            + f", privacy={cfg.privacy.name}, strategy={cfg.strategy.name}",
            flush=True,
        )
        if cfg.dataset.share_label_counts:  # the user opted in to share them
            for cid in sorted(described)[: min(len(described), 20)]:
                d = described[cid]
                log.info(
                    "client %d: %d examples, labels %s", cid, d["num_examples"], d.get("labels")
                )
            if len(described) > 20:
                log.info("... %d more clients: see clients.json", len(described) - 20)
    # Placement only, unless dataset.share_label_counts=true.
    shared = ("num_examples", "num_val", "labels") if cfg.dataset.share_label_counts else ()
    write_json(
        job.output_dir / "clients.json",
        {
            str(cid): {k: d.get(k) for k in ("node_id", "device", "gpu_ids", *shared)}
            for cid, d in sorted(described.items())
        },
    )


def _start_server(
    job: _Job, sizes: dict[int, int], resume_state: dict[str, Any] | None
) -> tuple[int, int, int]:
    """Wire the server to the federation (on resume, from the checkpoint and the privacy
    ledger). Returns its counts: exchanged values, model parameters, values per
    ciphertext."""
    import ray

    cfg = job.cfg
    privacy = None
    if cfg.privacy.name == "dp":
        from fedray.privacy import build_privacy

        privacy = build_privacy(cfg, sizes)
    job.privacy = privacy
    server = job.server
    _get(
        server.set_up.remote(
            job.hosts,
            job.placement.assignment,
            job.public_key,
            privacy,
            key_holders=job.custody.holders if job.custody else None,
        )
    )
    saved = None  # the accountant's true count: ledger and checkpoint (_resume_state)
    if resume_state is not None:
        # Rounds released after the checkpoint were released: they stay counted, and
        # their replay (with fresh noise) is counted again.
        ray.get(server.load_state_dict.remote(resume_state))
        saved = resume_state.get("privacy")
    job.first_round = int(resume_state["round"]) + 1 if resume_state else 1
    counts = tuple(
        ray.get(
            [
                server.num_parameters.remote(),
                server.num_model_parameters.remote(),
                server.values_per_ciphertext.remote(),
            ]
        )
    )
    _feature_scaling(job, resume_state)  # before the window closes round 0
    _key_holders_window(job, saved, counts[0])
    if getattr(job.custody, "holder_keys", None) is not None:  # RemoteCustody: none
        job.lineage = _driver_lineage(job, counts[0], resume_state)
    return counts


def _feature_scaling(job: _Job, resume_state: dict[str, Any] | None) -> None:
    """``dataset.standardize=global`` / ``missing=impute_mean``: the server opens the
    federation's feature sums (round 0's one sum, with crypto), the driver signs the
    scaling they give, and every host prepares its data with it before round 1 (a resume
    takes the checkpoint's: the key holders open no second round 0). Written to
    feature_scaling.json, which ``python -m fedray.export`` puts in the exported model."""
    import ray

    from fedray.config import needs_feature_statistics
    from fedray.runtime.keys import scaling_message

    cfg = job.cfg
    if not needs_feature_statistics(cfg):  # refused across organisations (config)
        return
    if resume_state is not None:
        scaling = resume_state.get("feature_scaling")
        if scaling is None:
            raise ConfigError(
                "the checkpoint holds no feature scaling (its run scaled each site by its "
                "own statistics): resume with dataset.standardize=site and the "
                "dataset.missing it ran with"
            )
    else:
        t0 = time.perf_counter()
        scaling = _get(job.server.open_feature_sums.remote())
        if cfg.progress:
            print(
                f"[fedray] federation-wide feature statistics opened "
                f"({'' if job.public_key else 'in the clear, '}"
                f"{len(scaling['mean'])} features; {time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
    from fedray.data.datasets import FeatureScaling

    try:  # what the driver signs is a scaling of this job's width, whatever it was given
        checked = FeatureScaling.from_dict(scaling)
    except DataError as exc:
        raise ClusterError(f"the feature scaling to sign is not one: {exc}") from None
    if len(checked.mean) != int(job.info.num_features):
        raise ClusterError(
            f"the feature scaling has {len(checked.mean)} features, the model "
            f"{job.info.num_features}"
        )
    signature = job.authority.sign_bytes(scaling_message(scaling))
    job.scaling = (scaling, signature)
    refs = [h.set_feature_scaling.remote(scaling, signature) for h in job.hosts]
    for i, ref in enumerate(refs):
        try:
            ray.get(ref)
        except Exception as exc:  # a dead host: _refresh_hosts gives it to its successor
            log.warning("client host %d did not take the feature scaling: %s", i, exc)
    write_json(job.output_dir / FEATURE_SCALING, scaling)


def _models_checked(cfg: Any, custody: Any) -> bool:
    if custody is None:
        return False
    if cfg.federation.name == "none":
        return getattr(custody, "holder_keys", None) is not None
    from fedray.runtime.lineage import verifies_models

    return verifies_models(cfg)  # the job every site declared says so (agreed_job)


def _driver_lineage(job: _Job, num_values: int, resume_state: dict[str, Any] | None):
    """The driver's own copy of the hosts' chain of models: what it checkpoints (and a
    resume's hosts start from) is checked against it, never taken from the server."""
    from fedray.crypto.secure_aggregation import UpdateLayout, codec_for
    from fedray.models import ParamView
    from fedray.runtime.lineage import Lineage
    from fedray.tasks.base import build_task, build_task_model

    cfg, key = job.cfg, job.custody.key
    task = build_task(cfg, job.info)
    initial = ParamView(build_task_model(task, cfg.seed), cfg.model.trainable).get()
    layout = UpdateLayout.for_key(key.public, codec_for(cfg, key.public, num_values))
    return Lineage(cfg, key, layout, job.custody.holder_keys, initial, _lineage_root(resume_state))


def _save_checkpoint(job: _Job) -> None:
    """The server's checked state as the next checkpoint; across organisations with
    model checks, first the attested sums it has not saved yet (see :func:`_resume_state`)."""
    import ray

    state = _checked_state(job)
    if _sites_check_models(job.cfg):
        from fedray.runtime.outputs import save_releases

        new = ray.get(job.server.releases_since.remote(job.releases_saved))
        save_releases(job.checkpoint_dir, new)
        job.releases_saved = max([job.releases_saved, *(r.round for r in new)])
    save_checkpoint(job.checkpoint_dir, state)


def _checked_state(job: _Job) -> dict[str, Any]:
    """The server's state to checkpoint; with model checks, only if its weights and
    strategy state are, bit for bit, what the attested sums give (the driver's own
    chain), else ClusterError: a resume's hosts start from what is written here."""
    import numpy as np
    import ray

    from fedray.runtime.lineage import LineageError

    state = ray.get(job.server.state_dict.remote())
    if job.scaling is not None:  # the driver's own, as it signed it: what a resume uses
        state["feature_scaling"] = job.scaling[0]
    if job.lineage is None:
        return state
    r = int(state["round"])
    if job.weight_ref is not None:
        from fedray.runtime.lineage import min_client_weight

        frac_bits = job.lineage.layout.stats.frac_bits
        job.lineage.min_client_weight = min_client_weight(job.weight_ref[0], frac_bits)
    try:
        releases = ray.get(job.server.releases_since.remote(job.lineage.round))
        job.lineage.check(r + 1, np.asarray(state["weights"]), releases)
        ours = job.lineage.strategy.state_dict()
        theirs = state["strategy"]
        if sorted(ours) != sorted(theirs) or any(
            np.asarray(ours[k]).tobytes() != np.asarray(theirs[k]).tobytes() for k in ours
        ):
            raise LineageError(f"round {r}: lineage check failed: the strategy state differs")
    except LineageError as exc:
        raise ClusterError(
            f"the server's state is not the model the attested sums give ({exc}); no "
            "checkpoint written"
        ) from None
    return state


def _key_holders_window(job: _Job, saved: dict[str, Any] | None, num_values: int) -> None:
    """The rounds the key holders will open: from the checkpoint's round + 1 (on resume,
    the new key's holders must not open again what the old key released) to the job's
    last round, or the last within privacy.target_epsilon_vs_server if every client were
    in every round (the holders open one sum per round, so that bound holds whatever the
    server does). The driver's own copy of the accountant, from ``saved``: the state the
    server's was loaded with on resume, the true count (ledger and checkpoint, with the
    rounds released after the checkpoint: see :func:`_resume_state`)."""
    cfg, privacy = job.cfg, job.privacy
    job.last_round = cfg.rounds
    if privacy is not None:
        if saved is not None:
            privacy.load_state_dict(saved)
        if job.public_key is not None and cfg.privacy.mode == "client":
            from fedray.crypto.secure_aggregation import codec_for

            privacy.client_plan(codec_for(cfg, job.public_key.public, num_values))
        left = cfg.rounds - job.first_round + 1
        job.last_round = job.first_round - 1 + privacy.rounds_within_target_vs_server(left)
    if job.custody is not None:
        job.custody.restrict(job.first_round, job.last_round)


def _open_outputs(job: _Job, counts: tuple[int, int, int]) -> dict[str, Any]:
    """Open metrics.csv and the TensorBoard log; start the summary (on resume, from the
    totals of the rounds already done)."""
    cfg, first_round = job.cfg, job.first_round
    setup_seconds = time.perf_counter() - job.t_start
    job.metrics_writer = MetricsWriter(job.output_dir / "metrics.csv", first_round - 1)
    job.tensorboard = TensorBoardWriter(job.output_dir / "tensorboard")
    summary = _new_summary(job, counts, setup_seconds)
    if not metrics_released(cfg):
        log.warning(
            "privacy=dp (mode=%s): the clients' per-round training and validation statistics "
            "are not released, since epsilon would not cover them; train_loss, fed_val_loss "
            "and fed_val_accuracy stay empty in metrics.csv (test_loss and test_accuracy, "
            "on the server's own test set, are reported)",
            cfg.privacy.mode,
        )
    if job.resumed:
        summary["resumed_from_round"] = first_round - 1
        _carry_over(summary, job.output_dir, first_round - 1)
        print(
            f"[fedray] resuming from round {first_round - 1}"
            + (
                f": nothing to run (rounds={cfg.rounds}); pass rounds=N to run more"
                if first_round > cfg.rounds
                else f" to round {cfg.rounds}"
            ),
            flush=True,
        )
    return summary


def _new_summary(job: _Job, counts: tuple[int, int, int], setup_seconds: float) -> dict[str, Any]:
    """summary.json before the first round."""
    cfg, custody, privacy = job.cfg, job.custody, job.privacy
    num_params, num_model_params, values_per_ct = counts
    return {
        "final_accuracy": None,
        "rounds_completed": job.first_round - 1,
        "round_seconds": [],
        "bytes_up": 0,
        "updates_up": 0,
        "bytes_down": 0,
        "epsilon": None,
        # Against the party that picks cohorts (no amplification); null: none holds
        # (central noise or seeded noise) or no DP.
        "epsilon_vs_server": None,
        "delta": cfg.privacy.delta if privacy is not None else None,
        "reproducible_noise": cfg.privacy.seeded_noise if privacy is not None else None,
        # Clients assumed to collude with the server (shares sized for m_min - k); null: no DP.
        "max_colluding_clients": (
            cfg.privacy.max_colluding_clients if privacy is not None else None
        ),
        "values_clipped": 0,
        "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "min_clients_per_round": min_clients(cfg),
        "crypto": cfg.crypto.name,
        "key_bits": cfg.crypto.key_bits if job.public_key else None,
        "key_dealer_node": custody.dealer_node if custody else None,
        "custody": cfg.crypto.custody if custody else None,
        "threshold": custody.key.threshold if custody else None,
        "key_holders": len(custody.holders) if custody else None,
        "key_holder_nodes": custody.holder_nodes if custody else None,
        # Hosts checked every global model against attested sums (cluster.verify_models;
        # across organisations each site's own agent set its host up to check)
        "models_checked": _models_checked(cfg, custody),
        "values_per_ciphertext": values_per_ct or None,
        "client_failures": 0,
        "clients_rejected": 0,
        "privacy": cfg.privacy.name,
        "strategy": cfg.strategy.name,
        "dataset": cfg.dataset.name,
        # How features were scaled (global: the federation's mean and deviation, opened
        # before round 1; site: each client's own; none), and whether empty cells were
        # filled with the federation's means (feature_scaling.json has both)
        "standardize": standardization(cfg),
        "impute_mean": cfg.dataset.name == "csv" and cfg.dataset.missing == "impute_mean",
        "model": cfg.model.name,
        # The model's input: the table columns it was trained on, in order (csv/parquet;
        # null: a built-in dataset's own), its width and classes (python -m fedray.export)
        "features": list(cfg.dataset.features) if cfg.dataset.features is not None else None,
        "num_features": getattr(getattr(job, "info", None), "num_features", None),
        "num_classes": getattr(getattr(job, "info", None), "num_classes", None),
        "num_parameters": num_params,  # exchanged (trainable) values per update
        "num_model_parameters": num_model_params,
        "mode": job.placement.mode,
        "num_actors": len(job.hosts),
        "setup_seconds": setup_seconds,
        "client_nodes": {str(c): d["node_id"] for c, d in sorted(job.described.items())},
        "stopped_early": False,
    }


def _run_rounds(job: _Job, summary: dict[str, Any]) -> None:
    """Run rounds first_round..cfg.rounds, writing each one's outputs as it ends; stop
    early at privacy.target_epsilon or target_accuracy. Checkpoint every
    checkpoint.every rounds (across organisations every round) and after the last.
    Ctrl-C: finish the round in flight, checkpoint it, then raise Interrupted (the
    launcher prints the resume command)."""

    cfg, server = job.cfg, job.server
    if _sites_check_models(cfg):  # the attested sums a resume gives the sites
        from fedray.runtime.outputs import RELEASES_DIR

        if job.resumed:  # rounds 1..first_round - 1: on disk, and the server has them
            job.releases_saved = job.first_round - 1
        else:  # a new run in an old run's folder: none of the old run's
            shutil.rmtree(job.checkpoint_dir / RELEASES_DIR, ignore_errors=True)
    last_round = saved_round = job.first_round - 1
    stop = job.sigint = _StopOnSigint().__enter__()
    for round_num in range(job.first_round, cfg.rounds + 1):
        if stop.requested:
            break
        if round_num > job.last_round:  # past the key holders' window: they would refuse
            target = f"privacy.target_epsilon_vs_server={cfg.privacy.target_epsilon_vs_server}"
            _stop_for_privacy(summary, round_num, target)
            break
        if job.custody is not None:  # the key holders take this round, no later one
            job.custody.open_round(round_num)
        try:
            outcome = _get(server.run_round.remote())  # a FedrayError: outputs kept
            while outcome.retry:  # too few clients: restarted hosts set up, then a retry
                _refresh_hosts(job, round_num + 1)
                outcome = _get(server.run_round.remote())
        except FedrayError:
            _save_ledger_of_a_failed_round(job, round_num)
            raise
        if outcome.stop:  # a privacy target would be exceeded: nothing was run
            _stop_for_privacy(summary, outcome.metrics["round"] + 1, outcome.stop_reason)
            break
        m = outcome.metrics
        if outcome.privacy_state is not None:  # first: this round is released
            job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_json(job.ledger_path, {"round": m["round"], "privacy": outcome.privacy_state})
        last_round = m["round"]
        _record_round(job, summary, outcome)
        reached = (
            cfg.target_accuracy is not None
            and m["test_accuracy"] is not None
            and not math.isnan(m["test_accuracy"])
            and m["test_accuracy"] >= cfg.target_accuracy
        )
        if stop.requested or _checkpoint_due(job, last_round):
            _save_checkpoint(job)
            saved_round = last_round
        write_json(job.output_dir / "summary.json", summary)
        if m["clients_failed"] > outcome.failed_in_sum:  # a host call failed
            _refresh_hosts(job, round_num + 1)  # a dead host's successor, set up again
        if reached:
            summary["stopped_early"] = True
            summary["stop_reason"] = "target_accuracy"
            print(
                f"[fedray] target_accuracy={cfg.target_accuracy} reached at round "
                f"{last_round}; stopping",
                flush=True,
            )
            break
    if last_round > saved_round:
        _save_checkpoint(job)
    if stop.requested:  # Ctrl-C: the launcher prints the command that resumes
        summary["interrupted"] = True
        write_json(job.output_dir / "summary.json", summary)
        raise Interrupted(last_round, job.checkpoint_dir)


def _save_ledger_of_a_failed_round(job: _Job, round_num: int) -> None:
    """A round that failed may have been released (the server counts a release before it
    asks the key holders to open it; a sum can open and then fail the packing check):
    save the accountant as it stands, so a resume counts it and its replay."""
    import ray

    if job.privacy is None:
        return
    try:
        state = ray.get(job.server.privacy_state.remote(), timeout=60)
    except Exception as exc:  # the server is gone: the last ledger entry stands
        log.warning("round %d failed and its privacy state could not be read: %s", round_num, exc)
        return
    if state is not None:
        job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_json(job.ledger_path, {"round": round_num, "privacy": state})


def _refresh_hosts(job: _Job, from_round: int) -> list[int]:
    """Set up again the client hosts Ray restarted (they refuse to train until then:
    ``ClientHost.trainable``): with crypto, a new identity registered with the key
    holders for rounds ``from_round`` on, the key and the DP plan; in every mode, the
    federation's weight_ref. Waits while Ray restarts a host; a host dead for good is
    left (its clients keep failing). Returns the indices set up again."""
    import ray

    from fedray.runtime.cluster import call_when_available

    restarted = []
    for i, host in enumerate(job.hosts):
        try:
            if call_when_available(host.trainable, timeout=120):
                continue
        except Exception as exc:  # dead for good, or not back in time
            log.debug("client host %d is not available: %s", i, exc)
            continue
        try:
            if job.custody is not None:
                public, configured = ray.get(host.identity.remote())
                if not configured:  # restarted (a host only awaiting its scaling is not)
                    job.custody.re_register(i, public, from_round)
            if job.weight_ref is not None:  # a restarted host starts from 1.0 again
                answer = ray.get(host.set_weight_ref.remote(*job.weight_ref))
                if answer is not True:
                    raise ConfigError(answer)
            if job.scaling is not None:  # and from its raw data
                ray.get(host.set_feature_scaling.remote(*job.scaling))
        except ray.exceptions.RayActorError as exc:  # died again while being set up: it
            log.warning("client host %d died while being set up again: %s", i, exc)
            continue  # refuses to train until the next call sets it up
        restarted.append(i)
    if restarted:
        log.warning(
            "client hosts %s were restarted; set up again (with crypto they take part from "
            "round %d)",
            restarted,
            from_round,
        )
    return restarted


def _stop_for_privacy(summary: dict[str, Any], round_num: int, target: str) -> None:
    """End the run before ``round_num``, which could pass ``target`` ("KEY=VALUE")."""
    summary["stopped_early"] = True
    summary["stop_reason"] = target.split("=")[0]  # the key's name
    print(f"[fedray] stopping before round {round_num}: it would exceed {target}", flush=True)


def _record_round(job: _Job, summary: dict[str, Any], outcome: Any) -> None:
    """Write a finished round to metrics.csv, TensorBoard and the progress line, and add
    it to the summary's totals (summary.json is written by the caller)."""
    cfg, m = job.cfg, outcome.metrics
    job.metrics_writer.write(m)
    job.tensorboard.write(m)
    _progress(cfg, m)
    summary["rounds_completed"] = m["round"]
    summary["round_seconds"].append(round(m["seconds"], 4))
    summary["bytes_up"] += m["bytes_up"]
    summary["updates_up"] += m["updates_up"]
    summary["bytes_down"] += m["bytes_down"]
    summary["bytes_to_key_holders"] = summary.get("bytes_to_key_holders", 0) + m.get(
        "bytes_to_key_holders", 0
    )
    summary["client_failures"] += m["clients_failed"]
    summary["clients_rejected"] += m["clients_rejected"]
    summary["final_accuracy"] = m["test_accuracy"]
    summary["final_test_loss"] = m["test_loss"]
    summary["final_fed_val_accuracy"] = m["fed_val_accuracy"]
    summary["epsilon"] = m.get("epsilon")
    summary["epsilon_vs_server"] = m.get("epsilon_vs_server")
    summary["values_clipped"] += m.get("values_clipped", 0)
    if m.get("values_clipped") and not job.warned_clipping:
        job.warned_clipping = True
        log.warning(
            "round %d: %d update values were outside +-crypto.clip=%g and were clipped "
            "(the aggregate differs from the plaintext mean); raise crypto.clip or "
            "lower lr. Counted per round in metrics.csv (values_clipped)",
            m["round"],
            m["values_clipped"],
            cfg.crypto.clip,
        )
    for cid, node in outcome.client_nodes.items():
        summary["client_nodes"][str(cid)] = node


def _write_summary(job: _Job, summary: dict[str, Any]) -> dict[str, Any]:
    """Finish summary.json (nodes used, total time) and say where the outputs are."""
    summary["nodes_used"] = sorted(set(summary["client_nodes"].values()))
    summary["total_seconds"] = time.perf_counter() - job.t_start
    write_json(job.output_dir / "summary.json", summary)
    if job.cfg.progress:
        acc, val = summary["final_accuracy"], summary.get("final_fed_val_accuracy")
        if not _no_number(acc) or summary["rounds_completed"] == 0:
            shown = f"final test accuracy {acc if acc is None else round(acc, 4)}"
        elif not _no_number(val):  # no server test set (dataset.test_path)
            shown = (
                f"no server test set; clients' validation accuracy {round(val, 4)} "
                f"(of the model they received in round {summary['rounds_completed']})"
            )
        else:
            shown = "no server test set (dataset.test_path) and no clients' validation"
        print(
            f"[fedray] done: {summary['rounds_completed']} rounds, {shown}, "
            f"{summary['total_seconds']:.1f}s; outputs in {job.output_dir}",
            file=sys.stdout,
            flush=True,
        )
    return summary
