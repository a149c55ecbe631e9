"""The X-LXMERT image-generation model and its generator ("Paint")."""
from .generator import Generator, GeneratorConfig
from .xlxmert import GRID, MAX_TEXT_LENGTH, N_CELLS, SIZES, ObjPredictHead, XLxmertForImageGeneration

__all__ = ["GRID", "MAX_TEXT_LENGTH", "N_CELLS", "SIZES", "Generator", "GeneratorConfig",
           "ObjPredictHead", "XLxmertForImageGeneration"]
