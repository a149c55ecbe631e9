"""``xlx-fast train``: pre-train X-LXMERT, or fine-tune it for VQA, GQA or NLVR2, with the fast
step, on one process or under torchrun (DDP).

    xlx-fast train --make-synthetic data/ --size tiny          # a tiny dataset to start with
    xlx-fast train data/ --out run/ --size tiny --steps 30      # one process
    torchrun --nproc_per_node 2 -m xlx_fast.cli train data/ --out run-ddp/ --size tiny --steps 30

    xlx-fast train --task vqa --make-synthetic vqa-data/ --size tiny
    xlx-fast train --task vqa vqa-data/ --out vqa-run/ --size tiny --steps 30
    xlx-fast train --task vqa vqa-data/ --out vqa-run/ --checkpoint Epoch20_LXRT.pth --vocab vocab.txt

``--arch`` (default ``xlxmert``): the model pre-trained; ``xuniter`` is the single-stream
X-UNITER (:class:`xlx_fast.models.xuniter.XUniterForImageGeneration`, step:
:mod:`xlx_fast.training.xuniter_step`) on the same data, tasks and recipe, from its seeded
default (there is no X-UNITER checkpoint to start from, and it is not fine-tuned here).

``--task`` (default ``pretrain``): the authors' pre-training step (data directory: see
:mod:`xlx_fast.training.data`), or fine-tuning for ``vqa``, ``gqa`` or ``nlvr2`` (data
directory: see :mod:`xlx_fast.training.task_data`; step: :mod:`xlx_fast.training.tasks`).
Fine-tuning starts from ``--checkpoint`` (an X-LXMERT checkpoint: its ``bert.*`` weights; the
answer head is always fresh, seeded by ``--seed``) or from the seeded random default.

``--batch-size`` is the *global* batch: each of the W ranks takes its contiguous share of the
examples of every global batch, and all masking is keyed by (seed, step, example index), so a
W-rank run makes the updates of a 1-rank run up to rounding (with ``--dropout 0``: dropout masks
are drawn per process).

The run directory gets ``stepNNNNNN_LXRT.pth`` (fine-tuning: ``stepNNNNNN_VQA.pth``, ...) every
``--save-every`` steps and at the end (``--arch xuniter``: ``stepNNNNNN_XUNITER.pth``, its state
dict with ``module.``-prefixed keys; otherwise the authors' state-dict format, ``module.``-prefixed
keys, loadable by ``XLxmertForImageGeneration.from_checkpoint(path, centroids,
pretraining_heads=...)``, or ``XLxmertForQuestionAnswering.from_checkpoint(path, answers,
task=...)``), beside them ``centroids.npy`` (pre-training) or ``answers.json`` (fine-tuning:
the head's answer table), and ``last.pt`` (model, optimizer and schedule state, the run's
hyper-parameters and a checksum) from which ``--resume`` continues. Every file is written whole
or not at all (:mod:`xlx_fast.training.checkpoint`).

A run directory belongs to one run: a non-empty ``--out`` is refused unless ``--resume``
continues the run in it or ``--overwrite`` replaces it. A resumed run keeps its hyper-parameters
(``HPARAMS``): those left off the command line are taken from ``last.pt``, and one given with
another value is refused, naming it. Every argument is checked before torch is imported or a
model built.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

from ..archs import ARCHS as ARCH_TABLE
from ..archs import DEFAULT_ARCH
from . import UserError

# The run's hyper-parameters: stored in last.pt and kept by --resume. Their argparse default
# is None, so that an option given on the command line can be told from one left out.
DEFAULTS = {"task": "pretrain", "arch": DEFAULT_ARCH, "steps": 100, "batch_size": 8, "lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.05,
            "clip": 1.0, "dropout": None, "seed": 0, "size": "base", "grid": 8, "dtype": "fp32",
            "checkpoint": None, "centroids": None, "vocab": None}
HPARAMS = tuple(DEFAULTS)
PATH_HPARAMS = ("checkpoint", "centroids", "vocab")

# (rule, test) per numeric option; NaN fails every comparison, so it is refused too
DOMAINS = {
    "steps": (">= 1", lambda v: v >= 1),
    "batch_size": (">= 1", lambda v: v >= 1),
    "save_every": (">= 1", lambda v: v >= 1),
    "stop_at": (">= 1", lambda v: v >= 1),
    "examples": (">= 2", lambda v: v >= 2),
    "lr": ("a finite number > 0", lambda v: 0 < v < math.inf),
    "weight_decay": ("a finite number >= 0", lambda v: 0 <= v < math.inf),
    "warmup_ratio": ("in [0, 1] (the share of --steps spent warming up)", lambda v: 0 <= v <= 1),
    "clip": ("a finite number > 0 (the largest gradient norm kept)", lambda v: 0 < v < math.inf),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    # masking draws from the seed modulo 2**32: larger seeds would repeat smaller ones' masks
    "seed": ("in [0, 2**32)", lambda v: 0 <= v < 2 ** 32),
    # xlx_fast.grid.MAX_GRID (not imported: that module is torch-free, but this keeps the CLI's
    # checks free of package imports); 8, 16 and 32 are the grids the tests cover
    "grid": ("in 1..32 (an N×N grid of at most 1,024 cells)", lambda v: 1 <= v <= 32),
}

TASKS = ("pretrain", "vqa", "gqa", "nlvr2")
ARCHS = tuple(ARCH_TABLE)  # xlx_fast.archs: the one table of architectures
# what a run writes into --out (and --overwrite removes); temporary files are atomic_write's
RUN_FILE = re.compile(r"^(last\.pt|centroids\.npy|answers\.json|step\d{6}_(LXRT|XUNITER|VQA|GQA|NLVR2)\.pth"
                      r"|\..+\.tmp\d+)$")
# the files of a data directory: pre-training's (xlx_fast.training.data), the answer tasks'
# (xlx_fast.training.task_data; named here so that they are checked before torch is imported)
DATA_FILES = ("captions.txt", "cluster_ids.npy", "features.npy")
TASK_DATA_FILES = ("questions.json", "features.npy", "img_ids.json", "answers.json")
FIRST_DATA_FILE = {"pretrain": "captions.txt", "vqa": "questions.json", "gqa": "questions.json",
                   "nlvr2": "questions.json"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_parser(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("data", nargs="?", help="data directory (pretrain: captions.txt + cluster_ids.npy or "
                                           "features.npy; vqa/gqa/nlvr2: questions.json, features.npy, "
                                           "img_ids.json, answers.json)")
    p.add_argument("--task", default=None, choices=TASKS,
                   help=f"pre-train, or fine-tune for an answer task (default {d['task']})")
    p.add_argument("--arch", default=None, choices=ARCHS,
                   help=f"pretrain: the model, X-LXMERT or the single-stream X-UNITER (default {d['arch']})")
    p.add_argument("--out", help="run directory (checkpoints, last.pt); must be empty or new, "
                                 "unless --resume or --overwrite")
    p.add_argument("--make-synthetic", metavar="DIR", help="write a synthetic data directory and exit")
    p.add_argument("--examples", type=int, default=64,
                   help="examples in the synthetic set: captions, or questions for --task vqa/gqa/nlvr2 "
                        "(default %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"total optimizer steps; the learning-rate schedule spans them (default {d['steps']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch size (default {d['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of AdamW, reached after the warm-up (default {d['lr']:g})")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"AdamW weight decay, not applied to biases and LayerNorm weights "
                        f"(default {d['weight_decay']:g})")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help=f"share of --steps spent warming the learning rate up linearly from 0, in "
                        f"[0, 1]; it then decays linearly to 0 (default {d['warmup_ratio']:g})")
    p.add_argument("--clip", type=float, default=None,
                   help=f"gradient-norm clipping, > 0 (default {d['clip']:g})")
    p.add_argument("--dropout", type=float, default=None,
                   help="override every dropout probability, in [0, 1) (default: the model's, 0.1); "
                        "0 for reproducible runs")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seeds the model init, data order and masking (default {d['seed']})")
    p.add_argument("--size", default=None, choices=["base", "tiny"], help=f"architecture (default {d['size']})")
    p.add_argument("--grid", type=int, default=None,
                   help=f"pretrain: the model's N×N grid of cells (default {d['grid']}; 16 and 32 are "
                        f"finer grids; the data's cluster_ids.npy is [N, grid²])")
    p.add_argument("--checkpoint", help="start from an X-LXMERT state dict (pretrain: needs --centroids; "
                                        "vqa/gqa/nlvr2: its bert.* weights, with a fresh answer head)")
    p.add_argument("--centroids", help="cluster centroids .npy (pretrain only)")
    p.add_argument("--vocab", help="BERT-base-uncased vocab.txt (required with --checkpoint)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint period in steps (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from OUT/last.pt, with its hyper-parameters")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty OUT (its checkpoints are deleted)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (and save) after this step, e.g. to split a run; --resume continues it")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help=f"bf16: autocast (default {d['dtype']})")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda if available (under torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def _writable_dir(flag: str, path: str) -> None:
    """``path`` is a directory, or one can be made there."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"{flag} {path} is a file, not a directory")
    parent = target
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model and no torch; raises UserError."""
    for name, (rule, ok) in DOMAINS.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise UserError(f"{_flag(name)} must be {rule}, got {value}")
    if args.task not in (None, "pretrain") and args.centroids is not None:
        raise UserError(f"--centroids is for --task pretrain: {args.task} reads grid features from the "
                        f"data directory (features.npy)")
    if args.task not in (None, "pretrain") and args.grid not in (None, DEFAULTS["grid"]):
        raise UserError(f"--grid is for --task pretrain: {args.task} reads 8×8 grid features")
    _check_arch(args.arch, args.task, args.checkpoint)
    if args.make_synthetic:
        _writable_dir("--make-synthetic", args.make_synthetic)
        every = DATA_FILES + tuple(f for f in TASK_DATA_FILES if f not in DATA_FILES)
        held = [f for f in every if os.path.exists(os.path.join(args.make_synthetic, f))]
        if held:
            raise UserError(f"--make-synthetic {args.make_synthetic} already holds a data set "
                            f"({', '.join(held)}); choose another directory")
        return
    if args.data is None or args.out is None:
        raise UserError("give a data directory and --out RUN_DIR (or --make-synthetic DIR)")
    if not os.path.isdir(args.data):
        raise UserError(f"data directory {args.data} "
                        + ("is a file" if os.path.exists(args.data) else "does not exist"))
    task = args.task or (None if args.resume else DEFAULTS["task"])  # None: the resumed run's
    first = [FIRST_DATA_FILE[task]] if task else sorted(set(FIRST_DATA_FILE.values()))
    if not any(os.path.isfile(os.path.join(args.data, f)) for f in first):
        raise UserError(f"no {' or '.join(first)} in {args.data}"
                        + (f" (the {task} data)" if task not in (None, "pretrain") else ""))
    _writable_dir("--out", args.out)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one")
    last = os.path.join(args.out, "last.pt")
    if args.resume:
        if not os.path.isfile(last):
            raise UserError(f"--resume: no {last}")
    elif not args.overwrite and os.path.isdir(args.out) and os.listdir(args.out):
        held = sorted(os.listdir(args.out))
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise UserError(f"--out {args.out} is not empty ({shown}): pass --resume to continue the run "
                        f"in it, --overwrite to replace it, or choose another --out")


def _check_arch(arch, task, checkpoint) -> None:
    """X-UNITER is pre-trained only, from its seeded default; raises UserError otherwise."""
    if arch != "xuniter":
        return
    if task not in (None, "pretrain"):
        raise UserError(f"--arch xuniter is for --task pretrain: {task} fine-tunes X-LXMERT")
    if checkpoint is not None:
        raise UserError("--arch xuniter starts from its seeded default: there is no X-UNITER "
                        "--checkpoint format to load")


def _show(value) -> str:
    return "not given" if value is None else str(value)


def _resumed_hparams(args: argparse.Namespace, state: dict, last: str) -> tuple[dict, list[str]]:
    """The run's hyper-parameters for a resumed run and notes to print; raises UserError for an
    option given on the command line with a value other than the run's."""
    stored, notes = state["hparams"], []
    if stored is None:  # a last.pt written before hyper-parameters were stored with it
        group = state["optimizer"]["param_groups"][0]
        stored = {"lr": group.get("initial_lr", group.get("lr")), "weight_decay": group.get("weight_decay")}
        notes.append(f"{last} predates stored hyper-parameters: only --lr and --weight-decay are "
                     f"checked against it; give the others as the run was started")
    changed = []
    for name in HPARAMS:
        given = getattr(args, name)
        if given is None or name not in stored:
            continue
        same = (os.path.abspath(given) == stored[name]) if name in PATH_HPARAMS and stored[name] \
            else given == stored[name]
        if not same:
            changed.append(f"{_flag(name)} {given} (the run has {_show(stored[name])})")
    if changed:
        raise UserError(f"--resume keeps the run's hyper-parameters, but {'; '.join(changed)}: "
                        f"leave {'it' if len(changed) == 1 else 'them'} out to continue {last}, or start "
                        f"a new run in another --out")
    hp = {}
    for name in HPARAMS:
        given = getattr(args, name)
        hp[name] = given if given is not None else stored.get(name, DEFAULTS[name])
    return hp, notes


