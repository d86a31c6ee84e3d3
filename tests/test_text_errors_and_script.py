"""Bad input gives errors that name the problem; the quick-start script runs and resumes."""

import shutil

import torch

from conftest import binarize, write_structured_corpus
from helpers import REPO, hydra_train, run

TINY = "pretraining/text_tiny"


def _fails_with(tmp_path, data, *needles):
    proc = hydra_train(TINY, f"task.data={data}", f"checkpoint.save_dir={tmp_path / 'ck'}", "optimization.max_update=2", check=False)
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stdout, proc.stdout[-3000:]


def test_missing_data_dir(tmp_path):
    _fails_with(tmp_path, tmp_path / "nope", f"task.data: directory '{tmp_path / 'nope'}' does not exist")


def test_missing_dictionary(tmp_path):
    (tmp_path / "data").mkdir()
    _fails_with(tmp_path, tmp_path / "data", f"{tmp_path / 'data' / 'dict.txt'} is missing")


def test_missing_split(tmp_path, text_bin):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(text_bin / "dict.txt", data / "dict.txt")
    _fails_with(tmp_path, data, "no binarized split 'train'", str(data / "train") + ".bin")


def test_empty_corpus(tmp_path, text_bin):
    (tmp_path / "train.txt").write_text("")
    (tmp_path / "valid.txt").write_text("")
    binarize(tmp_path, tmp_path / "bin", srcdict=text_bin / "dict.txt")
    _fails_with(tmp_path, tmp_path / "bin", "split 'train'", "holds no tokens")


def test_dictionary_mismatch(tmp_path, text_bin):
    """Data binarized with a 200-word dictionary, trained with a 20-word one."""
    data = tmp_path / "data"
    shutil.copytree(text_bin, data)
    lines = (text_bin / "dict.txt").read_text().splitlines()
    (data / "dict.txt").write_text("\n".join(lines[:20]) + "\n")
    _fails_with(tmp_path, data, "dictionary mismatch", str(data / "train.bin"), str(data / "dict.txt"))


def test_quick_start_script_trains_and_resumes(tmp_path):
    script = REPO / "scripts" / "train_text.sh"
    args = ["bash", script, "--work-dir", tmp_path / "work", "--save-dir", tmp_path / "ck", "--max-update", "20"]
    first = run(args, cwd=tmp_path).stdout
    assert (tmp_path / "work" / "bin" / "dict.txt").is_file()
    assert (tmp_path / "work" / "spm.model").is_file()
    assert (tmp_path / "ck" / "checkpoint_last.pt").is_file()
    assert "num_updates=20" in first and "== done. Checkpoints:" in first, first[-3000:]
    second = run(args[:-1] + ["30"], cwd=tmp_path).stdout
    assert "resuming from" in second and "@ 20 updates" in second, second[-3000:]
    assert "skipped" in second  # corpus preparation is not redone
    assert "num_updates=30" in second


def test_script_rejects_bad_data_dir(tmp_path):
    proc = run(["bash", REPO / "scripts" / "train_text.sh", tmp_path], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and f"{tmp_path} has no dict.txt" in proc.stdout


def test_config_runs_from_any_directory(tmp_path, text_bin):
    """The configs find the plugin themselves: no --user-dir, cwd outside the repo."""
    proc = hydra_train(TINY, f"task.data={text_bin}", f"checkpoint.save_dir={tmp_path / 'ck'}", "optimization.max_update=3", cwd=tmp_path)
    assert "num_updates" in proc.stdout and (tmp_path / "ck" / "checkpoint_last.pt").is_file()


def test_script_with_data_dir_uses_it(tmp_path, text_bin):
    """The DATA_DIR route (text_base on GPUs by default), here forced onto the tiny config and the CPU."""
    proc = run(
        ["bash", REPO / "scripts" / "train_text.sh", text_bin, "--gpus", "0", "--config", "pretraining/text_tiny",
         "--save-dir", tmp_path / "ck", "--max-update", "3"],
        cwd=tmp_path,
    )
    assert f"task.data={text_bin}" in proc.stdout and "common.cpu=true" in proc.stdout
    ckpt = torch.load(tmp_path / "ck" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer_history"][-1]["num_updates"] == 3
