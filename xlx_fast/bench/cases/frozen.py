"""The fast rows' models are frozen, as the server and bulk generation freeze theirs.

``xlx_fast.freeze`` declares a model's weights constant, so that on a CPU its float32 GEMMs run
against weights MKL packed once (``xlx_fast.ops.frozen_weights``). The server, ``generate
--captions-file`` and the multi-step CLI commands freeze the models they build; a benchmark of
their path does the same, and its row says so. The reference and the ``torch.compile`` peer
run on their own unfrozen copies. Where packed GEMMs do not run (a GPU, bf16) freezing changes
nothing and the note says that.
"""
from __future__ import annotations

from xlx_fast.ops import frozen_weights


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
