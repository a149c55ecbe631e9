"""``xlx-fast answer "what color is the bus?" --features img.npy``: questions about an image.

The image is an 8x8 grid of visual features (``--features``, a ``.npy`` of [64, F] or
[8, 8, F], F = 2048 at the base size) or of cluster ids into the model's codebook
(``--cluster-ids``, a ``.npy`` of [64] or [8, 8] integers, e.g. from ``xlx-fast vocab``).
NLVR2 judges a statement about two images: give two files, or one holding both ([2, 64, F],
[2, 64]). Every question is asked about the same image(s); the top answers are printed with
their scores (sigmoid of the logit for VQA and GQA, softmax over false/true for NLVR2), or
written as JSON with ``--json``.

Every argument and input file is checked before torch, transformers or a model are loaded
(``check_args``), so a wrong file fails at once, not after the model is built; what only the
model can say (the feature width or codebook of a checkpoint without ``--centroids``) is checked
right after it is loaded, still before anything is computed.
"""
from __future__ import annotations

import json
import os
import re
import sys

from ..grid import GRID, N_CELLS
from . import UserError
from .model_args import SIZES, choices_help
from .image_files import read_npy
from .paths import check_input

# images per example, read here without importing the models (torch and transformers take
# seconds to load; the argument checks come first). tests/test_cli_answer.py checks it against
# xlx_fast.models.answering.TASKS.
TASK_IMAGES = {"vqa": 1, "gqa": 1, "nlvr2": 2}
TASK_HELP = {"vqa": "VQA v2 (3,129 answers)", "gqa": "GQA (1,842 answers)",
             "nlvr2": "NLVR2, a statement about two images: false or true"}
NLVR2_LABELS = ["false", "true"]  # the authors' NLVR2 label 1 is "True"
DEFAULT_TOP_K = 5


def add_parser(p) -> None:
    p.add_argument("questions", nargs="+", help="one or more questions (NLVR2: statements), all "
                   "about the same image(s)")
    image = p.add_mutually_exclusive_group()
    image.add_argument("--features", nargs="+", metavar="NPY",
                       help=f"grid features .npy: [{N_CELLS}, F] or [{GRID}, {GRID}, F] floats "
                            f"(F = 2048 at the base size); NLVR2: two files, or one [2, {N_CELLS}, F]")
    image.add_argument("--cluster-ids", nargs="+", metavar="NPY",
                       help=f"grid cluster ids .npy: [{N_CELLS}] or [{GRID}, {GRID}] integers into "
                            f"the model's codebook; NLVR2: two files, or one [2, {N_CELLS}]")
    p.add_argument("--task", default="vqa", choices=list(TASK_IMAGES),
                   help=choices_help("the answer task", TASK_HELP, "vqa"))
    p.add_argument("--checkpoint", help="the fine-tuned state dict (the authors' BEST.pth); default: "
                   "the embedded default model (random weights: its answers are garbage)")
    p.add_argument("--answers", metavar="JSON", help="the answer table of the checkpoint's head "
                   "(label2ans: a JSON list, or ans2label: a JSON object); needed with --checkpoint "
                   "for vqa and gqa (NLVR2's two classes are false and true)")
    p.add_argument("--centroids", help="cluster centroids .npy [clusters, F], the codebook that "
                   "--cluster-ids index (default: the one in the checkpoint, if any)")
    p.add_argument("--vocab", help="BERT-base-uncased vocab.txt (or a directory holding it); "
                   "needed with --checkpoint")
    p.add_argument("--size", default="base", choices=list(SIZES),
                   help=choices_help("model architecture", SIZES, "base"))
    p.add_argument("--top-k", type=int, default=None,
                   help=f"answers to print per question (default {DEFAULT_TOP_K}; NLVR2: 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--json", action="store_true",
                   help="print the answers as JSON on stdout instead of a table")


# -- checks: files and arguments, before torch is imported -----------------------------------

def _read_npy(path: str, option: str):
    """The array in ``path`` (checked to be a readable .npy of numbers)."""
    return read_npy(path, option)


def _grid(shape: tuple, per_cell: int) -> bool:
    """Whether ``shape`` is one image's grid: [64] / [8, 8] (ids, per_cell 0) or [64, W] /
    [8, 8, W] (features, per_cell 1, any W >= 1)."""
    cells = shape[:len(shape) - per_cell]
    return cells in ((N_CELLS,), (GRID, GRID)) and all(w >= 1 for w in shape[len(cells):])


