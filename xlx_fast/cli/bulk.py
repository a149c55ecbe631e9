"""Bulk generation: ``xlx-fast generate --captions-file FILE --out-dir DIR --batch-size N``.

One image per caption line, through one paint engine kept full
(:class:`xlx_fast.engine.Engine`; with ``--arch xuniter`` its single-stream twin,
:class:`xlx_fast.xuniter_engine.XUniterEngine`): a finished row's slot is refilled at once from
the remaining lines, so short and long requests never wait for each other. Output, in ``DIR``:

- ``NNNNNN.png`` per line (``NNNNNN`` = the 1-based line number, zero-padded to 6 digits),
  written to a temporary file, synced and renamed, so a PNG is whole or absent;
- ``manifest.jsonl``: one JSON object per image, sorted by line: ``line``, ``caption``,
  ``seed``, ``steps``, ``strategy``, ``temperature``, ``file``, ``sha256`` (of the PNG), ``ids``
  (the N² cluster ids of the ``--grid``: 64 on 8×8), and ``given_seed`` when the seed asked for was hashed (see below);
- ``settings.json``: the run's settings (``--seed``, ``--steps``, ``--strategy``,
  ``--temperature``, ``--arch``, ``--size``, ``--grid``, ``--dtype``, the device type and the
  sha256 of each model file; a settings file written before grids or architectures were recorded
  holds none and means 8×8, X-LXMERT);
- ``.xlx-fast.lock``: the lock a run holds while it works in ``DIR``.

Lines end at ``\\n`` only, as ``wc -l`` counts them (a ``\\r`` before the ``\\n`` of a CRLF line
end is dropped; any other ``\\r`` is part of the caption). A line is a caption, or a JSON
object ``{"caption": ..., "seed": ..., "steps": ..., "strategy": ..., "temperature": ...}``
(all but ``caption`` optional). A blank line (empty or whitespace only) is skipped and reported;
its number is not reused, so later lines keep their numbers and seeds. The default seed of line
n is ``--seed + n``; a seed outside [0, 2**31) is hashed into that range by the rule of single
mode (:func:`xlx_fast.cli.generation_options.engine_seed`), and the manifest's ``seed`` is the one used:
``xlx-fast generate CAPTION --seed S`` and ``xlx_fast.generate(..., seed=S)`` +
``reference.paint(..., seed=S)`` reproduce the image. Every result depends on its line only
(engine rows are independent, each image is painted alone with its own seed), so output does not
depend on batch size, order or sharding.

Resume: an entry counts as done when its PNG's sha256 matches the manifest and its caption and
parameters are the line's current ones (an edited line is redone). A torn or unreadable
manifest line is dropped (its image is redone). A run whose settings differ from
``settings.json`` is refused, naming them, while ``DIR`` holds images; ``--overwrite`` deletes
the earlier run's images and manifests and starts over. A run holds an exclusive ``flock`` on
``DIR/.xlx-fast.lock`` (taken by rank 0 for all ranks), so a second run into the same ``DIR`` is
refused while the first works.

Scale-out: under ``torchrun`` (or any launch that sets ``RANK``/``WORLD_SIZE``) rank 0 takes the
lock, checks and merges what is there and sends every rank the pending lines; rank r takes those
with index ``i % WORLD_SIZE == r``, uses ``cuda:LOCAL_RANK`` when the device is CUDA, writes
``manifest.rank{r}.jsonl`` (whole lines, flushed and synced once per engine step); after a
barrier (``torch.distributed``, gloo) rank 0 merges every shard into ``manifest.jsonl`` (written
to a temporary file and renamed).
"""
from __future__ import annotations

import codecs
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import time

from ..archs import DEFAULT_ARCH
from ..grid import GRID, N_CELLS
from ..sampling_params import check_temperature
from ..strategies import NAMES, check_steps
from . import UserError
from .generation_options import (blank, check_model, check_sampling, engine_seed,
                                 long_caption_note, model_description, noise_note)
from .model_args import n_cells
from .paths import check_input, check_output_dir

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
LOCK = ".xlx-fast.lock"
# engine buffers grow with the slots; past this no device runs faster, and an allocation that
# fails would only do so after the model is built
MAX_BATCH = 1024
_KEY = ("caption", "seed", "steps", "strategy", "temperature")
_LINE_KEYS = {"caption", "seed", "steps", "strategy", "temperature"}
_MODEL_FILES = ("checkpoint", "centroids", "generator", "vocab")
_IMAGE = re.compile(r"\d{6,}\.png")
_PARTIAL = re.compile(r"\.\d{6,}\.png\.tmp")
_SHARD = re.compile(r"manifest\.rank\d+\.jsonl")


