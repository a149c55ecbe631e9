"""Backends picked by measurement (``xlx_fast.ops.measured``): the fastest candidate at a shape,
timed once per shape key, never while a graph is captured, and nothing timed on a CPU."""
from __future__ import annotations

import functools

import pytest
import torch

from xlx_fast.ops import load_all, measured, registry
from xlx_fast.ops.registry import Capability

load_all()  # every op module registers its backends (and chooser) on import

OP = "test_measured_op"


@pytest.fixture
def op():
    registry.register_op(OP, "kernel", impl=lambda: "kernel", preference_rank=0,
                         capability=Capability(devices=("cpu",)))
    registry.register_op(OP, "stock", impl=lambda: "stock", preference_rank=1,
                         capability=Capability(devices=(), on_request=("cpu",), measured_on=("cpu",)))
    registry.register_op(OP, "named_only", impl=lambda: "named", preference_rank=2,
                         capability=Capability(devices=(), on_request=("cpu",)))
    measured.forget()
    yield OP
    registry._OPS.pop(OP, None)
    registry._CHOOSERS.pop(OP, None)
    measured.forget()


def _install(times, timed, capturing=lambda device: False):
    def timer(run, device):
        backend = run()  # the trial runs the candidate: it reports its name here
        timed.append(backend)
        return times[backend]

    registry.set_chooser(OP, functools.partial(measured.choose, timer=timer, devices=("cpu",),
                                               cannot_time=capturing))


def _pick(key):
    return registry.select_impl(OP, "cpu", key=key, trial=lambda impl: impl.impl()).backend


def test_the_faster_candidate_wins_and_is_remembered(op):
    timed = []
    _install({"kernel": 2.0, "stock": 1.0}, timed)
    assert _pick(("shape", 1)) == "stock"
    assert sorted(timed) == ["kernel", "stock"]  # a named-only backend never competes
    assert _pick(("shape", 1)) == "stock" and len(timed) == 2  # looked up, not timed again
    (row,) = measured.choices()
    assert row["chosen"] == "stock" and row["ms"] == {"kernel": 2.0, "stock": 1.0}


def test_each_shape_is_measured_on_its_own(op):
    timed = []
    times = {"kernel": 1.0, "stock": 3.0}
    _install(times, timed)
    assert _pick("small") == "kernel"
    times.update(kernel=5.0)  # at another shape the stock op is faster
    assert _pick("large") == "stock"
    assert _pick("small") == "kernel"
    assert len(timed) == 4


def test_a_tie_goes_to_the_preferred_backend(op):
    _install({"kernel": 1.0, "stock": 1.0}, [])
    assert _pick("k") == "kernel"


def test_nothing_is_timed_while_a_graph_is_captured(op):
    timed = []
    capturing = [True]
    _install({"kernel": 2.0, "stock": 1.0}, timed, capturing=lambda device: capturing[0])
    assert _pick("k") == "kernel" and timed == []  # the rank decides, nothing remembered
    capturing[0] = False
    assert _pick("k") == "stock" and len(timed) == 2


def test_a_forced_backend_is_never_measured(op):
    timed = []
    _install({"kernel": 2.0, "stock": 1.0}, timed)
    assert registry.select_impl(OP, "cpu", force="kernel", key="k",
                                trial=lambda impl: impl.impl()).backend == "kernel"
    assert timed == []


def test_the_real_ops_measure_only_on_cuda():
    # on a CPU each op has one automatic backend: the installed choosers never run a trial
    def trial(impl):
        raise AssertionError("a CPU call was timed")

    for op in ("attention", "fused_linear", "codebook_head", "nearest"):
        assert registry._CHOOSERS.get(op) is measured.choose, op
        assert registry.select_impl(op, "cpu", torch.float32, key="k", trial=trial).backend in ("sdpa", "torch")


def test_the_stock_ops_compete_on_cuda():
    # which candidates a CUDA call would time (metadata only: no GPU needed to ask)
    seen = {}

    def recorder(op, candidates, device, dtype, key, trial):
        seen[op] = [i.backend for i in candidates]
        return candidates[0]

    ops = ("attention", "fused_linear", "codebook_head", "nearest")
    try:
        for op in ops:
            registry.set_chooser(op, recorder)
            registry.select_impl(op, "cuda", torch.bfloat16, key="k", trial=lambda impl: None)
    finally:
        for op in ops:
            measured.install(op)
    assert seen == {"attention": ["triton", "sdpa"], "fused_linear": ["triton", "torch"],
                    "codebook_head": ["triton", "torch"], "nearest": ["triton", "torch"]}


def test_info_says_which_stock_op_is_timed_against_ours():
    assert registry.explain("attention", "cuda")["measured_against"] == ["sdpa"]
    assert registry.explain("fused_linear", "cuda")["measured_against"] == ["torch"]
    assert registry.explain("fused_linear_cross_entropy", "cuda")["measured_against"] == []  # no chooser


def test_the_attention_rows_say_what_ran_and_why():
    """The bench's attention row names the backend the op ran at its shape: on CUDA the measured
    choice with both times (here a decision planted as the chooser would record it), elsewhere
    the device's backend; another shape's decision is not this row's."""
    from xlx_fast.bench.cases.attention import dispatch_note, make_inputs

    q, k, v, mask = make_inputs(2, 1024, 20, 2, 32, torch.float32, torch.device("cpu"))
    measured.forget()
    try:
        assert dispatch_note(q, k, torch.device("cpu")) == "ran sdpa (this device's backend)"
        key = measured.shape_key(q, k, v, mask, 2, None)
        measured._DECIDED[("attention", "cpu", torch.float32, key)] = ("sdpa", {"triton": 0.25, "sdpa": 0.125})
        other = measured.shape_key(q[:1], k[:1], v[:1], mask[:1], 2, None)
        measured._DECIDED[("attention", "cpu", torch.float32, other)] = ("triton", {"triton": 0.1, "sdpa": 0.2})
        assert dispatch_note(q, k, torch.device("cpu")) == \
            "ran sdpa (measured per shape: sdpa 0.125 ms, triton 0.250 ms)"
    finally:
        measured.forget()


def test_a_registration_is_seen_by_the_next_selection(op, monkeypatch):
    """What can run on a CPU is remembered per (op, dtype): a backend registered later, and
    triton going missing, are seen by the next selection."""
    from xlx_fast.ops import _common

    assert _common.HAS_TRITON  # a pinned dependency
    assert registry.select_impl(OP, "cpu").backend == "kernel"
    registry.register_op(OP, "better", impl=lambda: "better", preference_rank=-1,
                         capability=Capability(devices=("cpu",), requires=(registry.TRITON,)))
    assert registry.select_impl(OP, "cpu").backend == "better"
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    assert registry.select_impl(OP, "cpu").backend == "kernel"
    monkeypatch.setattr(_common, "HAS_TRITON", True)
    assert registry.select_impl(OP, "cpu").backend == "better"