def _images(option: str, paths: list[str], task: str, kind: str):
    """The image(s) of ``option`` as one array [images, 64(, W)]: one file per image, or one
    file holding all of them; the dtype ``kind`` ("float" or "int")."""
    import numpy as np

    images, per_cell = TASK_IMAGES[task], 1 if kind == "float" else 0
    cell = ", F" if per_cell else ""
    one = f"[{N_CELLS}{cell}] or [{GRID}, {GRID}{cell}]"
    if len(paths) > images:
        raise UserError(f"{option}: {task} takes {images} image{'s' if images > 1 else ''} per "
                        f"question, got {len(paths)} files")
    arrays = []
    for path in paths:
        arr = _read_npy(path, option)
        ok = (np.issubdtype(arr.dtype, np.floating) if per_cell
              else np.issubdtype(arr.dtype, np.integer))
        if not ok:
            want = "floats (float32)" if per_cell else "integers (int64 or int32)"
            raise UserError(f"{option} {path}: holds {arr.dtype}, not {want}")
        shape = tuple(arr.shape)
        if _grid(shape, per_cell) or (shape[:1] == (1,) and _grid(shape[1:], per_cell)):
            n = 1
        elif len(paths) == 1 and images > 1 and shape[:1] == (images,) and _grid(shape[1:], per_cell):
            n = images
        else:
            both = f", or one file holding both [{images}, {N_CELLS}{cell}]" if images > 1 else ""
            raise UserError(f"{option} {path}: shape {shape}; {task} takes {one} per image{both}")
        arrays.append(arr.reshape(n, N_CELLS, *shape[len(shape) - per_cell:]))
    widths = {a.shape[2:] for a in arrays}
    if len(widths) > 1:
        raise UserError(f"{option}: the two images have different widths {sorted(w[0] for w in widths)}")
    out = np.concatenate(arrays)
    if out.shape[0] != images:
        raise UserError(f"{option}: nlvr2 judges a statement about two images: give two files, "
                        f"or one holding both (got one image)")
    if per_cell and not np.isfinite(out).all():
        raise UserError(f"{option}: the features hold NaN or Inf")
    if not per_cell and int(out.min()) < 0:
        raise UserError(f"{option}: cluster ids must be >= 0, got {int(out.min())}")
    return out


def check_args(args):
    """Every check that needs no model; raises :class:`UserError`. The files and arguments are
    checked first, before torch is imported; then the model's sizes (feature width, codebook,
    answers), which need the model definitions but not a model. Returns (tokenizer, labels,
    visual array [images, 64(, F)])."""
    from xlx_fast.text import load_tokenizer

    task = args.task
    for i, q in enumerate(args.questions):
        try:
            q.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"question {i + 1} is not valid text: it holds undecodable bytes at "
                            f"character {e.start}; pass UTF-8 text") from None
        if not q.strip():
            raise UserError(f"question {i + 1} is blank; ask something")
    if args.features is None and args.cluster_ids is None:
        raise UserError("give the image: --features FILE.npy (grid features) or --cluster-ids "
                        "FILE.npy (grid cluster ids)")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UserError(f"--device {args.device}: use cpu, cuda or cuda:N")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: must be at least 1")
    if args.checkpoint is None:
        if args.centroids is not None:
            raise UserError("--centroids needs --checkpoint (the embedded default has its own codebook)")
    else:
        check_input(args.checkpoint, "--checkpoint")
        with open(args.checkpoint, "rb") as f:
            head = f.read(6)
        if not head.startswith((b"PK\x03\x04", b"\x80")):
            raise UserError(f"--checkpoint {args.checkpoint}: not a PyTorch checkpoint (it starts "
                            f"with {head!r}, not a torch.save zip archive or pickle)")
        if args.answers is None and task != "nlvr2":
            raise UserError(f"--checkpoint needs --answers: the answer table of its {task} head "
                            "(label2ans JSON list or ans2label JSON object)")
    if args.answers is not None:
        check_input(args.answers, "--answers")
    if args.vocab is not None:
        check_input(args.vocab, "--vocab", directory_ok=True)
    try:
        tokenizer = load_tokenizer(args.vocab, real_weights=args.checkpoint is not None)
    except (OSError, ValueError) as e:
        raise UserError(f"--vocab {args.vocab}: {e}" if args.vocab else str(e)) from None
    if args.features is not None:
        visual = _images("--features", args.features, task, "float")
    else:
        visual = _images("--cluster-ids", args.cluster_ids, task, "int")
    centroids = _read_npy(args.centroids, "--centroids") if args.centroids is not None else None
    return tokenizer, _check_sizes(args, visual, centroids), visual


