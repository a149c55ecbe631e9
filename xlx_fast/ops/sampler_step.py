"""The Mask-Predict sampler step: select cells, update ids and mask, write the next visual input.

One call advances B grid rows (64 cells each, an 8x8 grid) by one sampling step, after the
transformer forward of step i with mask ``m_i`` gave per cell ``pred_prob`` (f32 [B,64]) and
``pred_id`` (int64 [B,64]). Per row b:

1. decided cells D:
   ``mask_predict`` -> every cell masked in ``m_i``;
   ``tlbr``, ``random`` -> ``{cell[b]}`` (``-1``: none);
   ``confidence`` -> ``{argmax of pred_prob over cells not yet visited}``, ties -> lowest index
   (none once every cell was visited).
2. ``ids[c] = pred_id[c]`` and ``visited[c] = True`` for c in D.
3. next mask ``m_{i+1}`` (written into ``mask`` in place):
   ``mask_predict`` -> the ``count[b]`` cells with the LOWEST ``pred_prob`` over all 64 cells,
   i.e. the first ``count[b]`` of a stable ascending sort (cell c is masked iff
   ``#{j: p_j < p_c or (p_j == p_c and j < c)} < count[b]``); ``count[b] == 0`` masks none;
   ``tlbr``, ``confidence`` -> ``m_i`` minus D;
   ``random`` -> ``(m_i minus D)`` plus ``{next_cell[b]}`` (``-1``: none).
4. ``out[b, c, :] = mask_row if m_{i+1}[c] else table[ids[b, c], :]``.

``table`` is [N, D] (the centroids with ``mask_row = mask_feat`` in the reference form, or the
projected ``visn_fc`` table in the fast form: the same op), fp32/fp16/bf16; ``mask_row`` [D] and
``out`` [B, 64, D] share its dtype. ``count``/``cell``/``next_cell`` are int32 [B] so rows at
different steps can share a batch; ``schedule()`` computes them from (strategy, steps, seed).

Per-row strategies: ``strategy`` may also be an int32 [B] tensor of codes (``STRATEGIES``, plus
``INACTIVE`` = 4 for an idle row), so rows of different strategies share one launch: the rule a
row applies is a function of its own code, exactly as if the whole batch had that strategy. An
``INACTIVE`` row is not read, checked or written (an idle slot of a padded batch costs no work
and never has a status). This keeps the step one launch with a fixed shape, which a CUDA graph
of a padded batch needs; grouping rows by strategy would need data-dependent gathers and one
launch per group. With per-row codes, pass every per-row array a row's strategy may read
(``count`` for mask_predict rows, ``cell`` for tlbr/random rows, ``next_cell`` optional).

Memory traffic (``sampler_step_bytes``): the gather reads 64·D·itemsize bytes per row (table
rows or mask_row) and writes as many into ``out``; the per-cell state adds 64·22 bytes read
(pred_prob, pred_id, ids, mask, visited) and 64·10 written (ids, mask, visited) per row. It is bandwidth-bound; the CUDA kernel (csrc/sampler_kernel.cuh)
runs one 512-thread block per row and copies in 16-byte words when D·itemsize and the three base
pointers allow (else 8/4/2/1), so B of at least about half the SM count is needed to saturate
HBM; at B = 1 it is launch-latency-bound.

Errors. Metadata (dtype, device, shape, contiguity, strategy) is checked in Python before any
launch and raises ``TypeError``/``ValueError`` naming the argument. Values are checked by the
kernels themselves (no host sync on CUDA): a row whose ``count``/``cell``/``next_cell`` is out of
range, whose ``pred_prob`` has a NaN, or whose step would use an id outside [0, N) gets a
non-zero ``status[b]`` (codes in csrc/sampler_rules.h; sticky: never cleared by the op).

- CPU (the C++ twin): rows are all decided first; if any row is bad, only ``status`` is written
  and a ``ValueError`` names the argument, row and value. Nothing else is touched.
- CUDA: a row with a bad count/cell/next_cell/NaN is left untouched except ``status``; a cell
  with a bad id gets ``mask_row`` (never an out-of-bounds read) and the row's status is set.
  Call ``check_status(status)`` (a host sync) when convenient, e.g. once after the loop.

Under CUDA graph capture and ``torch.compile``: the op allocates nothing and never syncs; it is
the custom op ``torch.ops.xlx_fast.sampler_step`` (mutating ``mask``, ``visited``, ``ids``,
``out``, ``status``) with a fake implementation.

CUDA backend: chosen by what works here, once per device and process, on the first CUDA call
(``cuda_backend_choice``): the kernel compiled into ``xlx_fast._C`` if a test launch of it gives
the right answer (a static CUDA 13 runtime fails on drivers older than 580), else the same source
JIT-compiled by CuPy (NVRTC) if its test launch does, else every call raises a ``RuntimeError``
naming the driver and runtime versions and what to do (there is no silent fallback). The choice
and why are shown by ``xlx-fast info``. The test launch syncs, so the first CUDA call must not
be inside a CUDA graph capture (``generate`` warms up before capturing).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .. import native
from ..reference.schedule import mask_counts, random_order, tlbr_order

CELLS = 64
# Strategy name -> code in csrc/sampler_rules.h (enum Strategy).
STRATEGIES = {"mask_predict": 0, "tlbr": 1, "random": 2, "confidence": 3}
INACTIVE = 4  # per-row code of an idle row (kInactive): skipped entirely
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Status codes of csrc/sampler_rules.h (enum Status); 1..64 is "bad id at cell code-1".
STATUS_BAD_COUNT, STATUS_BAD_CELL, STATUS_BAD_NEXT_CELL, STATUS_BAD_PROB, STATUS_BAD_STRATEGY = (
    65, 66, 67, 68, 69)
_MAX_ROW_BYTES = 1 << 24  # the kernel indexes a row's words with 32-bit ints

_KERNEL_NAMES = {16: "xlx_sampler_step_w16", 8: "xlx_sampler_step_w8", 4: "xlx_sampler_step_w4",
                 2: "xlx_sampler_step_w2", 1: "xlx_sampler_step_w1"}
_THREADS = 512  # kSamplerThreads in csrc/sampler_kernel.cuh


@dataclass
class SamplerState:
    """The tensors one sampler step updates in place, for B rows.

    mask [B,64] bool (True = masked), visited [B,64] bool, ids [B,64] int64 (-1 = not decided),
    out [B,64,D] (table dtype: the next visual input), status [B] int32 (0 = fine).
    """

    mask: torch.Tensor
    visited: torch.Tensor
    ids: torch.Tensor
    out: torch.Tensor
    status: torch.Tensor


def init_state(batch: int, mask_row: torch.Tensor) -> SamplerState:
    """The state before step 0: every cell masked, nothing visited, ids -1, out = mask_row
    everywhere, status 0. Allocates on ``mask_row``'s device and dtype."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    _check_vector("mask_row", mask_row)
    dev, d = mask_row.device, mask_row.shape[0]
    state = SamplerState(
        mask=torch.empty(batch, CELLS, dtype=torch.bool, device=dev),
        visited=torch.empty(batch, CELLS, dtype=torch.bool, device=dev),
        ids=torch.empty(batch, CELLS, dtype=torch.int64, device=dev),
        out=torch.empty(batch, CELLS, d, dtype=mask_row.dtype, device=dev),
        status=torch.empty(batch, dtype=torch.int32, device=dev),
    )
    reset_state(state, mask_row)
    return state


