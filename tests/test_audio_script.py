"""scripts/train_audio.sh with no arguments: speech synthesized offline, tiny model, resume."""

import shutil

import pytest
import torch

from helpers import REPO, run


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
def test_quick_start_synthesizes_trains_and_resumes(tmp_path):
    script = REPO / "scripts" / "train_audio.sh"
    save = tmp_path / "ck"
    first = run(["bash", script, "--save-dir", save, "optimization.max_update=12", "common.log_interval=5"], cwd=tmp_path).stdout
    manifest = tmp_path / "data" / "speech_demo" / "train.tsv"
    lines = manifest.read_text().splitlines()
    assert len(lines) > 100, "expected ~200 synthesized utterances"
    assert "num_updates=10" in first and (save / "checkpoint_last.pt").is_file(), first[-3000:]
    assert torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["optimizer_history"][-1]["num_updates"] == 12

    second = run(["bash", script, "--save-dir", save, "optimization.max_update=16", "common.log_interval=5"], cwd=tmp_path).stdout
    assert "using the synthesized speech" in second and "@ 12 updates" in second, second[-3000:]
    assert "num_updates=15" in second
