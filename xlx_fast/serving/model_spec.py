"""What a replica serves: a plain, serialisable description it builds its model from.

A Ray Serve replica starts in another process (often on another machine), so it receives a
*description* (JSON-able, fits a serve config file's ``args``), never a model object:

- the authors' files: ``checkpoint`` + ``centroids`` + ``generator`` (+ ``vocab``), or
- the embedded default (no checkpoint): seeded random weights at ``size`` "base" (the real
  architecture; its pictures are noise) or "tiny" (the test size).

``arch`` is the image-generation architecture (:data:`xlx_fast.archs.ARCHS`): ``xlxmert`` (the
default) or ``xuniter``, the single-stream X-UNITER, which has no checkpoint loader (its seeded
default only) and no caption engine (``captions`` is refused with it); the paint route runs its
own engine (:func:`xlx_fast.xuniter_engine.engine_class`), and an answer model reads its
codebook as it reads X-LXMERT's.

``grid`` is the model's N×N grid of cells (8, the paper's, by default; 16 and 32 are the finer
grids): a property of the served model, never of a request. Cluster ids a generation returns or a
caption request sends are N² long. A model whose grid no generator paints yet is served without
painting (``painter.can_paint``): the image route then answers with the reason, captions and
answers work.

``image_size`` sets the generator's output side (default: the size's own, 256 for "base") so a
tiny test model can still answer the API's only size, 256x256. ``head_scale`` multiplies the
head's ``linear_feat`` (default 1 = the weights as given): tests raise it to push every cell's
best cluster id well above the second so ids are robust to float rounding (SPEC §4).

The other two tasks (``POST /v1/captions``, ``POST /v1/answers``) are off unless asked for, so a
server that only paints builds exactly the model it always did:

- ``captions``: build the painting model with its masked-LM head (``pretraining_heads=True``;
  a checkpoint must then carry the authors' ``cls.*`` keys). The random default draws the head
  after everything else, so its pictures are unchanged. ``word_head_scale`` multiplies the
  head transform's LayerNorm scale, as ``head_scale`` does for cluster ids (tests sharpen the
  nearly flat word distribution of the random default).
- ``answer_task`` (``vqa``, ``gqa`` or ``nlvr2``): a second model,
  ``XLxmertForQuestionAnswering``: the authors' fine-tuned ``answer_checkpoint`` with its answer
  table ``answers`` (a ``label2ans`` list or ``ans2label`` object; needed for VQA and GQA, whose
  answers would otherwise read ``answer_17``), or the seeded default at ``size`` (its answers are
  garbage, its costs real). Questions go through the painting model's tokenizer, and cluster ids
  are looked up in the painting model's codebook: one codebook per server, so the ids a
  generation returned can be asked about.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..archs import DEFAULT_ARCH, check_arch
from ..grid import GRID, check_grid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANSWER_TASKS = ("vqa", "gqa", "nlvr2")  # models.answering.TASKS, named here without building one


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: str | None = None
    centroids: str | None = None
    generator: str | None = None
    vocab: str | None = None
    size: str = "base"
    arch: str = DEFAULT_ARCH
    grid: int = GRID
    seed: int = 0
    image_size: int | None = None
    head_scale: float = 1.0
    device: str = "cpu"
    dtype: str = "fp32"
    captions: bool = False
    word_head_scale: float = 1.0
    answer_task: str | None = None
    answer_checkpoint: str | None = None
    answers: str | None = None

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
        try:
            arch = check_arch(self.arch)
        except ValueError as e:
            raise ValueError(f"model spec: {e}") from None
        if self.checkpoint is not None and not arch.loads_checkpoints:
            raise ValueError(f"model spec: arch {arch.name} builds its seeded default: there is no "
                             f"{arch.name} checkpoint loader (checkpoint is an X-LXMERT state dict)")
        if self.captions and not arch.captions:
            raise ValueError(f"model spec: captions read pictures back with X-LXMERT's masked-LM "
                             f"head and caption engine, which arch {arch.name} does not have")
        if self.checkpoint is None and (self.centroids or self.generator):
            raise ValueError("model spec: centroids/generator need checkpoint")
        if self.checkpoint is not None and (self.centroids is None or self.generator is None):
            raise ValueError("model spec: checkpoint needs centroids and generator (the server paints)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            # checked here, not at build time: a replica that fails to build is restarted forever
            raise ValueError(f"model spec: device must be cpu, cuda or cuda:N, got {self.device!r}")
        try:
            check_grid(self.grid)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model spec: {e}") from None
        if self.dtype not in DTYPES:
            raise ValueError(f"model spec: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size & (self.image_size - 1)):
            raise ValueError(f"model spec: image_size must be a power of two >= 8, got {self.image_size}")
        if not self.head_scale > 0:
            raise ValueError(f"model spec: head_scale must be > 0, got {self.head_scale}")
        if not isinstance(self.captions, bool):
            raise ValueError(f"model spec: captions must be true or false, got {self.captions!r}")
        if not self.word_head_scale > 0:
            raise ValueError(f"model spec: word_head_scale must be > 0, got {self.word_head_scale}")
        if self.word_head_scale != 1.0 and not self.captions:
            raise ValueError("model spec: word_head_scale needs captions")
        if self.answer_task is None:
            if self.answer_checkpoint is not None or self.answers is not None:
                raise ValueError("model spec: answer_checkpoint/answers need answer_task "
                                 f"({', '.join(ANSWER_TASKS)})")
        elif self.answer_task not in ANSWER_TASKS:
            raise ValueError(f"model spec: answer_task must be one of {', '.join(ANSWER_TASKS)}, "
                             f"got {self.answer_task!r}")
        elif self.answer_checkpoint is not None and self.answers is None and self.answer_task != "nlvr2":
            raise ValueError(f"model spec: answer_checkpoint needs answers, the {self.answer_task} "
                             "answer table its head was trained with (label2ans or ans2label JSON)")

    @property
    def answers_enabled(self) -> bool:
        return self.answer_task is not None

    def build(self):
        """``(model, tokenizer)`` on the spec's device and dtype, in eval mode."""
        from ..freezing import freeze
        from ..models import XLxmertForImageGeneration, from_default
        from ..models.generator import Generator
        from ..text import load_tokenizer

        self.check()
        if self.checkpoint is None:
            model = from_default(self.arch, seed=self.seed, size=self.size,
                                 pretraining_heads=self.captions, grid=self.grid)
            # no generator (a grid none paints yet): nothing to resize, the server does not paint
            if (self.image_size is not None and model.generator is not None
                    and self.image_size != model.generator.config.target_size):
                cfg = dataclasses.replace(model.generator.config, target_size=self.image_size)
                model.generator = Generator(cfg)
                model.generator.reset_parameters(torch.Generator().manual_seed(self.seed))
            real = False
        else:
            model = XLxmertForImageGeneration.from_checkpoint(
                self.checkpoint, self.centroids, self.generator, size=self.size,
                pretraining_heads=self.captions, grid=self.grid)
            if self.image_size is not None and self.image_size != model.generator.config.target_size:
                raise ValueError("model spec: image_size cannot change a checkpoint's generator")
            real = True
        if self.head_scale != 1.0:
            with torch.no_grad():
                model.obj_predict_head.linear_feat.weight.mul_(self.head_scale)
                model.obj_predict_head.linear_feat.bias.mul_(self.head_scale)
        if self.word_head_scale != 1.0:
            with torch.no_grad():
                model.cls.predictions.transform.LayerNorm.weight.mul_(self.word_head_scale)
        # the replica never edits its weights: frozen, its CPU GEMMs run on packed weights
        model = freeze(model.to(device=self._device(), dtype=DTYPES[self.dtype]).eval())
        real_answers = self.answer_checkpoint is not None
        tokenizer = load_tokenizer(self.vocab, real_weights=real or real_answers)
        return model, tokenizer

    def _device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model spec: device {self.device!r} but no CUDA device is available")
        return device

    def build_answer_model(self, codebook: torch.Tensor):
        """The answer model (None without ``answer_task``) on the spec's device and dtype, in eval
        mode, looking cluster ids up in ``codebook`` [K, F] (the painting model's centroids)."""
        from ..freezing import freeze
        from ..models import XLxmertForQuestionAnswering
        from ..models.answering import read_answer_table

        self.check()
        if self.answer_task is None:
            return None
        if self.answer_checkpoint is None:
            labels = read_answer_table(self.answers) if self.answers is not None else None
            model = XLxmertForQuestionAnswering.from_default(self.answer_task, seed=self.seed,
                                                             size=self.size, labels=labels)
        else:
            model = XLxmertForQuestionAnswering.from_checkpoint(
                self.answer_checkpoint, self.answers, task=self.answer_task, size=self.size)
        if model.feat_dim != codebook.shape[1]:
            raise ValueError(f"model spec: the answer model reads {model.feat_dim}-d features but "
                             f"the codebook's are {codebook.shape[1]}-d")
        model.set_visual_embedding(codebook.detach().float().cpu())
        return freeze(model.to(device=self._device(), dtype=DTYPES[self.dtype]).eval())