def reset_state(state: SamplerState, mask_row: torch.Tensor) -> None:
    """Put ``state`` back to step 0 in place (plain torch fills: capturable in a CUDA graph)."""
    state.mask.fill_(True)
    state.visited.fill_(False)
    state.ids.fill_(-1)
    state.out.copy_(mask_row.view(1, 1, -1).expand_as(state.out))
    state.status.zero_()


_REQUIRED = ("pred_prob", "pred_id", "table", "mask_row", "mask", "visited", "ids", "out", "status")


def sampler_step(pred_prob: torch.Tensor, pred_id: torch.Tensor, state: SamplerState,
                 table: torch.Tensor, mask_row: torch.Tensor, strategy, *,
                 count: Optional[torch.Tensor] = None, cell: Optional[torch.Tensor] = None,
                 next_cell: Optional[torch.Tensor] = None) -> SamplerState:
    """Advance every row of ``state`` by one step in place (see the module docstring) and
    return ``state``. ``count`` is required for ``mask_predict``, ``cell`` for ``tlbr`` and
    ``random``; ``next_cell`` is optional for ``random`` (None: no cell re-masked); arguments
    a strategy does not use are ignored. All int32 [B] on the tensors' device. ``strategy`` is
    a name, a code, or an int32 [B] tensor of per-row codes (see the module docstring)."""
    # a non-tensor would reach torch's op-schema check first (a RuntimeError): name it here
    for name, t in (("pred_prob", pred_prob), ("pred_id", pred_id), ("table", table),
                    ("mask_row", mask_row), ("mask", state.mask), ("visited", state.visited),
                    ("ids", state.ids), ("out", state.out), ("status", state.status),
                    ("count", count), ("cell", cell), ("next_cell", next_cell)):
        if not isinstance(t, torch.Tensor) and (t is not None or name in _REQUIRED):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(strategy, torch.Tensor):
        strategies, code = strategy, 0  # the scalar is ignored when per-row codes are given
    else:
        strategies, code = None, strategy_code(strategy)
    torch.ops.xlx_fast.sampler_step(pred_prob, pred_id, table, mask_row, state.mask,
                                    state.visited, state.ids, state.out, state.status,
                                    count, cell, next_cell, code, strategies)
    return state


