"""Connecting to Ray and placing client hosts: silo mode (one actor per client, pinned)
or simulation mode (a pool of actors, each hosting many virtual clients)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from fedray.config import FedrayConfig
from fedray.errors import ClusterError

log = logging.getLogger("fedray.cluster")


def _drop_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def loopback_node_ip() -> str:
    """The node IP for a Ray that only this machine uses: loopback, and kept as given.

    Ray 2.60 rewrites a node IP or address of 127.0.0.1/localhost to the host's reachable
    address (``services.resolve_ip_for_localhost``) where it runs clusters, so its GCS,
    raylets and workers would advertise and dial e.g. 192.0.2.2. It keeps other 127/8
    addresses, and Linux routes all of 127/8 to ``lo``: 127.0.0.2 there, so an embedded
    Ray talks only over loopback and tells no one the host's address (its gRPC servers
    still bind all interfaces, which Ray does not let us change). Elsewhere (macOS,
    Windows) Ray keeps 127.0.0.1 unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is set, and
    127.0.0.2 may not exist there.
    """
    try:
        from ray._private.ray_constants import ENABLE_RAY_CLUSTER as rewrites
    except ImportError:  # moved: Ray 2.60's rule
        flag = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        rewrites = (
            sys.platform not in ("darwin", "win32")
            if flag is None
            else flag.lower() in ("1", "true")
        )
    return "127.0.0.2" if rewrites and sys.platform.startswith("linux") else "127.0.0.1"


# A Hydra multirun's jobs run one after another in one process: the embedded Ray the first
# job started is kept for the next (Ray's start is 3-5 s of every job on 2 cores), as long
# as the next job asks for the same embedded Ray; it is stopped when the process exits.
_KEPT: dict[str, Any] = {}


def _embedded_settings(cfg: FedrayConfig) -> tuple:
    r = cfg.ray
    return (r.num_cpus or os.cpu_count(), r.num_gpus, r.include_dashboard, r.object_store_memory)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra (a script calling run()): one job, as before
        return False


def release(cfg: FedrayConfig, started: bool) -> None:
    """At a job's end: stop the Ray it started, unless a multirun's next job can use it."""
    import ray

    if not started:
        return
    if _in_multirun() and cfg.ray.address in (None, "local"):
        if not _KEPT:
            import atexit

            atexit.register(ray.shutdown)
        _KEPT["settings"] = _embedded_settings(cfg)
        _KEPT["jobs"] = _KEPT.get("jobs", 0) + 1
        return
    _KEPT.clear()
    ray.shutdown()


def connect(cfg: FedrayConfig) -> bool:
    """Start an embedded Ray (address null) or join one. Returns True if we started it
    (or this multirun's earlier job did, and it is reused: see :func:`release`)."""
    import ray

    address = cfg.ray.address
    if ray.is_initialized() and _KEPT:
        if address in (None, "local") and _KEPT["settings"] == _embedded_settings(cfg):
            log.info(
                "multirun: reusing the embedded Ray of the sweep's earlier jobs (%d so far)",
                _KEPT["jobs"],
            )
            return True
        _KEPT.clear()  # another Ray is asked for: this sweep's one is stopped first
        ray.shutdown()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address in (None, "local"):
        kwargs.update(
            num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            num_gpus=cfg.ray.num_gpus,
            include_dashboard=cfg.ray.include_dashboard,
            object_store_memory=cfg.ray.object_store_memory,
            # An embedded Ray serves only this machine: keep its traffic on loopback.
            _node_ip_address=loopback_node_ip(),
        )
        # Ray 2.60 turns token auth on for a new local cluster (creating ~/.ray/auth_token
        # if missing) and says so on every run; the embedded instance is fedray's own, so
        # that notice is dropped (RAY_AUTH_MODE=disabled in the environment still opts out).
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _drop_token_notice
        )
        # address="local": always a new instance. Without it, ray.init() joins the cluster
        # named in /tmp/ray/ray_current_cluster, which a killed `ray start` leaves behind.
        ray.init(address="local", **kwargs)
        return True
    check_address(cfg)
    try:
        context = ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at ray.address={address!r}: {first}. Start one with "
            "`ray start --head` (with RAY_AUTH_MODE=token, export its token), or use "
            "ray.address=null for an embedded local Ray"
        ) from None
    try:
        joined = joined_cluster_line(address, context)
    except Exception as exc:  # saying which cluster must never stop the job
        joined = f"joined the Ray cluster at ray.address={address} (nodes not listed: {exc})"
    log.info("%s", joined)
    return False


# How long a Ray head may take to answer: it answers in milliseconds; with start-up, the
# launcher's one line comes within about 5 s (docs/explanations/failure-modes.md).
PROBE_TIMEOUT_S = 4.0


