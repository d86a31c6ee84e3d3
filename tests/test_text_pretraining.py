"""data2vec 2.0 text pretraining through the real ``fairseq-hydra-train``."""

import os
import signal
import subprocess
import time

import pytest
import torch

from helpers import BIN, CONFIG_DIR, assert_same_student_and_teacher, env, hydra_train, train_log

TINY = "pretraining/text_tiny"


def annealed(start, end, step, total):
    return end if step >= total else end - (end - start) * (1 - step / total)


@pytest.fixture(scope="module")
def tiny_run(text_bin, tmp_path_factory):
    """100 updates of text_tiny, logged every 10 updates."""
    save = tmp_path_factory.mktemp("tiny_run")
    proc = hydra_train(
        TINY, f"task.data={text_bin}", f"checkpoint.save_dir={save}",
        "optimization.max_update=100", "common.log_interval=10",
        "checkpoint.save_interval_updates=50",
        cwd=tmp_path_factory.mktemp("cwd"),  # any working directory works
    )
    return save, proc.stdout, train_log(proc.stdout)


def test_loss_falls(tiny_run):
    _, out, rows = tiny_run
    assert len(rows) == 10, out[-3000:]
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.9 * first, [r["loss"] for r in rows]


def test_logged_statistics(tiny_run):
    _, _, rows = tiny_run
    for key in ("ema_decay", "target_var", "pred_var", "masked_pct", "model_norm", "ema_norm"):
        assert key in rows[-1], f"{key} not logged: {sorted(rows[-1])}"
    # text_tiny masks int(64 * 0.48) = 30 of 64 tokens
    assert rows[-1]["masked_pct"] == pytest.approx(1 - int(64 * 0.52) / 64, abs=1e-3)
    # 2 clones x 8 sequences x 30 masked tokens are predicted per update
    assert rows[-1]["sample_size"] == pytest.approx(2 * 8 * 30, rel=0.05)


def test_ema_decay_follows_schedule(tiny_run):
    """Each log line averages the decay used by its 10 updates: annealed(k - 1) for update k."""
    _, _, rows = tiny_run
    for row in rows:
        n = int(row["num_updates"])
        expected = sum(annealed(0.998, 0.9999, k - 1, 100) for k in range(n - 9, n + 1)) / 10
        assert row["ema_decay"] == pytest.approx(expected, abs=2e-6)


def test_checkpoint_holds_student_teacher_and_config(tiny_run):
    save, _, _ = tiny_run
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer_history"][-1]["num_updates"] == 100
    state = ckpt["model"]
    teacher = state["_ema"]
    # encoder-only teacher: the shared blocks, under Meta's names
    assert set(teacher) == {k[len("blocks."):] for k in state if k.startswith("blocks.")}
    # the teacher moved away from the student but stayed close (decay ~0.999)
    diff = (teacher["0.attn.qkv.weight"] - state["blocks.0.attn.qkv.weight"]).abs().max()
    assert 0 < diff < 0.5
    assert ckpt["cfg"]["model"]["_name"] == "data2vec_multi"


def _train_args(text_bin, save, max_update):
    return [
        f"task.data={text_bin}", f"checkpoint.save_dir={save}", f"optimization.max_update={max_update}",
        "checkpoint.save_interval_updates=20", "common.log_interval=1", "model.ema_anneal_end_step=1000", "model.ema_decay=0.95", "model.ema_end_decay=0.99",
        "optimization.lr=[0.001]",
    ]


def test_killed_run_resumes_exactly(text_bin, tmp_path):
    """SIGKILL a run after a checkpoint; the restart continues from it and ends where an
    uninterrupted run ends: same update, same student, same EMA teacher."""
    save = tmp_path / "killed"
    cmd = [BIN / "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", TINY, *_train_args(text_bin, save, 1000)]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:
        if "Saved checkpoint" in line and "@ 40 updates" in line:
            break
        assert time.time() < deadline, "no checkpoint within 300 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["optimizer_history"][-1]["num_updates"]
    assert n >= 40

    out = hydra_train(TINY, *_train_args(text_bin, save, n + 5), cwd=tmp_path).stdout
    assert "Loaded checkpoint" in out and f"@ {n} updates" in out, out[-3000:]
    assert train_log(out)[0]["num_updates"] == n + 1

    straight = tmp_path / "straight"
    hydra_train(TINY, *_train_args(text_bin, straight, n + 5), cwd=tmp_path)
    resumed = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    reference = torch.load(straight / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert resumed["optimizer_history"][-1]["num_updates"] == n + 5
    assert_same_student_and_teacher(resumed["model"], reference["model"])