def _build_model(args, torch):
    from xlx_fast.models import XLxmertForImageGeneration, from_default

    if args.checkpoint is None:
        if args.centroids:
            raise ValueError("--centroids needs --checkpoint (the embedded default has its own)")
        return from_default(args.arch, seed=args.seed, size=args.size, with_generator=False,
                            pretraining_heads=True, grid=args.grid), False
    if args.centroids is None:
        raise ValueError("--checkpoint needs --centroids (the cluster centroids .npy)")
    return XLxmertForImageGeneration.from_checkpoint(args.checkpoint, args.centroids, size=args.size,
                                                     strict=False, pretraining_heads=True,
                                                     grid=args.grid), True


class _Pretraining:
    """What a pre-training run trains on and how it saves (the loop in :func:`_run` is shared)."""

    def __init__(self, args, torch, device, rank):
        from xlx_fast import training
        from xlx_fast.text import load_tokenizer
        from xlx_fast.training.data import load_data

        self.suffix = "XUNITER" if args.arch == "xuniter" else "LXRT"
        model, real = _build_model(args, torch)
        tokenizer = load_tokenizer(args.vocab, real_weights=real)
        self.data = load_data(args.data, tokenizer, model.centroids, progress=rank == 0 and not args.no_progress,
                              grid=model.grid)
        self.vocab_size = model.config.vocab_size
        if int(self.data.captions.max()) >= self.vocab_size:
            raise ValueError(f"captions hold token ids >= the model's vocabulary ({self.vocab_size})")
        self.model, self.args, self.torch, self.device = model, args, torch, device
        self.training = training

    def __len__(self):
        return len(self.data)

    def prepare(self, model):
        if self.args.arch == "xuniter":
            from xlx_fast.training import xuniter_step

            return xuniter_step.prepare_for_training(model)
        return self.training.prepare_for_training(model)

    def loss_module(self):
        if self.args.arch == "xuniter":
            from xlx_fast.training import xuniter_step

            return xuniter_step.XUniterPretrainingLoss(self.model)
        return self.training.PretrainingLoss(self.model)

    def train_step(self, module, opt, sched, step, indices, autocast, world):
        """One update on this rank's ``indices``; returns (loss, what it trained)."""
        torch, training = self.torch, self.training
        batch = training.make_batch(self.data.captions, self.data.cluster_ids, indices, step, self.args.seed,
                                    self.vocab_size, device=self.device)
        count = torch.tensor(training.step.target_count(batch), device=self.device)
        if world > 1:
            torch.distributed.all_reduce(count)
        loss = training.train_step(module, opt, sched, batch, step=step, clip=self.args.clip,
                                   autocast_dtype=autocast, global_count=max(1, int(count)), world=world)
        return loss, batch.task

    def write_run_files(self, checkpoint, out):
        checkpoint.save_npy(self.model.centroids.detach().float().cpu().numpy(), os.path.join(out, "centroids.npy"))

    def state_dict(self):
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("generator.")}

    def saved(self, name):
        if self.args.arch == "xuniter":
            return f"{name} (a state dict of XUniterForImageGeneration(..., pretraining_heads=True)"
        return f"{name} (the authors' format"


