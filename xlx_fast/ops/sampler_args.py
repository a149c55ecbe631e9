"""The arguments of one sampler step, as the native kernels take them, and what their status
codes say about them.

``SamplerStepArgs`` is the one spelling of the step's argument list: the 13 tensors in the
order of ``struct SamplerStepArgs`` (csrc/sampler_step.h), the scalar strategy code and the
optional per-row codes. ``check()`` validates metadata only (dtype, device, shape, contiguity,
strategy: it works on fake tensors and never syncs) and raises ``TypeError``/``ValueError``
naming the first bad argument; ``pointers()`` are the data pointers the bindings take.

The cell count N of a row is read from the tensors' shapes (``pred_prob`` [B, N]), 1 to
``MAX_CELLS`` = 1,024 (grids 8x8 to 32x32); ``CELLS`` = 64 is only the default grid's count.

Status codes (csrc/sampler_rules.h, enum Status) are the kernels' verdict on argument values:
1..5 name a per-row array (count, cell, next_cell), the NaN in ``pred_prob`` or an unknown
strategy; ``STATUS_BAD_ID_BASE + c`` (2^16 + c, c < N <= 1,024) is "an id out of range at cell
c", so the two ranges never meet whatever N is. ``bad_id_cell`` decodes the latter.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..strategies import BY_CODE, strategy_code
from ._common import FLOAT_DTYPES, check_tensor

CELLS = 64  # the default 8x8 grid's cell count (the op reads N from pred_prob's shape)
MAX_CELLS = 1024  # kMaxCells in csrc/sampler_rules.h: one CUDA block decides a row
MAX_ROW_BYTES = 1 << 24  # a table row's bytes (D * itemsize) must stay under this
MAX_OUT_ROW_BYTES = 1 << 30  # a row of out (N * D * itemsize): the kernel indexes it with int32
# enum Status in csrc/sampler_rules.h
STATUS_BAD_COUNT, STATUS_BAD_CELL, STATUS_BAD_NEXT_CELL, STATUS_BAD_PROB, STATUS_BAD_STRATEGY = (
    1, 2, 3, 4, 5)
STATUS_BAD_ID_BASE = 1 << 16  # + c: an id out of range at cell c


def bad_id_cell(code: int) -> Optional[int]:
    """The cell a bad-id status code names, or None for any other code."""
    c = code - STATUS_BAD_ID_BASE
    return c if 0 <= c < MAX_CELLS else None


class SamplerStepArgs(NamedTuple):
    pred_prob: torch.Tensor
    pred_id: torch.Tensor
    table: torch.Tensor
    mask_row: torch.Tensor
    mask: torch.Tensor
    visited: torch.Tensor
    ids: torch.Tensor
    out: torch.Tensor
    status: torch.Tensor
    count: Optional[torch.Tensor]
    cell: Optional[torch.Tensor]
    next_cell: Optional[torch.Tensor]
    strategy: int
    strategies: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.pred_prob.shape[0]

    @property
    def cells(self) -> int:
        """N, the cells of a row (``pred_prob`` [B, N])."""
        return self.pred_prob.shape[1]

    @property
    def n_table(self) -> int:
        return self.table.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.table.shape[1] * self.table.element_size()

    def tensors(self):
        """(name, tensor or None) for every tensor argument, in the native order."""
        return ((name, getattr(self, name)) for name in _TENSORS)

    def pointers(self) -> tuple:
        """The tensors' data pointers in the native order (0 for an absent one)."""
        return tuple(0 if t is None else t.data_ptr() for _, t in self.tensors())

    def check(self) -> None:
        """Raise TypeError/ValueError naming the first bad argument (metadata checks only)."""
        code = strategy_code(self.strategy)
        check_tensor("pred_prob", self.pred_prob, dim=2, layout="[B, N]")
        b, n = self.pred_prob.shape
        if b < 1:
            raise ValueError("pred_prob has an empty batch (B = 0)")
        if not 1 <= n <= MAX_CELLS:
            raise ValueError(f"pred_prob must have 1 to {MAX_CELLS} cells per row (shape [B, N]), "
                             f"got N = {n}")
        table = check_tensor("table", self.table, dtypes=FLOAT_DTYPES, dim=2, layout="[N, D]")
        if table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"table must be a non-empty [N, D] tensor, got shape {tuple(table.shape)}")
        d = table.shape[1]
        if self.row_bytes >= MAX_ROW_BYTES:
            raise ValueError(f"table rows must be under {MAX_ROW_BYTES} bytes, got D = {d}")
        if n * self.row_bytes > MAX_OUT_ROW_BYTES:
            raise ValueError(f"out rows (N * D * itemsize) must be at most {MAX_OUT_ROW_BYTES} "
                             f"bytes, got N = {n}, D = {d} ({table.dtype})")
        same = (table.dtype,)
        want = {"pred_prob": ((torch.float32,), (b, n)), "pred_id": ((torch.int64,), (b, n)),
                "table": (same, tuple(table.shape)), "mask_row": (same, (d,)),
                "mask": ((torch.bool,), (b, n)), "visited": ((torch.bool,), (b, n)),
                "ids": ((torch.int64,), (b, n)), "out": (same, (b, n, d)),
                "status": ((torch.int32,), (b,))}
        needs = BY_CODE[code].needs
        if self.strategies is not None:
            # Codes are data (checked by the kernels: an unknown code flags its row); every
            # array a row may read must be there, since which rows read which is not known here.
            want["strategies"] = ((torch.int32,), (b,))
            needs = ("count", "cell")
        for name, (dtypes, shape) in want.items():
            try:
                check_tensor(name, getattr(self, name), dtypes=dtypes, shape=shape, contiguous=True)
            except ValueError as e:
                if name in _PER_CELL and "must have shape" in str(e):
                    raise ValueError(f"{e} (B = {b} and N = {n} are pred_prob's shape)") from None
                raise
        for name in ("count", "cell", "next_cell"):
            t = getattr(self, name)
            if t is not None:
                want[name] = check_tensor(name, t, dtypes=(torch.int32,), shape=(b,), contiguous=True)
            elif name in needs:
                if self.strategies is not None:
                    raise ValueError(f"{name} is required with per-row strategies")
                raise ValueError(f"{name} is required for strategy {BY_CODE[code].name!r}")
        for name in want:
            check_tensor(name, getattr(self, name), device=self.pred_prob.device, device_of="pred_prob")

    def status_message(self, code: int, row: int) -> str:
        """What status ``code`` of ``row`` says about these arguments (reads their values)."""
        n = self.cells
        c = bad_id_cell(code)
        if c is not None and c < n:
            return (f"ids out of range: row {row}, cell {c} would use id "
                    f"(pred_id {int(self.pred_id[row, c])}, ids {int(self.ids[row, c])}) outside "
                    f"[0, {self.n_table}) (pred_id and ids must index the table)")
        if code == STATUS_BAD_COUNT:
            return f"count[{row}] = {int(self.count[row])} is outside 0..{n}"
        if code == STATUS_BAD_CELL:
            return f"cell[{row}] = {int(self.cell[row])} is outside -1..{n - 1}"
        if code == STATUS_BAD_NEXT_CELL:
            return f"next_cell[{row}] = {int(self.next_cell[row])} is outside -1..{n - 1}"
        if code == STATUS_BAD_PROB:
            return f"pred_prob has NaN in row {row}"
        if code == STATUS_BAD_STRATEGY:
            return f"unknown strategy code in row {row}"
        return f"status {code} in row {row}"


