"""What a curious server can try with what it holds. Run *inside* the server actor
(``server.__ray_call__.remote(fn, ...)``), so each attack has exactly the server's reach:
its own attributes, the actor handles it was given, and the named actors it can list.
Shipped to Ray by value (Ray workers import nothing from tests/)."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np


def reachable_handles(root: Any) -> list[Any]:
    """Every Ray actor handle reachable from ``root``'s attributes."""
    from ray.actor import ActorHandle

    found, seen = [], set()

    def walk(obj, depth):
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, ActorHandle):
            found.append(obj)
            return
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, list | tuple | set):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for v in vars(obj).values():
                walk(v, depth + 1)

    walk(root, 0)
    return found


def named_handles() -> list[Any]:
    import ray

    out = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        try:
            out.append(ray.get_actor(entry["name"], namespace=entry["namespace"]))
        except ValueError:  # gone since listed
            continue
    return out


def forged_contribution(key, host: int, client_ids, round_num: int):
    """A contribution the server signs with its own key (it has no host's)."""
    from fedray.runtime.keys import Contribution, HostIdentity

    c = Contribution(
        key_id=key.fingerprint,
        round=round_num,
        update_id=f"h{host}-{secrets.token_hex(16)}",
        host=host,
        client_ids=tuple(client_ids),
        ciphertext_sha256="0" * 64,
    )
    return HostIdentity().sign(c)


def probe_every_method(server) -> dict[str, Any]:
    """Call every public method of every handle the server holds or can list, with the
    most useful arguments the server can make up; return what came back.

    Returns {"calls": [(class, method, "ok"|error line)], "findings": [...]}, where
    findings are any key material found in an answer (see ``find_key_material``).
    """
    import ray

    from fedray.crypto.paillier import PrivateKey, PublicKey
    from fedray.crypto.threshold import DecryptionShare
    from fedray.runtime.client import RoundTask
    from fedray.runtime.keys import find_key_material

    key = server.key
    n = key.n
    n2 = n * n
    forged = forged_contribution(key, 0, [0, 1, 2, 3], server.round + 1)
    fake_private = PrivateKey(PublicKey(n), 3, 5)  # not the factors: only a probe
    fake_share = DecryptionShare(key, 1, 12345)
    width = key.public.ciphertext_bytes
    # The old factoring oracle: a "ciphertext" 1 + n and a huge count.
    oracle_payload = (1 + n).to_bytes(width, "little") * server.layout.num_ciphertexts
    args_for = {
        "train": [(RoundTask(server.round + 50, [0], {}), server.weights)],
        "set_weight_ref": [(1e12,), (1e12, b"\0" * 64)],
        "install_private_key": [(fake_private,)],
        "configure_crypto": [(key, [], 0, b"\0" * 64)],
        "install": [(key, fake_share), (key, fake_private)],
        "register": [(0, b"\1" * 32, 99, 1, b"\0" * 64)],
        "deposit": [(forged, None), (forged, b"\0" * 8)],
        "share_sum": [
            (server.round, [forged.contribution.update_id], {0: b"\0" * 64}),
            (10**6, ["x", "y"], {}),
        ],
        "partial_decrypt": [
            (server.round, [forged.contribution.update_id], {}, [oracle_payload]),
            (server.round + 1, ["x"], {0: b"\0" * 64}, [oracle_payload], 0, 1),
        ],
        "approve": [(server.round, ["x", "y"]), (server.round + 1, ["x"])],
    }
    calls, findings, answers = [], [], []
    handles = reachable_handles(server) + named_handles()
    for handle in handles:
        cls = handle._ray_actor_creation_function_descriptor.class_name
        methods = sorted(m for m in dir(handle) if not m.startswith("_"))
        for method in methods:
            for args in args_for.get(method, [()]):
                try:
                    answer = ray.get(getattr(handle, method).remote(*args), timeout=120)
                    calls.append((cls, method, "ok"))
                    if method != "train":
                        answers.append(answer)
                    findings += find_key_material(answer, n)
                    if isinstance(answer, int) and 1 < answer < n2:
                        findings += find_key_material([answer], n)
                except Exception as exc:
                    calls.append((cls, method, str(exc).strip().splitlines()[-1][:200]))
    findings += find_key_material(server, n)
    return {"calls": calls, "findings": findings, "answers": answers}


def custody_findings(server, known_secrets=frozenset()) -> list[str]:
    """The custody check on everything the server holds; ``known_secrets``: the key
    holders' share values, which no integer the server holds may equal."""
    from fedray.runtime.keys import find_key_material

    return find_key_material(server, server.key.n, known_secrets=known_secrets)


def steal(server, loot) -> None:
    """The mutation: hand the server key material, as a broken custody would."""
    server._loot = loot


def deposits_of_a_fresh_round(server, per_client: bool = True) -> dict[str, Any]:
    """The server makes the hosts train a new round (it may: it holds their handles),
    keeps the updates, and returns what it needs for the attacks below."""
    import ray

    from fedray.runtime.client import RoundTask

    server.round += 1
    refs = [
        h.train.remote(RoundTask(server.round, cids, {}, server.releases), server.weights)
        for h, cids in _host_clients(server).items()
    ]
    updates = []
    for batch in ray.get(refs):
        updates += [r.encrypted for r in batch if r.encrypted is not None]
    return {"round": server.round, "updates": updates}


