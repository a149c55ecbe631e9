"""``xlx-fast generate "a red bus on a street" -o out.png``: captions → images.

Every argument is checked before torch's heavier parts, transformers or a model are loaded
(``check_args``, well under a second), so a typo fails at once instead of after the ~10 s it
takes to build the model or after the whole run.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import time

from ..grid import N_CELLS
from ..strategies import BY_NAME, MASK_PREDICT_STEPS, MAX_STEPS, check_steps
from . import UserError
from .model_args import add_model_arguments, choices_help
from .paths import check_input, check_output, makedirs_for

SEED_RANGE = 2 ** 31

STRATEGIES = {name: s.describe(N_CELLS) for name, s in BY_NAME.items()}
IMPLS = {"fast": "xlx_fast.generate, the fused loop", "reference": "the authors' eager loop"}


def add_parser(p) -> None:
    p.add_argument("captions", nargs="*", help="one or more captions (one image each; a blank one "
                   "is refused)")
    p.add_argument("-o", "--out", default="out.png",
                   help="output image (.png, .jpg, ...; .png is added when there is no extension); "
                        "with several captions NAME_0.EXT, NAME_1.EXT, ...")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps, 1 to {MAX_STEPS} (default: {MASK_PREDICT_STEPS} for "
                        f"mask_predict, {N_CELLS} for the one-cell-per-step orders; confidence and "
                        f"tlbr allow at most {N_CELLS})")
    p.add_argument("--strategy", default="mask_predict", choices=list(STRATEGIES),
                   help=choices_help("which cells each step decides", STRATEGIES, "mask_predict"))
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): each cell takes its most probable id, as the reference does; "
                        "> 0: sample from softmax(logits / temperature), seeded (fast impl only)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the random order, the temperature sampling and the generator noise; "
                        "any integer (outside [0, 2**31) it is hashed into that range, see the note "
                        "it prints); bulk mode: line n's default seed is --seed + n")
    p.add_argument("--impl", default="fast", choices=list(IMPLS),
                   help=choices_help("which sampler runs", IMPLS, "fast"))
    add_model_arguments(p)
    from xlx_fast import bulk

    bulk.add_arguments(p)


def output_paths(out: str, n: int) -> list[str]:
    stem, ext = os.path.splitext(out)
    ext = ext or ".png"
    if n == 1:
        return [stem + ext]
    return [f"{stem}_{i}{ext}" for i in range(n)]


def engine_seed(seed: int) -> int:
    """``--seed`` as the samplers take it: a seed in [0, 2**31) is used as is; any other integer
    is mapped into [0, 2**31) by BLAKE2b of its decimal digits (the first 8 bytes, little-endian,
    modulo 2**31), because the loop derives per-cell seeds by int64 arithmetic."""
    if 0 <= seed < SEED_RANGE:
        return seed
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_RANGE


def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def blank(caption: str) -> bool:
    """A caption with no text (empty or whitespace only): the server refuses it, single mode
    refuses it, bulk mode skips its line (the line number, and so the seeds, stay)."""
    return not caption.strip()


def check_sampling(args) -> None:
    """The sampling options (``--steps``, ``--strategy``, ``--temperature``, ``--impl``,
    ``--device``), checked the same way in both modes; raises :class:`UserError`."""
    try:
        check_steps(args.strategy, args.steps, N_CELLS, what=f"--steps {args.steps}:")
    except ValueError as e:
        raise UserError(str(e)) from None
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be a finite number >= 0")
    if args.temperature > 0 and args.impl == "reference":
        raise UserError("--temperature > 0 needs --impl fast: the reference sampler is greedy")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UserError(f"--device {args.device}: use cpu, cuda or cuda:N")


def check_model(args):
    """The model options: the checkpoint files exist and look like what they should be, the
    vocabulary reads. Returns the caption tokenizer."""
    if args.checkpoint is None:
        if args.centroids or args.generator:
            raise UserError("--centroids/--generator need --checkpoint (the X-LXMERT state dict)")
    else:
        if args.centroids is None:
            raise UserError("--checkpoint needs --centroids (the cluster centroids .npy)")
        if args.generator is None:
            raise UserError("painting needs the generator checkpoint: pass --generator G_60.pth")
        if args.vocab is None:
            raise UserError("a real checkpoint needs the vocabulary it was trained with: give the "
                            "BERT-base-uncased vocab.txt (or a folder holding it) with --vocab")
        for option, path in (("--checkpoint", args.checkpoint), ("--centroids", args.centroids),
                             ("--generator", args.generator)):
            check_input(path, option)
            # the first bytes tell a text file or an empty one at once; damage further in is
            # found when the file is loaded
            with open(path, "rb") as f:
                head = f.read(6)
            if option == "--centroids" and head != b"\x93NUMPY":
                raise UserError(f"--centroids {path}: not a .npy file (it starts with {head!r}); "
                                "save the [clusters, dim] array with numpy.save")
            if option != "--centroids" and not head.startswith((b"PK\x03\x04", b"\x80")):
                raise UserError(f"{option} {path}: not a PyTorch checkpoint (it starts with {head!r}, "
                                "not a torch.save zip archive or pickle)")
    if args.vocab is not None:
        check_input(args.vocab, "--vocab", directory_ok=True)
    return _tokenizer(args)


def check_args(args):
    """Every check of single-caption mode that needs no model: raises :class:`UserError` naming
    the argument. Returns the caption tokenizer (reading the vocabulary is one of the checks)."""
    for i, caption in enumerate(args.captions):
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"caption {i + 1} is not valid text: it holds undecodable bytes at "
                            f"character {e.start} ({caption[e.start:e.end]!r}); pass UTF-8 text") from None
        if blank(caption):
            raise UserError(f"caption {i + 1} is blank; give some text to paint")
    check_sampling(args)
    tokenizer = check_model(args)

    if os.path.isdir(args.out):  # before a default extension turns it into a file name
        raise UserError(f"-o {args.out} is a directory; give a file name, e.g. "
                        f"{os.path.join(args.out, 'out.png')}")
    paths = output_paths(args.out, len(args.captions))
    ext = os.path.splitext(paths[0])[1].lower()
    known = _image_extensions()
    if ext not in known:
        raise UserError(f"-o {args.out}: unknown image extension {ext!r}; use one of "
                        f"{', '.join(e for e in ('.png', '.jpg', '.webp', '.bmp', '.tif') if e in known)}")
    for path in paths:
        check_output(path, "-o")
    return tokenizer


def _device(name: str):
    import torch

    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA "
                            f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def _tokenizer(args):
    """The caption tokenizer (a vocabulary file is read and checked here, without torch)."""
    from xlx_fast.text import CaptionTokenizer

    if args.vocab is None:
        return CaptionTokenizer.fallback()
    try:
        return CaptionTokenizer.from_vocab(args.vocab)
    except (OSError, ValueError) as e:
        raise UserError(f"--vocab {args.vocab}: {e}") from None


def long_caption_note(tokenizer, captions, names) -> None:
    """A note naming the captions the model cannot read whole (``names[i]`` says which)."""
    from xlx_fast.text import MAX_LENGTH

    long = [(name, n) for name, n in zip(names, tokenizer.token_counts(captions)) if n > MAX_LENGTH]
    if long:
        which = ", ".join(f"{name} ({n} tokens)" for name, n in long[:10])
        more = f" and {len(long) - 10} more" if len(long) > 10 else ""
        print(f"note: the model reads {MAX_LENGTH} tokens ([CLS], {MAX_LENGTH - 2} words or "
              f"word pieces, [SEP]); cut: {which}{more}", file=sys.stderr)


def noise_note(tokenizer) -> None:
    if tokenizer.is_fallback:
        print("note: embedded default model (random weights) with the built-in fallback "
              "tokenizer: the pictures are noise; bring a checkpoint to paint for real",
              file=sys.stderr)


def _tokenize(args, tokenizer):
    from xlx_fast.text import MAX_LENGTH

    long_caption_note(tokenizer, args.captions, [f"caption {i + 1}" for i in range(len(args.captions))])
    input_ids, attention_mask = tokenizer(args.captions, MAX_LENGTH)
    return tokenizer, input_ids, attention_mask


def model_description(args) -> str:
    what = "embedded default" if args.checkpoint is None else os.path.basename(args.checkpoint)
    return f"{what}, {args.size}, {args.dtype}, {args.device}"


def load_model(args):
    from xlx_fast.models import XLxmertForImageGeneration
    from xlx_fast.models.checkpoint import CheckpointError

    if args.checkpoint is None:
        return XLxmertForImageGeneration.from_default(seed=0, size=args.size)
    try:
        return XLxmertForImageGeneration.from_checkpoint(args.checkpoint, args.centroids, args.generator,
                                                         size=args.size)
    except (CheckpointError, OSError) as e:
        raise UserError(str(e)) from None


def run(args) -> int:
    if args.captions_file:
        from xlx_fast import bulk

        return bulk.run(args, load_model)
    if not args.captions:
        raise UserError("give one or more captions, or --captions-file FILE --out-dir DIR")
    tokenizer = check_args(args)
    import torch

    device = _device(args.device)
    seed = engine_seed(args.seed)
    if seed != args.seed:
        print(f"note: --seed {args.seed} is outside [0, 2**31); it is hashed to {seed} (pass "
              f"seed={seed} to reproduce this run from Python)", file=sys.stderr)
    t0 = time.perf_counter()
    tokenizer, input_ids, attention_mask = _tokenize(args, tokenizer)
    noise_note(tokenizer)

    from PIL import Image

    from xlx_fast import reference

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"building the model ({model_description(args)}) ...", file=sys.stderr, flush=True)
    model = load_model(args)
    model = model.to(device=device, dtype=dtype)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if args.impl == "fast":
        import xlx_fast

        xlx_fast.optimize(model)
    t_built = time.perf_counter()
    print(f"sampling ({args.strategy}, {args.impl}) ...", file=sys.stderr, flush=True)
    # a step bar on a terminal; in a log its carriage-return updates are noise
    bar = sys.stderr.isatty()
    if args.impl == "fast":
        result = xlx_fast.generate(model, input_ids, attention_mask, steps=args.steps,
                                   strategy=args.strategy, temperature=args.temperature, seed=seed,
                                   progress=bar)
    else:
        result = reference.sample(model, input_ids, attention_mask, steps=args.steps,
                                  strategy=args.strategy, seed=seed, progress=bar)
    t_sampled = time.perf_counter()
    print("painting ...", file=sys.stderr, flush=True)
    images = reference.paint(model, result.codes, seed=seed).float().cpu()

    for path, img in zip(output_paths(args.out, len(args.captions)), images):
        pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        try:
            makedirs_for(path)
            Image.fromarray(pixels).save(path)
        except OSError as e:
            raise UserError(f"-o {args.out}: could not write {path} ({e})") from None
        print(f"wrote {path}")
    t_end = time.perf_counter()
    print(f"done in {t_end - t0:.1f} s: model {t_built - t0:.1f} s, sampling {t_sampled - t_built:.1f} s, "
          f"painting {t_end - t_sampled:.1f} s", file=sys.stderr)
    return 0
