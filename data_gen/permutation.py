"""A keyed pseudo-random permutation of range(n), evaluated one index at a time.

A balanced Feistel network over the smallest even number of bits covering n, with cycle walking
to stay inside [0, n). It lets persona i take a unique, random-looking name and attribute set
without knowing any other persona, which is what makes sharded generation coordination-free.
"""

from __future__ import annotations

import hashlib

_ROUNDS = 4


def _round_value(key: bytes, round_index: int, half: int, bits: int) -> int:
    digest = hashlib.blake2b(
        half.to_bytes(8, "little") + bytes([round_index]), key=key, digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def permute(index: int, n: int, key: tuple) -> int:
    """Maps `index` in [0, n) to a distinct value in [0, n), fixed by `key`."""
    if not 0 <= index < n:
        raise ValueError(f"index {index} outside the permutation range [0, {n})")
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half_bits) - 1
    key_bytes = hashlib.blake2b(repr(key).encode(), digest_size=32).digest()
    value = index
    while True:  # Cycle walking: re-encrypt until the value falls inside [0, n).
        left, right = value >> half_bits, value & mask
        for r in range(_ROUNDS):
            left, right = right, left ^ _round_value(key_bytes, r, right, half_bits)
        value = (left << half_bits) | right
        if value < n:
            return value