class BulkError(UserError):
    """A user error in the captions file, the bulk options or the out-dir (one line for the CLI)."""


def add_arguments(p) -> None:
    p.add_argument("--captions-file", metavar="FILE",
                   help="bulk mode: one caption (or JSON object) per line; needs --out-dir")
    p.add_argument("--out-dir", metavar="DIR", help="bulk mode: where the PNGs and manifest.jsonl go")
    p.add_argument("--batch-size", type=int, default=8,
                   help=f"bulk mode: engine slots (rows generated together), 1 to {MAX_BATCH}, default 8")
    p.add_argument("--overwrite", action="store_true",
                   help="bulk mode: delete the images and manifests an earlier run left in --out-dir "
                        "and start over (a resume with other settings is refused without it)")


def read_lines(path: str, base_seed: int, *, strategy: str = "mask_predict", steps: int | None = None,
               temperature: float = 0.0, cells: int = N_CELLS) -> tuple[list[dict], list[int]]:
    """Parse the captions file into (items, blank line numbers); the options are the defaults of
    a line that does not set its own, ``cells`` the grid's (the step limit of confidence/tlbr).
    Raises BulkError naming the line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BulkError(f"cannot read --captions-file {path}: {e.strerror}") from None
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()  # the newline that ends the last line opens no line
    if raw and raw[0].startswith(codecs.BOM_UTF8):
        raw[0] = raw[0][len(codecs.BOM_UTF8):]
    items, skipped = [], []
    for n, line in enumerate(raw, start=1):
        where = f"{path}:{n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BulkError(f"{where}: not UTF-8 text (byte {line[e.start:e.start + 1]!r} at column "
                            f"{e.start + 1})") from None
        if text.endswith("\r"):
            text = text[:-1]  # a CRLF line end
        if blank(text):
            skipped.append(n)
            continue
        text = text.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BulkError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise BulkError(f"{where}: not a JSON object")
            unknown = set(obj) - _LINE_KEYS
            if unknown:
                raise BulkError(f"{where}: unknown key(s) {sorted(unknown)}")
            caption = obj.get("caption")
            if not isinstance(caption, str) or blank(caption):
                raise BulkError(f"{where}: 'caption' must be a non-blank string")
            caption = caption.strip()
        else:
            obj, caption = {}, text
        given = obj.get("seed", base_seed + n)
        if isinstance(given, bool) or not isinstance(given, int):
            raise BulkError(f"{where}: 'seed' must be an integer")
        strat = obj.get("strategy", strategy)
        if strat not in NAMES:
            raise BulkError(f"{where}: 'strategy' must be one of {', '.join(NAMES)}")
        k = obj.get("steps", steps)
        if "steps" in obj and (isinstance(k, bool) or not isinstance(k, int)):
            raise BulkError(f"{where}: 'steps' must be an integer")
        source = "'steps'" if "steps" in obj else "--steps"
        try:
            k = check_steps(strat, k, cells, what=f"{where}: {source} {k} with strategy {strat}:")
        except ValueError as e:
            raise BulkError(str(e)) from None
        try:
            temp = check_temperature(obj.get("temperature", temperature), f"{where}: 'temperature'")
        except (TypeError, ValueError) as e:
            raise BulkError(str(e)) from None
        item = dict(line=n, caption=caption, seed=engine_seed(given), steps=k, strategy=strat,
                    temperature=float(temp))
        if item["seed"] != given:
            item["given_seed"] = given
        items.append(item)
    if not items:
        raise BulkError(f"--captions-file {path} has no captions")
    return items, skipped


# --- the out-dir: lock, settings, manifests ---------------------------------------------------

def _lock(out_dir: str) -> int:
    """An exclusive flock on DIR/.xlx-fast.lock, held (by rank 0, for every rank) until the run
    ends; the kernel drops it when the process dies, so a crash leaves no stale lock."""
    path = os.path.join(out_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise BulkError(f"--out-dir {out_dir} is in use by another run (process {holder or '?'}); wait "
                        "for it to finish, or choose another --out-dir") from None
    except OSError as e:
        os.close(fd)
        raise BulkError(f"--out-dir {out_dir}: cannot lock {path} ({e.strerror})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _file_sha256(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, "vocab.txt")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def settings(args) -> dict:
    """What the images depend on besides their lines: not the batch size, the sharding or the
    device index, but the device type (kernels, and so rounding, differ between cpu and cuda)."""
    out = dict(seed=args.seed, steps=args.steps, strategy=args.strategy, temperature=args.temperature,
               arch=getattr(args, "arch", DEFAULT_ARCH), size=args.size, grid=args.grid,
               dtype=args.dtype, device=args.device.split(":")[0])
    for option in _MODEL_FILES:
        path = getattr(args, option)
        out[option] = None if path is None else _file_sha256(path)
    return out


def _differences(there: dict, here: dict) -> list[str]:
    def show(key, value):
        if key in _MODEL_FILES:
            return "none" if value is None else f"sha256 {value[:12]}"
        return "default" if value is None else str(value)

    out = []
    for key in sorted(set(there) | set(here)):
        if there.get(key) != here.get(key):
            out.append(f"--{key} {show(key, here.get(key))} (there: {show(key, there.get(key))})")
    return out


def _read_settings(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, SETTINGS), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _valid_entry(e) -> bool:
    return (isinstance(e, dict) and isinstance(e.get("line"), int) and not isinstance(e["line"], bool)
            and e.get("file") == f"{e['line']:06d}.png" and isinstance(e.get("sha256"), str)
            and all(k in e for k in _KEY))


def _parse_manifest(path: str, notes: list[str]) -> list[dict]:
    """The entries of one manifest file, in order. A last line without its newline is an
    interrupted write: dropped, like any line that is not a whole entry (their images are
    redone), so nothing is ever appended to a fragment."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    parts = data.split(b"\n")
    name = os.path.basename(path)
    if parts.pop().strip():
        notes.append(f"{name}: dropped a torn last line (an interrupted write); its image is redone")
    out, bad = [], 0
    for part in parts:
        if not part.strip():
            continue
        try:
            e = json.loads(part)
        except ValueError:
            e = None
        if _valid_entry(e):
            out.append(e)
        else:
            bad += 1
    if bad:
        notes.append(f"{name}: dropped {bad} unreadable line(s); their images are redone")
    return out


