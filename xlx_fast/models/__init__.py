"""The X-LXMERT models: image generation (with its generator, "Paint") and question answering; X-UNITER,
the single-stream image-generation model."""
from .answering import TASKS, XLxmertForQuestionAnswering
from .generator import Generator, GeneratorConfig
from .xlxmert import GRID, MAX_TEXT_LENGTH, N_CELLS, SIZES, ObjPredictHead, XLxmertForImageGeneration
from .xuniter import XUniterForImageGeneration
from ..archs import ARCHS, DEFAULT_ARCH, check_arch

__all__ = ["ARCHS", "GRID", "MAX_TEXT_LENGTH", "N_CELLS", "SIZES", "TASKS", "Generator", "GeneratorConfig",
           "ObjPredictHead", "XLxmertForImageGeneration", "XLxmertForQuestionAnswering",
           "XUniterForImageGeneration", "from_default", "model_class"]


def model_class(arch: str = DEFAULT_ARCH):
    """The image-generation model class of ``arch`` (a name in :data:`xlx_fast.archs.ARCHS`:
    ``"xlxmert"`` or ``"xuniter"``); raises ValueError naming the choices otherwise."""
    return globals()[check_arch(arch).class_name]


def from_default(arch: str = DEFAULT_ARCH, **kw):
    """The seeded default model of ``arch``: ``XLxmertForImageGeneration.from_default(**kw)``
    or ``XUniterForImageGeneration.from_default(**kw)`` (both take ``seed``, ``size``,
    ``with_generator``, ``grid`` and ``pretraining_heads``). Raises ValueError for another
    ``arch``, naming the choices."""
    return model_class(arch).from_default(**kw)
