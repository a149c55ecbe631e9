"""X-LXMERT for question answering: HF ``LxmertModel`` + an answer head on the pooled output.

The authors' fine-tuning models (``x-lxmert/src/tasks/{vqa,gqa,nlvr2}_model.py``) are
``bert`` (``LxmertModel``) plus ``answer_head`` (HF's ``LxmertVisualAnswerHead``: Linear
H→2H, GeLU, LayerNorm(2H, eps 1e-12), Linear 2H→answers) on ``pooled_output``, the pooler's
``tanh(dense(language_output[:, 0]))``. The input is an 8×8 grid of 2048-d features, or its
cluster ids looked up in the frozen codebook ``vis_emb`` (``set_visual_embedding``).

Tasks (:data:`TASKS`):

- ``vqa``: 3,129 answers, trained with ``BCEWithLogitsLoss`` over soft answer scores;
- ``gqa``: 1,842 answers, the same loss;
- ``nlvr2``: two images per example, viewed as ``[B·2, 64, F]`` with the sentence repeated;
  the two pooled outputs are concatenated to ``[B, 2H]`` and classified into 2 classes with
  cross-entropy. The head is LXMERT's NLVR2 head (Linear 2H→2H, GeLU, LayerNorm(2H),
  Linear 2H→2). The authors' ``nlvr2_model.py`` builds an H-input head named ``logit_fc`` but
  calls ``answer_head`` on the [B, 2H] pair, which cannot run; so the head here is named
  ``answer_head`` for every task, and a checkpoint whose head takes H inputs is refused with
  the shapes named (see :mod:`xlx_fast.models.checkpoint`).

The answer table (``label2ans``: a JSON list of answer strings, or ``ans2label``: a JSON
object answer → index, as the authors' data ships them) names the head's outputs.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import LxmertConfig, LxmertModel
from transformers.models.lxmert.modeling_lxmert import GeLU

from .checkpoint import (IGNORED_BUFFERS, CheckpointError, load_into, read_centroids,
                         read_state_dict)
from .sizes import SIZES


@dataclass(frozen=True)
class Task:
    """A question-answering task: how many answers its head has and images per example."""

    name: str
    n_answers: int
    images: int  # images per example (NLVR2: 2)
    loss: str    # "bce" (soft scores) or "ce" (one class)


TASKS = {
    "vqa": Task("vqa", 3129, 1, "bce"),
    "gqa": Task("gqa", 1842, 1, "bce"),
    "nlvr2": Task("nlvr2", 2, 2, "ce"),
}


def check_task(task) -> Task:
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]


class AnswerHead(nn.Module):
    """``logit_fc``: Linear(in → hid), GeLU, LayerNorm(hid, eps 1e-12), Linear(hid → answers);
    HF's ``LxmertVisualAnswerHead`` when in = H and hid = 2H (same parameter names)."""

    def __init__(self, in_dim: int, hid_dim: int, n_answers: int):
        super().__init__()
        self.logit_fc = nn.Sequential(nn.Linear(in_dim, hid_dim), GeLU(),
                                      nn.LayerNorm(hid_dim, eps=1e-12),
                                      nn.Linear(hid_dim, n_answers))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.logit_fc(pooled)


