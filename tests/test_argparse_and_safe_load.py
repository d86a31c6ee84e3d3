"""``fairseq-train --user-dir`` (argparse) trains and resumes, also from a checkpoint in the
legacy format that stores the run's ``argparse.Namespace`` under ``args`` (older fairseq
releases and Meta's older checkpoints): torch >= 2.6 refuses that under ``weights_only=True``
unless the plugin, once imported, allows that one type."""

import argparse
import sys

import torch

from helpers import BIN, REPO, run, train_log

ARGS = [
    "--user-dir", REPO / "d2v_plugin", "--task", "d2v_text_pretraining", "--tokens-per-sample", "64",
    "--arch", "data2vec_multi", "--criterion", "data2vec", "--depth", "2", "--embed-dim", "64",
    "--num-heads", "2", "--clone-batch", "2", "--average-top-k-layers", "2", "--optimizer", "adam",
    "--lr", "0.0005", "--batch-size", "8", "--cpu", "--log-interval", "1", "--disable-validation",
]

LOAD = "import torch, sys; torch.load(sys.argv[1], weights_only=True); print('loaded')"


def test_fairseq_train_user_dir_trains_and_resumes(text_bin, tmp_path):
    save = tmp_path / "ck"
    first = run([BIN / "fairseq-train", text_bin, *ARGS, "--save-dir", save, "--max-update", "2"], cwd=tmp_path).stdout
    assert [r["num_updates"] for r in train_log(first)] == [1, 2]
    ckpt = save / "checkpoint_last.pt"
    state = torch.load(ckpt, weights_only=True)
    state["args"] = argparse.Namespace(arch="data2vec_multi", task="d2v_text_pretraining", seed=1)
    torch.save(state, ckpt)  # as fairseq releases before the hydra configs wrote it

    # without the plugin torch refuses the Namespace; importing the plugin allows it
    refused = run([sys.executable, "-c", LOAD, ckpt], check=False)
    assert refused.returncode != 0 and "Namespace" in refused.stdout
    allowed = run([sys.executable, "-c", "import d2v_plugin; " + LOAD, ckpt])
    assert "loaded" in allowed.stdout

    second = run([BIN / "fairseq-train", text_bin, *ARGS, "--save-dir", save, "--max-update", "3"], cwd=tmp_path).stdout
    assert "Loaded checkpoint" in second and "@ 2 updates" in second
    assert [r["num_updates"] for r in train_log(second)] == [3]
