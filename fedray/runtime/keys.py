"""The key dealer: makes the Paillier key pair, hands it out by role, decrypts sums fast.

The driver gives the server ``public_key()`` only and gives client hosts a handle to this
actor, from which each fetches ``keypair()`` itself; the private key never passes through
the driver or the server. Run it on a site you trust (see README, "Threat model").

It is also the key holder the server asks first for a round's decrypted sum. Hosts
deposit the obfuscators of each update they send (client -> key holder, never through
the server), so the dealer strips them from the sum with a few multiplications per
ciphertext instead of two 1024-bit exponentiations. It decrypts only sums of at least
``min_count`` clients, counted from its own deposits; when a deposit is missing or the
sum is not the product of the named updates, it answers None and the server falls back
to ordinary decryption by the client hosts.
"""

from __future__ import annotations

from fedray.crypto.paillier import (
    KnownObfuscatorDecryptor,
    PrivateKey,
    PublicKey,
    from_bytes,
    generate_keypair,
    obfuscators_from_bytes,
)

KEEP_ROUNDS = 2  # deposits of older rounds (stragglers' leftovers) are dropped


class KeyDealer:
    """Holds one fresh key pair for the run; decrypts sums with deposited obfuscators."""

    def __init__(self, key_bits: int, min_count: int = 1):
        self._public, self._private = generate_keypair(key_bits)
        self._min_count = int(min_count)
        self._decryptor = KnownObfuscatorDecryptor(self._private)
        self._deposits: dict[str, tuple[int, int, bytes]] = {}  # id -> (round, count, obfs)

    def public_key(self) -> PublicKey:
        return self._public

    def keypair(self) -> PrivateKey:
        return self._private

    def deposit(self, round_num: int, update_id: str, count: int, obfuscators: bytes) -> bool:
        """Keep the obfuscators of one update (of ``count`` clients) until its round ends."""
        if not update_id or update_id in self._deposits or count < 1:
            return False
        self._deposits[update_id] = (int(round_num), int(count), bytes(obfuscators))
        return True

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def pending_deposits(self) -> int:
        return len(self._deposits)

    def decrypt_sum(
        self, round_num: int, update_ids: list[str], payload: bytes
    ) -> list[int] | None:
        """Plaintexts of the summed ``payload`` of ``update_ids``, or None (fall back).

        Each deposit is used once: a sum is decrypted at most once this way.
        """
        stale = [k for k, (r, _, _) in self._deposits.items() if r <= round_num - KEEP_ROUNDS]
        for k in stale:
            del self._deposits[k]
        if not update_ids or len(set(update_ids)) != len(update_ids):
            return None
        if any(self._deposits.get(u, (None,))[0] != round_num for u in update_ids):
            return None
        deposits = [self._deposits.pop(u) for u in update_ids]
        count = sum(c for _, c, _ in deposits)
        if count < self._min_count:
            raise PermissionError(
                f"refusing to decrypt a sum of {count} updates (fewer than the "
                f"{self._min_count} a round must have)"
            )
        cts = from_bytes(self._public, payload)
        sets = [obfuscators_from_bytes(self._public, obfs) for _, _, obfs in deposits]
        return self._decryptor.decrypt_sum(cts, sets)


def key_dealer_class():
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(KeyDealer)
