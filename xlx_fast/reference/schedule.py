"""Which cells each sampling step touches: the authors' schedules, written out once.

- Mask-Predict-K: step i re-masks ``int((K - i) / K · 64)`` cells (the authors' float formula;
  step 0 masks all 64).
- TLBR: step i decides cell i.
- random: the authors draw ``positions = shuffle(range(64))`` with ``random.Random(seed)``; for
  K > 64 they prepend ``shuffle(range(K - 64))`` (a fresh ``Random(seed)``) and step i takes
  ``positions.pop() % 64`` — popping from the end, so revisits come after every cell was seen.
"""
from __future__ import annotations

import numbers
import random


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_steps(steps: int) -> int:
    return _check_count("steps", steps)


def mask_counts(steps: int, n_cells: int = 64) -> list[int]:
    """Cells masked at each Mask-Predict step: ``[int((K - i) / K * n_cells) for i < K]``."""
    k = _check_steps(steps)
    _check_count("n_cells", n_cells)
    return [int((k - i) / k * n_cells) for i in range(k)]


def tlbr_order(steps: int, n_cells: int = 64) -> list[int]:
    """Cell decided at each step, top-left to bottom-right (``steps <= n_cells``)."""
    k = _check_steps(steps)
    _check_count("n_cells", n_cells)
    if k > n_cells:
        raise ValueError(f"steps must be <= {n_cells} for strategy 'tlbr' (one cell per step), got {k}")
    return list(range(k))


def random_order(steps: int, seed: int, n_cells: int = 64) -> list[int]:
    """Cell decided at each step of the seeded random order (revisits cells when K > n_cells)."""
    k = _check_steps(steps)
    _check_count("n_cells", n_cells)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    positions = list(range(n_cells))
    random.Random(seed).shuffle(positions)
    if k > n_cells:
        extra = list(range(k - n_cells))
        random.Random(seed).shuffle(extra)
        positions = extra + positions
    return [positions.pop() % n_cells for _ in range(k)]
