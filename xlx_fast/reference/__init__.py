"""The reference: the authors' X-LXMERT samplers in plain eager PyTorch (SPEC §1).

Everything xlx_fast computes is checked against this package, so it imports nothing fast: only
torch, transformers and the model definitions in :mod:`xlx_fast.models`.
"""
from .grid import box_positions
from .sampler import STRATEGIES, SampleResult, default_steps, paint, sample
from .schedule import mask_counts, random_order, tlbr_order

__all__ = ["STRATEGIES", "SampleResult", "box_positions", "default_steps", "mask_counts", "paint",
           "random_order", "sample", "tlbr_order"]
