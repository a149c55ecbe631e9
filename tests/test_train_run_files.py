"""``xlx-fast train``'s run directory: a kill mid-save never leaves a torn checkpoint, the end of a
run says where its checkpoints are, and ``--overwrite`` replaces a run whole (its argument and
resume errors are in test_cli_errors.py)."""
import numpy as np
import pytest
import torch

from xlx_fast.cli import main
from xlx_fast.training import checkpoint

ARGS = ["--size", "tiny", "--batch-size", "2", "--save-every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "captions.txt").write_text("a red bus\na dog on a beach\ntwo cats\na green plate\n")
    np.save(d / "cluster_ids.npy", np.random.default_rng(0).integers(0, 97, (4, 64)))
    return d


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs."""


@pytest.mark.parametrize("kill_at", [1, 3])
def test_a_kill_during_a_save_leaves_no_torn_checkpoint(data, tmp_path, monkeypatch, kill_at):
    """The kill_at-th torch.save dies after opening its file (saves go: step 2's .pth, step 2's
    last.pt, step 4's .pth, ...): the file it was writing must not exist, the earlier ones must
    load."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == kill_at:
            if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__"):
                open(f, "wb").close()
            else:
                f.write(b"PK")
            raise Killed
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        main(["train", str(data), "--out", str(out), "--steps", "4", *ARGS])
    monkeypatch.setattr(torch, "save", real_save)
    names = sorted(p.name for p in out.iterdir())
    if kill_at == 1:
        assert names == ["centroids.npy"]
    else:
        assert names == ["centroids.npy", "last.pt", "step000002_LXRT.pth"]
        assert checkpoint.load_run_state(out / "last.pt")["step"] == 2
        assert all(k.startswith("module.") for k in torch.load(out / "step000002_LXRT.pth"))
        # and the run continues from there
        assert main(["train", str(data), "--out", str(out), "--resume", "--no-progress"]) == 0
        assert checkpoint.load_run_state(out / "last.pt")["step"] == 4


def test_the_end_of_a_run_names_its_checkpoints(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "4", "--stop-at", "2", *ARGS]) == 0
    said = capsys.readouterr().out
    assert f"stopped after step 2 of 4; checkpoints in {out}: step000002_LXRT.pth" in said
    assert "last.pt (--resume continues from it)" in said
    assert main(["train", str(data), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert f"trained to step 4; checkpoints in {out}: step000004_LXRT.pth" in capsys.readouterr().out


def test_overwrite_replaces_the_run_and_keeps_other_files(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "4", *ARGS]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["train", str(data), "--out", str(out), "--steps", "2", *ARGS]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(out), "--steps", "2", "--overwrite", *ARGS]) == 0
    assert "removed 4 file(s) of the previous run" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["centroids.npy", "last.pt", "notes.txt", "step000002_LXRT.pth"]
    state = checkpoint.load_run_state(out / "last.pt")
    assert state["step"] == 2 and state["hparams"]["steps"] == 2


def test_a_legacy_last_pt_resumes_with_its_stored_learning_rate_checked(data, tmp_path, capsys):
    """A last.pt written before hyper-parameters were stored: --lr is still checked (against
    the optimizer's state) and a note says what could not be."""
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "4", "--stop-at", "2", *ARGS]) == 0
    state = checkpoint.load_run_state(out / "last.pt")
    legacy = {k: state[k] for k in ("model", "optimizer", "scheduler", "step")}
    torch.save(legacy, out / "last.pt")
    capsys.readouterr()
    assert main(["train", str(data), "--out", str(out), "--resume", "--lr", "1e-3", *ARGS]) == 2
    assert "--lr 0.001 (the run has 0.0001)" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(out), "--resume", "--steps", "4", *ARGS]) == 0
    assert "predates stored hyper-parameters" in capsys.readouterr().err
