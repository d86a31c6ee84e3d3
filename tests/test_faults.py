"""Faults injected for real into tiny data2vec 2.0 runs through ``fairseq-hydra-train``:
SIGKILL mid-run and during a checkpoint write (speech, images), a corrupt
``checkpoint_last.pt``, a full disk and a save directory made read-only during a save, a NaN
input, a representation collapse of the local encoder, unreadable files met mid-epoch.

One uninterrupted speech run is the reference of three others (killed, corrupt, full disk /
read-only), which start from its checkpoints; the runs of a fixture go two at a time (2 cores).
"""

import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import BIN, CONFIG_DIR, assert_same_student_and_teacher, env, train_log
from test_audio import SR, tone, write_corpus
from test_image import write_images

AUDIO, IMAGE = "pretraining/audio_tiny", "pretraining/image_tiny"
PAUSE = "D2V_TEST_PAUSE_BEFORE_RENAME"
TOTAL, EVERY = 12, 4  # speech: updates, checkpoint interval
AUDIO_ARGS = (f"optimization.max_update={TOTAL}", f"checkpoint.save_interval_updates={EVERY}",
              "checkpoint.keep_interval_updates=-1", "checkpoint.save_interval=1000", "common.log_interval=1",
              "dataset.max_tokens=48000")


def cmd(config, data, save, *args):
    return [str(c) for c in (BIN / "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", config,
                             f"task.data={data}", f"checkpoint.save_dir={save}", *args)]


def start(command, cwd, extra_env=None, preexec_fn=None):
    e = env()
    e.update(extra_env or {})
    return subprocess.Popen(command, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=preexec_fn)


