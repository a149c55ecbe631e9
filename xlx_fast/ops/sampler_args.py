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

CELLS = 64  # kCells in csrc/sampler_rules.h: the kernels are built for the 8x8 grid
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
        pred_prob, table = self.pred_prob, self.table
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
        if self.row_bytes >= MAX_ROW_BYTES:
            raise ValueError(f"table rows must be under {MAX_ROW_BYTES} bytes, got D = {d}")
        float_ = (table.dtype,)
        want = {"pred_prob": ((torch.float32,), (b, CELLS)), "pred_id": ((torch.int64,), (b, CELLS)),
                "table": (float_, tuple(table.shape)), "mask_row": (float_, (d,)),
                "mask": ((torch.bool,), (b, CELLS)), "visited": ((torch.bool,), (b, CELLS)),
                "ids": ((torch.int64,), (b, CELLS)), "out": (float_, (b, CELLS, d)),
                "status": ((torch.int32,), (b,))}
        for name, (dtypes, shape) in want.items():
            check_tensor(name, getattr(self, name), dtypes, shape)
        needs = BY_CODE[code].needs
        if self.strategies is not None:
            # Codes are data (checked by the kernels: an unknown code flags its row); every
            # array a row may read must be there, since which rows read which is not known here.
            check_tensor("strategies", self.strategies, (torch.int32,), (b,))
            needs = ("count", "cell")
        for name in ("count", "cell", "next_cell"):
            t = getattr(self, name)
            if t is None and name in needs:
                if self.strategies is not None:
                    raise ValueError(f"{name} is required with per-row strategies")
                raise ValueError(f"{name} is required for strategy {BY_CODE[code].name!r}")
            check_tensor(name, t, (torch.int32,), (b,), optional=True)
        device = pred_prob.device
        for name, t in self.tensors():
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but pred_prob is on {device}: "
                                 "all tensors must be on one device")

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


def check_tensor(name, t, dtypes, shape, *, optional=False):
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


def check_vector(name, t):
    """A [D] row in a table dtype (``mask_row``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [D], got shape {tuple(t.shape)}")
    if t.dtype not in TABLE_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
