"""Scoring answer predictions: VQA soft accuracy, GQA and NLVR2 accuracy.

The questions are a ``questions.json`` in the format of :mod:`xlx_fast.training.task_data`
(the authors' ``data/{vqa,gqa,nlvr2}/*.json``); the predictions a JSON list, one entry per
question:

- VQA, GQA: ``{"question_id": ..., "answer": "..."}`` (GQA's submission keys ``questionId`` and
  ``prediction`` are read too);
- NLVR2: ``{"uid": ..., "label": 0 | 1}`` or ``{"identifier": ..., ...}``, the value under
  ``label`` or ``answer``: 0/1, true/false, or the strings "0"/"1"/"True"/"False".

Ids are matched by their text (``5`` and ``"5"`` are the same question). Every question must
have exactly one prediction and every prediction a question: a missing, unknown or repeated id
is an error naming it, never a silently smaller denominator.

Metrics (each example scores in [0, 1]; the result is their mean):

- VQA, with the annotators' answers (``"answers"``: ten strings, or the official annotation's
  ``[{"answer": ...}, ...]``): ``min(#annotators who gave the predicted answer / 3, 1)``. This
  is the simple form of the VQA metric, not the official one that averages that quantity over
  the ten leave-one-annotator-out subsets of nine (they differ when 1-3 annotators agree: 1/3 vs
  0.3, 2/3 vs 0.6, 1 vs 0.9). Answers are compared after lower-casing and collapsing white
  space; the official punctuation, article and number-word processing is not applied. Without
  ``"answers"``: the ``label`` score of the predicted answer (0 if absent), which is how the
  authors' evaluator scores (their ``label`` holds the official per-answer scores).
  Examples with an ``answer_type`` are also scored per type.
- GQA: exact match with the one answer in ``label`` (1 or 0).
- NLVR2: exact match with ``label`` (0 or 1).
"""
from __future__ import annotations

import json
import os

__all__ = ["METRICS", "evaluate", "evaluate_files", "read_json_list", "vqa_accuracy"]

METRICS = {"vqa": "VQA soft accuracy", "gqa": "accuracy", "nlvr2": "accuracy"}


def read_json_list(path, what: str) -> list:
    """A JSON list from ``path``; ``FileNotFoundError``/``ValueError`` naming ``what`` otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a JSON file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(obj, list):
        raise ValueError(f"{what} {path} must be a JSON list, got a {type(obj).__name__}")
    if not obj:
        raise ValueError(f"{what} {path} is empty")
    return obj


def _norm(answer: str) -> str:
    return " ".join(answer.lower().split())


def vqa_accuracy(answer: str, example: dict) -> float:
    """One VQA question's score for ``answer`` (see the module docstring)."""
    given = example.get("answers")
    if given is not None:
        given = [a.get("answer") if isinstance(a, dict) else a for a in given]
        agree = sum(1 for a in given if isinstance(a, str) and _norm(a) == _norm(answer))
        return min(agree / 3, 1.0)
    return float({_norm(a): s for a, s in example["label"].items()}.get(_norm(answer), 0.0))


