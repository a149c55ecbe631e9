"""The sampling strategies: which cells each step decides, how many steps a run may take, and
what each step passes to the sampler step, stated once for the reference, the fast op and every
front end (SPEC §1). ``n`` below is the grid's cell count: the image model's ``n_cells`` (N² on
its N×N grid, 64 on the paper's 8×8), which every caller with a model passes; the ``n_cells``
defaults (``grid.N_CELLS``) serve code that has no model (the CLI's checks).

- ``mask_predict`` (Mask-Predict-K, "NAR", the paper's best): every masked cell takes its
  prediction; step i re-masks ``int((K - i) / K · n)`` cells (the authors' float formula; step 0
  masks all n), the least confident ones. Default K = 4 (the authors' sampling script); K may
  exceed n.
- ``confidence`` (AR): each step decides the most confident cell not yet visited. K <= n.
- ``tlbr`` (AR): step i decides cell i, top-left to bottom-right. K <= n.
- ``random`` (AR): the authors draw ``positions = shuffle(range(n))`` with
  ``random.Random(seed)``; for K > n they prepend ``shuffle(range(K - n))`` (a fresh
  ``Random(seed)``) and step i takes ``positions.pop() % n`` -- popping from the end, so
  revisits come after every cell was seen.

The AR strategies default to K = n (one step per cell). Every run is capped at ``MAX_STEPS``:
each step is one full forward (beyond the cap a run takes hours) and the engine keeps a mask
history of ``MAX_STEPS`` rows per slot.

Codes are the native sampler's (``enum Strategy`` in csrc/sampler_rules.h; a test compares).

Pure Python on purpose: the CLI checks its arguments with it before torch or a model is loaded,
and the reference uses it without importing anything fast.
"""
from __future__ import annotations

import numbers
import random
from dataclasses import dataclass
from typing import Optional

from .grid import N_CELLS

MAX_STEPS = 1024  # why: the module docstring (hours of forwards; the engine's mask history)
MASK_PREDICT_STEPS = 4  # the authors' sampling script
INACTIVE = 4  # per-row code of an idle row of the sampler step (kInactive): skipped entirely


@dataclass(frozen=True)
class Strategy:
    """One sampling strategy. ``autoregressive``: one cell decided per step (default K = n);
    ``visits_once``: a cell is never decided twice, so K <= n; ``needs``: the per-step arrays
    the sampler step must be given for it (see ``schedule``)."""

    name: str
    code: int
    autoregressive: bool
    visits_once: bool
    needs: tuple[str, ...]
    summary: str

    def default_steps(self, n_cells: int = N_CELLS) -> int:
        return n_cells if self.autoregressive else MASK_PREDICT_STEPS

    def max_steps(self, n_cells: int = N_CELLS) -> int:
        return n_cells if self.visits_once else MAX_STEPS

    def describe(self, n_cells: int = N_CELLS) -> str:
        """One line for help texts: what a step does, the default and the limit."""
        more = "; more revisit cells" if self.autoregressive and not self.visits_once else ""
        return (f"{self.summary}; default {self.default_steps(n_cells)} steps{more}, "
                f"at most {self.max_steps(n_cells)}")


# In the order users see them (help texts, the engine benchmark's mix).
_ALL = (
    Strategy("mask_predict", 0, autoregressive=False, visits_once=False, needs=("count",),
             summary="Mask-Predict-K (the paper's best): every cell predicted at each step, the "
                     "least confident ones re-masked"),
    Strategy("confidence", 3, autoregressive=True, visits_once=True, needs=(),
             summary="one cell per step, the most confident undecided one"),
    Strategy("tlbr", 1, autoregressive=True, visits_once=True, needs=("cell",),
             summary="one cell per step, top-left to bottom-right"),
    Strategy("random", 2, autoregressive=True, visits_once=False, needs=("cell",),
             summary="one cell per step in a seeded random order"),
)
BY_NAME: dict[str, Strategy] = {s.name: s for s in _ALL}
NAMES: tuple[str, ...] = tuple(BY_NAME)
CODES: dict[str, int] = {s.name: s.code for s in _ALL}
BY_CODE: dict[int, Strategy] = {s.code: s for s in _ALL}


# --------------------------------------------------------------------------------------------
# Validation: one clear TypeError/ValueError naming the argument (``what``: its name as the
# caller's user knows it, e.g. "requests[3].steps" or "--steps 70:").


def lookup(name, what: str = "strategy") -> Strategy:
    """The strategy called ``name``."""
    if not isinstance(name, str) or name not in BY_NAME:
        raise ValueError(f"{what} must be one of {', '.join(NAMES)}; got {name!r}")
    return BY_NAME[name]


