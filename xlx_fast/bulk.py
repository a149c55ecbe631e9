"""Bulk generation: ``xlx-fast generate --captions-file FILE --out-dir DIR --batch-size N``.

One image per caption line, through one :class:`xlx_fast.engine.Engine` kept full: a finished
row's slot is refilled at once from the remaining lines, so short and long requests never wait
for each other. Output, in ``DIR``:

- ``NNNNNN.png`` per line (``NNNNNN`` = the 1-based line number, zero-padded to 6 digits);
- ``manifest.jsonl``: one JSON object per image, sorted by line: ``line``, ``caption``,
  ``seed``, ``steps``, ``strategy``, ``file``, ``ids`` (the 64 cluster ids).

A line is a caption, or a JSON object ``{"caption": ..., "seed": ..., "steps": ...,
"strategy": ...}`` (all but ``caption`` optional). Blank lines are skipped (their numbers are not
reused). The default seed of line n is ``--seed + n``, and every result depends on its line
only (engine rows are independent, each image is painted alone with its own seed), so output
does not depend on batch size, order or sharding.

Resumable: lines already in the manifest whose file exists are skipped.

Scale-out: under ``torchrun`` (or any launch that sets ``RANK``/``WORLD_SIZE``) rank r takes
the pending lines with index ``i % WORLD_SIZE == r``, uses ``cuda:LOCAL_RANK`` when the device is
CUDA, writes ``manifest.rank{r}.jsonl``; after a barrier (``torch.distributed``, gloo) rank 0
merges every shard into ``manifest.jsonl`` (written to a temporary file and renamed).
"""
from __future__ import annotations

import json
import os
import sys
import time

MANIFEST = "manifest.jsonl"
_STRATEGIES = ("mask_predict", "confidence", "tlbr", "random")


class BulkError(ValueError):
    """A user error in the captions file or the bulk options (one line for the CLI)."""


def add_arguments(p) -> None:
    p.add_argument("--captions-file", metavar="FILE",
                   help="bulk mode: one caption (or JSON object) per line; needs --out-dir")
    p.add_argument("--out-dir", metavar="DIR", help="bulk mode: where the PNGs and manifest.jsonl go")
    p.add_argument("--batch-size", type=int, default=8,
                   help="bulk mode: engine slots (rows generated together), default 8")
    p.add_argument("--size", default="base", choices=["base", "tiny"],
                   help="architecture of --checkpoint: base (the authors' model) or tiny (tests)")