def check_address(cfg: FedrayConfig) -> None:
    """With ray.address=HOST:PORT (or auto with RAY_ADDRESS set), fail within
    PROBE_TIMEOUT_S, in one line, unless a Ray head answers there (see
    :func:`_check_reachable`). Cheap: the launcher calls it before the job's heavy imports,
    :func:`connect` again before Ray."""
    address = cfg.ray.address
    if address in (None, "local"):
        return
    target = address
    if address == "auto":  # Ray takes RAY_ADDRESS first, else the last `ray start` here
        target = os.environ.get("RAY_ADDRESS", "").strip()
    if target and (target.startswith("ray://") or "://" not in target):
        _check_reachable(target, PROBE_TIMEOUT_S, shown=address)


def joined_cluster_line(address: str, context: Any = None) -> str:
    """One line naming the cluster a job joined: the GCS address and its alive nodes
    (IP, head, CPUs, GPUs, custom resources), so a user sees at once whose cluster it is."""
    import ray

    info = getattr(context, "address_info", None) or {}
    joined = info.get("gcs_address") or address
    nodes = sorted(
        (n for n in ray.nodes() if n.get("Alive")),
        key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeManagerAddress"]),
    )
    shown = [_node_summary(n) for n in nodes[:_NODES_SHOWN]]
    if len(nodes) > _NODES_SHOWN:
        shown.append(f"... {len(nodes) - _NODES_SHOWN} more")
    asked = f" (ray.address={address})" if str(address) != str(joined) else ""
    return (
        f"joined the Ray cluster at {joined}{asked}: {len(nodes)} node"
        f"{'' if len(nodes) == 1 else 's'}: " + "; ".join(shown)
    )


_NODES_SHOWN = 8
_NOT_SHOWN = ("memory", "object_store_memory")


def _node_summary(node: dict[str, Any]) -> str:
    res = node["Resources"]
    parts = [f"{k} {v:g}" for k, v in (("CPU", res.get("CPU", 0)), ("GPU", res.get("GPU", 0))) if v]
    parts += [
        f"{k} {v:g}"
        for k, v in sorted(res.items())
        if k not in ("CPU", "GPU", *_NOT_SHOWN) and not k.startswith(("node:", "accelerator_type:"))
    ]
    head = "head, " if "node:__internal_head__" in res else ""
    return f"{node['NodeManagerAddress']} ({head}{', '.join(parts) or 'no CPUs'})"


# A client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, 3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x4  # an HTTP/2 frame type


def _check_reachable(
    address: str, timeout: float = PROBE_TIMEOUT_S, shown: str | None = None
) -> None:
    """Fail within ``timeout`` seconds, in one line, unless a Ray head answers at HOST:PORT.

    Ray retries a silent address for minutes, printing its own retry lines. Its GCS (and
    the Ray Client server, ``ray://``) speak gRPC: with plaintext the server sends its
    HTTP/2 SETTINGS frame as soon as it accepts a connection; with TLS (RAY_USE_TLS=1) it
    answers the TLS handshake. Something that accepts and stays silent, closes at once or
    answers another protocol is not a Ray head. ``shown``: the ray.address the user gave
    (``auto`` resolved to RAY_ADDRESS)."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    where = f"cannot reach the Ray cluster at ray.address={(shown or address)!r}"
    if shown is not None and shown != address:
        where += f" (RAY_ADDRESS={address!r})"
    fix = (
        "check the host and port (the head's --port, 6379 by default; ray://HOST:10001 for "
        "Ray Client), or use ray.address=null for an embedded local Ray"
    )
    host, _, port = address.rpartition(":")
    host = host.removeprefix("ray://").strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{where} ({exc}); start one with `ray start --head`, {fix}") from None
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
    try:
        with sock:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            if tls:
                _tls_handshake(sock, host)
                return
            sock.sendall(_HTTP2_PREFACE)
            header = b""
            while len(header) < 9:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except TimeoutError:
        raise ClusterError(
            f"{where}: it accepted the connection but did not answer within {timeout:g} s "
            f"(a Ray head answers at once), so it is not a Ray head; {fix}"
        ) from None
    except OSError as exc:
        if tls:  # the handshake failed, but something answered: Ray says what is wrong
            log.debug("TLS probe of %s: %s", address, exc)
            return
        header = b""
    if len(header) < 9:
        raise ClusterError(
            f"{where}: it closed the connection without answering, so it is not a Ray head "
            "(a cluster with TLS needs RAY_USE_TLS=1 and its certificates here); " + fix
        )
    if header[3] != _SETTINGS:
        raise ClusterError(
            f"{where}: it answered, but not as a Ray head (no gRPC greeting; the dashboard's "
            f"port, 8265 by default, is not the head's); {fix}"
        )


def _tls_handshake(sock: Any, host: str) -> None:
    """A TLS handshake on ``sock`` (its timeout set): only whether the peer answers it, so
    the certificate is not checked here (Ray checks it); the node's own certificate is
    offered where set, as Ray's clients offer it."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    cert, key = os.environ.get("RAY_TLS_SERVER_CERT"), os.environ.get("RAY_TLS_SERVER_KEY")
    if cert and key:
        with contextlib.suppress(OSError, ssl.SSLError):
            context.load_cert_chain(cert, key)
    with context.wrap_socket(
        sock, server_hostname=host or None, do_handshake_on_connect=False
    ) as tls:
        tls.do_handshake()