def _nlvr2_value(v):
    """0 or 1 from a prediction's or example's label, or None."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v in (0, 1):
        return v
    if isinstance(v, str):
        return {"0": 0, "1": 1, "false": 0, "true": 1}.get(v.strip().lower())
    return None


def _id_key(items: list, keys: tuple[str, ...], what: str) -> str:
    """The id key every item of ``items`` carries (the first of ``keys`` that all do)."""
    for key in keys:
        if all(isinstance(it, dict) and key in it for it in items):
            return key
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not any(k in it for k in keys):
            raise ValueError(f"{what} entry {i} has no {' or '.join(repr(k) for k in keys)}: {it!r:.120}")
    raise ValueError(f"{what}: entries name themselves by different keys ({', '.join(keys)}); use one")


def _by_id(items: list, key: str, what: str) -> dict:
    out = {}
    for i, it in enumerate(items):
        ident = it[key]
        if not isinstance(ident, (str, int)) or isinstance(ident, bool):
            raise ValueError(f"{what} entry {i}: {key} must be a string or an integer, got {ident!r}")
        text = str(ident)
        if text in out:
            raise ValueError(f"{what}: {key} {ident!r} appears twice (entries {out[text][0]} and {i})")
        out[text] = (i, it)
    return out


def evaluate(task: str, examples: list, predictions: list) -> dict:
    """Score ``predictions`` against ``examples`` (both as read from their JSON lists).

    Returns ``{"task", "metric", "score", "n"}`` (``score`` in [0, 1]), plus
    ``"by_answer_type"`` for VQA examples that carry ``answer_type``. Raises ``ValueError`` naming
    the first missing, unknown or repeated id, or malformed entry."""
    if task not in METRICS:
        raise ValueError(f"task must be one of {sorted(METRICS)}, got {task!r}")
    if task == "nlvr2":
        id_keys, answer_keys = ("uid", "identifier"), ("label", "answer")
    else:
        id_keys, answer_keys = ("question_id", "questionId"), ("answer", "prediction")
    p_key = _id_key(predictions, id_keys, "predictions")
    q_key = p_key if task == "nlvr2" else _id_key(examples, id_keys, "questions")
    if task == "nlvr2" and not all(isinstance(e, dict) and p_key in e for e in examples):
        i = next(i for i, e in enumerate(examples) if not isinstance(e, dict) or p_key not in e)
        raise ValueError(f"the predictions name examples by {p_key!r} but questions entry {i} has none")
    questions = _by_id(examples, q_key, "questions")
    predicted = _by_id(predictions, p_key, "predictions")
    unknown = [k for k in predicted if k not in questions]
    if unknown:
        raise ValueError(f"{len(unknown)} prediction(s) name no question, the first: {p_key} "
                         f"{predicted[unknown[0]][1][p_key]!r}")
    missing = [k for k in questions if k not in predicted]
    if missing:
        raise ValueError(f"{len(missing)} of {len(questions)} questions have no prediction, the first: "
                         f"{q_key} {questions[missing[0]][1][q_key]!r}")

    total, by_type = 0.0, {}
    for ident, (i, ex) in questions.items():
        j, pred = predicted[ident]
        name = f"{q_key} {ex[q_key]!r}"
        answer_key = next((k for k in answer_keys if k in pred), None)
        if answer_key is None:
            raise ValueError(f"predictions entry {j} ({name}) has no {' or '.join(repr(k) for k in answer_keys)}")
        answer = pred[answer_key]
        if task == "nlvr2":
            value, truth = _nlvr2_value(answer), _nlvr2_value(ex.get("label"))
            if value is None:
                raise ValueError(f"predictions entry {j} ({name}): {answer_key} must be 0/1 or true/false, "
                                 f"got {answer!r}")
            if truth is None:
                raise ValueError(f"questions entry {i} ({name}): label must be 0 or 1, got {ex.get('label')!r}")
            score = float(value == truth)
        else:
            if not isinstance(answer, str):
                raise ValueError(f"predictions entry {j} ({name}): {answer_key} must be a string, got {answer!r}")
            label = ex.get("label")
            if task == "gqa":
                if not isinstance(label, dict) or len(label) != 1:
                    raise ValueError(f"questions entry {i} ({name}): a GQA label must hold one answer, got "
                                     f"{label!r:.120}")
                score = float(answer == next(iter(label)))
            else:
                if "answers" in ex:
                    if not isinstance(ex["answers"], list) or not ex["answers"]:
                        raise ValueError(f"questions entry {i} ({name}): 'answers' must be a non-empty list "
                                         f"of the annotators' answers")
                elif not isinstance(label, dict):
                    raise ValueError(f"questions entry {i} ({name}) has neither 'answers' nor a 'label' "
                                     f"object to score against")
                score = vqa_accuracy(answer, ex)
                if "answer_type" in ex:
                    kind = str(ex["answer_type"])
                    s, n = by_type.get(kind, (0.0, 0))
                    by_type[kind] = (s + score, n + 1)
        total += score
    out = {"task": task, "metric": METRICS[task], "score": total / len(questions), "n": len(questions)}
    if by_type:
        out["by_answer_type"] = {t: {"score": s / n, "n": n} for t, (s, n) in sorted(by_type.items())}
    return out


def evaluate_files(task: str, questions_path, predictions_path) -> dict:
    """:func:`evaluate` on the two JSON files."""
    return evaluate(task, read_json_list(questions_path, "questions"),
                    read_json_list(predictions_path, "predictions"))
