"""The benchmark harness: what a case is, how it is checked, how it is timed, what a row holds.

A :class:`Case` is one (op, shape, dtype, device) point. It declares its backends by name up front
(so pytest can parametrize over them before anything heavy is built) and builds its inputs only
when :meth:`Case.prepare` is called. Preparing gives a :class:`Prepared`: the reference callable,
one callable per backend (or a :class:`NotAvailable` saying why there is none), and a ``compare``
that turns (reference output, backend output) into an :class:`Agreement`.

The same case objects feed both front ends: ``xlx-fast bench`` (:func:`run_case`, rows, table,
JSON, plot) and the pytest-benchmark wrappers in ``benchmarks/`` (one benchmark group per case).

Contract (SPEC §5): every backend is run once and compared with the reference before anything is
timed; a fast backend that disagrees raises :class:`AgreementError` (it is never timed, never
reported as a speed-up). That first run doubles as the warm-up, so timings exclude it.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, median; it flushes L2 before every
repetition, so memory-bound ops read cold inputs); on the CPU the median of repeated
``time.perf_counter`` measurements.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..archs import ARCHS

# Norm-wise relative error bounds of SPEC §4 (‖out − ref‖ / ‖ref‖).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
TF32_TOLERANCE = 5e-4

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Backend kinds: the timed baseline, xlx_fast's own paths, and other implementations shown for
# context (SDPA backends, FAISS, ...). Only "fast" backends must agree or raise; a peer that
# cannot run here (unsupported dtype or backend) is reported as such.
REFERENCE, FAST, PEER = "reference", "fast", "peer"


class AgreementError(AssertionError):
    """A backend's output does not match the reference within the contract's bound."""


@dataclass(frozen=True)
class NotAvailable:
    """Stands in for a backend that cannot run here; ``reason`` is printed in its row."""

    reason: str


@dataclass
class Agreement:
    """How one backend's output compares with the reference.

    metric: "rel err" (‖out − ref‖ / ‖ref‖) or "id agree" (share of equal ids).
    value: the measured number; limit: the bound it must satisfy (≤ for errors, ≥ for shares).
    extra: further agreement figures to report (e.g. id agreement with the fp32 reference).
    """

    metric: str
    value: float
    limit: float
    ok: bool
    detail: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A case with its inputs built.

    reference: callable → the reference output (also the timed baseline).
    backends: name → callable (or NotAvailable), one entry for every name the case declared.
    compare: (reference output, backend output, backend name) → Agreement.
    same_gemm: optional callable running the plain torch GEMM this op contains, timed so that a
        row can say what share of torch.matmul's rate on the same GEMM the op reaches.
    release: optional callable dropping cached inputs once the case is done.
    notes: backend name -> callable returning text added to that row's note after the run
        (e.g. a compiled peer's compile time, known only once it has run).
    """

    reference: Callable[[], Any]
    backends: dict
    compare: Callable[[Any, Any, str], Agreement]
    same_gemm: Callable[[], Any] | None = None
    release: Callable[[], None] | None = None
    notes: dict = field(default_factory=dict)  # backend name -> callable giving text for its row


@dataclass
class Case:
    """One benchmark point. ``backends`` maps each backend name to its kind (FAST or PEER).

    flops / bytes: the work one call does (None where not meaningful); they turn times into
    TFLOP/s and GB/s. ``bound`` says which ceiling the op is compared with ("compute" → matmul
    TFLOP/s at ``dtype``, "memory" → copy GB/s, None → neither).
    """

    op: str
    shape: str
    dtype: torch.dtype
    device: torch.device
    backends: dict
    build: Callable[[], Prepared]
    flops: float | None = None
    bytes: float | None = None
    bound: str | None = None

    @property
    def id(self) -> str:
        return f"{self.op}[{self.shape}|{DTYPE_NAMES.get(self.dtype, str(self.dtype))}|{self.device.type}]"

    def prepare(self) -> Prepared:
        prepared = self.build()
        missing = set(self.backends) - set(prepared.backends)
        if missing:
            raise RuntimeError(f"{self.id}: build() gave no entry for declared backends {sorted(missing)}")
        return prepared


