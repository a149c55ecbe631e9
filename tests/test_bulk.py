"""Bulk generation (``xlx-fast generate --captions-file``): manifest, files, resume, and a
2-process torchrun (gloo) run identical to a 1-process run.

A tiny sharpened model is written as a test checkpoint (``--size tiny``) so the runs stay
fast; sharpening keeps ids clear of float rounding, so batch composition cannot move them.
"""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from xlx_fast.cli.bulk import read_lines, BulkError
from xlx_fast.cli import main
from xlx_fast.cli.generation_options import engine_seed
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.models.checkpoint import save_authors_format

from test_generation import sharpen

WORDS = ["a", "red", "bus", "on", "the", "street", "two", "dogs", "play", "in", "snow", "green",
         "field", "with", "cows", "boat", "lake", "at", "night"]

CAPTIONS = [
    "a red bus on the street",
    '{"caption": "two dogs play in the snow", "seed": 123, "steps": 3}',
    "",
    '{"caption": "a green field with cows", "strategy": "confidence", "steps": 5}',
    "a boat on the lake at night",
    '{"caption": "the street at night", "strategy": "random", "steps": 6, "seed": 18446744073709551621}',
    "cows in the snow",
    '{"caption": "a bus", "strategy": "tlbr", "steps": 4}',
    "two boats",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0)
    paths = [str(d / "lx.pth"), str(d / "centroids.npy"), str(d / "gen.pth")]
    save_authors_format(model, *paths)
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]"] + [f"[unused{i}]" for i in range(99)]
                               + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    caps = d / "captions.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    args = ["--checkpoint", paths[0], "--centroids", paths[1], "--generator", paths[2],
            "--vocab", str(vocab), "--size", "tiny"]
    return dict(args=args, captions=str(caps))


def bulk_args(files, out, batch=3):
    return ["generate", "--captions-file", files["captions"], "--out-dir", str(out),
            "--batch-size", str(batch), "--seed", "7", *files["args"]]


def listing(out):
    """Every file a run leaves, the lock file aside (it holds the pid of the last run)."""
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name != ".xlx-fast.lock"}


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main(bulk_args(files, out)) == 0
    return out


def test_manifest_and_files(one_process):
    lines = [json.loads(t) for t in (one_process / "manifest.jsonl").read_text().splitlines()]
    assert [e["line"] for e in lines] == [1, 2, 4, 5, 6, 7, 8, 9]  # line 3 is blank
    by_line = {e["line"]: e for e in lines}
    assert by_line[1] == dict(by_line[1], caption="a red bus on the street", seed=7 + 1, steps=4,
                              strategy="mask_predict", file="000001.png")
    assert by_line[2]["seed"] == 123 and by_line[2]["steps"] == 3
    assert by_line[4]["strategy"] == "confidence" and by_line[4]["seed"] == 7 + 4
    # outside [0, 2**31): hashed by single mode's rule, and the seed used is the one recorded
    assert by_line[6]["seed"] == engine_seed(18446744073709551621) != 18446744073709551621
    assert by_line[6]["given_seed"] == 18446744073709551621
    assert "given_seed" not in by_line[1]
    for e in lines:
        assert len(e["ids"]) == 64
        assert e["temperature"] == 0.0
        assert hashlib.sha256((one_process / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    assert sorted(os.listdir(one_process)) == sorted([e["file"] for e in lines] + [
        "manifest.jsonl", "settings.json", ".xlx-fast.lock"])
    # the confidence line decided 5 cells; the others every cell
    assert sum(i >= 0 for i in by_line[4]["ids"]) == 5
    assert all(i >= 0 for i in by_line[1]["ids"])


def test_batch_size_does_not_change_output(files, one_process, tmp_path):
    assert main(bulk_args(files, tmp_path, batch=1)) == 0
    assert listing(tmp_path) == listing(one_process)


def test_resume_skips_finished_lines(files, one_process, tmp_path):
    assert main(bulk_args(files, tmp_path)) == 0
    # lose one image and the manifest's last two entries (as if interrupted)
    os.remove(tmp_path / "000005.png")
    manifest = (tmp_path / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "manifest.jsonl").write_text("\n".join(manifest[:-2]) + "\n")
    kept = (tmp_path / "000001.png").stat().st_mtime_ns
    assert main(bulk_args(files, tmp_path)) == 0
    assert (tmp_path / "000001.png").stat().st_mtime_ns == kept  # not redone
    assert listing(tmp_path) == listing(one_process)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(files, one_process, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "xlx_fast.cli", *bulk_args(files, tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(4 generated by rank 0" in proc.stderr  # 8 lines, half each
    assert listing(tmp_path) == listing(one_process)


@pytest.mark.parametrize("text,match", [
    ('a bus\n{"caption": "x", "steps": 0}\n', ":2: 'steps'"),
    ('{"caption": "x"\n', ":1: not valid JSON"),
    ('ok\n{"caption": "x", "strategy": "beam"}\n', ":2: 'strategy'"),
    ('{"caption": "x", "colour": "red"}\n', ":1: unknown key"),
    ('{"caption": "x", "seed": 1.5}\n', ":1: 'seed'"),
    ('{"seed": 1}\n', ":1: 'caption'"),
    ("\n\n", "no captions"),
])
def test_bad_captions_file_names_the_line(tmp_path, text, match):
    path = tmp_path / "caps.txt"
    path.write_text(text)
    with pytest.raises(BulkError, match=match):
        read_lines(str(path), 0)


def test_cli_bad_file_is_one_error_line(files, tmp_path, capsys):
    path = tmp_path / "caps.txt"
    path.write_text('a bus\n{"caption": "x", "steps": -1}\n')
    cases = [
        (["--captions-file", str(path), "--out-dir", str(tmp_path / "o"), *files["args"]],
         r"error: .*caps.txt:2: 'steps'"),
        (["--captions-file", str(path)], "--out-dir"),
        (["--captions-file", files["captions"], "--out-dir", str(tmp_path), "--batch-size", "0"],
         "batch-size"),
    ]
    for args, pattern in cases:
        assert main(["generate", *args]) == 2  # a user's mistake: argparse's exit status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(pattern, err[0]), err