def read_until(proc, done, timeout=300):
    """Lines of ``proc`` up to the first one for which ``done(line)`` is true (returned joined)."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if done(line):
            return "".join(lines)
        assert time.time() < deadline, "".join(lines)[-3000:]
    pytest.fail("process ended before the expected line:\n" + "".join(lines)[-3000:])


def finish(proc, head="", timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return head + out


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def updates(path):
    return ckpt(path)["optimizer_history"][-1]["num_updates"]


def at(d, n):
    """The interval checkpoint of update ``n`` in ``d`` (``checkpoint_EPOCH_n.pt``)."""
    found = list(Path(d).glob(f"checkpoint_*_{n}.pt"))
    assert len(found) == 1, (n, os.listdir(d))
    return found[0]


def temporaries(d):
    return [n for n in os.listdir(d) if ".d2v-tmp-" in n]


# ---- speech: the reference run, a SIGKILL during a checkpoint write ------------------------
@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_speech")
    data = write_corpus(root / "data", 40)
    straight, killed = root / "straight", root / "killed"
    ref = start(cmd(AUDIO, data, straight, *AUDIO_ARGS), root)
    # every write pauses between fsync and rename; kill in the pause of the copy to
    # checkpoint_last.pt at update 2 * EVERY (checkpoint_E_8.pt is complete by then)
    proc = start(cmd(AUDIO, data, killed, *AUDIO_ARGS), root, {PAUSE: "1.5"})
    head = read_until(proc, lambda l: f"@ {2 * EVERY} updates" in l and "Preparing to save" in l)
    head += read_until(proc, lambda l: PAUSE in l and l.rstrip().endswith("checkpoint_last.pt"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after_kill = {"last": updates(killed / "checkpoint_last.pt"), "tmp": temporaries(killed),
                  "newest": updates(at(killed, 2 * EVERY))}
    resumed = subprocess.run(cmd(AUDIO, data, killed, *AUDIO_ARGS), cwd=root, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300)
    straight_out = finish(ref)
    assert ref.returncode == 0 and resumed.returncode == 0, (straight_out[-3000:], resumed.stdout[-3000:])
    return {"root": root, "data": data, "straight": straight, "killed": killed, "straight_out": straight_out,
            "killed_out": head, "after_kill": after_kill, "resumed_out": resumed.stdout}


def test_local_var_logged_every_update(speech):
    logs = train_log(speech["straight_out"])
    assert [r["num_updates"] for r in logs] == list(range(1, TOTAL + 1))
    assert all(r["local_var"] > 0.05 for r in logs), logs
    # the speech local encoder trains: its output statistics move
    assert logs[0]["local_var"] != logs[-1]["local_var"]


def test_kill_during_checkpoint_write_keeps_last_intact(speech):
    """SIGKILL between writing and renaming checkpoint_last.pt: the old one is whole (update 4)."""
    after = speech["after_kill"]
    assert after["last"] == EVERY and after["newest"] == 2 * EVERY
    assert len(after["tmp"]) == 1 and after["tmp"][0].startswith(".checkpoint_last.pt"), after
    out = speech["resumed_out"]
    assert "the temporary file of an interrupted checkpoint write" in out, out[-3000:]
    assert not temporaries(speech["killed"])


def test_killed_speech_run_resumes_exactly(speech):
    """The same command continues from update 4 and ends where the uninterrupted run ends:
    same loss at every update, same student and EMA teacher."""
    out = speech["resumed_out"]
    assert "Loaded checkpoint" in out and f"@ {EVERY} updates" in out, out[-3000:]
    resumed, straight = train_log(out), train_log(speech["straight_out"])
    assert [r["num_updates"] for r in resumed] == list(range(EVERY + 1, TOTAL + 1))
    for a, b in zip(resumed, straight[EVERY:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    assert updates(speech["killed"] / "checkpoint_last.pt") == TOTAL
    assert_same_student_and_teacher(ckpt(speech["killed"] / "checkpoint_last.pt")["model"],
                                    ckpt(speech["straight"] / "checkpoint_last.pt")["model"])


# ---- speech: corrupt checkpoint_last.pt, full disk, read-only save directory ----------------
def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          stderr=subprocess.DEVNULL).returncode == 0


@pytest.fixture(scope="module")
def storage_faults(speech):
    """Three restarts from the reference run's checkpoints, run side by side:
    ``corrupt``: checkpoint_last.pt truncated and checkpoint_E_12.pt garbage;
    ``full``: checkpoint_last.pt (update 8) on a filesystem without room for another one
    (a size-limited tmpfs; without mount rights, a file-size limit on the process);
    ``readonly``: the save directory made read-only while checkpoint_E_12.pt is being written
    (tmpfs remounted read-only; without mount rights, chmod, which does not stop root)."""
    root, data = speech["root"], speech["data"]
    mounts = []
    corrupt = root / "corrupt"
    shutil.copytree(speech["straight"], corrupt)
    last = corrupt / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    at(corrupt, TOTAL).write_bytes(b"not a checkpoint")
    procs = {"corrupt": start(cmd(AUDIO, data, corrupt, *AUDIO_ARGS), root)}

    source = at(speech["straight"], 2 * EVERY)
    size = source.stat().st_size
    full = root / "full"
    limit = None
    if _mount_tmpfs(full, size + size // 2):
        mounts.append(full)
        how_full = "tmpfs"
    else:
        limit = size // 2
        how_full = "RLIMIT_FSIZE"
    shutil.copy(source, full / "checkpoint_last.pt")
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    procs["full"] = start(cmd(AUDIO, data, full, *AUDIO_ARGS, f"hydra.run.dir={root / 'hydra_full'}"), root, preexec_fn=preexec)

    readonly = root / "readonly"
    if _mount_tmpfs(readonly, 64 * 2**20):
        mounts.append(readonly)
        how_ro = "remount"
    elif os.geteuid() != 0:
        how_ro = "chmod"
    else:
        how_ro = None
    shutil.copy(source, readonly / "checkpoint_last.pt")
    outs = {}
    if how_ro:
        proc = start(cmd(AUDIO, data, readonly, *AUDIO_ARGS, f"hydra.run.dir={root / 'hydra_ro'}"), root, {PAUSE: "1"})
        head = read_until(proc, lambda l: PAUSE in l)
        if how_ro == "remount":
            subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True)
        else:
            readonly.chmod(0o555)
        outs["readonly"] = (proc, head)
    for name, proc in procs.items():
        outs[name] = (proc, "")
    results = {name: (finish(p, head), p.returncode) for name, (p, head) in outs.items()}
    originals = {"size": size, "bytes": source.read_bytes()}
    yield {"dirs": {"corrupt": corrupt, "full": full, "readonly": readonly}, "results": results,
           "how": {"full": how_full, "readonly": how_ro}, "original": originals}
    for m in mounts:
        subprocess.run(["umount", str(m)])
    if how_ro == "chmod":
        readonly.chmod(0o755)


def test_corrupt_last_checkpoint_falls_back(storage_faults, speech):
    """checkpoint_last.pt truncated, the newest interval checkpoint garbage: the same command
    says so, resumes from checkpoint_E_8.pt and ends where the uninterrupted run ends."""
    out, rc = storage_faults["results"]["corrupt"]
    d = storage_faults["dirs"]["corrupt"]
    assert rc == 0, out[-3000:]
    assert f"{d / 'checkpoint_last.pt'} cannot be read" in out, out[-3000:]
    assert f"{at(d, TOTAL)} is unreadable too" in out
    assert f"resuming from the newest readable checkpoint {at(d, 2 * EVERY)} (update {2 * EVERY})" in out
    logs = train_log(out)
    assert [r["num_updates"] for r in logs] == list(range(2 * EVERY + 1, TOTAL + 1))
    straight = train_log(speech["straight_out"])
    for a, b in zip(logs, straight[2 * EVERY:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    assert_same_student_and_teacher(ckpt(d / "checkpoint_last.pt")["model"],
                                    ckpt(speech["straight"] / "checkpoint_last.pt")["model"])


def test_full_disk_during_save(storage_faults):
    out, rc = storage_faults["results"]["full"]
    d = storage_faults["dirs"]["full"]
    print("full disk by", storage_faults["how"]["full"])
    assert rc != 0
    reason = "No space left on device" if storage_faults["how"]["full"] == "tmpfs" else "File too large"
    assert re.search(rf"cannot write checkpoint {d}/checkpoint_\d+_{TOTAL}\.pt: {reason}", out), out[-3000:]
    assert "the checkpoints already in" in out and "are intact" in out
    assert train_log(out)[-1]["num_updates"] == TOTAL
    assert (d / "checkpoint_last.pt").read_bytes() == storage_faults["original"]["bytes"]
    assert not temporaries(d)


def test_save_dir_made_read_only_during_save(storage_faults):
    how = storage_faults["how"]["readonly"]
    if how is None:
        pytest.skip("running as root without mount rights: nothing can make a directory unwritable for root")
    out, rc = storage_faults["results"]["readonly"]
    d = storage_faults["dirs"]["readonly"]
    assert rc != 0
    reason = "Read-only file system" if how == "remount" else "Permission denied"
    assert re.search(rf"cannot write checkpoint {d}/checkpoint_\d+_{TOTAL}\.pt: {reason}", out), out[-3000:]
    assert (d / "checkpoint_last.pt").read_bytes() == storage_faults["original"]["bytes"]
    assert updates(d / "checkpoint_last.pt") == 2 * EVERY


# ---- speech: NaN input, collapse of the local encoder, unreadable files mid-epoch --------------
@pytest.fixture(scope="module")
def stops(tmp_path_factory):
    """``nan``: a file overwritten with NaN samples after the checkpoint at update 4;
    ``collapse``: model.min_local_var far above local_var, checked from update 3 on;
    ``skip`` / ``error``: a truncated WAV and a truncated FLAC listed with full lengths
    (task.check_files=false), with and without task.skip_unreadable."""
    root = tmp_path_factory.mktemp("faults_stops")
    data = write_corpus(root / "data", 12, seed=5)
    every = ("checkpoint.save_interval_updates=2", "checkpoint.keep_interval_updates=1", "checkpoint.save_interval=1000",
             "common.log_interval=1", "dataset.max_tokens=48000")
    nan = start(cmd(AUDIO, data, root / "nan", "optimization.max_update=60", *every), root)
    head = read_until(nan, lambda l: "Saved checkpoint" in l and "@ 4 updates" in l)
    rows = (data / "train.tsv").read_text().splitlines()
    victim, frames = rows[3].split("\t")
    sf.write(data / victim, np.full(int(frames), np.nan, dtype=np.float32), SR, subtype="FLOAT")
    collapse = start(cmd(AUDIO, write_corpus(root / "data2", 12, seed=5), root / "collapse", "optimization.max_update=20", "+model.min_local_var=100",
                         "+model.collapse_check_start=3", *every), root)
    results = {"nan": (finish(nan, head), nan.returncode, root / "nan")}
    results["collapse"] = (finish(collapse), collapse.returncode, root / "collapse")

    bad = write_corpus(root / "bad", 12, seed=6)
    rng = np.random.default_rng(0)
    for name in ("cut.wav", "cut.flac"):
        sf.write(bad / "wav" / name, tone(1.0, rng), SR)
        b = (bad / "wav" / name).read_bytes()
        (bad / "wav" / name).write_bytes(b[: len(b) // 2])
    with open(bad / "train.tsv", "a") as f:
        f.write(f"wav/cut.wav\t{SR}\nwav/cut.flac\t{SR}\n")
    args = ("task.check_files=false", "optimization.max_update=8", "common.log_interval=1", "dataset.max_tokens=48000")
    skip = start(cmd(AUDIO, bad, root / "skip", "task.skip_unreadable=true", *args), root)
    results["skip"] = (finish(skip), skip.returncode, root / "skip")
    results["bad_manifest"] = bad / "train.tsv"
    return results


def _stopped_at(out):
    m = re.search(r"training stopped at update (\d+) \(([^)]+)\)", out)
    assert m, out[-4000:]
    return int(m.group(1)), m.group(2)


def test_nan_stops_naming_update_losses_and_last_checkpoint(stops):
    out, rc, save = stops["nan"]
    assert rc != 0
    update, what = _stopped_at(out)
    assert what == "NaN or inf" and "gradients are Nan/Inf" in out
    assert re.search(rf"loss terms and statistics of update {update}: loss=nan, loss_AUDIO_regression=nan", out), out[-4000:]
    m = re.search(r"last good checkpoint: (\S+) \(update (\d+)\); it is kept", out)
    assert m and m.group(1) == str(save / "checkpoint_last.pt"), out[-4000:]
    good = int(m.group(2))
    assert 4 <= good < update and good == update - 1 - (update - 1) % 2  # the last save, every 2 updates
    state = ckpt(save / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] == good
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v))


def test_local_encoder_collapse_stops(stops):
    out, rc, save = stops["collapse"]
    assert rc != 0
    update, what = _stopped_at(out)
    assert (update, what) == (4, "representation collapse")
    local = train_log(out)[-1]["local_var"]  # update 3, the last finished one
    m = re.search(r"local_var is ([0-9.e+-]+) < model\.min_local_var=100(\.0)? at update 4 \(target_var=\S+, pred_var=\S+, local_var=", out)
    assert m, out[-4000:]
    assert float(m.group(1)) == pytest.approx(local, rel=0.5)
    assert f"last good checkpoint: {save / 'checkpoint_last.pt'} (update 2)" in out
    assert updates(save / "checkpoint_last.pt") == 2


def test_unreadable_files_mid_epoch_skipped_and_counted(stops):
    out, rc, _ = stops["skip"]
    assert rc == 0, out[-3000:]
    assert re.search(r"train\.tsv line 14: .*cut\.wav: truncated: \d+ samples, its row says 16000; skipped \(\d skipped", out), out[-3000:]
    assert re.search(r"train\.tsv line 15: .*cut\.flac: not a readable audio file .*; skipped \(\d skipped", out)
    assert train_log(out)[-1]["num_updates"] == 8


def test_unreadable_file_mid_epoch_is_an_error_naming_it(stops):
    """Without skip_unreadable, reading the same files (the task's dataset, as training builds
    it) stops with an error naming the file and its manifest row."""
    from d2v_plugin.data.audio_dataset import AudioManifestDataset, UnreadableAudioError

    manifest = stops["bad_manifest"]
    ds = AudioManifestDataset(str(manifest), check_files=False, min_sample_size=8000)
    for line, name, reason in ((14, "cut.wav", r"truncated: \d+ samples, its row says 16000"),
                               (15, "cut.flac", "not a readable audio file")):
        with pytest.raises(UnreadableAudioError, match=rf"{manifest} line {line}: \S+{name}: {reason}.*task\.skip_unreadable=true"):
            ds[line - 2]


def test_local_var_matches_an_independent_computation(speech):
    """local_var is target_var's statistic (per channel the std over all real steps of the
    batch, then the mean over channels) of the modality encoder's output, for 2.0 speech (the
    reference run's model; clone_batch 1 and 2) and 1.0 speech; computed here with numpy."""
    import d2v_plugin
    from d2v_plugin.models.v1.audio import Data2VecAudioConfig, Data2VecAudioModel

    torch.manual_seed(0)
    source = torch.randn(2, 8000)
    pm = torch.zeros(2, 8000, dtype=torch.bool)
    pm[1, 5000:] = True

    def independent(feats, frame_pm):
        x = feats[~frame_pm].detach().double().numpy()
        return float(np.sqrt(x.var(axis=0, ddof=1) + 1e-6).mean())

    for clone in (1, 2):
        model = d2v_plugin.load_pretraining_model(str(speech["straight"] / "checkpoint_last.pt"), {"clone_batch": clone})
        out = model(source=source, padding_mask=pm, id=torch.arange(2))
        enc = model.modality_encoders["AUDIO"]
        feats = enc.local_features(source)
        frame_pm = enc.convert_padding_mask(feats, pm)
        assert frame_pm.any() and not frame_pm.all()
        assert out["local_var"].item() == pytest.approx(independent(feats, frame_pm), rel=1e-4)

    cfg = Data2VecAudioConfig(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                              conv_feature_layers="[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16,2,2)] * 2", conv_pos=8,
                              conv_pos_groups=4, pos_conv_depth=2, mask_prob=0.65, mask_length=3, ema_anneal_end_step=10,
                              average_top_k_layers=1, seed=1)
    v1 = Data2VecAudioModel(cfg)
    out = v1(source=source, padding_mask=pm, id=torch.arange(2))
    x, frame_pm = v1.encoder_input(source, pm)
    assert out["local_var"].item() == pytest.approx(independent(x, frame_pm), rel=1e-4)


