"""One row's sampling parameters -- strategy, steps, temperature, seed -- and their checks,
written once for every entry point that takes them per row (``generate``, the engine's
requests). Pure Python, like the strategies it builds on.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .grid import N_CELLS
from .strategies import Strategy, check_steps, lookup

F32_MAX = (2 - 2 ** -23) * 2 ** 127  # float32's largest finite value
# below this a logit of 10^8 over the temperature overflows float32 (the head's z = logit / τ),
# and the row's probabilities turn NaN: such a row is greedy in all but name, so it is refused
MIN_TEMPERATURE = 1e-30


@dataclass(frozen=True)
class SamplingParams:
    """A checked row: ``steps`` resolved (None became the strategy's default), ``temperature``
    a float (0 = greedy), ``seed`` a Python int (any size: it is hashed, see ``seeds``)."""

    strategy: Strategy
    steps: int
    temperature: float
    seed: int


def check_params(strategy, steps, temperature, seed, n_cells: int = N_CELLS,
                 where: str = "") -> SamplingParams:
    """Raise one TypeError/ValueError naming the first bad argument (prefixed with ``where``,
    e.g. "requests[3].") or return the checked row."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{where}seed must be an int, got {type(seed).__name__}")
    s = lookup(strategy, f"{where}strategy")
    steps = check_steps(s.name, steps, n_cells, f"{where}steps")
    temperature = check_temperature(temperature, f"{where}temperature")
    return SamplingParams(s, steps, temperature, int(seed))


def check_temperature(temperature, name: str = "temperature") -> float:
    """The temperature as a float: 0 (greedy), or in [MIN_TEMPERATURE, float32's maximum]. Raises
    TypeError/ValueError whose message starts with ``name``; every entry point (the engine,
    ``generate``, the command line, bulk lines) checks with this one rule."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(temperature).__name__}")
    try:
        temperature = float(temperature)
    except OverflowError:  # an int past float range
        temperature = math.inf
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {temperature}")
    if temperature > F32_MAX:  # the kernels read it as float32, where it would be inf
        raise ValueError(f"{name} must be at most {F32_MAX:.7g} (float32), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be 0 (greedy) or at least {MIN_TEMPERATURE:g} "
                         f"(the head divides logits by it in float32), got {temperature}")
    return temperature