class _FineTuning:
    """Fine-tuning for an answer task: the model, its data and its step."""

    def __init__(self, args, torch, device, rank):
        from xlx_fast.text import load_tokenizer
        from xlx_fast.training import tasks
        from xlx_fast.training.task_data import load_task_data

        self.suffix = args.task.upper()
        model = tasks.build_answer_model(args.task, seed=args.seed, size=args.size, checkpoint=args.checkpoint)
        if args.checkpoint is not None and model.load_report["unused"] and rank == 0:
            print(f"note: --checkpoint: took its bert.* weights; {len(model.load_report['unused'])} other "
                  f"key(s) (heads, codebook) are not part of the {args.task} model", file=sys.stderr)
        tokenizer = load_tokenizer(args.vocab, real_weights=args.checkpoint is not None)
        self.data = load_task_data(args.data, args.task, tokenizer, model.feat_dim, model.n_answers)
        model.labels = list(self.data.answers)
        vocab_size = model.config.vocab_size
        if int(self.data.input_ids.max()) >= vocab_size:
            raise ValueError(f"questions hold token ids >= the model's vocabulary ({vocab_size})")
        self.model, self.args, self.device, self.tasks = model, args, device, tasks

    def __len__(self):
        return len(self.data)

    def prepare(self, model):
        from xlx_fast import training

        return training.prepare_for_training(model)

    def loss_module(self):
        return self.tasks.TaskLoss(self.model)

    def train_step(self, module, opt, sched, step, indices, autocast, world):
        batch = self.data.batch(indices, device=self.device)
        loss = self.tasks.finetune_step(module, opt, sched, batch, step=step, clip=self.args.clip,
                                        autocast_dtype=autocast, world=world)
        return loss, self.args.task

    def write_run_files(self, checkpoint, out):
        import json

        with checkpoint.atomic_write(os.path.join(out, "answers.json")) as f:
            f.write(json.dumps(self.model.labels).encode("utf-8"))

    def state_dict(self):
        return self.model.state_dict()

    def saved(self, name):
        return (f"{name} (XLxmertForQuestionAnswering.from_checkpoint(path, answers.json, "
                f"task={self.args.task!r})")


