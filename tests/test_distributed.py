"""Distributed data parallel on the CPU: 2 processes (gloo) against 1 process with the same
global batch, for text, audio and image, launched the way a cluster launches them.

* text: ``scripts/train_text.sh --gpus 0 --cpu-procs 2`` (torchrun)
* audio: ``scripts/train_audio.sh --cpu --gpus 2`` (torchrun)
* image: ``scripts/train_image.sh --cpu --gpus 2 --launcher slurm``, started as two Slurm tasks
  (SLURM_* variables and a stand-in ``scontrol``; fairseq reads Slurm's environment)

The reference is one process with ``optimization.update_freq=[2]``: fairseq makes N data
parallel processes equivalent to N accumulated batches (the batch of rank r is the
accumulated batch r), and masks are seeded by the sample ids of a batch, so both runs see the
same batches and the same masks. The noise on masked steps and the decoder's input dropout
draw from the global RNG, so they are off here. Each run trains 4 updates; the training
program is ``distributed_child.py``, fairseq-hydra-train plus a per-rank dump of the model
state (fairseq saves on rank 0 only), which shows that every rank holds the same teacher.
"""

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import REPO, assert_same_student_and_teacher, env, hydra_train, train_log

UPDATES = 4
CHILD = REPO / "tests" / "distributed_child.py"
COMMON = [f"optimization.max_update={UPDATES}", "common.log_interval=1", f"checkpoint.save_interval_updates={UPDATES}"]
NO_GLOBAL_RNG = {  # overrides that leave no draw from the global RNG in a training step
    "text": ["model.modalities.text.mask_noise_std=0", "model.modalities.text.decoder.input_dropout=0", "dataset.batch_size=4"],
    "audio": ["model.modalities.audio.mask_noise_std=0", "model.modalities.audio.decoder.input_dropout=0", "dataset.max_tokens=48000"],
    "image": ["model.modalities.image.mask_noise_std=0", "dataset.batch_size=4"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    e = env()
    e["FAIRSEQ_HYDRA_TRAIN"] = str(CHILD)
    e.update(extra)
    return e


def write_audio(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    (root / "wav").mkdir(parents=True)
    rows = []
    for i in range(n):
        t = np.arange(int(rng.uniform(0.6, 1.0) * 16000)) / 16000
        wav = (0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
        sf.write(root / "wav" / f"{i}.wav", wav, 16000)
        rows.append(f"wav/{i}.wav\t{len(wav)}")
    (root / "train.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
    return root


def write_images(root: Path, n: int = 48) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def text_data(tmp: Path) -> Path:
    from conftest import binarize, write_structured_corpus

    tmp.mkdir()
    write_structured_corpus(tmp / "train.txt", 400, seed=0)
    write_structured_corpus(tmp / "valid.txt", 20, seed=1)
    binarize(tmp, tmp / "bin")
    return tmp / "bin"


def launch(modality: str, data: Path, save: Path) -> list:
    """Start the 2-process run of ``modality``; return its processes (one, or two Slurm tasks)."""
    overrides = COMMON + NO_GLOBAL_RNG[modality]
    port = str(free_port())
    if modality == "text":
        cmd = ["bash", REPO / "scripts/train_text.sh", data, "--gpus", "0", "--cpu-procs", "2", "--master-port", port,
               "--config", "pretraining/text_tiny", "--save-dir", save, *overrides]
        envs = [child_env()]
    elif modality == "audio":
        cmd = ["bash", REPO / "scripts/train_audio.sh", data, "--cpu", "--gpus", "2", "--master-port", port,
               "--config", "audio_tiny", "--save-dir", save, *overrides]
        envs = [child_env()]
    else:
        cmd = ["bash", REPO / "scripts/train_image.sh", data, "--cpu", "--gpus", "2", "--launcher", "slurm",
               "--master-port", port, "--config", "image_tiny", "--save-dir", save, *overrides]
        fake_bin = save.parent / "fake_slurm_bin"
        fake_bin.mkdir(exist_ok=True)
        (fake_bin / "scontrol").write_text("#!/bin/sh\necho localhost\n")  # `scontrol show hostnames LIST`
        (fake_bin / "scontrol").chmod(0o755)
        slurm = dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_NTASKS="2",
                     SLURM_NTASKS_PER_NODE="2", SLURM_NODEID="0")
        envs = []
        for rank in range(2):
            # SLURM_LOCALID picks the task's CUDA device in fairseq (torch.cuda.set_device, which a
            # CPU-only machine refuses for devices > 0): 0 for both tasks here
            e = child_env(SLURM_PROCID=str(rank), SLURM_LOCALID="0", **slurm)
            e["PATH"] = f"{fake_bin}{os.pathsep}{e['PATH']}"
            envs.append(e)
    return [subprocess.Popen([str(c) for c in cmd], env=e, cwd=save.parent, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for e in envs]


def wait_all(procs, what: str, timeout: float = 300) -> str:
    """Wait for every process; when one fails (its peers would wait for it forever) or time
    runs out, stop the others and fail showing the outputs."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.5)
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"{what}: 2-process run failed (exit {[p.returncode for p in procs]})\n"
                    + "\n----\n".join(o[-4000:] for o in outs))
    return "\n".join(outs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """For each modality: (2-process output, 1-process output, their save dirs)."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = {"text": text_data(tmp / "text"), "audio": write_audio(tmp / "audio"), "image": write_images(tmp / "image")}
    config = {"text": "pretraining/text_tiny", "audio": "pretraining/audio_tiny", "image": "pretraining/image_tiny"}
    results = {}
    for modality in ("text", "audio", "image"):
        two, one = tmp / f"{modality}_2procs", tmp / f"{modality}_1proc"
        two.mkdir()
        procs = launch(modality, data[modality], two)
        # the reference runs beside the 2 ranks
        ref = hydra_train(config[modality], f"task.data={data[modality]}", f"checkpoint.save_dir={one}",
                          "optimization.update_freq=[2]", *COMMON, *NO_GLOBAL_RNG[modality], cwd=tmp)
        outs = [wait_all(procs, modality)]
        results[modality] = (outs[0], ref.stdout, two, one)
    return results


@pytest.mark.parametrize("modality", ["text", "audio", "image"])
def test_two_processes_match_one_with_the_same_global_batch(runs, modality):
    out2, out1, two, one = runs[modality]
    assert "distributed init (rank 1)" in out2, f"{modality}: the run did not start 2 ranks"
    log2, log1 = train_log(out2), train_log(out1)
    assert [r["num_updates"] for r in log2] == list(range(1, UPDATES + 1))
    assert [r["num_updates"] for r in log1] == list(range(1, UPDATES + 1))
    for r2, r1 in zip(log2, log1):
        # the global batch: the same samples (bsz) and the same masked steps (sample_size)
        assert (r2["bsz"], r2["sample_size"]) == (r1["bsz"], r1["sample_size"]), (modality, r2, r1)
        assert r2["loss"] == pytest.approx(r1["loss"], rel=2e-4, abs=2e-4), (modality, r2["num_updates"])
    dist = torch.load(two / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    single = torch.load(one / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert dist["optimizer_history"][-1]["num_updates"] == UPDATES
    assert_same_student_and_teacher(dist["model"], single["model"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("modality", ["text", "audio", "image"])
def test_every_rank_holds_the_same_teacher(runs, modality):
    _, _, two, _ = runs[modality]
    rank0 = torch.load(two / f"rank0_update{UPDATES}.pt", map_location="cpu", weights_only=False)
    rank1 = torch.load(two / f"rank1_update{UPDATES}.pt", map_location="cpu", weights_only=False)
    assert rank0["_ema"], "no teacher in the per-rank state"
    assert rank0["_ema"].keys() == rank1["_ema"].keys()
    for k, v in rank0["_ema"].items():
        assert torch.equal(v, rank1["_ema"][k]), f"{modality}: teacher {k} differs between rank 0 and rank 1"
    for k, v in rank0.items():
        if k != "_ema":
            assert torch.equal(v, rank1[k]), f"{modality}: student {k} differs between rank 0 and rank 1"
    # and it is the teacher rank 0 saved in the checkpoint
    saved = torch.load(two / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]["_ema"]
    for k, v in saved.items():
        assert torch.equal(v, rank0["_ema"][k]), f"{modality}: checkpoint teacher {k} is not rank 0's"


def test_layerdrop_under_pytorch_ddp():
    """Speech models with layerdrop (2.0 ``layerdrop``, 1.0 ``encoder_layerdrop``) train under
    PyTorch's DDP without find_unused_parameters (what ddp_backend=c10d builds): a skipped
    block still takes part in the graph with weight 0. Without that, DDP stops on the step
    after a skip ("Expected to have finished reduction in the prior iteration ...")."""
    import re

    from helpers import BIN, run

    proc = run([BIN / "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()),
                REPO / "tests" / "ddp_layerdrop_child.py"], timeout=300)
    skipped = {(int(r), m): int(n) for r, m, n in re.findall(r"rank (\d) (v\d): skipped blocks: (\d+)", proc.stdout)}
    assert set(skipped) == {(0, "v2"), (1, "v2"), (0, "v1"), (1, "v1")}, proc.stdout[-3000:]
    assert all(n > 0 for n in skipped.values()), f"no block was skipped, nothing tested: {skipped}"