@dataclass
class Spec:
    """What to run: device, dtypes, and how big (``quick`` trims the sweep; ``size`` "tiny" shrinks
    every dimension to the tiny model's, for tests of the harness itself). ``arch``: which
    architectures' ``generate`` rows run (a name in :data:`xlx_fast.archs.ARCHS`, or "all"); the
    other families time X-LXMERT's ops whatever it says."""

    device: torch.device
    dtypes: tuple
    quick: bool = False
    size: str = "base"
    arch: str = "all"

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.size not in ("base", "tiny"):
            raise ValueError(f"size must be 'base' or 'tiny', got {self.size!r}")
        if self.arch != "all" and self.arch not in ARCHS:
            raise ValueError(f"arch must be 'all' or one of {', '.join(ARCHS)}, got {self.arch!r}")
        for dt in self.dtypes:
            if dt not in DTYPE_NAMES:
                raise ValueError(f"unsupported dtype {dt}; choose from {sorted(DTYPES)}")


# --------------------------------------------------------------------------------------------
# Fast modules that may not exist yet
# --------------------------------------------------------------------------------------------

def fast_module(name: str):
    """The module ``name`` if it exists, else ``None`` (the fast path is not implemented yet).

    A module that exists but fails to import raises: a broken fast path must never be reported
    as a missing one.
    """
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a parent package is missing
        spec = None
    if spec is None:
        return None
    return importlib.import_module(name)


def not_implemented(what: str) -> NotAvailable:
    return NotAvailable(f"n/a — not implemented ({what})")


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------

def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    if out.shape != ref.shape:
        raise AgreementError(f"shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(o).all():
        return math.inf
    num = torch.linalg.vector_norm(o - r).item()
    den = torch.linalg.vector_norm(r).item()
    return num / den if den else (0.0 if num == 0 else math.inf)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, limit: float | None = None) -> Agreement:
    """Relative error against the SPEC §4 bound for ``dtype`` (or ``limit``)."""
    limit = TOLERANCE[dtype] if limit is None else limit
    err = rel_error(out, ref)
    return Agreement("rel err", err, limit, err <= limit)


def id_share(ids: torch.Tensor, ref_ids: torch.Tensor) -> float:
    """Share of positions where two id tensors agree."""
    if ids.shape != ref_ids.shape:
        raise AgreementError(f"ids shape {tuple(ids.shape)} differs from the reference's {tuple(ref_ids.shape)}")
    if ids.numel() == 0:
        return 1.0
    return (ids.detach().cpu().long() == ref_ids.detach().cpu().long()).double().mean().item()


def ids_agree(ids: torch.Tensor, ref_ids: torch.Tensor, min_share: float = 1.0,
              decided: torch.Tensor | None = None) -> Agreement:
    """Id agreement: the share of equal ids must reach ``min_share``; where ``decided`` (bool,
    the positions whose best-vs-second gap exceeds the error bound) is given, every decided
    position must be equal too (SPEC §4), whatever the share."""
    share = id_share(ids, ref_ids)
    ok = share >= min_share
    detail = ""
    if decided is not None:
        wrong = (ids.detach().cpu().long() != ref_ids.detach().cpu().long()) & decided.cpu()
        if wrong.any():
            ok = False
            detail = f"{int(wrong.sum())} ids differ where the reference's margin exceeds the error bound"
    return Agreement("id agree", share, min_share, ok, detail)


