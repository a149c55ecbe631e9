"""``xlx-fast train``: pre-train X-LXMERT with the fast step, on one process or under torchrun (DDP).

    xlx-fast train --make-synthetic data/ --size tiny          # a tiny dataset to start with
    xlx-fast train data/ --out run/ --size tiny --steps 30      # one process
    torchrun --nproc_per_node 2 -m xlx_fast.cli train data/ --out run/ --size tiny --steps 30

The data directory: see :mod:`xlx_fast.training.data`. ``--batch-size`` is the *global* batch:
each of the W ranks takes its contiguous share of the examples of every global batch, and all
masking is keyed by (seed, step, example index), so a W-rank run makes the updates of a 1-rank
run up to rounding (with ``--dropout 0``: dropout masks are drawn per process).

The run directory gets ``centroids.npy``, ``stepNNNNNN_LXRT.pth`` every ``--save-every`` steps
and at the end (the authors' state-dict format: ``module.``-prefixed keys, loadable by
``XLxmertForImageGeneration.from_checkpoint(path, centroids, pretraining_heads=...)``) and
``last.pt`` (model, optimizer and schedule state) from which ``--resume`` continues.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import UserError


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="data directory (captions.txt + cluster_ids.npy or features.npy)")
    p.add_argument("--out", help="run directory (checkpoints, last.pt)")
    p.add_argument("--make-synthetic", metavar="DIR", help="write a synthetic data directory and exit")
    p.add_argument("--examples", type=int, default=64, help="examples in the synthetic set (default 64)")
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default 1.0)")
    p.add_argument("--dropout", type=float, default=None,
                   help="override every dropout probability (HF default 0.1); 0 for reproducible runs")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, data order and masking")
    p.add_argument("--size", default="base", choices=["base", "tiny"], help="architecture (default base)")
    p.add_argument("--checkpoint", help="start from an X-LXMERT state dict (needs --centroids)")
    p.add_argument("--centroids", help="cluster centroids .npy")
    p.add_argument("--vocab", help="BERT-base-uncased vocab.txt (required with --checkpoint)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint period in steps (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (and save) after this step, e.g. to split a run; --resume continues it")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


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
    import numpy as np
    import torch
    import torch.distributed as dist

    from xlx_fast import training
    from xlx_fast.text import load_tokenizer
    from xlx_fast.training.data import global_batch_indices, load_data, write_synthetic

    if args.make_synthetic:
        model, _ = _build_model(args, torch)
        write_synthetic(args.make_synthetic, model.centroids, n=args.examples, seed=args.seed)
        print(f"wrote {args.examples} synthetic examples to {args.make_synthetic}")
        return 0
    if args.data is None or args.out is None:
        raise ValueError("give a data directory and --out RUN_DIR (or --make-synthetic DIR)")
    for name in ("steps", "batch_size", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    last = os.path.join(args.out, "last.pt")
    if args.resume and not os.path.isfile(last):
        raise FileNotFoundError(f"--resume: no {last}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of the {world} ranks")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

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
    start = 0
    if args.resume:
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
    module = training.PretrainingLoss(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                     find_unused_parameters=True)  # each task leaves the other heads unused
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        np.save(os.path.join(args.out, "centroids.npy"), model.centroids.detach().float().cpu().numpy())

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, unit="step")
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    share = args.batch_size // world
    t0, seen = time.perf_counter(), 0
    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
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
            _save(torch, model, opt, sched, done, args.out)
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _save(torch, model, opt, sched, step, out):
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("generator.")}
    torch.save({f"module.{k}": v for k, v in state.items()}, os.path.join(out, f"step{step:06d}_LXRT.pth"))
    tmp = os.path.join(out, "last.pt.tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step}, tmp)
    os.replace(tmp, os.path.join(out, "last.pt"))  # a crash mid-write never leaves a torn last.pt
