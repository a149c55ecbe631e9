"""The benchmark cases, one module per op family; each module defines ``cases(spec)``.

Both front ends enumerate cases through :func:`cases` here: ``xlx-fast bench`` and the
pytest-benchmark wrappers in ``benchmarks/`` run the same definitions, never a second copy.
"""
from __future__ import annotations

import importlib

from ..harness import Case, Spec

# family -> module; the order is the order of the sweep (end to end first, as in SPEC §6)
FAMILIES = {
    "generation": "xlx_fast.bench.cases.generation",
    "answer": "xlx_fast.bench.cases.answer",
    "caption": "xlx_fast.bench.cases.caption",
    "attention": "xlx_fast.bench.cases.attention",
    "model_forward": "xlx_fast.bench.cases.model_forward",
    "nearest": "xlx_fast.bench.cases.nearest",
    "kmeans": "xlx_fast.bench.cases.kmeans",
    "codebook_head": "xlx_fast.bench.cases.codebook_head",
    "sampler": "xlx_fast.bench.cases.sampler",
    "engine": "xlx_fast.bench.cases.engine",
    "training": "xlx_fast.bench.cases.training",
}


def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; choose from {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def cases(family: str, spec: Spec) -> list[Case]:
    """The cases of one family for ``spec`` (nothing heavy is built until a case is prepared)."""
    return list(family_module(family).cases(spec))


def release(family: str) -> None:
    """Drop whatever a family caches across its cases (e.g. the generation case's models)."""
    fn = getattr(family_module(family), "release", None)
    if fn is not None:
        fn()
