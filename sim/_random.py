"""Deterministic random streams keyed by purpose, so that any piece of the survey
(one quadrant of one exposure, say) can be drawn alone, in any order, in any
process, and still come out the same."""

from __future__ import annotations

import zlib

import numpy as np


def _key(part: object) -> int:
    if isinstance(part, (int, np.integer)):
        return int(part) & 0xFFFFFFFF
    return zlib.crc32(str(part).encode())


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A generator for ``(seed, *keys)``; the same keys give the same stream."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(_key(k) for k in keys)]))
