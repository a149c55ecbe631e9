"""`xlx-fast generate` end to end on the CPU."""
import numpy as np
import pytest
from PIL import Image

from xlx_fast.cli import main


@pytest.mark.slow
def test_generate_writes_images_with_embedded_default(tmp_path, capsys):
    out = tmp_path / "pics" / "bus.png"
    assert main(["generate", "a red bus on a street", "two dogs", "-o", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    for i in range(2):
        path = tmp_path / "pics" / f"bus_{i}.png"
        assert f"wrote {path}" in printed
        img = np.asarray(Image.open(path))
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        assert img.std() > 0


def test_generate_checkpoint_needs_centroids_and_vocab(tmp_path, capsys):
    assert main(["generate", "x", "--checkpoint", str(tmp_path / "a.pth")]) == 2
    assert "error: --checkpoint needs --centroids" in capsys.readouterr().err
    assert main(["generate", "x", "--centroids", str(tmp_path / "c.npy")]) == 2
    assert "error: --centroids/--generator need --checkpoint" in capsys.readouterr().err


def test_unknown_strategy_is_rejected():
    with pytest.raises(SystemExit):
        main(["generate", "x", "--strategy", "greedy"])
