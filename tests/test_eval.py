"""``xlx-fast eval`` and ``xlx_fast.evaluation``: the metrics on hand-made cases whose values are
worked out by hand below, and one error line for every bad input."""
import json

import pytest

from xlx_fast.cli import main
from xlx_fast.evaluation import evaluate, vqa_accuracy


def ten(answer, n, other="blue"):
    """Ten annotators' answers, ``n`` of them ``answer``."""
    return [answer] * n + [other] * (10 - n)


# ---- VQA ----------------------------------------------------------------------------------------

def test_vqa_soft_accuracy_is_min_agreeing_over_three():
    ex = {"question_id": 1, "answers": ten("red", 2)}
    assert vqa_accuracy("red", ex) == pytest.approx(2 / 3)  # 2 of 10 agree: 2/3
    assert vqa_accuracy("red", {"answers": ten("red", 1)}) == pytest.approx(1 / 3)
    assert vqa_accuracy("red", {"answers": ten("red", 3)}) == 1.0  # 3 agree: full credit
    assert vqa_accuracy("red", {"answers": ten("red", 7)}) == 1.0  # capped at 1
    assert vqa_accuracy("green", ex) == 0.0  # nobody said it
    assert vqa_accuracy("blue", ex) == 1.0  # the other 8
    # compared after lower-casing and collapsing white space
    assert vqa_accuracy("  Red ", ex) == pytest.approx(2 / 3)
    assert vqa_accuracy("fire truck", {"answers": ten("Fire  Truck", 1)}) == pytest.approx(1 / 3)
    # the official annotation's form: a list of {"answer": ...}
    raw = {"answers": [{"answer": a, "answer_id": i} for i, a in enumerate(ten("two", 2))]}
    assert vqa_accuracy("two", raw) == pytest.approx(2 / 3)


def test_vqa_without_annotators_scores_the_label():
    ex = {"question_id": 7, "label": {"yes": 1, "no": 0.3}}
    assert vqa_accuracy("yes", ex) == 1.0
    assert vqa_accuracy("no", ex) == 0.3
    assert vqa_accuracy("maybe", ex) == 0.0
    # the annotators' answers take precedence over the label when both are there
    assert vqa_accuracy("no", {"label": {"no": 0.3}, "answers": ten("no", 2)}) == pytest.approx(2 / 3)


def test_vqa_mean_over_questions_and_per_answer_type():
    questions = [
        {"question_id": 1, "answers": ten("red", 2), "answer_type": "other"},   # predicted red: 2/3
        {"question_id": 2, "answers": ten("2", 3), "answer_type": "number"},    # predicted 2: 1
        {"question_id": 3, "answers": ten("yes", 10), "answer_type": "yes/no"},  # predicted no: 0
        {"question_id": 4, "label": {"dog": 0.6}, "answer_type": "other"},      # predicted dog: 0.6
    ]
    preds = [{"question_id": 4, "answer": "dog"}, {"question_id": 2, "answer": "2"},
             {"question_id": 1, "answer": "red"}, {"question_id": 3, "answer": "no"}]
    r = evaluate("vqa", questions, preds)
    assert r["n"] == 4 and r["metric"] == "VQA soft accuracy"
    assert r["score"] == pytest.approx((2 / 3 + 1 + 0 + 0.6) / 4)
    assert r["by_answer_type"]["other"] == {"score": pytest.approx((2 / 3 + 0.6) / 2), "n": 2}
    assert r["by_answer_type"]["number"] == {"score": 1.0, "n": 1}
    assert r["by_answer_type"]["yes/no"] == {"score": 0.0, "n": 1}


def test_ids_are_matched_by_their_text():
    r = evaluate("vqa", [{"question_id": 5, "label": {"a": 1}}], [{"question_id": "5", "answer": "a"}])
    assert r["score"] == 1.0


# ---- GQA and NLVR2 --------------------------------------------------------------------------------

def test_gqa_exact_match():
    questions = [{"question_id": "q1", "label": {"left": 1.0}}, {"question_id": "q2", "label": {"table": 1.0}},
                 {"question_id": "q3", "label": {"no": 1.0}}]
    preds = [{"question_id": "q1", "answer": "left"}, {"question_id": "q2", "answer": "tables"},
             {"question_id": "q3", "answer": "no"}]
    assert evaluate("gqa", questions, preds)["score"] == pytest.approx(2 / 3)  # "tables" != "table"
    # GQA's submission keys
    sub = [{"questionId": p["question_id"], "prediction": p["answer"]} for p in preds]
    assert evaluate("gqa", questions, sub)["score"] == pytest.approx(2 / 3)


def test_nlvr2_accuracy_by_uid_or_identifier():
    questions = [{"uid": f"u{i}", "identifier": f"dev-{i}-0", "label": lab} for i, lab in enumerate([1, 0, 1, 0, 1])]
    # right, right, wrong, right, wrong: 3/5, with the label in each accepted form
    preds = [{"uid": "u0", "label": 1}, {"uid": "u1", "answer": "False"}, {"uid": "u2", "label": False},
             {"uid": "u3", "label": "0"}, {"uid": "u4", "answer": "false"}]
    r = evaluate("nlvr2", questions, preds)
    assert r["score"] == pytest.approx(3 / 5) and r["n"] == 5 and r["metric"] == "accuracy"
    by_identifier = [{"identifier": f"dev-{i}-0", "label": True} for i in range(5)]  # right on 0, 2, 4
    assert evaluate("nlvr2", questions, by_identifier)["score"] == pytest.approx(3 / 5)


