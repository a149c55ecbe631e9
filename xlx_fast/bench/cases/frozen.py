"""The fast rows' models are frozen, as the server and bulk generation freeze theirs.

``xlx_fast.freeze`` declares a model's weights constant, so that on a CPU its float32 and
(where the CPU multiplies it natively) bfloat16 GEMMs run against weights packed once
(``xlx_fast.ops.frozen_weights``). The server, ``generate --captions-file`` and the multi-step
CLI commands freeze the models they build; a benchmark of their path does the same, and its row
says so. The reference and the ``torch.compile`` peer run on their own unfrozen copies; where
freezing packs weights, the peer compiles with inductor's ``freezing=True``
(:func:`peer_freezes`), the same promise on its side (inductor then packs its linears too).
Where packed GEMMs do not run (a GPU, fp16) freezing changes nothing and the note says that.
"""
from __future__ import annotations

import torch

from xlx_fast.ops import frozen_weights


def peer_freezes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the ``torch.compile`` peer of a frozen fast row compiles with ``freezing=True``:
    where freezing packs the fast row's weights (a CPU, a packed dtype), the peer gets the same
    promise of constant weights."""
    return device.type == "cpu" and frozen_weights.available(dtype)


def freeze(model):
    """``model`` frozen (in place), and the note for its row."""
    import xlx_fast

    xlx_fast.freeze(model)
    packers = ", ".join(f"{str(d).removeprefix('torch.')} with {p.library}"
                        for d, p in frozen_weights.PACKERS.items())

    def note() -> str:
        count = frozen_weights.packed_count(model)
        if count:
            return f"weights frozen (xlx_fast.freeze): {count} packed weight views"
        return f"weights frozen (xlx_fast.freeze): no packed GEMM here (CPU only: {packers})"

    return model, note
