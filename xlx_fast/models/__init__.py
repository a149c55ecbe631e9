"""The X-LXMERT models: image generation (with its generator, "Paint") and question answering; X-UNITER,
the single-stream image-generation model."""
from .answering import TASKS, XLxmertForQuestionAnswering
from .generator import Generator, GeneratorConfig
from .xlxmert import GRID, MAX_TEXT_LENGTH, N_CELLS, SIZES, ObjPredictHead, XLxmertForImageGeneration
from .xuniter import XUniterForImageGeneration

__all__ = ["GRID", "MAX_TEXT_LENGTH", "N_CELLS", "SIZES", "TASKS", "Generator", "GeneratorConfig",
           "ObjPredictHead", "XLxmertForImageGeneration", "XLxmertForQuestionAnswering",
           "XUniterForImageGeneration"]
