"""Seed derivation, one formula for the whole project (training streams, per-map sampling seeds).

    derive_seed(seed, *tags)   a seed in [0, 2**31) for the stream named by tags, e.g. ("data", rank)
    generator(seed, *tags)     a CPU torch.Generator seeded with it
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *tags: object) -> int:
    """A seed in [0, 2**31) for the stream named by `tags` (e.g. derive_seed(run_seed, "data", rank)).

    Hashing, not arithmetic: seed*1000 + rank collides with (seed+1)*1000 + rank - 1000, a hash does not; and the
    same tags give the same stream on every machine and Python version."""
    text = "/".join([str(int(seed))] + [str(t) for t in tags])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % (2 ** 31)


def generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU torch.Generator seeded with derive_seed(seed, *tags)."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))
