"""``xlx-fast eval``: score answer predictions (VQA soft accuracy, GQA and NLVR2 accuracy).

    xlx-fast eval --task vqa --data questions.json --predictions preds.json [--out score.json]

Formats and metrics: :mod:`xlx_fast.evaluation`. A missing, unknown or repeated id, or a
malformed file, is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json

from . import UserError


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=["vqa", "gqa", "nlvr2"], help="the answer task")
    p.add_argument("--data", required=True, metavar="QUESTIONS_JSON",
                   help="the questions with their labels (a questions.json of the task's data format)")
    p.add_argument("--predictions", required=True, metavar="PREDICTIONS_JSON",
                   help='a JSON list of {"question_id": ..., "answer": ...} (NLVR2: {"uid" or '
                        '"identifier": ..., "label": 0|1})')
    p.add_argument("--out", metavar="SCORE_JSON", help="also write the score as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from xlx_fast.evaluation import evaluate_files

    from .paths import check_output

    if args.out is not None:
        check_output(args.out, "--out")
    try:
        result = evaluate_files(args.task, args.data, args.predictions)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    unit = "questions" if args.task != "nlvr2" else "examples"
    print(f"{args.task} {result['metric']}: {result['score']:.4f} ({100 * result['score']:.2f}%) over "
          f"{result['n']} {unit}")
    for kind, r in result.get("by_answer_type", {}).items():
        print(f"  {kind}: {r['score']:.4f} ({100 * r['score']:.2f}%) over {r['n']}")
    if args.out is not None:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0
