"""The key dealer: makes the Paillier key pair and hands it out by role.

The driver gives the server ``public_key()`` only and gives client hosts a handle to this
actor, from which each fetches ``keypair()`` itself; the private key never passes through
the driver or the server. Run it on a site you trust (see README, "Threat model").
"""

from __future__ import annotations

from fedray.crypto.paillier import PrivateKey, PublicKey, generate_keypair


class KeyDealer:
    """Holds one fresh key pair for the run."""

    def __init__(self, key_bits: int):
        self._public, self._private = generate_keypair(key_bits)

    def public_key(self) -> PublicKey:
        return self._public

    def keypair(self) -> PrivateKey:
        return self._private


def key_dealer_class():
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(KeyDealer)
