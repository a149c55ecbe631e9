"""Per-request random streams: a seed is hashed (SplitMix64), never multiplied.

A request's sampling noise must depend on the request only (its seed, the step, the cell),
never on its batch position or neighbours, and any Python int must be a valid seed (a 64-bit
seed times a constant overflows int64). So:

    key(seed)              = fold of SplitMix64 over the sign and the 64-bit limbs of |seed|
    cell_seed(key, i, c)   = mix(mix(key ^ mix(i)) ^ (c + 1))          (i: step, c: cell < n)

where mix is SplitMix64's finaliser (a bijection on 64-bit words with full avalanche). The
result, read as int64, keys the codebook head's Philox stream (counter = class, step 0), so the
Gumbel noise of (request, step, cell, class) is fixed by the request alone. The engine computes
cell seeds on the host for the rows that sample (n words per row and step, n the row's cells:
64 on the 8×8 grid, up to 1,024; microseconds) and writes them as data, so nothing is captured
or cached per seed. A cell's seed does not depend on n: cell c has the same key on every grid.
"""
from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def mix(x: int) -> int:
    """SplitMix64 of one 64-bit word (Python ints, exact)."""
    z = (x + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def _mix_np(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        return z ^ (z >> np.uint64(31))


def seed_key(seed: int) -> int:
    """A 64-bit key for any Python int (negative and > 64-bit seeds included)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    magnitude = -seed if seed < 0 else seed
    h = mix(0x5EED0000 | (1 if seed < 0 else 0))
    while True:
        h = mix(h ^ (magnitude & _MASK))
        magnitude >>= 64
        if not magnitude:
            return h


_CELLS = np.arange(1, 1025, dtype=np.uint64)  # c + 1 for every cell a row may have


def cell_seeds(key: int, step: int, n_cells: int = 64) -> np.ndarray:
    """int64 [n_cells]: the Philox key of each cell of a row at ``step`` (see the module
    docstring); ``n_cells`` in 1..1024 (64: the 8×8 grid)."""
    if isinstance(n_cells, bool) or not isinstance(n_cells, int) or not 1 <= n_cells <= len(_CELLS):
        raise ValueError(f"n_cells must be an int in 1..{len(_CELLS)}, got {n_cells!r}")
    row = mix(key ^ mix(int(step) & _MASK))
    return _mix_np(np.uint64(row) ^ _CELLS[:n_cells]).view(np.int64)
