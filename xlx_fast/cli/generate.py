"""``xlx-fast generate "a red bus on a street" -o out.png``: captions → images.

Every argument is checked before torch's heavier parts, transformers or a model are loaded
(``check_args``, well under a second), so a typo fails at once instead of after the ~10 s it
takes to build the model or after the whole run.
"""
from __future__ import annotations

import os
import sys
import time

from ..caption_io import DEFAULT_WORDS, MAX_WORDS
from ..grid import N_CELLS
from ..strategies import BY_NAME, MASK_PREDICT_STEPS, MAX_STEPS
from . import UserError
from .model_args import add_arch_argument, add_model_arguments, check_arch_options, choices_help
from .generation_options import (blank, check_model, check_sampling, device_for, engine_seed,
                                 long_caption_note, model_description, noise_note)
from .paths import check_output, makedirs_for

STRATEGIES = {name: s.describe(N_CELLS) for name, s in BY_NAME.items()}
IMPLS = {"fast": "xlx_fast.generate, the fused loop", "reference": "the authors' eager loop "
         "(--arch xuniter: xlx_fast.reference.xuniter's)"}


def add_parser(p) -> None:
    p.add_argument("captions", nargs="*", help="one or more captions (one image each; a blank one "
                   "is refused)")
    p.add_argument("-o", "--out", default="out.png",
                   help="output image (.png, .jpg, ...; .png is added when there is no extension); "
                        "with several captions NAME_0.EXT, NAME_1.EXT, ...")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps, 1 to {MAX_STEPS} (default: {MASK_PREDICT_STEPS} for "
                        f"mask_predict, one per cell (N² on --grid N, {N_CELLS} on 8×8) for the "
                        f"one-cell-per-step orders; confidence and tlbr allow at most N²)")
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
    p.add_argument("--save-ids", metavar="PATH",
                   help="also save the cluster ids as .npy [images, N²] on --grid N ([images, 64] "
                        "on 8×8; what `xlx-fast caption --cluster-ids` reads); written before "
                        "painting")
    p.add_argument("--caption-back", action="store_true",
                   help="also print the caption the model reads back from each picture it painted "
                        "(Mask-Predict over words with its masked-LM head; the checkpoint must "
                        "carry its pre-training heads cls.*, as the authors' does)")
    p.add_argument("--caption-length", type=int, default=DEFAULT_WORDS,
                   help=f"words of --caption-back's captions, 1..{MAX_WORDS} (default {DEFAULT_WORDS})")
    add_model_arguments(p)
    add_arch_argument(p)
    from . import bulk

    bulk.add_arguments(p)


def output_paths(out: str, n: int) -> list[str]:
    stem, ext = os.path.splitext(out)
    ext = ext or ".png"
    if n == 1:
        return [stem + ext]
    return [f"{stem}_{i}{ext}" for i in range(n)]




def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}








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
    if args.save_ids is not None:
        if not args.save_ids.endswith(".npy"):
            raise UserError(f"--save-ids {args.save_ids}: give a .npy file name")
        check_output(args.save_ids, "--save-ids")
    if not 1 <= args.caption_length <= MAX_WORDS:
        raise UserError(f"--caption-length {args.caption_length}: a caption has 1 to {MAX_WORDS} words")
    if args.caption_back and args.impl != "fast":
        raise UserError("--caption-back needs --impl fast")
    return tokenizer










def _tokenize(args, tokenizer):
    from xlx_fast.text import MAX_LENGTH

    long_caption_note(tokenizer, args.captions, [f"caption {i + 1}" for i in range(len(args.captions))])
    input_ids, attention_mask = tokenizer(args.captions, MAX_LENGTH)
    return tokenizer, input_ids, attention_mask




def load_model(args):
    """The model the options name: the seeded default of ``--arch``, or the X-LXMERT
    ``--checkpoint`` (an architecture without a loader was refused by ``check_arch_options``)."""
    from xlx_fast.models import XLxmertForImageGeneration, from_default
    from xlx_fast.models.checkpoint import CheckpointError

    heads = getattr(args, "caption_back", False)  # the masked-LM head reads the picture back
    if args.checkpoint is None:
        return from_default(args.arch, seed=0, size=args.size, pretraining_heads=heads, grid=args.grid)
    try:
        return XLxmertForImageGeneration.from_checkpoint(args.checkpoint, args.centroids, args.generator,
                                                         size=args.size, pretraining_heads=heads,
                                                         grid=args.grid)
    except (CheckpointError, OSError) as e:
        raise UserError(str(e)) from None


