"""The image-generation architectures a user picks from: one table, read by
``xlx_fast.models.from_default`` and by every command with ``--arch`` (``generate``, ``serve``,
``train``, ``bench``).

Torch-free on purpose: the command line checks ``--arch`` (and refuses the combinations an
architecture does not support) before torch or a model is imported. A row names its model class
in :mod:`xlx_fast.models` by name, so this module imports nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ARCHS", "DEFAULT_ARCH", "Arch", "check_arch"]


@dataclass(frozen=True)
class Arch:
    """One architecture: its ``--arch`` name, its model class in :mod:`xlx_fast.models`, a
    one-line description, whether it has a checkpoint loader (``from_checkpoint``), and whether
    the caption engine (:func:`xlx_fast.caption`: Mask-Predict over words with the masked-LM
    head, built on the two-stream step) reads its pictures back."""

    name: str
    class_name: str
    description: str
    loads_checkpoints: bool
    captions: bool


ARCHS = {a.name: a for a in (
    Arch("xlxmert", "XLxmertForImageGeneration",
         "X-LXMERT, the two-stream model of the paper (the authors' checkpoints load)", True, True),
    Arch("xuniter", "XUniterForImageGeneration",
         "X-UNITER, single-stream UNITER with X-LXMERT's changes (seeded default only: no "
         "checkpoint loader; no caption read-back)", False, False),
)}
DEFAULT_ARCH = "xlxmert"


def check_arch(arch) -> Arch:
    """The row of ``arch``; raises ValueError naming the choices for any other value."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS[arch]
