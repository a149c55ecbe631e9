"""``xlx-fast generate "a red bus on a street" -o out.png``: captions → images."""
from __future__ import annotations

import os
import sys
import time


def add_parser(p) -> None:
    p.add_argument("captions", nargs="*", help="one or more captions (one image each)")
    p.add_argument("-o", "--out", default="out.png",
                   help="output PNG; with several captions, NAME_0.png, NAME_1.png, ...")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 4 for mask_predict, 64 for the AR orders)")
    p.add_argument("--strategy", default="mask_predict",
                   choices=["mask_predict", "confidence", "tlbr", "random"])
    p.add_argument("--seed", type=int, default=0, help="seeds the random order and the generator noise")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--impl", default="fast", choices=["fast", "reference"],
                   help="fast: xlx_fast.generate; reference: the eager authors' loop")
    p.add_argument("--checkpoint", help="X-LXMERT state dict (e.g. Epoch20_LXRT.pth)")
    p.add_argument("--centroids", help="cluster centroids .npy [10000, 2048]")
    p.add_argument("--generator", help="generator state dict (e.g. G_60.pth)")
    p.add_argument("--vocab", help="BERT-base-uncased vocab.txt (or a directory holding it)")
    from xlx_fast import bulk

    bulk.add_arguments(p)


def output_paths(out: str, n: int) -> list[str]:
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext or '.png'}" for i in range(n)]


def load_model(args):
    from xlx_fast.models import XLxmertForImageGeneration

    if args.checkpoint is None:
        if args.centroids or args.generator:
            raise SystemExit("error: --centroids/--generator need --checkpoint")
        return XLxmertForImageGeneration.from_default(seed=0), False
    if args.centroids is None:
        raise SystemExit("error: --checkpoint needs --centroids (the cluster centroids .npy)")
    if args.generator is None:
        raise SystemExit("error: painting needs the generator checkpoint: pass --generator G_60.pth")
    return XLxmertForImageGeneration.from_checkpoint(args.checkpoint, args.centroids, args.generator), True


def run(args) -> int:
    if args.captions_file:
        from xlx_fast import bulk

        try:
            return bulk.run(args, load_model)
        except bulk.BulkError as e:
            raise SystemExit(f"error: {e}")
    if not args.captions:
        raise SystemExit("error: give one or more captions, or --captions-file FILE --out-dir DIR")
    import torch
    from PIL import Image

    from xlx_fast import reference
    from xlx_fast.text import load_tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")

    t0 = time.perf_counter()
    model, real = load_model(args)
    try:
        tokenizer = load_tokenizer(args.vocab, real_weights=real)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if tokenizer.is_fallback:
        print("note: embedded default model (random weights) with the built-in fallback "
              "tokenizer: the pictures are noise; bring a checkpoint to paint for real",
              file=sys.stderr)
    model = model.to(device=device, dtype=dtype)
    input_ids, attention_mask = tokenizer(args.captions)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    if args.impl == "fast":
        import xlx_fast

        xlx_fast.optimize(model)
        result = xlx_fast.generate(model, input_ids, attention_mask, steps=args.steps,
                                   strategy=args.strategy, seed=args.seed, progress=True)
    else:
        result = reference.sample(model, input_ids, attention_mask, steps=args.steps,
                                  strategy=args.strategy, seed=args.seed, progress=True)
    images = reference.paint(model, result.codes, seed=args.seed).float().cpu()

    for path, img in zip(output_paths(args.out, len(args.captions)), images):
        pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(pixels).save(path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
