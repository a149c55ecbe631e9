"""Which cells each sampling step touches: the authors' schedules, written out once.

- Mask-Predict-K: step i re-masks ``int((K - i) / K · 64)`` cells (the authors' float formula;
  step 0 masks all 64).
- TLBR: step i decides cell i.
- random: the authors draw ``positions = shuffle(range(64))`` with ``random.Random(seed)``; for
  K > 64 they prepend ``shuffle(range(K - 64))`` (a fresh ``Random(seed)``) and step i takes
  ``positions.pop() % 64`` — popping from the end, so revisits come after every cell was seen.
"""
from __future__ import annotations

import random


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def mask_counts(steps: int, n_cells: int = 64) -> list[int]:
    """Cells masked at each Mask-Predict step: ``[int((K - i) / K * n_cells) for i < K]``."""
    k = _check_steps(steps)
    return [int((k - i) / k * n_cells) for i in range(k)]


def tlbr_order(steps: int, n_cells: int = 64) -> list[int]:
    """Cell decided at each step, top-left to bottom-right (``steps <= n_cells``)."""
    k = _check_steps(steps)
    if k > n_cells:
        raise ValueError(f"steps must be <= {n_cells} for strategy 'tlbr' (one cell per step), got {k}")
    return list(range(k))


def random_order(steps: int, seed: int, n_cells: int = 64) -> list[int]:
    """Cell decided at each step of the seeded random order (revisits cells when K > n_cells)."""
    k = _check_steps(steps)
    positions = list(range(n_cells))
    random.Random(seed).shuffle(positions)
    if k > n_cells:
        extra = list(range(k - n_cells))
        random.Random(seed).shuffle(extra)
        positions = extra + positions
    return [positions.pop() % n_cells for _ in range(k)]