def read_answer_table(path) -> list[str]:
    """The answer strings in head order, from a ``label2ans`` JSON list or an ``ans2label``
    JSON object (answer → index, indices exactly 0..n-1)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"answer table file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"answer table {path} is not valid JSON ({e})") from None
    if isinstance(obj, list):
        if not all(isinstance(a, str) for a in obj):
            raise ValueError(f"answer table {path}: a label2ans list must hold only strings")
        labels = obj
    elif isinstance(obj, dict):
        idx = list(obj.values())
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx) \
                or sorted(idx) != list(range(len(idx))):
            raise ValueError(f"answer table {path}: an ans2label object must map answers to the "
                             f"indices 0..{len(idx) - 1}, each once")
        labels = [None] * len(idx)
        for a, i in obj.items():
            labels[i] = a
    else:
        raise ValueError(f"answer table {path} must be a JSON list (label2ans) or object "
                         f"(ans2label), got {type(obj).__name__}")
    if not labels:
        raise ValueError(f"answer table {path} is empty")
    return labels


class XLxmertForQuestionAnswering(nn.Module):
    """X-LXMERT fine-tuned for VQA, GQA or NLVR2 (see the module docstring).

    - ``bert``: ``transformers.LxmertModel``
    - ``answer_head``: :class:`AnswerHead` on the pooled output ([B, H]; [B, 2H] for NLVR2)
    - ``vis_emb``: frozen codebook [K, F] for cluster-id input, or None (features only)
    - ``labels``: the answer strings, one per head output
    """

    def __init__(self, config: LxmertConfig, task: str, n_clusters: int = 0,
                 labels: list[str] | None = None, n_answers: int | None = None):
        super().__init__()
        self.task = check_task(task)
        n = n_answers if n_answers is not None else (len(labels) if labels else self.task.n_answers)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_answers must be an int >= 1, got {n!r}")
        if self.task.name == "nlvr2" and n != 2:
            raise ValueError(f"nlvr2 has 2 classes, got n_answers={n}")
        if labels is not None and len(labels) != n:
            raise ValueError(f"the answer table has {len(labels)} answers but the head has {n}")
        self.config = config
        self.bert = LxmertModel(config)
        h = config.hidden_size
        in_dim = h * self.task.images
        self.answer_head = AnswerHead(in_dim, 2 * h if self.task.images == 1 else in_dim, n)
        self.vis_emb = None
        if n_clusters:
            self.vis_emb = nn.Embedding(n_clusters, config.visual_feat_dim)
            self.vis_emb.weight.requires_grad_(False)
        if labels is None:  # NLVR2's classes have names (the authors' label 1 is "True")
            labels = ["false", "true"] if self.task.name == "nlvr2" else [f"answer_{i}" for i in range(n)]
        self.labels = list(labels)
        self.eval()

    @property
    def n_answers(self) -> int:
        return self.answer_head.logit_fc[-1].out_features

    @property
    def feat_dim(self) -> int:
        return self.config.visual_feat_dim

    @property
    def n_clusters(self) -> int:
        return 0 if self.vis_emb is None else self.vis_emb.num_embeddings

    def set_visual_embedding(self, centroids) -> None:
        """Install the codebook [K, F] that cluster-id input is looked up in (the authors'
        ``set_visual_embedding``)."""
        import numpy as np

        if isinstance(centroids, np.ndarray):
            centroids = torch.from_numpy(centroids)
        if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 \
                or centroids.shape[1] != self.feat_dim or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be a [clusters, {self.feat_dim}] tensor or array, "
                             f"got {getattr(centroids, 'shape', type(centroids).__name__)}")
        if not torch.isfinite(centroids).all():
            raise ValueError("centroids contain NaN or Inf")
        p = self.bert.embeddings.word_embeddings.weight
        emb = nn.Embedding(centroids.shape[0], self.feat_dim).to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            emb.weight.copy_(centroids)
        emb.weight.requires_grad_(False)
        self.vis_emb = emb

    @classmethod
    def from_default(cls, task: str = "vqa", seed: int = 0, size: str = "base",
                     labels: list[str] | None = None) -> "XLxmertForQuestionAnswering":
        """Seeded random weights and codebook at the real (or ``"tiny"``) size: every shape
        and cost is the real one, the answers are garbage."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        s = SIZES[size]
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # HF's own init draws from the global generator
        try:
            model = cls(LxmertConfig(**s.lxmert), task, s.n_clusters, labels)
        finally:
            torch.random.set_rng_state(torch_state)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.vis_emb.weight.copy_(torch.randn(s.n_clusters, model.feat_dim, generator=gen))
            for name, p in model.answer_head.named_parameters():
                if name.endswith("weight") and p.dim() == 2:
                    p.normal_(0, model.config.initializer_range, generator=gen)
                elif name.endswith("bias"):
                    p.zero_()
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path, answers_path=None, *, task: str = "vqa", centroids_path=None,
                        size: str = "base", strict: bool = True) -> "XLxmertForQuestionAnswering":
        """Load the authors' fine-tuned state dict; see
        :func:`load_answering`."""
        return load_answering(cls, path, answers_path, task=task, centroids_path=centroids_path,
                              size=size, strict=strict)

    def extra_repr(self) -> str:
        return (f"task={self.task.name}, answers={self.n_answers}, images={self.task.images}, "
                f"clusters={self.n_clusters}")


def load_answering(cls, path, answers_path=None, *, task: str = "vqa", centroids_path=None,
                   size: str = "base", strict: bool = True):
    """Build an ``XLxmertForQuestionAnswering`` from the authors' fine-tuned state dict.

    - ``path``: ``bert.*`` and ``answer_head.logit_fc.*`` (``module.`` stripped; the authors'
      NLVR2 name ``logit_fc.logit_fc.*`` is read as ``answer_head.logit_fc.*``). The head's
      size comes from the checkpoint; a ``vis_emb.weight`` in it is the codebook.
    - ``answers_path``: the answer table (``label2ans`` list or ``ans2label`` object); its
      length must equal the head's, or this refuses naming both.
    - ``centroids_path``: a codebook ``.npy`` for cluster-id input (overrides the state dict's).
    """
    t = check_task(task)
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    state = read_state_dict(path, f"{t.name} checkpoint")
    for k in IGNORED_BUFFERS:
        state.pop(k, None)
    state = {("answer_head." + k[len("logit_fc."):] if k.startswith("logit_fc.logit_fc.") else k): v
             for k, v in state.items()}
    last = state.get("answer_head.logit_fc.3.weight")
    if last is None or last.dim() != 2:
        raise CheckpointError(f"{t.name} checkpoint {path}: no answer head "
                              "(answer_head.logit_fc.3.weight) in it")
    n_answers = last.shape[0]
    labels = read_answer_table(answers_path) if answers_path is not None else None
    if labels is not None and len(labels) != n_answers:
        raise CheckpointError(f"the answer table {answers_path} has {len(labels)} answers but "
                              f"the checkpoint's head has {n_answers}")
    codebook = state.pop("vis_emb.weight", None)
    if centroids_path is not None:
        codebook = read_centroids(centroids_path)
    feat_dim = codebook.shape[1] if codebook is not None else SIZES[size].lxmert.get(
        "visual_feat_dim", 2048)
    config = LxmertConfig(**{**SIZES[size].lxmert, "visual_feat_dim": feat_dim})
    model = cls(config, t.name, 0, labels, n_answers=n_answers)
    unused = load_into(model, state, f"{t.name} checkpoint", strict=strict)
    if codebook is not None:
        model.set_visual_embedding(codebook)
    if unused:
        warnings.warn(f"{t.name} checkpoint: {len(unused)} unused key(s): {', '.join(unused)}",
                      stacklevel=2)
    model.load_report = {"unused": unused}
    return model.eval()