_TENSORS = tuple(f for f in SamplerStepArgs._fields if f != "strategy")
_PER_CELL = ("pred_id", "mask", "visited", "ids", "out")  # [B, N] (out [B, N, D]) like pred_prob


def describe_status(code: int, cells: Optional[int] = None) -> str:
    """A status code in words, without the arguments it came from; ``cells`` (N, when the
    caller knows it) words the bounds, else they read "N" (the row's cell count)."""
    c = bad_id_cell(code)
    if c is not None:
        return f"id out of range at cell {c}"
    n, last = (str(cells), str(cells - 1)) if cells is not None else ("N", "N-1")
    return {STATUS_BAD_COUNT: f"count outside 0..{n}", STATUS_BAD_CELL: f"cell outside -1..{last}",
            STATUS_BAD_NEXT_CELL: f"next_cell outside -1..{last}", STATUS_BAD_PROB: "NaN in pred_prob",
            STATUS_BAD_STRATEGY: "unknown strategy"}.get(code, f"status {code}")


def check_mask_row(t) -> torch.Tensor:
    """A [D] row in a table dtype (``mask_row``, before any table is at hand)."""
    check_tensor("mask_row", t, dtypes=FLOAT_DTYPES, dim=1, layout="[D]")
    if t.shape[0] < 1:
        raise ValueError(f"mask_row must be a non-empty 1-D tensor [D], got shape {tuple(t.shape)}")
    return t
