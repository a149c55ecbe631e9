"""Fine-tuning data for the answer tasks (VQA, GQA, NLVR2) on disk, and a synthetic set.

A data directory holds four files (three for NLVR2), in the authors' formats:

- ``questions.json``: a JSON list of examples.

  - VQA: ``{"question_id", "img_id", "sent", "label": {answer: score}}``; ``score`` in [0, 1]
    is the soft accuracy of that answer (LXMERT's ``data/vqa/*.json``: 1, 0.9, 0.6, 0.3); an
    empty ``label`` trains towards no answer. Optional ``"answers"``: the annotators' answers
    (read by :mod:`xlx_fast.evaluation`, not by training). Other keys are ignored.
  - GQA: the same keys; ``label`` holds the one answer, with score 1.
  - NLVR2: ``{"uid" or "identifier", "img0", "img1", "sent", "label": 0 | 1}`` (1: the
    sentence is true of the image pair).

- ``features.npy``: float32 (or float16) grid features ``[N_images, 64, F]`` (or
  ``[N_images, 8, 8, F]``), opened memory-mapped: only each batch's rows are read.
- ``img_ids.json``: a JSON list of the ``N_images`` image ids, in the rows' order.
- ``answers.json`` (VQA, GQA): the answer table, a ``label2ans`` JSON list of answer strings
  (or an ``ans2label`` object, answer → index); its length must be the head's (3,129 for VQA,
  1,842 for GQA: :data:`xlx_fast.models.TASKS`). Answer ``i`` is the head's output ``i``.

:func:`load_task_data` checks everything once, up front, and names the first problem of each
kind with its file and example: a missing file, features of the wrong shape or width, an image
id that is not in ``img_ids.json``, a label that is not in the answer table, an answer table
whose length differs from the head's. Questions are tokenised once (``[CLS] words [SEP]``,
20 tokens, :class:`xlx_fast.text.CaptionTokenizer`); soft-score targets are kept sparse and made
dense per batch (VQA's ``[N, 3129]`` table would not fit in memory).

:func:`write_synthetic_task` makes a small consistent directory (each image has a colour and an
object that its features encode; questions ask about them) so a run can start at once.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..grid import GRID, N_CELLS
from ..models.answering import check_task, read_answer_table
from ..models.sizes import SIZES

__all__ = ["DATA_FILES", "TaskBatch", "TaskData", "data_files", "load_task_data", "load_features",
           "write_synthetic_task", "vqa_score"]

QUESTIONS, FEATURES, IMG_IDS, ANSWERS = "questions.json", "features.npy", "img_ids.json", "answers.json"


def data_files(task: str) -> tuple[str, ...]:
    """The files of a ``task`` data directory."""
    t = check_task(task)
    return (QUESTIONS, FEATURES, IMG_IDS) + ((ANSWERS,) if t.loss == "bce" else ())


DATA_FILES = (QUESTIONS, FEATURES, IMG_IDS, ANSWERS)  # every task's, together


@dataclass
class TaskBatch:
    """One step's inputs. ``input_ids``/``attention_mask`` [B, L]; ``features`` [B, 64, F] float32
    (NLVR2: [B, 2, 64, F]); ``target``: [B, answers] float32 soft scores, or [B] int64 labels
    (NLVR2)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    features: torch.Tensor
    target: torch.Tensor

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.features,
                                                  self.target)))


