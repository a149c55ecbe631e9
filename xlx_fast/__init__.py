"""xlx_fast: fast X-LXMERT image generation, captioning and question answering.

Public API::

    import xlx_fast
    model = xlx_fast.models.XLxmertForImageGeneration.from_default()   # or .from_checkpoint(...)
    xlx_fast.optimize(model)                                            # fused kernels, in place
    xlx_fast.freeze(model)        # optional: weights constant from now on, packed CPU GEMMs
    out = xlx_fast.generate(model, input_ids, steps=4)                  # fast sampler
    ref = xlx_fast.reference.sample(model, input_ids, steps=4)          # eager reference
    words = xlx_fast.caption(model, cluster_ids=out.ids, length=12)     # read the picture back

Submodules are imported lazily so that ``import xlx_fast`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY = {
    "models": ("xlx_fast.models", None),
    "reference": ("xlx_fast.reference", None),
    "ops": ("xlx_fast.ops", None),
    "text": ("xlx_fast.text", None),
    "optimize": ("xlx_fast.patching", "optimize"),
    "freeze": ("xlx_fast.freezing", "freeze"),
    "unfreeze": ("xlx_fast.freezing", "unfreeze"),
    "generate": ("xlx_fast.generation", "generate"),
    "answer": ("xlx_fast.answering", "answer"),
    "caption": ("xlx_fast.captioning", "caption"),
    "info": ("xlx_fast.cli.info", "info"),
    "vocab": ("xlx_fast.vocab", None),
    "training": ("xlx_fast.training", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'xlx_fast' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
