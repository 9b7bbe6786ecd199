"""Seeds derived from positions: randomness that does not depend on the process history.

A resumed run re-seeds every random draw from ``(seed, step, ...)`` (or ``(seed, epoch,
sample)``), so it draws the same numbers as an uninterrupted run without saving or replaying any
generator state. Torch-free.
"""
from __future__ import annotations

import hashlib

__all__ = ["step_seed"]


def step_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``seed`` and any keys (step, rank, purpose): stable across processes.

    Used to re-seed randomness per step so that a resumed run draws the same numbers as an
    uninterrupted one without saving or replaying anything.
    """
    h = hashlib.blake2b(repr((int(seed),) + tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