def _shards(out_dir: str) -> list[str]:
    return sorted((n for n in os.listdir(out_dir) if _SHARD.fullmatch(n)),
                  key=lambda n: int(n[len("manifest.rank"):-len(".jsonl")]))


def _entries(out_dir: str, notes: list[str]) -> list[dict]:
    """Every entry of the merged manifest, then of each rank's shard (later ones win)."""
    out = _parse_manifest(os.path.join(out_dir, MANIFEST), notes)
    for name in _shards(out_dir):
        out += _parse_manifest(os.path.join(out_dir, name), notes)
    return out


def _png_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _merge(out_dir: str, entries: list[dict]) -> dict[int, dict]:
    """Write ``entries`` (the last per line wins) as manifest.jsonl, sorted by line, and remove
    the shards they came from."""
    by_line = {}
    for e in entries:
        by_line[e["line"]] = e
    _write_atomic(os.path.join(out_dir, MANIFEST),
                  "".join(json.dumps(by_line[n]) + "\n" for n in sorted(by_line)))
    for name in _shards(out_dir):
        os.remove(os.path.join(out_dir, name))
    return by_line


def _clear(out_dir: str) -> int:
    """--overwrite: remove what a run writes (and nothing else); returns the images removed."""
    images = 0
    for name in os.listdir(out_dir):
        if _IMAGE.fullmatch(name) or _PARTIAL.fullmatch(name) or _SHARD.fullmatch(name) \
                or name in (MANIFEST, SETTINGS, MANIFEST + ".tmp", SETTINGS + ".tmp"):
            os.remove(os.path.join(out_dir, name))
            images += bool(_IMAGE.fullmatch(name))
    return images


