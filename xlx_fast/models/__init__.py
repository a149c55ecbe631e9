"""The X-LXMERT models: image generation (with its generator, "Paint") and question answering."""
from .answering import TASKS, XLxmertForQuestionAnswering
from .generator import Generator, GeneratorConfig
from .xlxmert import GRID, MAX_TEXT_LENGTH, N_CELLS, SIZES, ObjPredictHead, XLxmertForImageGeneration

__all__ = ["GRID", "MAX_TEXT_LENGTH", "N_CELLS", "SIZES", "TASKS", "Generator", "GeneratorConfig",
           "ObjPredictHead", "XLxmertForImageGeneration", "XLxmertForQuestionAnswering"]