def check(case: Case, prepared: Prepared, seconds: dict | None = None) -> tuple[Any, dict]:
    """Run the reference and every backend once; compare. Returns (reference output,
    {name: Agreement or NotAvailable}). ``seconds``, if given, receives each call's duration
    (under "reference" and the backend names), e.g. to size later timing loops.

    Raises AgreementError naming the backend if a FAST backend disagrees (or crashes: a fast path
    that exists must work). A PEER that raises is recorded as NotAvailable with the error; a PEER
    that disagrees keeps its Agreement (``ok`` False, the reason in ``detail``) and is timed.
    """
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    ref = prepared.reference()
    _sync(case.device)
    seconds["reference"] = time.perf_counter() - t0
    results = {}
    for name, kind in case.backends.items():
        fn = prepared.backends[name]
        if isinstance(fn, NotAvailable):
            results[name] = fn
            continue
        try:
            t0 = time.perf_counter()
            out = fn()
            _sync(case.device)
            seconds[name] = time.perf_counter() - t0
        except Exception as e:
            if kind == FAST:
                raise
            results[name] = NotAvailable(f"n/a — {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        agreement = prepared.compare(ref, out, name)
        if not agreement.ok:
            msg = (f"backend {name!r} disagrees with the reference: {agreement.metric} "
                   f"{agreement.value:.3g} (bound {agreement.limit:.3g})"
                   + (f"; {agreement.detail}" if agreement.detail else ""))
            if kind == FAST:
                raise AgreementError(f"{case.id}: {msg}")
            # A peer is someone else's code (e.g. torch in bf16, as inexact as a bf16 reference):
            # it is timed and shown, with the disagreement spelled out in its row.
            agreement.detail = f"outside the bound: {msg}"
        results[name] = agreement
    return ref, results


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingPlan:
    """CPU: repeat until ``budget_s`` is spent, between ``min_reps`` and ``max_reps`` times.
    CUDA: ``do_bench`` warm-up and repetition windows in ms."""

    min_reps: int
    max_reps: int
    budget_s: float
    gpu_warmup_ms: int
    gpu_rep_ms: int


QUICK = TimingPlan(min_reps=2, max_reps=20, budget_s=0.5, gpu_warmup_ms=10, gpu_rep_ms=40)
FULL = TimingPlan(min_reps=3, max_reps=100, budget_s=3.0, gpu_warmup_ms=20, gpu_rep_ms=60)
# For the tiny dimensions that only exercise the machinery (tests): the fewest calls that time.
SMOKE = TimingPlan(min_reps=1, max_reps=2, budget_s=0.01, gpu_warmup_ms=2, gpu_rep_ms=5)


def time_ms(fn: Callable[[], Any], device: torch.device, plan: TimingPlan = FULL,
            stat: str = "median") -> float:
    """Milliseconds of one ``fn()`` call, the median of the repetitions (``stat="min"``: the
    fastest, for ceilings); ``fn`` must already have run once (warm-up)."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=plan.gpu_warmup_ms, rep=plan.gpu_rep_ms,
                                             return_mode=stat))
    times = []
    deadline = time.perf_counter() + plan.budget_s
    while len(times) < plan.max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= plan.min_reps and time.perf_counter() >= deadline:
            break
    return (min(times) if stat == "min" else statistics.median(times)) * 1e3


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def _pct(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return 100.0 * value / ceiling


def run_case(case: Case, ceilings: dict, machine: dict, plan: TimingPlan = FULL,
             prepared: Prepared | None = None) -> list[dict]:
    """Check, then time the reference and every backend of ``case``; one row per backend.

    Raises AgreementError when a fast backend disagrees. A backend that is NotAvailable gets a
    row with its reason in ``note`` and no times, so a missing fast path is visible, never
    replaced by a copy of the reference.
    """
    prepared = case.prepare() if prepared is None else prepared
    try:
        _, agreements = check(case, prepared)
        ref_ms = time_ms(prepared.reference, case.device, plan)
        gemm_tflops = None
        if prepared.same_gemm is not None and case.flops:
            prepared.same_gemm()
            _sync(case.device)
            gemm_tflops = case.flops / (time_ms(prepared.same_gemm, case.device, plan) * 1e-3) / 1e12
        rows = []
        for name, kind in case.backends.items():
            status = agreements[name]
            fast_ms = None
            if isinstance(status, Agreement):
                fast_ms = time_ms(prepared.backends[name], case.device, plan)
            rows.append(make_row(case, name, kind, ref_ms, fast_ms, status, ceilings, machine,
                                 gemm_tflops))
        for row in rows:
            note = prepared.notes.get(row["backend"])
            if note is not None:
                row["note"] = "; ".join(t for t in (row["note"], note()) if t)
        return rows
    finally:
        if prepared.release is not None:
            prepared.release()


def make_row(case: Case, backend: str, kind: str, ref_ms: float, fast_ms: float | None,
             status, ceilings: dict, machine: dict, gemm_tflops: float | None = None) -> dict:
    """One result row (the JSON schema's ``rows`` item; see ``xlx_fast.bench.report``)."""
    dtype = DTYPE_NAMES.get(case.dtype, str(case.dtype))
    tflops = gbps = None
    if fast_ms is not None and case.flops:
        tflops = case.flops / (fast_ms * 1e-3) / 1e12
    if fast_ms is not None and case.bytes:
        gbps = case.bytes / (fast_ms * 1e-3) / 1e9
    matmul_ceiling = ceilings.get("matmul_tflops", {}).get(dtype)
    copy_ceiling = ceilings.get("copy_gbps")
    if case.bound == "compute":
        pct_ceiling = _pct(tflops, matmul_ceiling)
    elif case.bound == "memory":
        pct_ceiling = _pct(gbps, copy_ceiling)
    else:
        pct_ceiling = None
    agreement = status if isinstance(status, Agreement) else None
    return {
        "op": case.op,
        "shape": case.shape,
        "dtype": dtype,
        "device": machine.get("device_name", case.device.type),
        "torch": machine.get("torch"),
        "triton": machine.get("triton"),
        "backend": backend,
        "kind": kind,
        "reference_ms": ref_ms,
        "fast_ms": fast_ms,
        "speedup": (ref_ms / fast_ms) if fast_ms else None,
        "agreement_metric": agreement.metric if agreement else None,
        "max_error": agreement.value if agreement and agreement.metric == "rel err" else None,
        "id_agreement": agreement.value if agreement and agreement.metric == "id agree" else None,
        "agreement_limit": agreement.limit if agreement else None,
        "agreement_ok": agreement.ok if agreement else None,
        "agreement_extra": dict(agreement.extra) if agreement else {},
        "flops": case.flops,
        "bytes": case.bytes,
        "bound": case.bound,
        "tflops": tflops,
        "gbps": gbps,
        "ceiling_matmul_tflops": matmul_ceiling,
        "ceiling_copy_gbps": copy_ceiling,
        "pct_of_ceiling": pct_ceiling,
        "same_gemm_tflops": gemm_tflops,
        "pct_of_same_gemm": _pct(tflops, gemm_tflops),
        "note": (status.reason if isinstance(status, NotAvailable)
                 else "" if status.ok else status.detail),
    }


def add_comparisons(rows: list[dict]) -> list[dict]:
    """Cross-row figures for the fast rows (SPEC §6), added in place:

    - ``best_peer`` / ``speedup_vs_best_peer``: the fastest peer of the same case (SDPA's best
      backend for attention, FAISS for nearest, ...) and the fast path's speed-up over it;
    - ``speedup_vs_fp32_reference`` (rows in another dtype): the fp32 reference's time of the
      same op and shape over this row's time, e.g. bf16 generation against the fp32 loop.
    """
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["op"], r["shape"], r["dtype"], r["device"]), []).append(r)
    for (op, shape, dtype, device), group in by_case.items():
        peers = [r for r in group if r["kind"] == PEER and r["fast_ms"]]
        best = min(peers, key=lambda r: r["fast_ms"]) if peers else None
        fp32 = by_case.get((op, shape, "fp32", device)) if dtype != "fp32" else None
        for r in group:
            if r["kind"] != FAST:
                continue
            r["best_peer"] = best["backend"] if best else None
            r["speedup_vs_best_peer"] = best["fast_ms"] / r["fast_ms"] if best and r["fast_ms"] else None
            if fp32 and r["fast_ms"]:
                r["speedup_vs_fp32_reference"] = fp32[0]["reference_ms"] / r["fast_ms"]
    return rows
