"""``xlx-fast caption --cluster-ids ids.npy``: images → captions, written by Mask-Predict over
words with the masked-LM head (:func:`xlx_fast.caption`).

    xlx-fast generate "a red bus" -o bus.png --save-ids bus_ids.npy  # or any [64] / [B, 64] ids
    xlx-fast caption --cluster-ids bus_ids.npy --length 8

An image is read on the model's grid (``--grid N``: N² ids a picture, 64 on the default 8×8), so
ids saved by ``generate --grid 16`` are read with ``caption --grid 16``.

Prints one caption per image (``--json``: ids, text and probabilities). The model is the one
``generate`` paints with, read with its pre-training heads (``cls.*``, present in the authors'
``Epoch20_LXRT.pth``); no generator is needed. Every argument and file is checked before the
model is built.
"""
from __future__ import annotations

import json
import sys
import time

from ..caption_io import DEFAULT_WORDS, MAX_WORDS
from ..grid import N_CELLS
from ..strategies import BY_NAME
from . import UserError
from .generation_options import check_sampling, device_for, engine_seed, model_description, tokenizer_for
from .image_files import codebook_shape, read_cluster_ids, read_features
from .model_args import DTYPES, SIZES, add_grid_argument, choices_help
from .paths import check_input

STRATEGIES = {name: s.describe(N_CELLS).replace("cells", "words").replace("cell", "word")
              for name, s in BY_NAME.items()}
IMPLS = {"fast": "xlx_fast.caption, on the step-level engine", "reference": "the eager loop"}


def add_parser(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cluster-ids", help="cluster ids .npy: [n], [N, N] or [images, n], n = N² "
                     "on --grid N (64 on 8×8; e.g. what generate painted)")
    src.add_argument("--features", help="grid features .npy: [n, F] or [images, n, F]")
    p.add_argument("--length", type=int, default=DEFAULT_WORDS,
                   help=f"words per caption, 1..{MAX_WORDS} (default {DEFAULT_WORDS})")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 4 for mask_predict, one per word for the others)")
    p.add_argument("--strategy", default="mask_predict", choices=list(STRATEGIES),
                   help=choices_help("which words each step decides", STRATEGIES, "mask_predict"))
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): the most probable word; T > 0: sample from softmax(logits / T)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order and the sampling")
    p.add_argument("--impl", default="fast", choices=list(IMPLS),
                   help=choices_help("implementation", IMPLS, "fast"))
    p.add_argument("--json", action="store_true", help="print JSON: ids, text and probabilities")
    p.add_argument("--checkpoint", help="X-LXMERT state dict with its pre-training heads (e.g. "
                   "Epoch20_LXRT.pth); default: the embedded default model (random weights)")
    p.add_argument("--centroids", help="cluster centroids .npy [10000, 2048]")
    p.add_argument("--vocab", help="BERT-base-uncased vocab.txt (or a directory holding it)")
    p.add_argument("--size", default="base", choices=list(SIZES),
                   help=choices_help("model architecture", SIZES, "base"))
    add_grid_argument(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help=choices_help("compute precision", DTYPES, "fp32"))


def check_args(args):
    """Every check that needs no model; returns (images as numpy, kind, tokenizer)."""
    from ..models.sizes import SIZES as MODEL_SIZES

    if not 1 <= args.length <= MAX_WORDS:
        raise UserError(f"--length {args.length}: a caption has 1 to {MAX_WORDS} words (the model "
                        f"reads {MAX_WORDS + 2} tokens, [CLS] and [SEP] included)")
    check_sampling_for_words(args)
    if args.checkpoint is None and args.centroids:
        raise UserError("--centroids needs --checkpoint (the X-LXMERT state dict)")
    if args.checkpoint is not None:
        if args.centroids is None:
            raise UserError("--checkpoint needs --centroids (the cluster centroids .npy)")
        if args.vocab is None:
            raise UserError("a real checkpoint needs the vocabulary it was trained with: give the "
                            "BERT-base-uncased vocab.txt (or a folder holding it) with --vocab")
        check_input(args.checkpoint, "--checkpoint")
    if args.vocab is not None:
        check_input(args.vocab, "--vocab", directory_ok=True)
    tokenizer = tokenizer_for(args)
    n_clusters, feat_dim = codebook_shape(args, MODEL_SIZES)
    if args.cluster_ids is not None:
        return (read_cluster_ids(args.cluster_ids, "--cluster-ids", n_clusters, args.grid),
                "cluster_ids", tokenizer)
    return read_features(args.features, "--features", feat_dim, args.grid), "features", tokenizer


def check_sampling_for_words(args) -> None:
    """``check_sampling``'s rules, with the step limits of a caption of ``--length`` words."""
    from ..strategies import check_steps

    check_sampling(args)
    try:
        check_steps(args.strategy, args.steps, args.length,
                    what=f"--steps {args.steps} (a caption of {args.length} words):")
    except ValueError as e:
        raise UserError(str(e)) from None


def load_model(args):
    from xlx_fast.models import XLxmertForImageGeneration
    from xlx_fast.models.checkpoint import CheckpointError

    if args.checkpoint is None:
        # with its generator, though it paints nothing: the default's heads are drawn after the
        # generator's weights, so this is the very model `generate --caption-back` reads with
        return XLxmertForImageGeneration.from_default(seed=0, size=args.size, pretraining_heads=True,
                                                      grid=args.grid)
    try:
        return XLxmertForImageGeneration.from_checkpoint(args.checkpoint, args.centroids, size=args.size,
                                                         pretraining_heads=True, grid=args.grid)
    except (CheckpointError, OSError) as e:
        raise UserError(str(e)) from None


def run(args) -> int:
    images, kind, tokenizer = check_args(args)
    import torch

    device = device_for(args.device)
    seed = engine_seed(args.seed)
    t0 = time.perf_counter()
    print(f"building the model ({model_description(args)}) ...", file=sys.stderr, flush=True)
    model = load_model(args).to(device=device, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16",
                                                                      "fp16": "float16"}[args.dtype]))
    if tokenizer.is_fallback:
        print("note: embedded default model (random weights) and no vocabulary: the captions are "
              "noise, shown as word ids; bring a checkpoint and --vocab to read real ones",
              file=sys.stderr)
    t_built = time.perf_counter()
    image = torch.from_numpy(images).to(device)
    kwargs = {kind: image}
    print(f"captioning {image.shape[0]} image(s) ({args.strategy}, {args.impl}) ...", file=sys.stderr,
          flush=True)
    if args.impl == "fast":
        import xlx_fast

        xlx_fast.freeze(model)  # built here, never edited: packed CPU GEMMs for every step
        result = xlx_fast.caption(model, length=args.length, steps=args.steps, strategy=args.strategy,
                                  temperature=args.temperature, seed=seed,
                                  progress=sys.stderr.isatty(), **kwargs)
    else:
        if args.temperature > 0:
            raise UserError("--temperature > 0 needs --impl fast: the reference captioner is greedy")
        from xlx_fast.reference.caption import caption

        result = caption(model, length=args.length, steps=args.steps, strategy=args.strategy,
                         seed=seed, **kwargs)
    rows = []
    for r in range(image.shape[0]):
        tokens = result.tokens(r)
        rows.append({"ids": tokens, "text": tokenizer.decode(tokens),
                     "probs": [round(p, 6) for p in result.probs[r, :len(tokens)].tolist()]})
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(row["text"])
    t_end = time.perf_counter()
    print(f"done in {t_end - t0:.1f} s: model {t_built - t0:.1f} s, captioning {t_end - t_built:.1f} s",
          file=sys.stderr)
    return 0
