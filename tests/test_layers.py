"""The house reads from the bottom up (SPEC §3): every import of every module of xlx_fast, at
the top of a file or inside a function, goes to the module's own floor or below, and no modules
import each other, directly or through others.

The imports are read from the source (``ast``), so a lazy import inside a function counts as
much as one at the top: it is the same dependency, only later.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "xlx_fast"

# Floors, bottom first. A module's floor is that of the longest prefix listed here.
FLOORS = [
    # models and neutral definitions: what every other floor reads
    ("xlx_fast.models", "xlx_fast.archs", "xlx_fast.grid", "xlx_fast.strategies", "xlx_fast.seeds",
     "xlx_fast.text", "xlx_fast.caption_io",
     "xlx_fast.native", "xlx_fast.sampling_params", "xlx_fast.sampler_io"),
    # the reference: the authors' loops in eager PyTorch, importing nothing fast
    ("xlx_fast.reference",),
    # the op layer: kernels, their dispatch and their CPU twins
    ("xlx_fast.ops",),
    # what the ops are assembled into: the fused attention in HF's modules, one step's forward
    ("xlx_fast.patching", "xlx_fast.freezing", "xlx_fast.model_tables", "xlx_fast.step_plan",
     "xlx_fast.caption_plan", "xlx_fast.xuniter_plan",
     "xlx_fast.training.attention", "xlx_fast.training.masking"),
    # the engines drive the step plans
    ("xlx_fast.step_engine", "xlx_fast.engine", "xlx_fast.caption_engine", "xlx_fast.xuniter_engine"),
    # the front ends of the engines and the ops
    ("xlx_fast.generation", "xlx_fast.captioning", "xlx_fast.answering", "xlx_fast.evaluation",
     "xlx_fast.serving", "xlx_fast.training", "xlx_fast.vocab"),
    # the benchmarks, the command line, and the package's lazy facade
    ("xlx_fast.bench", "xlx_fast.cli", "xlx_fast"),
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The xlx_fast modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                         for a in node.names)
    out = set()
    for target in found:
        if not target.startswith("xlx_fast"):
            continue
        while target not in known and "." in target:
            target = target.rpartition(".")[0]
        if target != name:
            out.add(target)
    return out


def _floor(name: str) -> int:
    best, floor = -1, None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    assert floor is not None, f"{name} has no floor: add it to FLOORS"
    return floor


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_every_module_has_a_floor(graph):
    for name in graph:
        _floor(name)


def test_no_import_from_a_higher_floor(graph):
    up = [f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
          for a, targets in sorted(graph.items()) for b in sorted(targets)
          if _floor(b) > _floor(a) and not b == "xlx_fast" and not a.startswith(b + ".")]
    assert not up, "imports from a higher floor:\n" + "\n".join(up)


def test_no_module_imports_another_that_imports_it_back(graph):
    # a package's __init__ re-exporting its own modules is not a dependency of those modules
    def edges(a):
        return {b for b in graph[a] if not a.startswith(b + ".")}

    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges(node)):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_reference_imports_nothing_fast(graph):
    fast = [f"{a} imports {b}" for a, targets in graph.items() if _floor(a) == 1
            for b in targets if _floor(b) > 1]
    assert not fast, "\n".join(fast)


def test_the_fast_path_is_not_built_on_the_reference(graph):
    # What the fast path is checked against must not be what it is made of: the ops, the step
    # plan, the engine and generate read the rules (strategies, schedules, the grid, the
    # sampler's inputs and result) from neutral ground. (The training step does use the
    # reference's optimizer update, on purpose: it is not a rule the fast step is checked
    # against, and its tests compare whole updates.)
    fast = ("xlx_fast.ops", "xlx_fast.patching", "xlx_fast.model_tables", "xlx_fast.step_plan",
            "xlx_fast.engine",
            "xlx_fast.step_engine",
            "xlx_fast.generation", "xlx_fast.serving", "xlx_fast.cli.bulk",
            "xlx_fast.caption_plan", "xlx_fast.caption_engine", "xlx_fast.captioning",
            "xlx_fast.answering", "xlx_fast.xuniter_plan", "xlx_fast.xuniter_engine")
    built_on = [f"{a} imports {b}" for a, targets in sorted(graph.items())
                if a.startswith(fast) for b in sorted(targets) if b.startswith("xlx_fast.reference")]
    assert not built_on, "\n".join(built_on)


def test_the_checker_sees_lazy_imports(tmp_path):
    # the test above is only as good as the import reader: a function-level import counts
    (tmp_path / "xlx_fast").mkdir()
    src = tmp_path / "xlx_fast" / "a.py"
    src.write_text("def f():\n    from .b import g\n    import xlx_fast.c.d\n")
    known = {"xlx_fast.a", "xlx_fast.b", "xlx_fast.c", "xlx_fast.c.d"}
    assert _imports("xlx_fast.a", src, known) == {"xlx_fast.b", "xlx_fast.c.d"}