@dataclass
class Placement:
    """Which host actor serves which clients, and what each actor asks Ray for."""

    mode: str
    host_clients: list[list[int]]
    host_options: list[dict[str, Any]]

    @property
    def assignment(self) -> dict[int, int]:
        return {cid: h for h, cids in enumerate(self.host_clients) for cid in cids}


def _actor_options(cfg: FedrayConfig, extra: dict[str, float]) -> dict[str, Any]:
    resources = {**cfg.client.resources, **extra}
    opts: dict[str, Any] = {"num_cpus": cfg.client.num_cpus, "num_gpus": cfg.client.num_gpus}
    if resources:
        opts["resources"] = resources
    return opts


def plan_placement(cfg: FedrayConfig, cluster: dict[str, float]) -> Placement:
    """Decide silo vs simulation and the actors' resources; fail fast if nothing fits."""
    needs = {"CPU": cfg.client.num_cpus, "GPU": cfg.client.num_gpus, **cfg.client.resources}
    capacity = math.inf
    for name, amount in needs.items():
        if amount <= 0:
            continue
        have = cluster.get(name, 0.0)
        if have < amount:
            key = {"CPU": "client.num_cpus", "GPU": "client.num_gpus"}.get(
                name, f"client.resources.{name}"
            )
            raise ClusterError(
                f"{key}={amount:g} but the Ray cluster has {have:g} {name}; lower it or add "
                f"nodes with that resource (cluster has: "
                + ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if "node:" not in k)
                + ")"
            )
        capacity = min(capacity, math.floor(have / amount + 1e-9))
    for cid, site in cfg.cluster.sites.items():
        for name, amount in site.items():
            if cluster.get(name, 0.0) < amount:
                raise ClusterError(
                    f"cluster.sites.{cid} asks for {name}={amount:g} but no node of the Ray "
                    f"cluster offers it (start that site's node with "
                    f"--resources='{{\"{name}\": {amount:g}}}')"
                )
    if capacity is math.inf:
        capacity = max(1, int(cluster.get("CPU", 1)))
    mode = cfg.cluster.mode
    if mode == "auto":
        mode = "silo" if (cfg.cluster.sites or cfg.num_clients <= capacity) else "simulation"
    if mode == "silo":
        if cfg.num_clients > capacity and not cfg.cluster.sites:
            raise ClusterError(
                f"cluster.mode=silo needs one actor per client: num_clients={cfg.num_clients} "
                f"actors of {needs} do not fit (room for {capacity}); lower client.num_cpus "
                "or use cluster.mode=simulation"
            )
        hosts = [[cid] for cid in range(cfg.num_clients)]
        opts = [
            _actor_options(cfg, cfg.cluster.sites.get(str(cid), {}))
            for cid in range(cfg.num_clients)
        ]
        return Placement("silo", hosts, opts)
    num = cfg.cluster.num_actors or int(min(capacity, cfg.num_clients))
    num = max(1, min(num, cfg.num_clients))
    per = math.ceil(cfg.num_clients / num)
    hosts = [list(range(i, min(i + per, cfg.num_clients))) for i in range(0, cfg.num_clients, per)]
    return Placement("simulation", hosts, [_actor_options(cfg, {}) for _ in hosts])


def dealer_options(cfg: FedrayConfig, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Ray options that pin the key dealer to the node offering ``crypto.dealer_site``.

    The dealer holds the private key and receives the hosts' obfuscators, so in a
    deployment it belongs on a client site, not on a head node the server's operator runs.
    Without ``crypto.dealer_site`` Ray places it (usually on the driver's node).
    """
    site = cfg.crypto.dealer_site
    if not site:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    offering = sorted(n["NodeID"] for n in nodes if n.get("Alive") and site in n["Resources"])
    if not offering:
        names = sorted(
            {
                r
                for n in nodes
                if n.get("Alive")
                for r in n["Resources"]
                if r not in ("CPU", "GPU", "memory", "object_store_memory")
                and not r.startswith(("node:", "accelerator_type:"))
            }
        )
        raise ClusterError(
            f"crypto.dealer_site={site!r} but no node of the Ray cluster offers that resource "
            f"(custom resources offered: {', '.join(names) or 'none'}); start the site's node "
            f"with --resources='{{\"{site}\": 1}}'"
        )
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(offering[0], soft=False)}


def call_when_available(method: Any, *args: Any, timeout: float = 120.0) -> Any:
    """``ray.get(method.remote(*args))``, waiting while Ray restarts the actor (a call to a
    restarting actor fails at once). Raises the call's error, or TimeoutError."""
    import time

    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(method.remote(*args), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() >= deadline:
                raise TimeoutError("the actor did not come back in time") from None
            time.sleep(0.5)