def read_lines(path: str, base_seed: int) -> list[dict]:
    """Parse the captions file; raises BulkError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise BulkError(f"cannot read --captions-file {path}: {e}") from None
    items = []
    for n, text in enumerate(raw, start=1):
        text = text.strip()
        if not text:
            continue
        where = f"{path}:{n}"
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BulkError(f"{where}: not valid JSON ({e.msg})") from None
            unknown = set(obj) - {"caption", "seed", "steps", "strategy"}
            if unknown:
                raise BulkError(f"{where}: unknown key(s) {sorted(unknown)}")
            caption = obj.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise BulkError(f"{where}: 'caption' must be a non-empty string")
        else:
            obj, caption = {}, text
        seed = obj.get("seed", base_seed + n)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BulkError(f"{where}: 'seed' must be an integer")
        strategy = obj.get("strategy")
        if strategy is not None and strategy not in _STRATEGIES:
            raise BulkError(f"{where}: 'strategy' must be one of {', '.join(_STRATEGIES)}")
        steps = obj.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise BulkError(f"{where}: 'steps' must be an integer >= 1")
        items.append(dict(line=n, caption=caption, seed=seed, steps=steps, strategy=strategy))
    if not items:
        raise BulkError(f"--captions-file {path} has no captions")
    return items


def _read_manifest(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for text in f:
            if text.strip():
                try:
                    out.append(json.loads(text))
                except json.JSONDecodeError:
                    pass  # a torn last line of an interrupted run: that line is redone
    return out


def _done(out_dir: str) -> dict[int, dict]:
    """Lines finished by earlier runs: in a manifest (merged or a rank shard) with their file."""
    entries = _read_manifest(os.path.join(out_dir, MANIFEST))
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("manifest.rank") and name.endswith(".jsonl"):
            entries += _read_manifest(os.path.join(out_dir, name))
    return {e["line"]: e for e in entries
            if isinstance(e, dict) and "line" in e and os.path.exists(os.path.join(out_dir, e.get("file", "")))}


def _dist():
    """(rank, world, local_rank) from the torch.distributed launch variables (1 process: 0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _merge(out_dir: str, world: int) -> int:
    done = _done(out_dir)
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in sorted(done):
            e = done[line]
            f.write(json.dumps({k: e[k] for k in ("line", "caption", "seed", "steps", "strategy", "file", "ids")})
                    + "\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    for r in range(world):
        shard = os.path.join(out_dir, f"manifest.rank{r}.jsonl")
        if os.path.exists(shard):
            os.remove(shard)
    return len(done)


def _load(args, load_model):
    """``load_model(args)`` (the generate subcommand's loader), with ``--size`` for checkpoints."""
    if args.size == "base" or args.checkpoint is None:
        return load_model(args)
    from .models import XLxmertForImageGeneration

    if args.centroids is None or args.generator is None:
        raise BulkError("--checkpoint needs --centroids and --generator")
    return XLxmertForImageGeneration.from_checkpoint(args.checkpoint, args.centroids, args.generator,
                                                     size=args.size), True


def run(args, load_model) -> int:
    """The bulk subcommand. ``load_model(args)`` -> (model, real_weights)."""
    import torch
    from PIL import Image

    from . import reference
    from .engine import Engine, Request
    from .reference.sampler import default_steps
    from .text import MAX_LENGTH, load_tokenizer

    if not args.out_dir:
        raise BulkError("--captions-file needs --out-dir")
    if args.captions:
        raise BulkError("give captions on the command line or --captions-file, not both")
    if args.batch_size < 1:
        raise BulkError(f"--batch-size must be >= 1, got {args.batch_size}")
    items = read_lines(args.captions_file, args.seed)
    for it in items:
        it["strategy"] = it["strategy"] or args.strategy
        it["steps"] = it["steps"] or args.steps or default_steps(it["strategy"])
        if it["strategy"] in ("tlbr", "confidence") and it["steps"] > 64:
            raise BulkError(f"{args.captions_file}:{it['line']}: steps must be <= 64 for {it['strategy']}")
    os.makedirs(args.out_dir, exist_ok=True)
    rank, world, local = _dist()
    if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        torch.distributed.init_process_group("gloo")
    done = _done(args.out_dir)
    todo = [it for it in items if it["line"] not in done]
    mine = todo[rank::world]

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BulkError("--device cuda but no CUDA device is available")
        if world > 1:
            device = torch.device("cuda", local)
    model, real = _load(args, load_model)
    try:
        tokenizer = load_tokenizer(args.vocab, real_weights=real)
    except (ValueError, FileNotFoundError) as e:
        raise BulkError(str(e)) from None
    model = model.to(device=device, dtype=dtype).eval()
    engine = Engine(model, slots=args.batch_size, max_length=MAX_LENGTH)
    engine.warmup()

    shard = os.path.join(args.out_dir, f"manifest.rank{rank}.jsonl")
    from tqdm.auto import tqdm

    queue = list(mine)
    t0 = time.perf_counter()
    with open(shard, "a", encoding="utf-8") as manifest, \
            tqdm(total=len(mine), unit="img", desc=f"rank {rank}" if world > 1 else "generate",
                 disable=None) as bar:
        while queue or engine.active():
            take = min(engine.free_slots(), len(queue))
            if take:
                batch, queue = queue[:take], queue[take:]
                reqs = []
                for it in batch:
                    ids, mask = tokenizer([it["caption"]])
                    reqs.append(Request(input_ids=ids[0].to(device), attention_mask=mask[0].to(device),
                                        seed=it["seed"], steps=it["steps"], strategy=it["strategy"],
                                        tag=it))
                engine.admit(reqs)
            for f in engine.step():
                it = f.request.tag
                codes = f.codes[None].to(device)
                # painted alone, noise seeded by the line's seed: independent of batching
                image = reference.paint(model, codes, seed=it["seed"] % 2**64)[0].float().cpu()
                pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                name = f"{it['line']:06d}.png"
                Image.fromarray(pixels).save(os.path.join(args.out_dir, name))
                entry = dict(it, file=name, ids=f.ids.tolist())
                manifest.write(json.dumps(entry) + "\n")
                manifest.flush()
                bar.update()
    elapsed = time.perf_counter() - t0
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        total = _merge(args.out_dir, world)
        print(f"{total} of {len(items)} images in {os.path.join(args.out_dir, MANIFEST)} "
              f"({len(mine)} generated by rank 0 in {elapsed:.1f} s, {len(done)} already there)",
              file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
