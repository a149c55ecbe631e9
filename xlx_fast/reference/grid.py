"""The grid's box positions as the reference reads them: the neutral definition in
:mod:`xlx_fast.grid`, shared with the fast path (it is the model's input data, not a rule that
either side is checked against)."""
from ..grid import box_positions

__all__ = ["box_positions"]