def strategy_code(strategy: str | int) -> int:
    """The integer code of a strategy name (codes are accepted as they are)."""
    if isinstance(strategy, bool) or not isinstance(strategy, (str, int)):
        raise TypeError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        return STRATEGIES[strategy]
    if strategy not in STRATEGIES.values():
        raise ValueError(f"strategy code must be one of {sorted(STRATEGIES.values())}, got {strategy}")
    return strategy


def sampler_step_bytes(batch: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes one step must move: the gather (read + write of B·64·D elements) plus the state."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    gather = 2 * batch * CELLS * dim * itemsize
    state = batch * CELLS * ((4 + 8 + 8 + 1 + 1) + (8 + 1 + 1)) + batch * 4 * 4
    return gather + state


# --------------------------------------------------------------------------------------------
# Schedules: the per-step count / cell / next_cell for a whole run (CPU-side Python).


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
        out = {}
        for name in ("count", "cell", "next_cell"):
            values = getattr(self, name)
            if values is not None:
                t = torch.tensor(values, dtype=torch.int32, device=device)
                out[name] = t.view(-1, 1).expand(-1, batch).contiguous()
        return out


def schedule(strategy: str, steps: int, seed: Optional[int] = None) -> Schedule:
    """The sampler-step inputs of a K-step run, starting from ``init_state``.

    The rules themselves (counts, orders) are the reference's (``xlx_fast.reference.schedule``),
    stated once; this only shifts them to what a step passes. mask_predict: step i writes the mask
    of step i+1, so ``count[i] = mask_counts(K)[i+1]`` and ``count[K-1] = 0`` (the final output
    gathers every cell). tlbr: ``cell[i] = i`` (K <= 64). random: ``cell[i] = order[i]``,
    ``next_cell[i] = order[i+1]`` (-1 at the last step), with ``seed`` None meaning 0.
    confidence: nothing (K <= 64).
    """
    name = strategy if isinstance(strategy, str) else None
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if name in ("tlbr", "confidence") and steps > CELLS:
        raise ValueError(f"steps must be <= {CELLS} for strategy {name!r} (one cell per step), got {steps}")
    if name == "mask_predict":
        return Schedule(name, steps, mask_counts(steps, CELLS)[1:] + [0], None, None)
    if name == "tlbr":
        return Schedule(name, steps, None, tlbr_order(steps, CELLS), None)
    if name == "random":
        order = random_order(steps, 0 if seed is None else seed, CELLS)
        return Schedule(name, steps, None, order, order[1:] + [-1])
    return Schedule(name, steps, None, None, None)


# --------------------------------------------------------------------------------------------
# Validation (metadata only: works on fake tensors and never syncs).


def _check_tensor(name, t, dtypes, shape, *, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {str(t.dtype).replace('torch.', '')}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")


def _check_vector(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [D], got shape {tuple(t.shape)}")
    if t.dtype not in TABLE_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_args(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
               count, cell, next_cell, strategy, strategies=None) -> None:
    """Raise TypeError/ValueError naming the first bad argument (metadata checks only)."""
    strategy_code(strategy)
    if not isinstance(pred_prob, torch.Tensor):
        raise TypeError(f"pred_prob must be a torch.Tensor, got {type(pred_prob).__name__}")
    if pred_prob.dim() != 2 or pred_prob.shape[1] != CELLS:
        raise ValueError(f"pred_prob must have shape [B, {CELLS}], got {tuple(pred_prob.shape)}")
    b = pred_prob.shape[0]
    if b < 1:
        raise ValueError("pred_prob has an empty batch (B = 0)")
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
    if table.dim() != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"table must be a non-empty [N, D] tensor, got shape {tuple(table.shape)}")
    if table.dtype not in TABLE_DTYPES:
        raise TypeError(f"table must be float32, float16 or bfloat16, got {table.dtype}")
    d = table.shape[1]
    if d * table.element_size() >= _MAX_ROW_BYTES:
        raise ValueError(f"table rows must be under {_MAX_ROW_BYTES} bytes, got D = {d}")
    _check_tensor("pred_prob", pred_prob, (torch.float32,), (b, CELLS))
    _check_tensor("pred_id", pred_id, (torch.int64,), (b, CELLS))
    _check_tensor("table", table, (table.dtype,), tuple(table.shape))
    _check_tensor("mask_row", mask_row, (table.dtype,), (d,))
    _check_tensor("mask", mask, (torch.bool,), (b, CELLS))
    _check_tensor("visited", visited, (torch.bool,), (b, CELLS))
    _check_tensor("ids", ids, (torch.int64,), (b, CELLS))
    _check_tensor("out", out, (table.dtype,), (b, CELLS, d))
    _check_tensor("status", status, (torch.int32,), (b,))
    code = strategy_code(strategy)
    needs = {0: ("count",), 1: ("cell",), 2: ("cell",), 3: ()}[code]
    if strategies is not None:
        # Codes are data (checked by the kernels: an unknown code flags its row); every array a
        # row may read must be there, since which rows read which is not known here.
        _check_tensor("strategies", strategies, (torch.int32,), (b,))
        needs = ("count", "cell")
    for name, t in (("count", count), ("cell", cell), ("next_cell", next_cell)):
        if t is None and name in needs:
            if strategies is not None:
                raise ValueError(f"{name} is required with per-row strategies")
            raise ValueError(f"{name} is required for strategy "
                             f"{[k for k, v in STRATEGIES.items() if v == code][0]!r}")
        _check_tensor(name, t, (torch.int32,), (b,), optional=True)
    device = pred_prob.device
    named = (("pred_id", pred_id), ("table", table), ("mask_row", mask_row), ("mask", mask),
             ("visited", visited), ("ids", ids), ("out", out), ("status", status),
             ("count", count), ("cell", cell), ("next_cell", next_cell),
             ("strategies", strategies))
    for name, t in named:
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but pred_prob is on {device}: "
                             "all tensors must be on one device")


# --------------------------------------------------------------------------------------------
# The custom op and its backends.


def _pointers(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
              count, cell, next_cell, strategies=None):
    def p(t):
        return 0 if t is None else t.data_ptr()

    return (p(pred_prob), p(pred_id), p(table), p(mask_row), p(mask), p(visited), p(ids),
            p(out), p(status), p(count), p(cell), p(next_cell), p(strategies))


def _status_message(code: int, row: int, count, cell, next_cell, pred_id, ids, n_table) -> str:
    if 1 <= code <= CELLS:
        c = code - 1
        return (f"ids out of range: row {row}, cell {c} would use id "
                f"(pred_id {int(pred_id[row, c])}, ids {int(ids[row, c])}) outside [0, {n_table}) "
                "(pred_id and ids must index the table)")
    if code == STATUS_BAD_COUNT:
        return f"count[{row}] = {int(count[row])} is outside 0..{CELLS}"
    if code == STATUS_BAD_CELL:
        return f"cell[{row}] = {int(cell[row])} is outside -1..{CELLS - 1}"
    if code == STATUS_BAD_NEXT_CELL:
        return f"next_cell[{row}] = {int(next_cell[row])} is outside -1..{CELLS - 1}"
    if code == STATUS_BAD_PROB:
        return f"pred_prob has NaN in row {row}"
    if code == STATUS_BAD_STRATEGY:
        return f"unknown strategy code in row {row}"
    return f"status {code} in row {row}"


def check_status(status: torch.Tensor) -> None:
    """Raise ValueError if any row of ``status`` is non-zero (a host sync on CUDA)."""
    bad = torch.nonzero(status.cpu()).flatten().tolist()
    if bad:
        codes = status.cpu()
        rows = ", ".join(f"row {r}: {_describe_code(int(codes[r]))}" for r in bad[:8])
        raise ValueError(f"sampler_step flagged {len(bad)} row(s): {rows}")


def _describe_code(code: int) -> str:
    if 1 <= code <= CELLS:
        return f"id out of range at cell {code - 1}"
    return {STATUS_BAD_COUNT: "count outside 0..64", STATUS_BAD_CELL: "cell outside -1..63",
            STATUS_BAD_NEXT_CELL: "next_cell outside -1..63", STATUS_BAD_PROB: "NaN in pred_prob",
            STATUS_BAD_STRATEGY: "unknown strategy"}.get(code, f"status {code}")


def _run_cpu(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
             count, cell, next_cell, strategy, strategies=None):
    mod = native.load()
    if mod is None:
        raise RuntimeError(f"sampler_step on CPU needs xlx_fast._C, which did not load "
                           f"({native.load_error()}); reinstall with 'pip install -e .'")
    ptrs = _pointers(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
                     count, cell, next_cell, strategies)
    n_table, row_bytes = table.shape[0], table.shape[1] * table.element_size()
    row, code = mod.sampler_step_cpu(*ptrs, strategy, pred_prob.shape[0], n_table, row_bytes)
    if row >= 0:
        raise ValueError("sampler_step: " + _status_message(code, row, count, cell, next_cell,
                                                            pred_id, ids, n_table)
                         + " (nothing but status was written)")


# device index -> native.BackendChoice, filled by the first CUDA call on that device
_CHOICES: dict = {}


def cuda_backend_choice(device) -> "native.BackendChoice":
    """The CUDA backend for ``device`` (probed on first use, then remembered for the process):
    see ``native.decide_sampler_backend``. Never raises for an unusable backend (the choice's
    ``backend`` is then None and ``why`` the error text), except when the first call on a
    device comes inside a CUDA graph capture, where the test launch cannot sync."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CHOICES:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "sampler_step's first CUDA call on this device is inside a CUDA graph capture, "
                "where its backend probe (one test launch and a sync) cannot run: call it once "
                "before capturing (a warm-up run)")
        compiled = _probe(index, "compiled")
        cupy = (native.Probe(None, "not tried (the compiled kernel works)") if compiled.ok
                else _probe(index, "cupy"))
        _CHOICES[index] = native.decide_sampler_backend(
            compiled, cupy, native.driver_version(), native.build_info()["cuda_runtime"])
    return _CHOICES[index]


def _probe(index: int, backend: str) -> "native.Probe":
    """Whether ``backend`` can run one step correctly on cuda:``index`` (one row, mask_predict
    from the initial state: every cell decided, the 21 lowest-probability cells re-masked)."""
    if backend == "compiled":
        if not native.has_cuda_kernels():
            why = native.load_error() or "it was built without CUDA kernels (no nvcc, or XLX_NO_CUDA)"
            return native.Probe(False, f"xlx_fast._C: {why}")
        n, reason = native.cuda_device_count()
        if n < 1:  # e.g. cudaErrorInsufficientDriver: the static runtime is newer than the driver
            return native.Probe(False, f"its CUDA runtime cannot use this GPU: {reason}")
    else:
        ok, why = native.cupy_status()
        if not ok:
            return native.Probe(False, why)
    dev = torch.device("cuda", index)
    try:
        n_table, d = 5, 3
        table = torch.arange(n_table * d, dtype=torch.float32, device=dev).view(n_table, d)
        mask_row = torch.full((d,), -1.0, device=dev)
        prob = (torch.randperm(CELLS, generator=torch.Generator().manual_seed(0)).float() + 1) / 65
        pred_id = torch.arange(CELLS, dtype=torch.int64) % n_table
        count = 21
        state = init_state(1, mask_row)
        args = (prob.view(1, CELLS).to(dev), pred_id.view(1, CELLS).to(dev), table, mask_row,
                state.mask, state.visited, state.ids, state.out, state.status,
                torch.tensor([count], dtype=torch.int32, device=dev), None, None,
                STRATEGIES["mask_predict"])
        check_args(*args)
        _launch(*args, None, backend=backend)
        torch.cuda.synchronize(dev)
        masked = torch.zeros(CELLS, dtype=torch.bool)
        masked[torch.argsort(prob, stable=True)[:count]] = True
        want_out = torch.where(masked[:, None], mask_row.cpu(), table.cpu()[pred_id])
        right = (torch.equal(state.ids.cpu()[0], pred_id) and torch.equal(state.mask.cpu()[0], masked)
                 and torch.equal(state.out.cpu()[0], want_out) and int(state.status.cpu()[0]) == 0)
    except Exception as e:  # a failed launch (no kernel image for this GPU, driver too old, ...)
        return native.Probe(False, f"its test launch failed: {type(e).__name__}: {e}")
    if not right:
        return native.Probe(False, "its test launch ran but gave a wrong answer")
    return native.Probe(True, f"a test launch on cuda:{index} gave the right answer")


def _run_cuda(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
              count, cell, next_cell, strategy, strategies=None, backend=None):
    """Launch on the current stream of the tensors' device. ``backend`` None uses the probed
    choice (``cuda_backend_choice``); "compiled" or "cupy" forces one (tests)."""
    if backend is None:
        choice = cuda_backend_choice(pred_prob.device)
        if choice.backend is None:
            raise RuntimeError(choice.why)
        backend = choice.backend
    _launch(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
            count, cell, next_cell, strategy, strategies, backend=backend)


def _launch(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
            count, cell, next_cell, strategy, strategies, backend):
    ptrs = _pointers(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
                     count, cell, next_cell, strategies)
    batch, n_table = pred_prob.shape[0], table.shape[0]
    row_bytes = table.shape[1] * table.element_size()
    with torch.cuda.device(pred_prob.device):
        stream = torch.cuda.current_stream(pred_prob.device).cuda_stream
        if backend == "compiled":
            mod = native.load()
            if mod is None or not native.has_cuda_kernels():
                raise RuntimeError("xlx_fast._C was built without CUDA kernels")
            mod.sampler_step_cuda(*ptrs, strategy, batch, n_table, row_bytes, stream)
            return
        ok, why = _cupy_status()
        if not ok:
            raise RuntimeError(
                "sampler_step on CUDA needs xlx_fast._C built with CUDA (reinstall with nvcc on "
                f"PATH, without XLX_NO_CUDA) or CuPy for the NVRTC JIT path ({why})")
        _launch_cupy(ptrs, strategy, batch, n_table, row_bytes, pred_prob.device.index, stream)


@functools.lru_cache(maxsize=None)
def _cupy_status() -> tuple[bool, str]:
    """``native.cupy_status()`` once per process: it asks the driver, too slow for every step."""
    return native.cupy_status()


def _gather_width(row_bytes, *addresses) -> int:
    bits = row_bytes
    for a in addresses:
        bits |= a
    for w in (16, 8, 4, 2):
        if bits % w == 0:
            return w
    return 1


@functools.lru_cache(maxsize=None)
def _cupy_module(device_index: int):
    import cupy

    src_dir = native.kernel_source_dir()
    rules = (src_dir / "sampler_rules.h").read_text()
    kernel = (src_dir / "sampler_kernel.cuh").read_text()
    # NVRTC gets one self-contained source: the rules header pasted where it is included
    # (and "#pragma once" dropped: it warns in a main file).
    source = kernel.replace('#include "sampler_rules.h"', rules).replace("#pragma once", "")
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=source, options=("--std=c++17",))


def _launch_cupy(ptrs, strategy, batch, n_table, row_bytes, device_index, stream):
    import cupy
    import numpy as np

    width = _gather_width(row_bytes, ptrs[2], ptrs[3], ptrs[7])
    args = tuple(np.uint64(p) for p in ptrs) + (np.int32(strategy), np.int64(n_table),
                                                 np.int64(row_bytes))
    # RawKernel launches on CuPy's current stream: make it torch's (the capture stream in a graph).
    with cupy.cuda.Device(device_index), cupy.cuda.ExternalStream(stream):
        fn = _cupy_module(device_index).get_function(_KERNEL_NAMES[width])
        fn((batch,), (_THREADS,), args)


@torch.library.custom_op("xlx_fast::sampler_step",
                         mutates_args=("mask", "visited", "ids", "out", "status"))
def _sampler_step_op(pred_prob: torch.Tensor, pred_id: torch.Tensor, table: torch.Tensor,
                     mask_row: torch.Tensor, mask: torch.Tensor, visited: torch.Tensor,
                     ids: torch.Tensor, out: torch.Tensor, status: torch.Tensor,
                     count: Optional[torch.Tensor], cell: Optional[torch.Tensor],
                     next_cell: Optional[torch.Tensor], strategy: int,
                     strategies: Optional[torch.Tensor] = None) -> None:
    args = (pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
            count, cell, next_cell, strategy, strategies)
    check_args(*args)
    if pred_prob.device.type == "cuda":
        _run_cuda(*args)
    elif pred_prob.device.type == "cpu":
        _run_cpu(*args)
    else:
        raise ValueError(f"sampler_step runs on cpu or cuda tensors, got {pred_prob.device}")


@_sampler_step_op.register_fake
def _(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status, count, cell,
      next_cell, strategy, strategies=None):
    check_args(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
               count, cell, next_cell, strategy, strategies)
    return None