def _check_sizes(args, visual, centroids):
    """The feature width, the ids' range, the answer table and --top-k against the model that
    will be built (read from the size table and the files, no model built). Returns the
    answer strings (None: the model's own)."""
    import numpy as np

    from xlx_fast.models.answering import TASKS, read_answer_table
    from xlx_fast.models.sizes import SIZES as MODEL_SIZES

    task = TASKS[args.task]
    labels = None
    if args.answers is not None:
        try:
            labels = read_answer_table(args.answers)
        except (ValueError, OSError) as e:
            raise UserError(f"--answers: {e}") from None
        if args.checkpoint is None and len(labels) != task.n_answers:
            raise UserError(f"--answers {args.answers} has {len(labels)} answers but the embedded "
                            f"default's {task.name} head has {task.n_answers}")
    n_answers = len(labels) if labels is not None else (
        task.n_answers if args.checkpoint is None or task.name == "nlvr2" else None)
    if args.top_k is not None and n_answers is not None and args.top_k > n_answers:
        raise UserError(f"--top-k {args.top_k}: the {task.name} head has only {n_answers} answers")
    width = clusters = src = None  # a checkpoint without --centroids: its own codebook decides
    if centroids is not None:
        if centroids.ndim != 2 or min(centroids.shape) < 1 \
                or not np.issubdtype(centroids.dtype, np.floating):
            raise UserError(f"--centroids {args.centroids}: must be a [clusters, F] float array, "
                            f"got {centroids.dtype} {tuple(centroids.shape)}")
        width, clusters, src = centroids.shape[1], centroids.shape[0], f"--centroids {args.centroids}"
    elif args.checkpoint is None:
        size = MODEL_SIZES[args.size]
        width, clusters = size.lxmert.get("visual_feat_dim", 2048), size.n_clusters
        src = f"the embedded default's ({args.size})"
    if args.features is not None and width is not None and visual.shape[-1] != width:
        raise UserError(f"--features: {visual.shape[-1]} values per cell, but the model reads "
                        f"{width} ({src} feature width)")
    if args.cluster_ids is not None and clusters is not None and int(visual.max()) >= clusters:
        raise UserError(f"--cluster-ids: ids must lie in [0, {clusters}) ({src} codebook), got up "
                        f"to {int(visual.max())}")
    return labels


# -- run -------------------------------------------------------------------------------------

def load_model(args, labels):
    from xlx_fast.models import XLxmertForQuestionAnswering
    from xlx_fast.models.checkpoint import CheckpointError

    if args.checkpoint is None:
        if labels is None and args.task == "nlvr2":
            labels = NLVR2_LABELS
        return XLxmertForQuestionAnswering.from_default(args.task, seed=0, size=args.size,
                                                        labels=labels)
    try:
        model = XLxmertForQuestionAnswering.from_checkpoint(
            args.checkpoint, args.answers, task=args.task, centroids_path=args.centroids,
            size=args.size)
    except (CheckpointError, OSError, ValueError) as e:
        raise UserError(str(e)) from None
    if args.answers is None and args.task == "nlvr2":
        model.labels = list(NLVR2_LABELS)
    return model


def _check_against_model(args, model, visual) -> None:
    """What only the loaded model can say: its feature width, its codebook."""
    if args.features is not None and visual.shape[-1] != model.feat_dim:
        raise UserError(f"--features: {visual.shape[-1]} values per cell, but the model reads "
                        f"{model.feat_dim} (its visual_feat_dim)")
    if args.cluster_ids is not None:
        if model.vis_emb is None:
            raise UserError(f"--cluster-ids: the checkpoint {args.checkpoint} holds no codebook; "
                            "give its centroids with --centroids, or pass --features")
        hi = int(visual.max())
        if hi >= model.n_clusters:
            raise UserError(f"--cluster-ids: ids must lie in [0, {model.n_clusters}) (the "
                            f"checkpoint's codebook), got up to {hi}")


def run(args) -> int:
    from .generation_options import device_for, long_caption_note

    tokenizer, labels, visual = check_args(args)
    import torch

    import xlx_fast
    from xlx_fast.text import MAX_LENGTH

    device = device_for(args.device)
    long_caption_note(tokenizer, args.questions, [f"question {i + 1}" for i in range(len(args.questions))])
    input_ids, attention_mask = tokenizer(args.questions, MAX_LENGTH)
    if args.checkpoint is None:
        print("note: embedded default model (random weights): its answers are garbage; bring a "
              "fine-tuned checkpoint (--checkpoint, --answers, --vocab) for real ones",
              file=sys.stderr)
    what = "embedded default" if args.checkpoint is None else os.path.basename(args.checkpoint)
    print(f"building the model ({args.task}, {what}, {args.size}, {args.device}) ...",
          file=sys.stderr, flush=True)
    model = load_model(args, labels)
    _check_against_model(args, model, visual)
    top_k = args.top_k if args.top_k is not None else min(DEFAULT_TOP_K, model.n_answers)
    if top_k > model.n_answers:
        raise UserError(f"--top-k {top_k}: the {args.task} head has only {model.n_answers} answers")
    model = model.to(device)
    b = len(args.questions)
    images = torch.from_numpy(visual)  # [images, 64(, F)]
    if model.task.images == 1:
        images = images[0]
    images = images.unsqueeze(0).expand(b, *images.shape).to(device)
    kw = dict(cluster_ids=images.long()) if args.features is None else dict(features=images.float())
    result = xlx_fast.answer(model, input_ids.to(device), attention_mask.to(device), top_k=top_k, **kw)
    ids, scores = result.top_ids.cpu().tolist(), result.top_scores.cpu().tolist()
    rows = [{"question": q, "answers": [{"answer": a, "score": s, "index": i}
                                        for a, s, i in zip(answers, sc, ix)]}
            for q, answers, sc, ix in zip(args.questions, result.answers, scores, ids)]
    if args.json:
        json.dump({"task": args.task, "model": what, "size": args.size, "results": rows},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for row in rows:
        print(row["question"])
        width = max(len(a["answer"]) for a in row["answers"])
        for rank, a in enumerate(row["answers"], 1):
            print(f"  {rank}. {a['answer']:<{width}}  {a['score']:.4f}")
    return 0
