"""The strategy table (xlx_fast.strategies) and the per-row checks built on it: one definition,
equal to the native rules' codes, importable without anything fast."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from xlx_fast import strategies as S
from xlx_fast.grid import N_CELLS
from xlx_fast.sampling_params import check_params

RULES_H = Path(__file__).resolve().parent.parent / "csrc" / "sampler_rules.h"


def header_strategy_codes() -> dict[str, int]:
    """``enum Strategy`` of csrc/sampler_rules.h as {snake_case name: code}."""
    body = re.search(r"enum\s+Strategy\s*:\s*int\s*\{([^}]*)\}", RULES_H.read_text()).group(1)
    pairs = re.findall(r"k([A-Za-z]+)\s*=\s*(\d+)", body)
    return {re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(): int(code) for name, code in pairs}


def test_codes_are_the_native_rules():
    codes = header_strategy_codes()
    assert codes.pop("inactive") == S.INACTIVE
    assert codes == S.CODES
    assert sorted(S.BY_CODE) == sorted(codes.values())
    assert all(S.BY_CODE[s.code] is s for s in S.BY_NAME.values())


def test_table():
    assert S.NAMES == ("mask_predict", "confidence", "tlbr", "random")
    assert {n: S.BY_NAME[n].default_steps(N_CELLS) for n in S.NAMES} == {
        "mask_predict": 4, "confidence": N_CELLS, "tlbr": N_CELLS, "random": N_CELLS}
    assert {n: S.BY_NAME[n].max_steps(N_CELLS) for n in S.NAMES} == {
        "mask_predict": S.MAX_STEPS, "confidence": N_CELLS, "tlbr": N_CELLS, "random": S.MAX_STEPS}
    assert S.MAX_STEPS == 1024 and S.BY_NAME["tlbr"].max_steps(16) == 16


@pytest.mark.parametrize("strategy,steps,exc,match", [
    ("beam", 4, ValueError, "strategy must be one of mask_predict, confidence, tlbr, random"),
    (None, 4, ValueError, "strategy"),
    ("mask_predict", 0, ValueError, "steps must be >= 1"),
    ("mask_predict", 2.0, TypeError, "steps must be an int"),
    ("mask_predict", True, TypeError, "steps"),
    ("mask_predict", S.MAX_STEPS + 1, ValueError, "steps must be <= 1024"),
    ("random", S.MAX_STEPS + 1, ValueError, "steps must be <= 1024"),
    ("tlbr", N_CELLS + 1, ValueError, "steps must be <= 64 for strategy 'tlbr'.*at most 64"),
    ("confidence", 100, ValueError, "steps must be <= 64 for strategy 'confidence'"),
])
def test_check_steps_names_the_argument(strategy, steps, exc, match):
    with pytest.raises(exc, match=match):
        S.check_steps(strategy, steps, N_CELLS)


def test_check_steps_accepts():
    assert S.check_steps("mask_predict", None) == 4
    assert S.check_steps("tlbr", None, 16) == 16
    assert S.check_steps("random", S.MAX_STEPS) == S.MAX_STEPS
    assert S.check_steps("tlbr", N_CELLS) == N_CELLS
    assert type(S.check_steps("mask_predict", __import__("numpy").int64(7))) is int
    with pytest.raises(ValueError, match=r"--steps 70: must be <= 64"):
        S.check_steps("tlbr", 70, what="--steps 70:")


def test_strategy_code():
    assert [S.strategy_code(n) for n in S.NAMES] == [0, 3, 1, 2]
    assert S.strategy_code(2) == 2
    with pytest.raises(ValueError, match="strategy code"):
        S.strategy_code(S.INACTIVE)
    with pytest.raises(TypeError, match="strategy"):
        S.strategy_code(1.0)


def test_schedules_are_the_rules_shifted():
    assert S.schedule("mask_predict", 4).count == S.mask_counts(4)[1:] + [0] == [48, 32, 16, 0]
    order = S.random_order(70, 9)
    sch = S.schedule("random", 70, 9)
    assert sch.cell == order and sch.next_cell == order[1:] + [-1]
    assert S.schedule("tlbr", 3).cell == [0, 1, 2] and S.schedule("confidence", 3).cell is None
    for name in S.NAMES:  # the arrays the sampler step needs for a strategy are the ones given
        sch = S.schedule(name, 2, 0)
        assert all(getattr(sch, a) is not None for a in S.BY_NAME[name].needs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(seed=1.5), TypeError, r"requests\[2\]\.seed"),
    (dict(seed=True), TypeError, r"requests\[2\]\.seed"),
    (dict(strategy="beam"), ValueError, r"requests\[2\]\.strategy"),
    (dict(steps=0), ValueError, r"requests\[2\]\.steps"),
    (dict(temperature=-1.0), ValueError, r"requests\[2\]\.temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), ValueError, r"requests\[2\]\.temperature"),
    (dict(temperature="hot"), TypeError, r"requests\[2\]\.temperature must be a real number"),
    (dict(temperature=1e308), ValueError, r"requests\[2\]\.temperature.*float32"),
    (dict(temperature=10 ** 400), ValueError, r"requests\[2\]\.temperature"),
])
def test_check_params_names_the_field(kwargs, exc, match):
    args = {**dict(strategy="mask_predict", steps=None, temperature=0.0, seed=0), **kwargs}
    with pytest.raises(exc, match=match):
        check_params(args["strategy"], args["steps"], args["temperature"], args["seed"], N_CELLS,
                     where="requests[2].")


def test_check_params_resolves():
    p = check_params("random", None, 1, 2 ** 70)
    assert (p.strategy.name, p.steps, p.temperature, p.seed) == ("random", N_CELLS, 1.0, 2 ** 70)
    assert isinstance(p.temperature, float)


def _modules_after(imports: str) -> set[str]:
    code = f"import sys, {imports}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_strategies_are_neutral_ground():
    # the CLI checks arguments with them before loading torch; the reference builds on them
    loaded = _modules_after("xlx_fast.strategies, xlx_fast.sampling_params")
    fast = ("xlx_fast.ops", "xlx_fast.native", "xlx_fast._C", "xlx_fast.reference", "torch")
    assert not sorted(m for m in loaded if m.startswith(fast))