# ---- the command line ---------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps([
        {"question_id": 1, "img_id": "a", "sent": "What color?", "label": {"red": 0.6}, "answers": ten("red", 2)},
        {"question_id": 2, "img_id": "b", "sent": "Is it?", "label": {"yes": 1.0}, "answers": ten("yes", 9, "no")},
    ]))
    (tmp_path / "p.json").write_text(json.dumps([{"question_id": 1, "answer": "red"},
                                                 {"question_id": 2, "answer": "no"}]))
    return tmp_path


def test_cli_prints_and_writes_the_score(files, capsys):
    assert main(["eval", "--task", "vqa", "--data", str(files / "q.json"), "--predictions",
                 str(files / "p.json"), "--out", str(files / "score.json")]) == 0
    out = capsys.readouterr().out
    # question 1: 2 agree -> 2/3; question 2: 1 of 10 said "no" -> 1/3; mean 1/2
    assert "vqa VQA soft accuracy: 0.5000 (50.00%) over 2 questions" in out
    saved = json.loads((files / "score.json").read_text())
    assert saved["score"] == pytest.approx(0.5) and saved["n"] == 2 and saved["task"] == "vqa"


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


CLI_ERRORS = [
    ("missing prediction", [{"question_id": 1, "answer": "red"}], "1 of 2 questions have no prediction, the first: "
                                                                  "question_id 2"),
    ("unknown id", [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "x"},
                    {"question_id": 9, "answer": "x"}], "1 prediction(s) name no question, the first: question_id 9"),
    ("duplicate id", [{"question_id": 1, "answer": "red"}, {"question_id": 1, "answer": "blue"},
                      {"question_id": 2, "answer": "x"}], "predictions: question_id 1 appears twice (entries 0 and 1)"),
    ("no id", [{"answer": "red"}], "predictions entry 0 has no 'question_id' or 'questionId'"),
    ("no answer", [{"question_id": 1, "answer": "red"}, {"question_id": 2}],
     "predictions entry 1 (question_id 2) has no 'answer' or 'prediction'"),
    ("answer type", [{"question_id": 1, "answer": 3}, {"question_id": 2, "answer": "x"}],
     "predictions entry 0 (question_id 1): answer must be a string, got 3"),
    ("not JSON", "[{", "predictions {} is not valid JSON"),
    ("not a list", {"1": "red"}, "must be a JSON list, got a dict"),
    ("empty", [], "is empty"),
]


@pytest.mark.parametrize("name,preds,match", CLI_ERRORS, ids=[e[0] for e in CLI_ERRORS])
def test_cli_errors_are_one_line(files, capsys, name, preds, match):
    p = _write(files / "bad.json", preds)
    rc = main(["eval", "--task", "vqa", "--data", str(files / "q.json"), "--predictions", p])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert match.format(p) in err, err


def test_cli_file_and_data_errors(files, capsys):
    def fails(argv, match):
        rc = main(["eval", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and err.strip().count("\n") == 0, err

    q, p = str(files / "q.json"), str(files / "p.json")
    fails(["--task", "vqa", "--data", str(files / "nope.json"), "--predictions", p],
          f"questions file not found: {files / 'nope.json'}")
    fails(["--task", "vqa", "--data", q, "--predictions", p, "--out", str(files)], "is a directory")
    dup = _write(files / "dup.json", [{"question_id": 1, "label": {}}, {"question_id": "1", "label": {}}])
    fails(["--task", "vqa", "--data", dup, "--predictions", p], "questions: question_id '1' appears twice")
    gq = _write(files / "gq.json", [{"question_id": 1, "label": {"red": 1.0, "blue": 0.3}}, {"question_id": 2,
                                                                                         "label": {"no": 1.0}}])
    fails(["--task", "gqa", "--data", gq, "--predictions", p], "questions entry 0 (question_id 1): a GQA label must "
                                                               "hold one answer")
    nl = _write(files / "nl.json", [{"uid": "a", "label": 1}, {"uid": "b", "label": 0}])
    fails(["--task", "nlvr2", "--data", nl, "--predictions",
           _write(files / "np.json", [{"uid": "a", "label": "yes"}, {"uid": "b", "label": 0}])],
          "predictions entry 0 (uid 'a'): label must be 0/1 or true/false, got 'yes'")
    fails(["--task", "nlvr2", "--data", nl, "--predictions",
           _write(files / "ni.json", [{"identifier": "x", "label": 1}])],
          "the predictions name examples by 'identifier' but questions entry 0 has none")
    fails(["--task", "vqa", "--data", _write(files / "nolabel.json", [{"question_id": 1}, {"question_id": 2}]),
           "--predictions", p], "questions entry 0 (question_id 1) has neither 'answers' nor a 'label'")
