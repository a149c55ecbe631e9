"""The options single-caption and bulk generation share, and their checks: sampling
(``--steps``, ``--strategy``, ``--temperature``, ``--device``), the model files and vocabulary,
the seed rule, the blank-caption rule, and the notes both modes print. Every check raises
:class:`~xlx_fast.cli.UserError` before any model is built.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys

from ..sampling_params import check_temperature
from ..strategies import check_steps
from . import UserError
from .model_args import n_cells
from .paths import check_input

SEED_RANGE = 2 ** 31

def engine_seed(seed: int) -> int:
    """``--seed`` as the samplers take it: a seed in [0, 2**31) is used as is; any other integer
    is mapped into [0, 2**31) by BLAKE2b of its decimal digits (the first 8 bytes, little-endian,
    modulo 2**31), because the loop derives per-cell seeds by int64 arithmetic."""
    if 0 <= seed < SEED_RANGE:
        return seed
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_RANGE
def blank(caption: str) -> bool:
    """A caption with no text (empty or whitespace only): the server refuses it, single mode
    refuses it, bulk mode skips its line (the line number, and so the seeds, stay)."""
    return not caption.strip()
def check_sampling(args) -> None:
    """The sampling options (``--steps``, ``--strategy``, ``--temperature``, ``--impl``,
    ``--device``), checked the same way in both modes; raises :class:`UserError`. Step limits
    are the ``--grid``'s: confidence and tlbr decide each of its N² cells at most once."""
    cells = n_cells(args)
    try:
        check_steps(args.strategy, args.steps, cells, what=f"--steps {args.steps}:")
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        check_temperature(args.temperature, f"--temperature {args.temperature}:")
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
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
    return tokenizer_for(args)
def device_for(name: str):
    import torch

    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA "
                            f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device
def tokenizer_for(args):
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
def model_description(args) -> str:
    what = "embedded default" if args.checkpoint is None else os.path.basename(args.checkpoint)
    arch = getattr(args, "arch", "xlxmert")
    if arch != "xlxmert":
        what += f" {arch}"
    return f"{what}, {args.size}, {args.grid}×{args.grid} grid, {args.dtype}, {args.device}"
