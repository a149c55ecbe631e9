"""What a replica serves: a plain, serialisable description it builds its model from.

A Ray Serve replica starts in another process (often on another machine), so it receives a
*description* (JSON-able, fits a serve config file's ``args``), never a model object:

- the authors' files: ``checkpoint`` + ``centroids`` + ``generator`` (+ ``vocab``), or
- the embedded default (no checkpoint): seeded random weights at ``size`` "base" (the real
  architecture; its pictures are noise) or "tiny" (the test size).

``image_size`` sets the generator's output side (default: the size's own, 256 for "base") so a
tiny test model can still answer the API's only size, 256x256. ``head_scale`` multiplies the
head's ``linear_feat`` (default 1 = the weights as given): tests raise it to push every cell's
best cluster id well above the second so ids are robust to float rounding (SPEC §4).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: str | None = None
    centroids: str | None = None
    generator: str | None = None
    vocab: str | None = None
    size: str = "base"
    seed: int = 0
    image_size: int | None = None
    head_scale: float = 1.0
    device: str = "cpu"
    dtype: str = "fp32"

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelSpec":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model spec: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        spec = cls(**d)
        spec.check()
        return spec

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        if self.checkpoint is None and (self.centroids or self.generator):
            raise ValueError("model spec: centroids/generator need checkpoint")
        if self.checkpoint is not None and (self.centroids is None or self.generator is None):
            raise ValueError("model spec: checkpoint needs centroids and generator (the server paints)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            # checked here, not at build time: a replica that fails to build is restarted forever
            raise ValueError(f"model spec: device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model spec: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size & (self.image_size - 1)):
            raise ValueError(f"model spec: image_size must be a power of two >= 8, got {self.image_size}")
        if not self.head_scale > 0:
            raise ValueError(f"model spec: head_scale must be > 0, got {self.head_scale}")

    def build(self):
        """``(model, tokenizer)`` on the spec's device and dtype, in eval mode."""
        from ..models import XLxmertForImageGeneration
        from ..models.generator import Generator
        from ..models.xlxmert import SIZES
        from ..text import load_tokenizer

        self.check()
        if self.checkpoint is None:
            model = XLxmertForImageGeneration.from_default(seed=self.seed, size=self.size)
            if self.image_size is not None and self.image_size != model.generator.config.target_size:
                cfg = dataclasses.replace(SIZES[self.size].generator, target_size=self.image_size)
                model.generator = Generator(cfg)
                model.generator.reset_parameters(torch.Generator().manual_seed(self.seed))
            real = False
        else:
            model = XLxmertForImageGeneration.from_checkpoint(
                self.checkpoint, self.centroids, self.generator, size=self.size)
            if self.image_size is not None and self.image_size != model.generator.config.target_size:
                raise ValueError("model spec: image_size cannot change a checkpoint's generator")
            real = True
        if self.head_scale != 1.0:
            with torch.no_grad():
                model.obj_predict_head.linear_feat.weight.mul_(self.head_scale)
                model.obj_predict_head.linear_feat.bias.mul_(self.head_scale)
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model spec: device {self.device!r} but no CUDA device is available")
        model = model.to(device=device, dtype=DTYPES[self.dtype]).eval()
        tokenizer = load_tokenizer(self.vocab, real_weights=real)
        return model, tokenizer