class TaskData:
    """A loaded data directory (see the module docstring), on the host.

    ``input_ids``/``attention_mask`` [N, L]; ``image_rows`` int64 [N] (NLVR2: [N, 2]) rows of
    ``features`` (the memory map); the targets: ``labels`` int64 [N] (NLVR2) or, for the soft
    scores, CSR arrays ``score_ptr`` [N + 1], ``score_index``, ``score_value``; ``answers``:
    the answer table (NLVR2: ``["False", "True"]``).
    """

    def __init__(self, task: str, input_ids, attention_mask, image_rows, features, answers,
                 labels=None, score_ptr=None, score_index=None, score_value=None):
        self.task = check_task(task)
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.image_rows, self.features, self.answers = image_rows, features, answers
        self.labels = labels
        self.score_ptr, self.score_index, self.score_value = score_ptr, score_index, score_value

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_answers(self) -> int:
        return len(self.answers)

    def batch(self, indices, device=None) -> TaskBatch:
        """The examples ``indices`` (positions in ``questions.json``): their questions, their
        images' features read from the memory map, and their targets."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("indices must name at least one example")
        if int(idx.min()) < 0 or int(idx.max()) >= len(self):
            raise ValueError(f"indices must lie in [0, {len(self)}), got {int(idx.min())}..{int(idx.max())}")
        rows = self.image_rows[idx].numpy()
        feats = torch.from_numpy(np.asarray(self.features[rows.reshape(-1)], dtype=np.float32))
        feats = feats.reshape(*rows.shape, *feats.shape[1:])
        if self.task.loss == "ce":
            target = self.labels[idx]
        else:
            target = torch.zeros(len(idx), self.n_answers)
            for b, i in enumerate(idx.tolist()):
                lo, hi = int(self.score_ptr[i]), int(self.score_ptr[i + 1])
                target[b, self.score_index[lo:hi]] = self.score_value[lo:hi]
        out = TaskBatch(self.input_ids[idx], self.attention_mask[idx], feats, target)
        return out.to(device) if device is not None else out


# ---- loading --------------------------------------------------------------------------------

def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {os.path.basename(path)} in {os.path.dirname(path) or '.'} ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _example_name(i: int, ex: dict) -> str:
    for key in ("question_id", "uid", "identifier"):
        if isinstance(ex, dict) and key in ex:
            return f"example {i} ({key} {ex[key]!r})"
    return f"example {i}"


def _first(problems: list[str], path: str, what: str) -> None:
    """One error for a kind of problem: how many examples have it, and the first."""
    if problems:
        more = f"{len(problems)} examples {what}; the first: " if len(problems) > 1 else ""
        raise ValueError(f"{path}: {more}{problems[0]}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_features(directory: str, feat_dim: int):
    """``features.npy`` as a memory map ``[N_images, 64, F]`` and the row of each image id."""
    feat_path, ids_path = os.path.join(directory, FEATURES), os.path.join(directory, IMG_IDS)
    if not os.path.isfile(feat_path):
        raise FileNotFoundError(f"no {FEATURES} in {directory} (grid features [N_images, 64, F])")
    try:
        feats = np.load(feat_path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{feat_path} is not a .npy array ({e})") from None
    if feats.ndim == 4 and feats.shape[1:3] == (GRID, GRID):
        feats = feats.reshape(feats.shape[0], N_CELLS, feats.shape[3])
    if feats.ndim != 3 or feats.shape[1] != N_CELLS or feats.shape[0] < 1:
        raise ValueError(f"{feat_path} must be [N_images, {N_CELLS}, F] or [N_images, {GRID}, {GRID}, F], "
                         f"got {feats.shape}")
    if feats.dtype not in (np.float32, np.float16):
        raise ValueError(f"{feat_path} must hold float32 or float16 features, got {feats.dtype}")
    if feats.shape[2] != feat_dim:
        raise ValueError(f"{feat_path}: features of width {feats.shape[2]} but the model takes "
                         f"{feat_dim}-dimensional features (visual_feat_dim)")
    ids = _read_json(ids_path, "the image ids of features.npy's rows, in order")
    if not isinstance(ids, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{ids_path} must be a JSON list of image ids (strings or integers)")
    if len(ids) != feats.shape[0]:
        raise ValueError(f"{ids_path} names {len(ids)} images but {feat_path} has {feats.shape[0]} rows "
                         f"(one id per row, in order)")
    row = {}
    for r, i in enumerate(ids):
        if i in row:
            raise ValueError(f"{ids_path}: image id {i!r} appears twice (rows {row[i]} and {r})")
        row[i] = r
    return feats, row


def load_task_data(directory, task: str, tokenizer, feat_dim: int, n_answers: int | None = None) -> TaskData:
    """Read and check a data directory for ``task`` (see the module docstring).

    ``tokenizer``: a :class:`xlx_fast.text.CaptionTokenizer`; ``feat_dim``: the model's feature
    width; ``n_answers``: the head's outputs (default: the task's). Raises ``FileNotFoundError``
    for a missing file and ``ValueError`` naming the file and the first example for anything else.
    """
    t = check_task(task)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {directory} does not exist")
    n_answers = t.n_answers if n_answers is None else n_answers
    q_path = os.path.join(directory, QUESTIONS)
    examples = _read_json(q_path, f"the {t.name} examples")
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{q_path} must be a non-empty JSON list of examples")
    if t.loss == "bce":
        a_path = os.path.join(directory, ANSWERS)
        if not os.path.isfile(a_path):
            raise FileNotFoundError(f"no {ANSWERS} in {directory} (the answer table, a label2ans list)")
        answers = read_answer_table(a_path)
        if len(answers) != n_answers:
            raise ValueError(f"{a_path} has {len(answers)} answers but the {t.name} head has {n_answers}")
        if len(set(answers)) != len(answers):
            dup = next(a for i, a in enumerate(answers) if a in answers[:i])
            raise ValueError(f"{a_path}: answer {dup!r} appears twice")
    else:
        answers = ["False", "True"]
    feats, row = load_features(directory, feat_dim)

    image_keys = ("img0", "img1") if t.images == 2 else ("img_id",)
    keys = ("sent", "label") + image_keys
    bad_shape, missing, bad_sent, bad_image, bad_label, unknown = [], [], [], [], [], []
    rows, sents = [], []
    labels, ptr, index, value = [], [0], [], []
    ans2label = {a: i for i, a in enumerate(answers)}
    for i, ex in enumerate(examples):
        name = _example_name(i, ex)
        if not isinstance(ex, dict):
            bad_shape.append(f"{name} is a {type(ex).__name__}, not an object")
            continue
        lacks = [k for k in keys if k not in ex]
        if t.images == 2 and "uid" not in ex and "identifier" not in ex:
            lacks.append("uid or identifier")
        elif t.images == 1 and "question_id" not in ex:
            lacks.append("question_id")
        if lacks:
            missing.append(f"{name} lacks {', '.join(repr(k) for k in lacks)}")
            continue
        if not isinstance(ex["sent"], str) or not ex["sent"].strip():
            bad_sent.append(f"{name}: 'sent' must be a non-empty string, got {ex['sent']!r}")
            continue
        absent = [f"{k} {ex[k]!r}" for k in image_keys if not isinstance(ex[k], (str, int)) or ex[k] not in row]
        if absent:
            bad_image.append(f"{name}: {', '.join(absent)} is not in {IMG_IDS}")
            continue
        label = ex["label"]
        if t.loss == "ce":
            if not isinstance(label, int) or isinstance(label, bool) or label not in (0, 1):
                bad_label.append(f"{name}: 'label' must be 0 or 1, got {label!r}")
                continue
            labels.append(int(label))
        else:
            if not isinstance(label, dict) or not all(_is_number(s) and 0 <= s <= 1 for s in label.values()):
                bad_label.append(f"{name}: 'label' must be an object answer -> score in [0, 1], got {label!r}")
                continue
            if t.name == "gqa" and len(label) != 1:
                bad_label.append(f"{name}: a GQA 'label' holds exactly one answer, got {len(label)}")
                continue
            out = [a for a in label if a not in ans2label]
            if out:
                unknown.append(f"{name}: answer {out[0]!r} is not in {ANSWERS}")
                continue
            for a, s in label.items():
                index.append(ans2label[a])
                value.append(float(s))
            ptr.append(len(index))
        rows.append([row[ex[k]] for k in image_keys])
        sents.append(ex["sent"])
    _first(bad_shape, q_path, "are not objects")
    _first(missing, q_path, "lack keys")
    _first(bad_sent, q_path, "have no question")
    _first(bad_image, q_path, f"name images that are not in {IMG_IDS}")
    _first(bad_label, q_path, "have a malformed label")
    _first(unknown, q_path, f"have labels that are not in the answer table {ANSWERS}")

    input_ids, mask = tokenizer(sents)
    image_rows = torch.tensor(rows, dtype=torch.long)
    if t.images == 1:
        image_rows = image_rows[:, 0]
    if t.loss == "ce":
        return TaskData(t.name, input_ids, mask, image_rows, feats, answers,
                        labels=torch.tensor(labels, dtype=torch.long))
    return TaskData(t.name, input_ids, mask, image_rows, feats, answers,
                    score_ptr=torch.tensor(ptr, dtype=torch.long),
                    score_index=torch.tensor(index, dtype=torch.long),
                    score_value=torch.tensor(value, dtype=torch.float32))


# ---- a synthetic set --------------------------------------------------------------------------

_COLORS = ("red", "blue", "green", "yellow", "white", "black")
_OBJECTS = ("dog", "cat", "bus", "pizza", "horse", "plate")


def vqa_score(count: int, annotators: int = 10) -> float:
    """The official VQA soft score of an answer ``count`` of ``annotators`` gave: the mean over
    the leave-one-out subsets of ``min(#matches / 3, 1)`` (the ``label`` scores of LXMERT's
    data: 1 → 0.3, 2 → 0.6, 3 → 0.9, 4+ → 1)."""
    total = sum(min((count - (j < count)) / 3, 1.0) for j in range(annotators))
    return round(total / annotators, 4)


def write_synthetic_task(directory, task: str, n: int = 64, seed: int = 0, size: str = "base") -> None:
    """Write a ``task`` data directory of ``n`` examples for a model of ``size`` (its feature
    width): ``n // 2`` images (at least 2), each a colour and an object whose prototypes (random
    unit-variance grids, one per colour and object) its features sum, plus noise; questions ask
    for the colour, the object, or whether an object is shown, and NLVR2 sentences claim both
    images have one colour. Deterministic in ``seed``."""
    t = check_task(task)
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    feat_dim = SIZES[size].lxmert.get("visual_feat_dim", 2048)
    rng = np.random.default_rng(seed)
    n_images = max(2, n // 2)
    colour = rng.integers(0, len(_COLORS), n_images)
    obj = rng.integers(0, len(_OBJECTS), n_images)
    proto_c = rng.standard_normal((len(_COLORS), N_CELLS, feat_dim), dtype=np.float32)
    proto_o = rng.standard_normal((len(_OBJECTS), N_CELLS, feat_dim), dtype=np.float32)
    feats = proto_c[colour] + proto_o[obj] + 0.3 * rng.standard_normal((n_images, N_CELLS, feat_dim),
                                                                       dtype=np.float32)
    img_ids = [f"synthetic_{i:06d}" for i in range(n_images)]

    examples = []
    for q in range(n):
        if t.name == "nlvr2":
            a, b = (int(v) for v in rng.choice(n_images, 2, replace=False))
            c = int(colour[a]) if rng.random() < 0.7 else int(rng.integers(len(_COLORS)))
            label = int(colour[a] == c and colour[b] == c)
            examples.append({"identifier": f"synthetic-{q}-0", "img0": img_ids[a], "img1": img_ids[b],
                             "label": label, "sent": f"Both images show {_COLORS[c]} things.",
                             "uid": f"nlvr2_synthetic_{q}"})
            continue
        i = int(rng.integers(n_images))
        kind = q % 3
        if kind == 0:
            sent, answer = f"What color is the {_OBJECTS[obj[i]]}?", _COLORS[colour[i]]
        elif kind == 1:
            sent, answer = "What animal or thing is shown?", _OBJECTS[obj[i]]
        else:
            o = int(obj[i]) if rng.random() < 0.5 else int(rng.integers(len(_OBJECTS)))
            sent, answer = f"Is there a {_OBJECTS[o]}?", "yes" if o == obj[i] else "no"
        ex = {"question_id": q if t.name == "vqa" else str(100000 + q), "img_id": img_ids[i], "sent": sent}
        if t.name == "vqa":  # ten annotators, most of them right
            agree = int(rng.integers(7, 11))
            others = [a for a in (*_COLORS, *_OBJECTS, "yes", "no") if a != answer]
            other = others[int(rng.integers(len(others)))]
            ex["answers"] = [answer] * agree + [other] * (10 - agree)
            ex["label"] = {answer: vqa_score(agree)}
            if agree < 10:
                ex["label"][other] = vqa_score(10 - agree)
        else:
            ex["label"] = {answer: 1.0}
        examples.append(ex)

    os.makedirs(directory, exist_ok=True)
    if t.loss == "bce":
        words = [*_COLORS, *_OBJECTS, "yes", "no"]
        table = words + [f"answer_{i}" for i in range(len(words), t.n_answers)]
        _write_json(os.path.join(directory, ANSWERS), table)
    _write_json(os.path.join(directory, QUESTIONS), examples)
    _write_json(os.path.join(directory, IMG_IDS), img_ids)
    np.save(os.path.join(directory, FEATURES), feats)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)

