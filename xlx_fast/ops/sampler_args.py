"""The arguments of one sampler step, as the native kernels take them, and what their status
codes say about them.

``SamplerStepArgs`` is the one spelling of the step's argument list: the 13 tensors in the
order of ``struct SamplerStepArgs`` (csrc/sampler_step.h), the scalar strategy code and the
optional per-row codes. ``check()`` validates metadata only (dtype, device, shape, contiguity,
strategy: it works on fake tensors and never syncs) and raises ``TypeError``/``ValueError``
naming the first bad argument; ``pointers()`` are the data pointers the bindings take.

Status codes (csrc/sampler_rules.h, enum Status) are the kernels' verdict on argument values:
1..64 is "an id out of range at cell code-1", the others name a per-row array or the NaN in
``pred_prob``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..strategies import BY_CODE, strategy_code
from ._common import FLOAT_DTYPES, check_tensor

CELLS = 64  # kCells in csrc/sampler_rules.h: the kernels are built for the 8x8 grid
MAX_ROW_BYTES = 1 << 24  # the kernel indexes a row's words with 32-bit ints
STATUS_BAD_COUNT, STATUS_BAD_CELL, STATUS_BAD_NEXT_CELL, STATUS_BAD_PROB, STATUS_BAD_STRATEGY = (
    65, 66, 67, 68, 69)


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
        check_tensor("pred_prob", self.pred_prob, dim=2, shape=(None, CELLS))
        b = self.batch
        if b < 1:
            raise ValueError("pred_prob has an empty batch (B = 0)")
        table = check_tensor("table", self.table, dtypes=FLOAT_DTYPES, dim=2, layout="[N, D]")
        if table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"table must be a non-empty [N, D] tensor, got shape {tuple(table.shape)}")
        d = table.shape[1]
        if self.row_bytes >= MAX_ROW_BYTES:
            raise ValueError(f"table rows must be under {MAX_ROW_BYTES} bytes, got D = {d}")
        same = (table.dtype,)
        want = {"pred_prob": ((torch.float32,), (b, CELLS)), "pred_id": ((torch.int64,), (b, CELLS)),
                "table": (same, tuple(table.shape)), "mask_row": (same, (d,)),
                "mask": ((torch.bool,), (b, CELLS)), "visited": ((torch.bool,), (b, CELLS)),
                "ids": ((torch.int64,), (b, CELLS)), "out": (same, (b, CELLS, d)),
                "status": ((torch.int32,), (b,))}
        needs = BY_CODE[code].needs
        if self.strategies is not None:
            # Codes are data (checked by the kernels: an unknown code flags its row); every
            # array a row may read must be there, since which rows read which is not known here.
            want["strategies"] = ((torch.int32,), (b,))
            needs = ("count", "cell")
        for name, (dtypes, shape) in want.items():
            check_tensor(name, getattr(self, name), dtypes=dtypes, shape=shape, contiguous=True)
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
        if 1 <= code <= CELLS:
            c = code - 1
            return (f"ids out of range: row {row}, cell {c} would use id "
                    f"(pred_id {int(self.pred_id[row, c])}, ids {int(self.ids[row, c])}) outside "
                    f"[0, {self.n_table}) (pred_id and ids must index the table)")
        if code == STATUS_BAD_COUNT:
            return f"count[{row}] = {int(self.count[row])} is outside 0..{CELLS}"
        if code == STATUS_BAD_CELL:
            return f"cell[{row}] = {int(self.cell[row])} is outside -1..{CELLS - 1}"
        if code == STATUS_BAD_NEXT_CELL:
            return f"next_cell[{row}] = {int(self.next_cell[row])} is outside -1..{CELLS - 1}"
        if code == STATUS_BAD_PROB:
            return f"pred_prob has NaN in row {row}"
        if code == STATUS_BAD_STRATEGY:
            return f"unknown strategy code in row {row}"
        return f"status {code} in row {row}"


_TENSORS = tuple(f for f in SamplerStepArgs._fields if f != "strategy")


def describe_status(code: int) -> str:
    """A status code in words, without the arguments it came from."""
    if 1 <= code <= CELLS:
        return f"id out of range at cell {code - 1}"
    return {STATUS_BAD_COUNT: "count outside 0..64", STATUS_BAD_CELL: "cell outside -1..63",
            STATUS_BAD_NEXT_CELL: "next_cell outside -1..63", STATUS_BAD_PROB: "NaN in pred_prob",
            STATUS_BAD_STRATEGY: "unknown strategy"}.get(code, f"status {code}")


def check_mask_row(t) -> torch.Tensor:
    """A [D] row in a table dtype (``mask_row``, before any table is at hand)."""
    check_tensor("mask_row", t, dtypes=FLOAT_DTYPES, dim=1, layout="[D]")
    if t.shape[0] < 1:
        raise ValueError(f"mask_row must be a non-empty 1-D tensor [D], got shape {tuple(t.shape)}")
    return t