def _prepare(args, items: list[dict]) -> tuple[int, dict[int, dict], list[str]]:
    """Rank 0, before any model: lock DIR, check the settings, verify and merge what earlier
    runs left. Returns (the lock's fd, the verified entries by line, notes to print)."""
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    fd = _lock(out_dir)
    try:
        notes = []
        if args.overwrite:
            removed = _clear(out_dir)
            if removed:
                notes.append(f"--overwrite: removed {removed} image(s) of an earlier run")
        here = settings(args)
        entries = _entries(out_dir, notes)
        if entries:
            there = _read_settings(out_dir)
            if there is not None:
                there.setdefault("grid", GRID)  # written before the grid was recorded: 8×8
                there.setdefault("arch", DEFAULT_ARCH)  # before the arch was: X-LXMERT
            if there is None:
                raise BulkError(f"--out-dir {out_dir} holds a manifest without its {SETTINGS} (the "
                                "settings that made the images); pass --overwrite to delete them and "
                                "start over, or choose another --out-dir")
            diff = _differences(there, here)
            if diff:
                raise BulkError(f"--out-dir {out_dir} holds images made with other settings: "
                                f"{', '.join(diff)}; rerun with those, or pass --overwrite to delete "
                                "them and start over")
        verified, failed = [], set()
        for e in entries:
            if _png_sha256(os.path.join(out_dir, e["file"])) == e["sha256"]:
                verified.append(e)
            else:
                failed.add(e["line"])
        valid = _merge(out_dir, verified)
        failed -= set(valid)
        if failed:
            names = ", ".join(f"{n:06d}.png" for n in sorted(failed)[:5])
            notes.append(f"{len(failed)} image(s) in the manifest missing or not matching their "
                         f"sha256 ({names}{', ...' if len(failed) > 5 else ''}); they are redone")
        if _read_settings(out_dir) != here:
            _write_atomic(os.path.join(out_dir, SETTINGS), json.dumps(here, indent=1, sort_keys=True) + "\n")
        for name in os.listdir(out_dir):
            if _PARTIAL.fullmatch(name):
                os.remove(os.path.join(out_dir, name))
        return fd, valid, notes
    except BaseException:
        os.close(fd)
        raise


def _matches(entry: dict | None, item: dict) -> bool:
    return entry is not None and all(entry[k] == item[k] for k in _KEY)