def _run(args) -> int:
    import torch
    import torch.distributed as dist

    from xlx_fast.training import checkpoint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.make_synthetic:
        for name in HPARAMS:
            if getattr(args, name) is None:
                setattr(args, name, DEFAULTS[name])
        if args.task != "pretrain":
            from xlx_fast.training.task_data import write_synthetic_task

            write_synthetic_task(args.make_synthetic, args.task, n=args.examples, seed=args.seed, size=args.size)
            print(f"wrote {args.examples} synthetic {args.task} examples to {args.make_synthetic}")
            return 0
        from xlx_fast.training.data import write_synthetic

        model, _ = _build_model(args, torch)
        write_synthetic(args.make_synthetic, model.centroids, n=args.examples, seed=args.seed,
                        grid=model.grid)
        print(f"wrote {args.examples} synthetic examples to {args.make_synthetic}")
        return 0

    last = os.path.join(args.out, "last.pt")
    state, start = None, 0
    if args.resume:
        state = checkpoint.load_run_state(last)
        hp, notes = _resumed_hparams(args, state, last)
        start = int(state["step"])
        for note in notes if rank == 0 else ():
            print(f"note: {note}", file=sys.stderr)
    else:
        hp = {name: DEFAULTS[name] if getattr(args, name) is None else getattr(args, name) for name in HPARAMS}
    for name, value in hp.items():
        setattr(args, name, value)
    if args.task != "pretrain" and args.centroids is not None:  # a resumed run's task, read just now
        raise ValueError(f"--centroids is for --task pretrain: {args.task} reads grid features")
    _check_arch(args.arch, args.task, args.checkpoint)  # the same: a resumed run's arch
    stored_hp = {k: (os.path.abspath(v) if k in PATH_HPARAMS and v is not None else v) for k, v in hp.items()}
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of the {world} ranks")
    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    if start >= args.steps:
        raise ValueError(f"{last} is at step {start}, the run's last (--steps {args.steps}): nothing to "
                         f"train (a longer run would change the learning-rate schedule: start a new one)")
    if start >= end:
        raise ValueError(f"--stop-at {args.stop_at}: the run in {args.out} is already at step {start}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    from xlx_fast import training
    from xlx_fast.training.data import global_batch_indices

    job = (_Pretraining if args.task == "pretrain" else _FineTuning)(args, torch, device, rank)
    model = job.model
    if args.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = args.dropout

    model = job.prepare(model.to(device)).train()
    opt, sched = training.make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay,
                                         total_steps=args.steps, warmup_ratio=args.warmup_ratio)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{last} does not fit this model: {str(e).strip().splitlines()[0][:200]}") from None
        del state
    module = job.loss_module()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # pre-training: each task leaves the other heads unused; fine-tuning: the last cross
        # layer's visual half never reaches the pooled output
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                     find_unused_parameters=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite:
            removed = [f for f in os.listdir(args.out) if RUN_FILE.match(f)]
            for f in removed:
                os.remove(os.path.join(args.out, f))
            if removed:
                print(f"note: --overwrite: removed {len(removed)} file(s) of the previous run in {args.out}",
                      file=sys.stderr)
        job.write_run_files(checkpoint, args.out)

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, unit="step")
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    share = args.batch_size // world
    t0, seen = time.perf_counter(), 0
    for step in range(start, end):
        indices = global_batch_indices(step, args.batch_size, len(job), args.seed)
        try:
            loss, what = job.train_step(module, opt, sched, step, indices[rank * share:(rank + 1) * share],
                                        autocast, world)
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        seen += args.batch_size
        bar.set_postfix(task=what, loss=f"{loss:.4f}", ex_s=f"{seen / (time.perf_counter() - t0):.1f}")
        bar.update(1)
        done = step + 1
        if rank == 0 and (done % args.save_every == 0 or done == end):
            _save(checkpoint, job, opt, sched, done, args.out, stored_hp)
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        what = (f"stopped after step {end} of {args.steps}" if end < args.steps
                else f"trained to step {end}")
        print(f"{what}; checkpoints in {args.out}: {job.saved(f'step{end:06d}_{job.suffix}.pth')}, also "
              f"every {args.save_every} steps), last.pt (--resume continues from it)")
    return 0


def _save(checkpoint, job, opt, sched, step, out, hparams):
    checkpoint.save_torch({f"module.{k}": v for k, v in job.state_dict().items()},
                          os.path.join(out, f"step{step:06d}_{job.suffix}.pth"))
    checkpoint.save_run_state(os.path.join(out, "last.pt"), model=job.model, optimizer=opt, scheduler=sched,
                              step=step, hparams=hparams)
