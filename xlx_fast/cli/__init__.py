"""The ``xlx-fast`` command line: one module per subcommand.

Each subcommand module defines ``add_parser(parser)`` (fills in its arguments) and
``run(args) -> int``. Only the module of the subcommand being run is imported, so
``xlx-fast generate`` does not pay for the benchmark machinery and vice versa.

User mistakes (a bad argument, a missing or unreadable file) raise :class:`UserError`; ``main``
prints it as one ``error: ...`` line on stderr and exits 2, argparse's convention. Anything else
keeps its traceback: it is a bug. Subcommands check their arguments before building a model.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "generate": ("xlx_fast.cli.generate", "paint images from captions"),
    "answer": ("xlx_fast.cli.answer", "answer a question about an image (VQA, GQA, NLVR2)"),
    "caption": ("xlx_fast.cli.caption", "write captions for images (Mask-Predict over words)"),
    "bench": ("xlx_fast.cli.bench", "benchmark xlx_fast against the eager reference"),
    "vocab": ("xlx_fast.cli.vocab", "fit or apply a visual vocabulary (k-means codebook)"),
    "info": ("xlx_fast.cli.info", "show what was built and what is usable here"),
    "serve": ("xlx_fast.cli.serve", "serve images over HTTP (Ray Serve, step-level batching)"),
    "bench-serve": ("xlx_fast.cli.bench_serve", "load-test the serving schedulers (latency under load)"),
    "train": ("xlx_fast.cli.train", "pre-train X-LXMERT, or fine-tune it for VQA/GQA/NLVR2 (torchrun for DDP)"),
    "eval": ("xlx_fast.cli.eval", "score answer predictions (VQA soft accuracy, GQA/NLVR2 accuracy)"),
}


class UserError(Exception):
    """A mistake in the command line or in the files it names: say what, which argument, and
    what to do. ``main`` prints ``error: <message>`` and exits 2, without a traceback."""


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported to declare its arguments."""
    parser = argparse.ArgumentParser(prog="xlx-fast", description="Fast X-LXMERT image generation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name == command:
            sub_parser = sub.add_parser(name, help=help_text, description=help_text)
            importlib.import_module(module_name).add_parser(sub_parser)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
