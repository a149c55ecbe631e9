"""``xlx-fast train``: pre-train X-LXMERT with the fast step, on one process or under torchrun (DDP).

    xlx-fast train --make-synthetic data/ --size tiny          # a tiny dataset to start with
    xlx-fast train data/ --out run/ --size tiny --steps 30      # one process
    torchrun --nproc_per_node 2 -m xlx_fast.cli train data/ --out run-ddp/ --size tiny --steps 30

The data directory: see :mod:`xlx_fast.training.data`. ``--batch-size`` is the *global* batch:
each of the W ranks takes its contiguous share of the examples of every global batch, and all
masking is keyed by (seed, step, example index), so a W-rank run makes the updates of a 1-rank
run up to rounding (with ``--dropout 0``: dropout masks are drawn per process).

The run directory gets ``centroids.npy``, ``stepNNNNNN_LXRT.pth`` every ``--save-every`` steps
and at the end (the authors' state-dict format: ``module.``-prefixed keys, loadable by
``XLxmertForImageGeneration.from_checkpoint(path, centroids, pretraining_heads=...)``) and
``last.pt`` (model, optimizer and schedule state, the run's hyper-parameters and a checksum)
from which ``--resume`` continues. Every file is written whole or not at all
(:mod:`xlx_fast.training.checkpoint`).

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

from . import UserError

# The run's hyper-parameters: stored in last.pt and kept by --resume. Their argparse default
# is None, so that an option given on the command line can be told from one left out.
DEFAULTS = {"steps": 100, "batch_size": 8, "lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.05,
            "clip": 1.0, "dropout": None, "seed": 0, "size": "base", "dtype": "fp32",
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
}

# what a run writes into --out (and --overwrite removes); temporary files are atomic_write's
RUN_FILE = re.compile(r"^(last\.pt|centroids\.npy|step\d{6}_LXRT\.pth|\..+\.tmp\d+)$")
DATA_FILES = ("captions.txt", "cluster_ids.npy", "features.npy")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_parser(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("data", nargs="?", help="data directory (captions.txt + cluster_ids.npy or features.npy)")
    p.add_argument("--out", help="run directory (checkpoints, last.pt); must be empty or new, "
                                 "unless --resume or --overwrite")
    p.add_argument("--make-synthetic", metavar="DIR", help="write a synthetic data directory and exit")
    p.add_argument("--examples", type=int, default=64,
                   help="examples in the synthetic set (default %(default)s)")
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
    p.add_argument("--checkpoint", help="start from an X-LXMERT state dict (needs --centroids)")
    p.add_argument("--centroids", help="cluster centroids .npy")
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
    if args.make_synthetic:
        _writable_dir("--make-synthetic", args.make_synthetic)
        held = [f for f in DATA_FILES if os.path.exists(os.path.join(args.make_synthetic, f))]
        if held:
            raise UserError(f"--make-synthetic {args.make_synthetic} already holds a data set "
                            f"({', '.join(held)}); choose another directory")
        return
    if args.data is None or args.out is None:
        raise UserError("give a data directory and --out RUN_DIR (or --make-synthetic DIR)")
    if not os.path.isdir(args.data):
        raise UserError(f"data directory {args.data} "
                        + ("is a file" if os.path.exists(args.data) else "does not exist"))
    if not os.path.isfile(os.path.join(args.data, "captions.txt")):
        raise UserError(f"no captions.txt in {args.data}")
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
    from xlx_fast.models import XLxmertForImageGeneration

    if args.checkpoint is None:
        if args.centroids:
            raise ValueError("--centroids needs --checkpoint (the embedded default has its own)")
        return XLxmertForImageGeneration.from_default(seed=args.seed, size=args.size, with_generator=False,
                                                      pretraining_heads=True), False
    if args.centroids is None:
        raise ValueError("--checkpoint needs --centroids (the cluster centroids .npy)")
    return XLxmertForImageGeneration.from_checkpoint(args.checkpoint, args.centroids, size=args.size,
                                                     strict=False, pretraining_heads=True), True


def _run(args) -> int:
    import torch
    import torch.distributed as dist

    from xlx_fast.training import checkpoint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.make_synthetic:
        from xlx_fast.training.data import write_synthetic

        for name in HPARAMS:
            if getattr(args, name) is None:
                setattr(args, name, DEFAULTS[name])
        model, _ = _build_model(args, torch)
        write_synthetic(args.make_synthetic, model.centroids, n=args.examples, seed=args.seed)
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
    from xlx_fast.text import load_tokenizer
    from xlx_fast.training.data import global_batch_indices, load_data

    model, real = _build_model(args, torch)
    if args.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = args.dropout
    tokenizer = load_tokenizer(args.vocab, real_weights=real)
    data = load_data(args.data, tokenizer, model.centroids, progress=rank == 0 and not args.no_progress)
    vocab_size = model.config.vocab_size
    if int(data.captions.max()) >= vocab_size:
        raise ValueError(f"captions hold token ids >= the model's vocabulary ({vocab_size})")

    model = training.prepare_for_training(model.to(device)).train()
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
    module = training.PretrainingLoss(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                     find_unused_parameters=True)  # each task leaves the other heads unused
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite:
            removed = [f for f in os.listdir(args.out) if RUN_FILE.match(f)]
            for f in removed:
                os.remove(os.path.join(args.out, f))
            if removed:
                print(f"note: --overwrite: removed {len(removed)} file(s) of the previous run in {args.out}",
                      file=sys.stderr)
        checkpoint.save_npy(model.centroids.detach().float().cpu().numpy(), os.path.join(args.out, "centroids.npy"))

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, unit="step")
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    share = args.batch_size // world
    t0, seen = time.perf_counter(), 0
    for step in range(start, end):
        indices = global_batch_indices(step, args.batch_size, len(data), args.seed)
        batch = training.make_batch(data.captions, data.cluster_ids, indices[rank * share:(rank + 1) * share],
                                    step, args.seed, vocab_size, device=device)
        count = torch.tensor(training.step.target_count(batch), device=device)
        if world > 1:
            dist.all_reduce(count)
        try:
            loss = training.train_step(module, opt, sched, batch, step=step, clip=args.clip,
                                       autocast_dtype=autocast, global_count=max(1, int(count)), world=world)
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        seen += args.batch_size
        bar.set_postfix(task=batch.task, loss=f"{loss:.4f}", ex_s=f"{seen / (time.perf_counter() - t0):.1f}")
        bar.update(1)
        done = step + 1
        if rank == 0 and (done % args.save_every == 0 or done == end):
            _save(checkpoint, model, opt, sched, done, args.out, stored_hp)
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        what = (f"stopped after step {end} of {args.steps}" if end < args.steps
                else f"trained to step {end}")
        print(f"{what}; checkpoints in {args.out}: step{end:06d}_LXRT.pth (the authors' format, also "
              f"every {args.save_every} steps), last.pt (--resume continues from it)")
    return 0


def _save(checkpoint, model, opt, sched, step, out, hparams):
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("generator.")}
    checkpoint.save_torch({f"module.{k}": v for k, v in state.items()}, os.path.join(out, f"step{step:06d}_LXRT.pth"))
    checkpoint.save_run_state(os.path.join(out, "last.pt"), model=model, optimizer=opt, scheduler=sched,
                              step=step, hparams=hparams)