# ---- images: SIGKILL mid-run with a corrupt PNG skipped; without skipping, an error ---------
I_TOTAL, I_EVERY, I_KILL = 6, 2, 3  # 3 batches per epoch
IMAGE_ARGS = (f"optimization.max_update={I_TOTAL}", f"checkpoint.save_interval_updates={I_EVERY}", "common.log_interval=1",
              "dataset.batch_size=4", "checkpoint.save_interval=1000", "task.skip_unreadable=true")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_images")
    data = write_images(root / "data", classes=2, per_class=5)
    png = (data / "train" / "class0" / "0.png").read_bytes()
    (data / "train" / "class1" / "zz_cut.png").write_bytes(png[: len(png) // 2])
    straight, killed = root / "straight", root / "killed"
    ref = start(cmd(IMAGE, data, straight, *IMAGE_ARGS), root)
    proc = start(cmd(IMAGE, data, killed, *IMAGE_ARGS), root)
    # mid-training: two updates after the checkpoint at update 5
    head = read_until(proc, lambda l: "[train_inner]" in l and f"num_updates={I_KILL}," in l)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = start(cmd(IMAGE, data, killed, *IMAGE_ARGS), root)
    outs = {"straight": finish(ref), "resumed": finish(resumed), "killed": head}
    assert ref.returncode == 0 and resumed.returncode == 0, (outs["straight"][-3000:], outs["resumed"][-3000:])
    return {"data": data, "straight": straight, "killed": killed, "outs": outs}


def test_killed_image_run_resumes_exactly(images):
    outs = images["outs"]
    assert f"@ {I_EVERY} updates" in outs["resumed"] and "Loaded checkpoint" in outs["resumed"], outs["resumed"][-3000:]
    resumed, straight = train_log(outs["resumed"]), train_log(outs["straight"])
    assert train_log(outs["killed"])[-1]["num_updates"] == I_KILL  # killed past the checkpoint
    assert [r["num_updates"] for r in resumed] == list(range(I_EVERY + 1, I_TOTAL + 1))
    for a, b in zip(resumed, straight[I_EVERY:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    assert updates(images["killed"] / "checkpoint_last.pt") == I_TOTAL
    assert_same_student_and_teacher(ckpt(images["killed"] / "checkpoint_last.pt")["model"],
                                    ckpt(images["straight"] / "checkpoint_last.pt")["model"])


def test_corrupt_image_mid_epoch(images):
    """Skipped and counted with task.skip_unreadable=true (2 epochs); without it, the
    task's dataset stops with an error naming the file."""
    from d2v_plugin.data.image_dataset import ImageDataError, ImageFolderDataset

    outs, bad = images["outs"], images["data"] / "train" / "class1" / "zz_cut.png"
    counts = re.findall(rf"skipped unreadable image {re.escape(str(bad))} \((\d+) skipped so far in this process\)", outs["straight"])
    # a running count, at least once per epoch (fairseq also reads the first batch at start)
    assert len(counts) >= 2 and counts == [str(i) for i in range(1, len(counts) + 1)], outs["straight"][-3000:]
    ds = ImageFolderDataset(str(images["data"] / "train"), 32, train=True)
    index = [i for i in range(len(ds)) if ds.path(i) == str(bad)][0]
    with pytest.raises(ImageDataError, match=rf"cannot read image {re.escape(str(bad))}: .*task\.skip_unreadable=true"):
        ds[index]
