"""``xlx-fast info``: what was built (C++/CUDA kernels, archs) and what is usable here."""
from __future__ import annotations

import argparse
import json


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from xlx_fast import native

    if args.json:
        print(json.dumps(native.report(), indent=2))
    else:
        native.info()
    return 0
