"""``xlx-fast train``: a 2-process torchrun (gloo, CPU) run makes the updates of a 1-process run."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from xlx_fast.cli import main
from xlx_fast.models import XLxmertForImageGeneration

COMMON = ["--size", "tiny", "--steps", "4", "--batch-size", "4", "--dropout", "0", "--no-progress",
          "--lr", "1e-4", "--save-every", "2"]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    assert main(["train", "--make-synthetic", str(d), "--size", "tiny", "--examples", "10"]) == 0
    return d


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    assert main(["train", str(data), "--out", str(out), *COMMON]) == 0
    return out


def test_two_rank_ddp_matches_one_process(data, one_process, tmp_path):
    out = tmp_path / "run2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "xlx_fast.cli", "train", str(data), "--out", str(out), *COMMON],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(one_process / "step000004_LXRT.pth")
    b = torch.load(out / "step000004_LXRT.pth")
    start = XLxmertForImageGeneration.from_default(seed=0, size="tiny", with_generator=False,
                                                   pretraining_heads=True).state_dict()
    assert a.keys() == b.keys() and all(k.startswith("module.") for k in a)
    moved = 0
    for k in a:
        if k.endswith("key.bias"):
            # its gradient is 0 in exact arithmetic (softmax is shift-invariant), so it holds
            # Adam's response to rounding noise: judged against the key weight, as in test_training
            w = a[k[:-len("bias")] + "weight"]
            assert float((b[k] - a[k]).double().norm() / w.double().norm()) <= 1e-5, k
            continue
        s0 = start[k[len("module."):]]
        if s0.any():  # parameters that started at 0 hold only Adam updates: judged by those below
            assert rel(b[k], a[k]) <= 1e-5, k
        d_a, d_b = a[k] - start[k[len("module."):]], b[k] - start[k[len("module."):]]
        if d_a.any():
            moved += 1
            assert rel(d_b, d_a) <= 1e-3, k  # the update itself (see test_training)
    assert moved > 20
    flat = lambda sd: torch.cat([v.flatten().double() for v in sd.values()])  # noqa: E731
    assert rel(flat(b), flat(a)) <= 1e-5


def test_checkpoint_loads_and_resume_continues_the_same_run(data, one_process, tmp_path):
    model = XLxmertForImageGeneration.from_checkpoint(one_process / "step000004_LXRT.pth",
                                                      one_process / "centroids.npy", size="tiny",
                                                      pretraining_heads=True)
    out = tmp_path / "split"
    assert main(["train", str(data), "--out", str(out), *COMMON, "--stop-at", "2"]) == 0
    assert not (out / "step000004_LXRT.pth").exists()
    assert main(["train", str(data), "--out", str(out), *COMMON, "--resume"]) == 0
    a = torch.load(one_process / "step000004_LXRT.pth")
    b = torch.load(out / "step000004_LXRT.pth")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(model.state_dict()["mask_feat"], a["module.mask_feat"])


def test_bad_input_is_one_error_line(data, tmp_path, capsys):
    def fails(argv, match, code=2):
        rc = main(["train", *argv])
        err = capsys.readouterr().err
        assert rc == code and match in err and "Traceback" not in err, err
        assert err.strip().count("\n") == 0 or code == 1

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.txt").write_text("a dog\na cat\n")
    np.save(bad / "cluster_ids.npy", np.array([[0] * 64, [97] * 64]))
    fails([str(bad), "--out", str(tmp_path / "o"), "--size", "tiny", "--no-progress"],
          "cluster ids must lie in [0, 97)")
    np.save(bad / "cluster_ids.npy", np.zeros((3, 64), dtype=np.int64))
    fails([str(bad), "--out", str(tmp_path / "o"), "--size", "tiny", "--no-progress"], "2 captions but 3 images")
    os.remove(bad / "cluster_ids.npy")
    np.save(bad / "features.npy", np.zeros((2, 64, 47), dtype=np.float32))
    fails([str(bad), "--out", str(tmp_path / "o"), "--size", "tiny", "--no-progress"], "features of width 47")
    fails([str(data), "--out", str(tmp_path / "o"), "--size", "tiny", "--batch-size", "0", "--no-progress"], "--batch-size must be >= 1")
    fails([str(data), "--out", str(tmp_path / "o"), "--size", "tiny", "--resume", "--no-progress"], "--resume: no")
    fails([str(data), "--out", str(tmp_path / "o"), *COMMON, "--lr", "1e30"], "loss nan at step", code=1)
