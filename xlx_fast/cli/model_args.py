"""The options that say which model to run and where, shared by the subcommands that build one
(``generate``, ``serve``, ``bench-serve``; ``caption`` adds ``--grid`` alone): the checkpoint
files, the embedded default's size, the model's grid, the device and the compute precision; and
``--arch`` (``generate``, ``serve``), the architecture, from :data:`xlx_fast.archs.ARCHS`."""
from __future__ import annotations

from ..archs import ARCHS, DEFAULT_ARCH
from ..grid import GRID
from . import UserError

DTYPES = {"fp32": "float32 (the reference's precision)", "bf16": "bfloat16 weights and activations",
          "fp16": "float16 weights and activations"}
GRIDS = (8, 16, 32)  # the N×N grids the model and the tests cover (grid.MAX_GRID is the largest)
SIZES = {"base": "the X-LXMERT architecture", "tiny": "the same code at test size (small layers, "
         "97 clusters, 32x32 images), for quick checks of a setup"}


def choices_help(what: str, choices: dict, default: str) -> str:
    """Help text that says what each choice means."""
    return f"{what} (default {default}): " + "; ".join(f"{k}: {v}" for k, v in choices.items())


def add_arch_argument(p) -> None:
    """``--arch NAME``: the image-generation architecture (:data:`xlx_fast.archs.ARCHS`)."""
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHS),
                   help=choices_help("the model's architecture",
                                     {name: a.description for name, a in ARCHS.items()}, DEFAULT_ARCH))


def check_arch_options(args, *, captions: str | None = None) -> None:
    """``--arch`` against the other options, before torch is imported: an architecture without
    a checkpoint loader builds its seeded default only, and one the caption engine does not run
    on refuses ``captions`` (the name of the option that asks for captions, when it is set).
    Raises :class:`UserError`."""
    arch = ARCHS[args.arch]
    if not arch.loads_checkpoints and args.checkpoint is not None:
        raise UserError(f"--arch {arch.name} builds its seeded default: there is no {arch.name} "
                        "checkpoint loader (--checkpoint is an X-LXMERT state dict)")
    if captions is not None and not arch.captions:
        raise UserError(f"{captions} reads pictures back with X-LXMERT's masked-LM head and caption "
                        f"engine, which --arch {arch.name} does not have; leave {captions} out")


def add_grid_argument(p) -> None:
    """``--grid N``: the model's N×N grid of cells (a model property; no weight depends on it)."""
    p.add_argument("--grid", type=int, default=GRID, choices=GRIDS,
                   help=f"the model's N×N grid of visual cells (default {GRID}: the paper's 8×8, "
                        "64 cells; 16 and 32 are the finer grids of 256 and 1,024 cells). Cluster "
                        "ids are N² a picture, and confidence/tlbr take at most N² steps")


def n_cells(args) -> int:
    """The cells of the grid the options ask for (N²), for the checks made before any model."""
    return args.grid * args.grid


def add_model_arguments(p, *, device_help: str = "cpu or cuda[:N] (default cpu)") -> None:
    p.add_argument("--checkpoint", help="X-LXMERT state dict (e.g. Epoch20_LXRT.pth); default: "
                   "the embedded default model (random weights, noise pictures)")
    p.add_argument("--centroids", help="cluster centroids .npy [10000, 2048]")
    p.add_argument("--generator", help="generator state dict (e.g. G_60.pth)")
    p.add_argument("--vocab", help="BERT-base-uncased vocab.txt (or a directory holding it)")
    p.add_argument("--size", default="base", choices=list(SIZES),
                   help=choices_help("model architecture", SIZES, "base"))
    add_grid_argument(p)
    p.add_argument("--device", default="cpu", help=device_help)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help=choices_help("compute precision", DTYPES, "fp32"))
