"""The fast rows' models are frozen, as the server and bulk generation freeze theirs.

``xlx_fast.freeze`` declares a model's weights constant, so that on a CPU its float32 GEMMs run
against weights MKL packed once (``xlx_fast.ops.frozen_weights``). The server, ``generate
--captions-file`` and the multi-step CLI commands freeze the models they build; a benchmark of
their path does the same, and its row says so. The reference and the ``torch.compile`` peer
run on their own unfrozen copies; where freezing packs weights, the peer compiles with
inductor's ``freezing=True`` (:func:`peer_freezes`), the same promise on its side. Where packed GEMMs do not run (a GPU, bf16) freezing changes
nothing and the note says that.
"""
from __future__ import annotations

import torch

from xlx_fast.ops import frozen_weights


def peer_freezes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the ``torch.compile`` peer of a frozen fast row compiles with ``freezing=True``:
    where freezing packs the fast row's weights (CPU, float32, MKL), the peer gets the same
    promise of constant weights."""
    return device.type == "cpu" and dtype == torch.float32 and frozen_weights.available()


def freeze(model):
    """``model`` frozen (in place), and the note for its row."""
    import xlx_fast

    xlx_fast.freeze(model)

    def note() -> str:
        count = frozen_weights.packed_count(model)
        if count:
            return f"weights frozen (xlx_fast.freeze): {count} packed fp32 weight views (MKL)"
        return "weights frozen (xlx_fast.freeze): no packed GEMM here (CPU fp32 with MKL only)"

    return model, note