def run(args) -> int:
    check_arch_options(args, captions="--caption-back" if args.caption_back else None)
    if args.captions_file:
        if args.caption_back or args.save_ids:
            raise UserError("--caption-back and --save-ids are for captions given on the command "
                            "line, not --captions-file")
        from . import bulk

        return bulk.run(args, load_model)
    if not args.captions:
        raise UserError("give one or more captions, or --captions-file FILE --out-dir DIR")
    tokenizer = check_args(args)
    import torch

    device = device_for(args.device)
    seed = engine_seed(args.seed)
    if seed != args.seed:
        print(f"note: --seed {args.seed} is outside [0, 2**31); it is hashed to {seed} (pass "
              f"seed={seed} to reproduce this run from Python)", file=sys.stderr)
    t0 = time.perf_counter()
    tokenizer, input_ids, attention_mask = _tokenize(args, tokenizer)
    noise_note(tokenizer)

    from PIL import Image

    from xlx_fast import reference
    from xlx_fast.reference import xuniter  # noqa: F401 (reference.xuniter, for --arch xuniter)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"building the model ({model_description(args)}) ...", file=sys.stderr, flush=True)
    model = load_model(args)
    model = model.to(device=device, dtype=dtype)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if args.impl == "fast":
        import xlx_fast

        xlx_fast.freeze(model)  # built here, never edited: packed CPU GEMMs for every step
    t_built = time.perf_counter()
    print(f"sampling ({args.strategy}, {args.impl}) ...", file=sys.stderr, flush=True)
    # a step bar on a terminal; in a log its carriage-return updates are noise
    bar = sys.stderr.isatty()
    if args.impl == "fast":
        result = xlx_fast.generate(model, input_ids, attention_mask, steps=args.steps,
                                   strategy=args.strategy, temperature=args.temperature, seed=seed,
                                   progress=bar)
    else:
        # each architecture's own eager loop (X-UNITER's is in reference.xuniter)
        sampler = reference.xuniter.sample if args.arch == "xuniter" else reference.sample
        result = sampler(model, input_ids, attention_mask, steps=args.steps, strategy=args.strategy,
                         seed=seed, progress=bar)
    t_sampled = time.perf_counter()
    if args.save_ids is not None:  # before painting: the ids stand whether or not it succeeds
        import numpy as np

        makedirs_for(args.save_ids)
        np.save(args.save_ids, result.ids.cpu().numpy())
        print(f"wrote {args.save_ids}")
    print("painting ...", file=sys.stderr, flush=True)
    try:
        images = reference.paint(model, result.codes, seed=seed).float().cpu()
    except ValueError as e:  # e.g. a grid no generator paints yet (nothing is resized)
        raise UserError(f"--grid {args.grid}: {e}") from None

    for path, img in zip(output_paths(args.out, len(args.captions)), images):
        pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        try:
            makedirs_for(path)
            Image.fromarray(pixels).save(path)
        except OSError as e:
            raise UserError(f"-o {args.out}: could not write {path} ({e})") from None
        print(f"wrote {path}")
    if args.caption_back:
        # from the codes, not the ids: a cell no step decided (AR with fewer steps than cells)
        # reads mask_feat, as the picture's generator saw it
        back = xlx_fast.caption(model, features=result.codes, length=args.caption_length, seed=seed)
        for path, r in zip(output_paths(args.out, len(args.captions)), range(len(args.captions))):
            print(f"caption read back from {path}: {tokenizer.decode(back.tokens(r))}")
    t_end = time.perf_counter()
    print(f"done in {t_end - t0:.1f} s: model {t_built - t0:.1f} s, sampling {t_sampled - t_built:.1f} s, "
          f"painting {t_end - t_sampled:.1f} s", file=sys.stderr)
    return 0
