"""Key set-up for a run: key holders at the sites, a one-shot dealer, signed host config.

The driver is the trusted set-up party. It makes a set-up signing key (it never leaves
the driver), starts one :class:`~fedray.runtime.keys.KeyHolder` on each client host's
node, lets a :class:`~fedray.runtime.keys.KeyDealer` give each holder its share and then
kills the dealer, and tells each host (signed) which key and holders to use. Before a
retry and between rounds it sets up again hosts that Ray restarted (they have a new
signing identity, and take part again from the round after the one in flight).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fedray.config import FedrayConfig, min_clients
from fedray.errors import ClusterError, ConfigError

log = logging.getLogger("fedray.custody")


def threshold_for(cfg: FedrayConfig, holders: int) -> int:
    """t: ``crypto.threshold``, or a majority of the key holders; 1 in shared custody."""
    if cfg.crypto.custody == "shared":
        return 1
    if holders < 2:
        raise ConfigError(
            f"crypto.custody=threshold needs at least 2 key holders (one per client actor); "
            f"this job has {holders} client actor: raise cluster.num_actors or num_clients, "
            "or use crypto.custody=shared"
        )
    t = cfg.crypto.threshold if cfg.crypto.threshold is not None else holders // 2 + 1
    # More than half: any two groups of t holders share one, and each holder releases one
    # sum per round, so two different sums of one round can never both be opened.
    if not (2 <= t <= holders and 2 * t > holders):
        raise ConfigError(
            f"crypto.threshold={t} must be more than half the key holders and at most all "
            f"of them ({holders // 2 + 1}..{holders}; one key holder per client actor)"
        )
    return t


@dataclass
class KeyCustody:
    """The run's public key, its key holders, and what the driver needs to re-register."""

    key: Any  # ThresholdPublicKey
    holders: list[Any]
    hosts: list[Any]
    authority: Any  # HostIdentity: the driver's set-up key
    dealer_node: str | None
    identities: list[bytes]
    holder_nodes: list[str] = field(default_factory=list)
    epochs: dict[int, int] = field(default_factory=dict)  # per host: its registrations
    # Model checks (cluster.verify_models): the holders' attestation keys, by holder
    # index, and where each host's chain starts (None: its own initial model; on resume,
    # the checkpoint the driver vouches for: round, weights, strategy state).
    holder_keys: dict[int, bytes] | None = None
    lineage_root: dict[str, Any] | None = None

    def restrict(self, first_round: int, last_round: int) -> None:
        """Narrow the rounds every key holder opens (see ``KeyHolder.restrict``)."""
        import ray

        ray.get([h.restrict.remote(first_round, last_round) for h in self.holders])

    def open_round(self, round_num: int) -> None:
        """Open ``round_num`` at every key holder (a ticket signed with the driver's set-up
        key): holders take deposits of, and open sums of, no later round. A dead holder
        is skipped (the others suffice)."""
        import ray

        from fedray.runtime.keys import round_ticket_message

        signature = self.authority.sign_bytes(round_ticket_message(self.key.fingerprint, round_num))
        for ref in [h.open_round.remote(round_num, signature) for h in self.holders]:
            try:
                ray.get(ref, timeout=60)
            except Exception as exc:
                log.debug("a key holder did not take round %d's ticket: %s", round_num, exc)

    def configure_host(self, index: int) -> Any:
        from fedray.runtime.keys import configure_message
        from fedray.runtime.lineage import root_message

        holder_ids = [h._actor_id.hex() for h in self.holders]
        if self.holder_keys is None:
            signature = self.authority.sign_bytes(
                configure_message(self.key.fingerprint, index, holder_ids)
            )
            return self.hosts[index].configure_crypto.remote(
                self.key, self.holders, index, signature
            )
        root = root_message(self.key.fingerprint, index, self.lineage_root)
        signature = self.authority.sign_bytes(
            configure_message(self.key.fingerprint, index, holder_ids, self.holder_keys, root)
        )
        return self.hosts[index].configure_crypto.remote(
            self.key, self.holders, index, signature, self.holder_keys, self.lineage_root
        )

    def re_register(self, index: int, public: bytes, from_round: int) -> None:
        """Set up host ``index`` again after Ray restarted it: register its new identity
        with every key holder, for its deposits of rounds ``from_round`` on (the driver
        passes the round after the one in flight: see ``KeyHolder.register``), then
        configure its crypto (which builds its DP plan). The driver then gives back its
        weight_ref."""
        import ray

        from fedray.runtime.keys import registration_message

        epoch = self.epochs.get(index, 0) + 1
        signature = self.authority.sign_bytes(
            registration_message(self.key.fingerprint, index, public, epoch, from_round)
        )
        refs = [
            h.register.remote(index, public, epoch, from_round, signature) for h in self.holders
        ]
        for ref in refs:
            try:
                ray.get(ref, timeout=60)
            except Exception as exc:  # a dead holder: the others suffice
                log.debug("holder did not register host %d: %s", index, exc)
        # Registered from here on (the holders refuse this epoch again), whether or not
        # the host lives to be configured: a host that dies now is registered afresh.
        self.epochs[index] = epoch
        self.identities[index] = public
        ray.get(self.configure_host(index))


def set_up_keys(
    cfg: FedrayConfig,
    hosts: list[Any],
    assignment: dict[int, int],
    authority,
    lineage_root: dict[str, Any] | None = None,
    feature_sums: bool = False,
):
    """Key holders on the hosts' nodes, the dealer's shares, signed host configuration
    (with model checks: the holders' attestation keys and ``lineage_root``).
    ``feature_sums``: the holders also open the federation's feature sums (round 0)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from fedray.runtime.cluster import dealer_options
    from fedray.runtime.keys import key_dealer_class, key_holder_class

    t = threshold_for(cfg, len(hosts))
    identities = [public for public, _ in ray.get([h.identity.remote() for h in hosts])]
    nodes = ray.get([h.node_id.remote() for h in hosts])
    peers = dict(enumerate(identities))
    holder_cls = key_holder_class()
    holders = [
        holder_cls.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(
            j + 1,
            peers,
            assignment,
            min_clients(cfg),
            authority.public_bytes(),
            cfg.crypto.custody,
            max_rounds=cfg.rounds,
            feature_sums=feature_sums,
        )
        for j, node in enumerate(nodes)
    ]
    dealer = key_dealer_class().options(**dealer_options(cfg, ray.nodes())).remote()
    try:
        dealer_node = ray.get(dealer.node_id.remote())
        key = ray.get(
            dealer.deal.remote(
                cfg.crypto.key_bits,
                holders,
                t,
                cfg.crypto.custody,
                hosts if cfg.crypto.custody == "shared" else None,
            )
        )
    except ray.exceptions.RayTaskError as exc:
        raise ClusterError(f"key set-up failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        ray.kill(dealer)  # the dealer's process, and whatever it held of p and q, ends here
    custody = KeyCustody(key, holders, hosts, authority, dealer_node, identities)
    custody.holder_nodes = ray.get([h.node_id.remote() for h in holders])
    from fedray.runtime.lineage import verifies_models

    if verifies_models(cfg):
        keys = ray.get([h.attestation_key.remote() for h in holders])
        custody.holder_keys = {j: k for j, k in enumerate(keys, start=1)}
        custody.lineage_root = lineage_root
    ray.get([custody.configure_host(i) for i in range(len(hosts))])
    return custody