def check_strategy(name, what: str = "strategy") -> str:
    return lookup(name, what).name


def default_steps(name, n_cells: int = N_CELLS) -> int:
    return lookup(name).default_steps(n_cells)


def strategy_code(strategy, what: str = "strategy") -> int:
    """The native code of a strategy given by name or by code."""
    if isinstance(strategy, bool) or not isinstance(strategy, (str, int)):
        raise TypeError(f"{what} must be one of {', '.join(NAMES)} (or its code), got {strategy!r}")
    if isinstance(strategy, str):
        return lookup(strategy, what).code
    if strategy not in CODES.values():
        raise ValueError(f"{what} code must be one of {sorted(CODES.values())}, got {strategy}")
    return strategy


def check_steps(strategy, steps, n_cells: int = N_CELLS, what: str = "steps") -> int:
    """``steps`` for a run of ``strategy`` (a name) on ``n_cells`` cells: None means the
    strategy's default; else an int in 1..max_steps(n_cells)."""
    s = lookup(strategy)
    if steps is None:
        return s.default_steps(n_cells)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{what} must be an int (or None for the default), got {type(steps).__name__}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"{what} must be >= 1, got {steps}")
    cap = s.max_steps(n_cells)
    if steps > cap and s.visits_once:
        raise ValueError(f"{what} must be <= {cap} for strategy {s.name!r} (it decides one of the "
                         f"{n_cells} cells per step, so at most {cap} steps; mask_predict and "
                         f"random take more), got {steps}")
    if steps > cap:
        raise ValueError(f"{what} must be <= {cap} (each step is one full forward), got {steps}")
    return steps


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# The rules: which cells each step touches (the authors' schedules).


def mask_counts(steps: int, n_cells: int = N_CELLS) -> list[int]:
    """Cells masked at each Mask-Predict step: ``[int((K - i) / K * n_cells) for i < K]``."""
    k = _check_count("steps", steps)
    _check_count("n_cells", n_cells)
    return [int((k - i) / k * n_cells) for i in range(k)]


def tlbr_order(steps: int, n_cells: int = N_CELLS) -> list[int]:
    """Cell decided at each step, top-left to bottom-right (``steps <= n_cells``)."""
    _check_count("n_cells", n_cells)
    return list(range(check_steps("tlbr", _check_count("steps", steps), n_cells)))


def random_order(steps: int, seed: int, n_cells: int = N_CELLS) -> list[int]:
    """Cell decided at each step of the seeded random order (revisits cells when K > n_cells)."""
    k = _check_count("steps", steps)
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


# --------------------------------------------------------------------------------------------
# Schedules: the per-step count / cell / next_cell the sampler step takes for a whole run.


@dataclass
class Schedule:
    """Per-step inputs of the sampler step for one row: ``count[i]``, ``cell[i]``,
    ``next_cell[i]`` are what step i (0-based) passes (``None`` lists where unused)."""

    strategy: str
    steps: int
    count: Optional[list]
    cell: Optional[list]
    next_cell: Optional[list]

    def tensors(self, batch: int, device=None) -> dict:
        """{name: int32 [steps, batch]} for the lists that are used (every row the same)."""
        import torch  # only here: the rest of this module stays importable without torch

        out = {}
        for name in ("count", "cell", "next_cell"):
            values = getattr(self, name)
            if values is not None:
                t = torch.tensor(values, dtype=torch.int32, device=device)
                out[name] = t.view(-1, 1).expand(-1, batch).contiguous()
        return out


def schedule(strategy: str, steps: int, seed: Optional[int] = None,
             n_cells: int = N_CELLS) -> Schedule:
    """The sampler-step inputs of a K-step run, starting from every cell masked.

    The rules are the ones above; this only shifts them to what a step passes. mask_predict: step
    i writes the mask of step i+1, so ``count[i] = mask_counts(K)[i+1]`` and ``count[K-1] = 0``
    (the final output gathers every cell). tlbr: ``cell[i] = i``. random: ``cell[i] =
    order[i]``, ``next_cell[i] = order[i+1]`` (-1 at the last step), with ``seed`` None meaning 0.
    confidence: nothing.
    """
    name = check_strategy(strategy)
    steps = check_steps(name, steps, n_cells)
    if name == "mask_predict":
        return Schedule(name, steps, mask_counts(steps, n_cells)[1:] + [0], None, None)
    if name == "tlbr":
        return Schedule(name, steps, None, tlbr_order(steps, n_cells), None)
    if name == "random":
        order = random_order(steps, 0 if seed is None else seed, n_cells)
        return Schedule(name, steps, None, order, order[1:] + [-1])
    return Schedule(name, steps, None, None, None)