def second_update_of(server, client_id: int) -> Any:
    """The server asks ``client_id``'s host to train that client again in the current
    round (it may: it holds the handle): a second, differently named update of the same
    client, which the host signs and deposits like any other. Returns it (None if the
    host did not seal it)."""
    import ray

    from fedray.runtime.client import RoundTask

    host = server.hosts[server.assignment[client_id]]
    task = RoundTask(server.round, [client_id], {}, server.releases)
    (result,) = ray.get(host.train.remote(task, server.weights))
    return result.encrypted


def _host_clients(server) -> dict[Any, list[int]]:
    out: dict[int, list[int]] = {}
    for cid, host in sorted(server.assignment.items()):
        out.setdefault(host, []).append(cid)
    return {server.hosts[h]: cids for h, cids in out.items()}


def host_approvals(server, round_num: int, update_ids: list[str]) -> dict[int, bytes]:
    """Every approval of ``update_ids`` the server can get: it asks every host (it holds
    their handles); a host that refuses is left out."""
    import ray

    approvals = {}
    for i, host in enumerate(server.hosts):
        try:
            approvals[i] = ray.get(host.approve.remote(round_num, update_ids))
        except Exception:
            continue
    return approvals


def ask_share_sum(
    server, round_num: int, update_ids: list[str], approvals: dict | None = None
) -> list[str]:
    """Ask every holder for the share sum of ``update_ids`` with the hosts' approvals the
    server could get (or ``approvals``); each answer or refusal."""
    import ray

    if approvals is None:
        approvals = host_approvals(server, round_num, update_ids)
    out = []
    for h in server.key_holders:
        try:
            ray.get(h.share_sum.remote(round_num, update_ids, approvals))
            out.append("released")
        except Exception as exc:
            out.append(str(exc).strip().splitlines()[-1])
    return out


def open_with_colluders(server, update, colluding_shares: dict[int, bytes]) -> Any:
    """Try to open one client's update with the server's view plus colluding holders'
    exponent shares of that update: interpolate as if they were enough."""
    from fedray.crypto.paillier import from_bytes
    from fedray.crypto.threshold import Unmasker, lagrange_at_zero

    key = server.key
    unmasker = Unmasker(key, 1)
    try:
        exponents = unmasker.exponents(colluding_shares, 1)
    except ValueError as exc:
        # Fewer than t shares: interpolate the line through them anyway (guess f(0)).
        width = key.share_width()
        js = sorted(colluding_shares)
        coeffs = lagrange_at_zero(js, key.holders) if len(js) > 1 else [key.delta]
        cols = [
            [
                int.from_bytes(colluding_shares[j][i : i + width], "little")
                for i in range(0, len(colluding_shares[j]), width)
            ]
            for j in js
        ]
        exponents = [
            max(0, sum(c * v for c, v in zip(coeffs, vals, strict=True)) // key.delta**2)
            for vals in zip(*cols, strict=True)
        ]
        del exc
    cts = from_bytes(key.public, update.ciphertexts)
    try:
        plain = unmasker.unmask(cts, exponents)
    except (OverflowError, ValueError):  # a guessed exponent beyond any real one
        return None
    if plain is None:
        return None
    total, _ = server.layout.decode_sum(plain, update.count)
    return np.asarray(total)


def failure_oracle(server, feature: int, threshold: float) -> dict[str, Any]:
    """The curious-server review's failure oracle, replayed with what the server holds:
    it sets a global model whose training overflows only at a client with an example
    whose ``feature`` is above ``threshold`` (one hidden unit 10^20 (x - threshold),
    read out at 10^30: inf, then NaN), runs the round, and keeps what every host hands
    back. Bisecting ``threshold`` over rounds would read the feature's maximum at each
    site if it could tell which clients failed. Returns, per client, everything of its
    result but timings and names, and the round's metrics."""
    import copy

    import torch

    from fedray.models import ParamView

    model = copy.deepcopy(server.model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        first, _, last = model.net
        first.weight[0, feature] = 1e20
        first.bias[0] = -1e20 * threshold
        last.weight[0, 0] = 1e30
    server.weights = ParamView(model).get()
    seen: dict[int, tuple] = {}
    fetch = server._fetch

    def recording(ref):
        batch = fetch(ref)
        for r in batch if isinstance(batch, list) else []:
            u = r.encrypted
            seen[r.client_id] = (
                r.error,
                r.weight,
                r.stats,
                r.delta is None and r.compressed is None,
                None if u is None else (len(u.ciphertexts), u.count, len(u.client_ids)),
                r.bytes_up,
                r.bytes_to_key_holders,
            )
        return batch

    server._fetch = recording
    try:
        outcome = server.run_round()
    finally:
        server._fetch = fetch
    return {"seen": seen, "metrics": outcome.metrics}