def _save_png(out_dir: str, name: str, pixels) -> str:
    """Write the PNG whole or not at all (temporary file, fsync, rename); returns its sha256."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = buf.getvalue()
    # one rank owns each line and the run holds the lock: a fixed temporary name cannot clash
    tmp = os.path.join(out_dir, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, name))
    return hashlib.sha256(data).hexdigest()


def _dist():
    """(rank, world, local_rank) from the torch.distributed launch variables (1 process: 0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def check(args) -> tuple[list[dict], list[int], object]:
    """Every check that needs no model (and no torch): (items, blank lines, tokenizer)."""
    if not args.out_dir:
        raise BulkError("--captions-file needs --out-dir")
    if args.captions:
        raise BulkError("give captions on the command line or --captions-file, not both")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise BulkError(f"--batch-size {args.batch_size}: must be between 1 and {MAX_BATCH}")
    if args.impl != "fast":
        raise BulkError("--impl reference is for single captions: bulk mode runs the engine "
                        "(the fast sampler)")
    check_sampling(args)
    check_input(args.captions_file, "--captions-file")
    check_output_dir(args.out_dir, "--out-dir")
    tokenizer = check_model(args)
    items, skipped = read_lines(args.captions_file, args.seed, strategy=args.strategy, steps=args.steps,
                                temperature=args.temperature, cells=n_cells(args))
    return items, skipped, tokenizer


def _skipped_note(skipped: list[int]) -> str:
    if not skipped:
        return ""
    lines = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
    return f"; {len(skipped)} blank line(s) skipped (line {lines})"


def run(args, load_model) -> int:
    """The bulk subcommand. ``load_model(args)`` -> model."""
    items, skipped, tokenizer = check(args)
    rank, world, local = _dist()
    dist = None
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    fd = None
    try:
        state, failure = None, None
        if rank == 0:
            try:
                fd, valid, notes = _prepare(args, items)
                state = dict(todo=[it["line"] for it in items if not _matches(valid.get(it["line"]), it)],
                             notes=notes)
            except Exception as e:  # every rank must hear of it, or the others wait forever
                failure = e
                state = dict(error=str(e) if isinstance(e, UserError) else
                             f"rank 0 failed to prepare --out-dir {args.out_dir}: {type(e).__name__}: {e}")
        if dist is not None:
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if failure is not None and not isinstance(failure, UserError):
            raise failure
        if "error" in state:
            raise BulkError(state["error"])
        if rank == 0:
            for note in state["notes"]:
                print(f"note: {note}", file=sys.stderr)
        pending = set(state["todo"])
        todo = [it for it in items if it["line"] in pending]
        if not todo:
            if rank == 0:
                print(f"all {len(items)} images are already in {os.path.join(args.out_dir, MANIFEST)}, "
                      f"nothing to do{_skipped_note(skipped)}", file=sys.stderr)
            return 0
        mine = todo[rank::world]
        if rank == 0:
            print(f"{len(todo)} of {len(items)} images to make ({len(items) - len(todo)} already there)",
                  file=sys.stderr, flush=True)
            hashed = [it for it in todo if "given_seed" in it]
            if hashed:
                first = hashed[0]
                print(f"note: {len(hashed)} seed(s) outside [0, 2**31) hashed into it as single mode does "
                      f"(line {first['line']}: {first['given_seed']} -> {first['seed']}); the manifest "
                      "holds the seed used, and the one given as given_seed", file=sys.stderr)
            noise_note(tokenizer)
            long_caption_note(tokenizer, [it["caption"] for it in todo],
                              [f"line {it['line']}" for it in todo])
        t0 = time.perf_counter()
        failed = _generate(args, load_model, tokenizer, mine, rank, world, local) if mine else []
        elapsed = time.perf_counter() - t0
        if dist is not None:
            dist.barrier()
        if rank == 0:
            merged = _merge(args.out_dir, _entries(args.out_dir, []))
            done = sum(_matches(merged.get(it["line"]), it) for it in items)
            print(f"{done} of {len(items)} images in {os.path.join(args.out_dir, MANIFEST)} "
                  f"({len(mine)} generated by rank 0 in {elapsed:.1f} s, {len(items) - len(todo)} already "
                  f"there{_skipped_note(skipped)})", file=sys.stderr)
        if dist is not None:
            dist.barrier()
        if failed:
            print(f"error: {len(failed)} line(s) got no image: {', '.join(map(str, failed[:10]))}"
                  f"{' ...' if len(failed) > 10 else ''} (the sampler flagged them; see above); "
                  "a rerun retries them", file=sys.stderr)
            return 1
        return 0
    finally:
        if fd is not None:
            os.close(fd)
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _generate(args, load_model, tokenizer, mine: list[dict], rank: int, world: int, local: int) -> list[int]:
    """Make this rank's images, appending whole, synced lines to manifest.rank{rank}.jsonl.
    Returns the lines that got no image (rows the sampler flagged: NaN in the model's output)."""
    import torch

    from ..engine import Request
    from ..xuniter_engine import engine_class
    from ..models.painting import paint
    from ..text import MAX_LENGTH
    from .generation_options import device_for

    device = device_for(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    who = f"rank {rank}: " if world > 1 else ""
    print(f"{who}building the model ({model_description(args)}) ...", file=sys.stderr, flush=True)
    model = load_model(args).to(device=device, dtype=dtype).eval()
    import xlx_fast

    xlx_fast.freeze(model)  # built here, never edited: packed CPU GEMMs for every step
    # output does not depend on the slots, and a smaller engine warms up faster
    engine = engine_class(model)(model, slots=min(args.batch_size, len(mine)), max_length=MAX_LENGTH)
    print(f"{who}warming up ...", file=sys.stderr, flush=True)
    engine.warmup()

    from tqdm.auto import tqdm

    shard = os.path.join(args.out_dir, f"manifest.rank{rank}.jsonl")
    queue = list(mine)
    written, failed = 0, []
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
                                        temperature=it["temperature"], tag=it))
                engine.admit(reqs)
            lines = []
            for f in engine.step():
                it = f.request.tag
                if f.error is not None:  # no picture: said now, counted, retried by a rerun
                    failed.append(it["line"])
                    print(f"{who}error: line {it['line']}: {f.error}; no image written",
                          file=sys.stderr, flush=True)
                    continue
                codes = f.codes[None].to(device)
                # painted alone, noise seeded by the line's seed: independent of batching
                try:
                    image = paint(model, codes, seed=it["seed"])[0].float().cpu()
                except ValueError as e:  # e.g. a grid no generator paints yet (nothing is resized)
                    raise BulkError(f"--grid {args.grid}: {e}") from None
                pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                name = f"{it['line']:06d}.png"
                sha = _save_png(args.out_dir, name, pixels)
                lines.append(json.dumps(dict(it, file=name, sha256=sha, ids=f.ids.tolist())) + "\n")
            if not lines:
                continue
            manifest.write("".join(lines))
            manifest.flush()
            os.fsync(manifest.fileno())
            bar.update(len(lines))
            before, written = written, written + len(lines)
            # no terminal (a log, CI): a plain line per batch of images instead of a bar
            if bar.disable and (written // args.batch_size > before // args.batch_size or written == len(mine)):
                spent = time.perf_counter() - t0
                rate = written / spent if spent > 0 else float("inf")
                left = (len(mine) - written) / rate if rate > 0 else 0.0
                print(f"{who}[{written}/{len(mine)}] images written, {spent:.0f} s, {rate:.2f} images/s, "
                      f"about {left:.0f} s left", file=sys.stderr, flush=True)
    return failed
