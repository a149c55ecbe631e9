"""The Mask-Predict sampler step: select cells, update ids and mask, write the next visual input.

One call advances B grid rows of N cells each by one sampling step, after the transformer
forward of step i with mask ``m_i`` gave per cell ``pred_prob`` (f32 [B,N]) and ``pred_id``
(int64 [B,N]). N is read from ``pred_prob``'s shape: 1 <= N <= ``MAX_CELLS`` = 1,024 (64 for
X-LXMERT's 8x8 grid, 256 and 1,024 for 16x16 and 32x32 grids); every per-cell tensor is [B,N]
and ``out`` [B,N,D]. Per row b:

1. decided cells D:
   ``mask_predict`` -> every cell masked in ``m_i``;
   ``tlbr``, ``random`` -> ``{cell[b]}`` (``-1``: none);
   ``confidence`` -> ``{argmax of pred_prob over cells not yet visited}``, ties -> lowest index
   (none once every cell was visited).
2. ``ids[c] = pred_id[c]`` and ``visited[c] = True`` for c in D.
3. next mask ``m_{i+1}`` (written into ``mask`` in place):
   ``mask_predict`` -> the ``count[b]`` cells with the LOWEST ``pred_prob`` over all N cells,
   i.e. the first ``count[b]`` of a stable ascending sort (cell c is masked iff
   ``#{j: p_j < p_c or (p_j == p_c and j < c)} < count[b]``); ``count[b] == 0`` masks none;
   ``tlbr``, ``confidence`` -> ``m_i`` minus D;
   ``random`` -> ``(m_i minus D)`` plus ``{next_cell[b]}`` (``-1``: none).
4. ``out[b, c, :] = mask_row if m_{i+1}[c] else table[ids[b, c], :]``.

``table`` is [N, D] (the centroids with ``mask_row = mask_feat`` in the reference form, or the
projected ``visn_fc`` table in the fast form: the same op), fp32/fp16/bf16; ``mask_row`` [D] and
``out`` [B, N, D] share its dtype. ``count``/``cell``/``next_cell`` are int32 [B] so rows at
different steps can share a batch (``count`` in [0, N], ``cell``/``next_cell`` in [-1, N));
``schedule()`` computes them from (strategy, steps, seed, n_cells).

Per-row strategies: ``strategy`` may also be an int32 [B] tensor of codes (``STRATEGIES``, plus
``INACTIVE`` = 4 for an idle row), so rows of different strategies share one launch: the rule a
row applies is a function of its own code, exactly as if the whole batch had that strategy. An
``INACTIVE`` row is not read, checked or written (an idle slot of a padded batch costs no work
and never has a status). This keeps the step one launch with a fixed shape, which a CUDA graph
of a padded batch needs; grouping rows by strategy would need data-dependent gathers and one
launch per group. With per-row codes, pass every per-row array a row's strategy may read
(``count`` for mask_predict rows, ``cell`` for tlbr/random rows, ``next_cell`` optional).

Memory traffic (``sampler_step_bytes``): the gather reads N·D·itemsize bytes per row (table
rows or mask_row) and writes as many into ``out``; the per-cell state adds N·22 bytes read
(pred_prob, pred_id, ids, mask, visited) and N·10 written (ids, mask, visited) per row. It is
bandwidth-bound; the CUDA kernel (csrc/sampler_kernel.cuh) runs one 512-thread block per row and
copies in 16-byte words when D·itemsize and the three base pointers allow (else 8/4/2/1), so B
of at least about half the SM count is needed to saturate HBM; at B = 1 it is
launch-latency-bound. Selection (mask_predict, confidence) costs N² comparisons a row: each cell
is ranked against every cell of its row, N²/512 a thread on CUDA (2,048 at N = 1,024, estimated
at some tens of microseconds a row: the order of the gather at D = 768 bf16; noise at N = 64),
and the same N² on one core in the C++ twin (about 1 ms a mask_predict row at N = 1,024 on the
development machines). ``out`` rows are limited to 2^30 bytes (N·D·itemsize).

Errors. Metadata (dtype, device, shape, contiguity, strategy) is checked in Python before any
launch and raises ``TypeError``/``ValueError`` naming the argument. Values are checked by the
kernels themselves (no host sync on CUDA): a row whose ``count``/``cell``/``next_cell`` is out of
range, whose ``pred_prob`` has a NaN, or whose step would use an id outside the table's rows gets
a non-zero ``status[b]`` (codes in csrc/sampler_rules.h: 1..5 name an argument, the NaN or the
strategy, ``STATUS_BAD_ID_BASE`` + c (2^16 + c) a bad id at cell c; sticky: never cleared by the
op; ``describe_status`` words a code).

- CPU (the C++ twin): rows are all decided first; if any row is bad, only ``status`` is written
  and a ``ValueError`` names the argument, row and value. Nothing else is touched.
- CUDA: a row with a bad count/cell/next_cell/NaN is left untouched except ``status``; a cell
  with a bad id gets ``mask_row`` (never an out-of-bounds read) and the row's status is set.
  Call ``check_status(status)`` (a host sync) when convenient, e.g. once after the loop.

Under CUDA graph capture and ``torch.compile``: the op allocates nothing and never syncs; it is
the custom op ``torch.ops.xlx_fast.sampler_step`` (mutating ``mask``, ``visited``, ``ids``,
``out``, ``status``) with a fake implementation.

Backends (``sampler_backends``, registered with the op registry): the C++ twin on the CPU; on
CUDA the kernel compiled into ``xlx_fast._C`` or, where its static runtime cannot run, the same
source JIT-compiled by CuPy, chosen by a test launch on the first CUDA call (shown by
``xlx-fast info``). The argument list
and its checks are ``sampler_args.SamplerStepArgs``; the schedules come from
:mod:`xlx_fast.strategies`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# The strategy table, INACTIVE and the schedules are named here too: they are what a caller
# passes to the op. So are the status codes it may set.
from ..strategies import CODES as STRATEGIES  # noqa: F401
from ..strategies import INACTIVE, schedule, strategy_code  # noqa: F401
from .sampler_args import (CELLS, MAX_CELLS, STATUS_BAD_CELL, STATUS_BAD_COUNT,  # noqa: F401
                           STATUS_BAD_ID_BASE, STATUS_BAD_NEXT_CELL, STATUS_BAD_PROB,
                           STATUS_BAD_STRATEGY, SamplerStepArgs, bad_id_cell, check_mask_row,
                           describe_status)
from .sampler_backends import cuda_backend_choice, run  # noqa: F401

__all__ = [
    "SamplerState", "init_state", "reset_state", "sampler_step", "sampler_step_bytes", "check_status",
    "STRATEGIES", "INACTIVE", "schedule", "strategy_code", "CELLS", "MAX_CELLS", "STATUS_BAD_COUNT",
    "STATUS_BAD_CELL", "STATUS_BAD_NEXT_CELL", "STATUS_BAD_PROB", "STATUS_BAD_STRATEGY",
    "STATUS_BAD_ID_BASE", "bad_id_cell", "describe_status", "SamplerStepArgs", "check_mask_row",
    "cuda_backend_choice", "run",
]


@dataclass
class SamplerState:
    """The tensors one sampler step updates in place, for B rows.

    mask [B,N] bool (True = masked), visited [B,N] bool, ids [B,N] int64 (-1 = not decided),
    out [B,N,D] (table dtype: the next visual input), status [B] int32 (0 = fine).
    """

    mask: torch.Tensor
    visited: torch.Tensor
    ids: torch.Tensor
    out: torch.Tensor
    status: torch.Tensor


def init_state(batch: int, mask_row: torch.Tensor, cells: int = CELLS) -> SamplerState:
    """The state before step 0 for ``batch`` rows of ``cells`` cells (default the 8x8 grid's
    64): every cell masked, nothing visited, ids -1, out = mask_row everywhere, status 0.
    Allocates on ``mask_row``'s device and dtype."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= MAX_CELLS:
        raise ValueError(f"cells must be an int in 1..{MAX_CELLS}, got {cells!r}")
    check_mask_row(mask_row)
    dev, d = mask_row.device, mask_row.shape[0]
    state = SamplerState(
        mask=torch.empty(batch, cells, dtype=torch.bool, device=dev),
        visited=torch.empty(batch, cells, dtype=torch.bool, device=dev),
        ids=torch.empty(batch, cells, dtype=torch.int64, device=dev),
        out=torch.empty(batch, cells, d, dtype=mask_row.dtype, device=dev),
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


_OPTIONAL = ("count", "cell", "next_cell", "strategies")


def sampler_step(pred_prob: torch.Tensor, pred_id: torch.Tensor, state: SamplerState,
                 table: torch.Tensor, mask_row: torch.Tensor, strategy, *,
                 count: Optional[torch.Tensor] = None, cell: Optional[torch.Tensor] = None,
                 next_cell: Optional[torch.Tensor] = None) -> SamplerState:
    """Advance every row of ``state`` by one step in place (see the module docstring) and
    return ``state``. ``count`` is required for ``mask_predict``, ``cell`` for ``tlbr`` and
    ``random``; ``next_cell`` is optional for ``random`` (None: no cell re-masked); arguments
    a strategy does not use are ignored. All int32 [B] on the tensors' device. ``strategy`` is
    a name, a code, or an int32 [B] tensor of per-row codes (see the module docstring)."""
    if isinstance(strategy, torch.Tensor):
        strategies, code = strategy, 0  # the scalar is ignored when per-row codes are given
    else:
        strategies, code = None, strategy_code(strategy)
    a = SamplerStepArgs(pred_prob, pred_id, table, mask_row, state.mask, state.visited, state.ids,
                        state.out, state.status, count, cell, next_cell, code, strategies)
    # a non-tensor would reach torch's op-schema check first (a RuntimeError): name it here
    for name, t in a.tensors():
        if not isinstance(t, torch.Tensor) and (t is not None or name not in _OPTIONAL):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    torch.ops.xlx_fast.sampler_step(*a)
    return state


def sampler_step_bytes(batch: int, dim: int, dtype: torch.dtype, cells: int = CELLS) -> int:
    """Bytes one step must move: the gather (read + write of B·N·D elements, N = ``cells``)
    plus the state."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    gather = 2 * batch * cells * dim * itemsize
    state = batch * cells * ((4 + 8 + 8 + 1 + 1) + (8 + 1 + 1)) + batch * 4 * 4
    return gather + state


def check_status(status: torch.Tensor, cells: Optional[int] = None) -> None:
    """Raise ValueError if any row of ``status`` is non-zero (a host sync on CUDA); ``cells``
    (the rows' N, if known) words the bounds in the message."""
    bad = torch.nonzero(status.cpu()).flatten().tolist()
    if bad:
        codes = status.cpu()
        rows = ", ".join(f"row {r}: {describe_status(int(codes[r]), cells)}" for r in bad[:8])
        raise ValueError(f"sampler_step flagged {len(bad)} row(s): {rows}")


@torch.library.custom_op("xlx_fast::sampler_step",
                         mutates_args=("mask", "visited", "ids", "out", "status"))
def _sampler_step_op(pred_prob: torch.Tensor, pred_id: torch.Tensor, table: torch.Tensor,
                     mask_row: torch.Tensor, mask: torch.Tensor, visited: torch.Tensor,
                     ids: torch.Tensor, out: torch.Tensor, status: torch.Tensor,
                     count: Optional[torch.Tensor], cell: Optional[torch.Tensor],
                     next_cell: Optional[torch.Tensor], strategy: int,
                     strategies: Optional[torch.Tensor] = None) -> None:
    a = SamplerStepArgs(pred_prob, pred_id, table, mask_row, mask, visited, ids, out, status,
                        count, cell, next_cell, strategy, strategies)
    a.check()
    run(a)


@_sampler_step_op.register_fake
def _(*args, **kwargs):
    SamplerStepArgs(*args, **kwargs).check()
    return None
