"""Which cells each sampling step touches: the authors' schedules, defined with the strategies
(:mod:`xlx_fast.strategies`, neutral ground that imports nothing fast) and named here too, so
the reference's public names stay where they were."""
from ..strategies import mask_counts, random_order, tlbr_order

__all__ = ["mask_counts", "random_order", "tlbr_order"]
