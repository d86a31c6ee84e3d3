"""data2vec 2.0 speech: tiny pretraining, Meta checkpoint compatibility, bad input, LibriSpeech prep."""

import hashlib
import io
import logging
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import REPO, compat_dir, env, hydra_train, train_log

SR = 16000


def tone(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A harmonic tone with slow amplitude modulation plus a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(100, 300)
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 5))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)) + 0.05 * rng.standard_normal(len(t))
    return (0.3 * x).astype(np.float32)


def write_corpus(root: Path, n: int, seed: int = 0, extra=()) -> Path:
    """``n`` 16 kHz wavs of 0.6-1.6 s and a manifest; ``extra`` rows (name, num_samples) are appended."""
    rng = np.random.default_rng(seed)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        wav = tone(rng.uniform(0.6, 1.6), rng)
        sf.write(root / "wav" / f"{i:03d}.wav", wav, SR)
        rows.append(f"wav/{i:03d}.wav\t{len(wav)}")
    rows += [f"{name}\t{size}" for name, size in extra]
    (root / "train.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
    return root


# ---- 1. tiny pretraining through fairseq-hydra-train --------------------------------
def test_tiny_audio_pretraining(tmp_path):
    data = write_corpus(tmp_path / "data", 40, extra=[("wav/corrupt.wav", 16000), ("wav/empty.wav", 16000)])
    (data / "wav" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + os.urandom(64))
    (data / "wav" / "empty.wav").write_bytes(b"")
    save = tmp_path / "ckpt"
    proc = hydra_train(
        "pretraining/audio_tiny",
        f"task.data={data}",
        f"checkpoint.save_dir={save}",
        "task.skip_unreadable=true",
        "optimization.max_update=80",
        timeout=300,
    )
    out = proc.stdout
    assert "2 unreadable file(s), skipped" in out, out[-3000:]
    assert "corrupt.wav" in out and "empty.wav" in out
    logs = [r for r in train_log(out) if "loss" in r]
    assert len(logs) >= 6, out[-3000:]
    first = np.mean([r["loss"] for r in logs[:2]])
    last = np.mean([r["loss"] for r in logs[-2:]])
    print("losses", [r["loss"] for r in logs])
    assert last < first * 0.97, [r["loss"] for r in logs]
    # 50% of the frames hidden (int(T * 0.5) of T per row: slightly under 0.5)
    for r in logs:
        assert abs(r["masked_pct"] - 0.5) < 0.02, r
    import d2v_plugin

    enc = d2v_plugin.load_encoder(str(save / "checkpoint_last.pt"))
    x = enc.extract_features(torch.zeros(2, 16000), torch.zeros(2, 16000, dtype=torch.bool))["x"]
    assert x.shape == (2, 49, 64)


# ---- 2. Meta's checkpoint ------------------------------------------------------------
def test_meta_v2_audio_checkpoint():
    compat = compat_dir()
    import d2v_plugin

    enc = d2v_plugin.load_encoder(str(compat / "v2_audio.checkpoint.pt"))
    e = torch.load(compat / "v2_audio.expected.pt", weights_only=True)
    with torch.no_grad():
        out = enc(e["source"], e["padding_mask"])
    assert out.last_hidden_state.shape == e["x"].shape
    assert torch.equal(out.padding_mask, e["out_padding_mask"])
    keep = ~e["out_padding_mask"]
    diff = (out.last_hidden_state - e["x"])[keep].abs().max().item()
    print(f"v2_audio max abs diff {diff:.3g}")
    assert diff < 1e-4


def test_alibi_slopes_and_conv_spec():
    from d2v_plugin.models.alibi import alibi_bias_1d, alibi_slopes
    from d2v_plugin.models.modalities.audio import parse_conv_spec

    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    b = alibi_bias_1d(2, 4)
    assert b.shape == (2, 4, 4) and b[0, 0, 3] == b[0, 3, 0] == -3 * alibi_slopes(2)[0]
    assert parse_conv_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)]") == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)]
    for bad in ("__import__('os').system('true')", "[(1, 2)]", "[]", "[(1, 2, 3.5)]"):
        with pytest.raises(ValueError, match="feature_encoder_spec"):
            parse_conv_spec(bad)


# ---- 3. bad input ----------------------------------------------------------------------
def _dataset(manifest, **kw):
    from d2v_plugin.data.audio_dataset import AudioManifestDataset

    return AudioManifestDataset(str(manifest), **kw)


@pytest.fixture
def bad_corpus(tmp_path):
    rng = np.random.default_rng(1)
    root = write_corpus(tmp_path, 3)
    sf.write(root / "wav" / "rate22k.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(22050) / 22050), 22050)  # 1 s
    sf.write(root / "wav" / "stereo.wav", np.stack([tone(1.0, rng)] * 2, axis=1), SR)
    (root / "wav" / "corrupt.flac").write_bytes(b"fLaC" + os.urandom(200))
    (root / "wav" / "empty.wav").write_bytes(b"")
    sf.write(root / "wav" / "nosamples.wav", np.zeros(0, dtype=np.float32), SR)
    return root


def _manifest(root: Path, *names) -> Path:
    good = (root / "train.tsv").read_text().splitlines()
    path = root / ("m-" + "-".join(names) + ".tsv")
    path.write_text("\n".join(good + [f"wav/{n}\t16000" for n in names]) + "\n")
    return path


@pytest.mark.parametrize(
    "name,kind,message",
    [
        ("rate22k.wav", "AudioFormatError", "sample rate 22050 Hz, the task expects 16000 Hz"),
        ("stereo.wav", "AudioFormatError", "2 channels; data2vec expects mono"),
        ("corrupt.flac", "UnreadableAudioError", "not a readable audio file"),
        ("empty.wav", "UnreadableAudioError", "empty file (0 bytes)"),
        ("nosamples.wav", "UnreadableAudioError", "empty audio (0 samples)"),
        ("missing.wav", "UnreadableAudioError", "file does not exist"),
    ],
)
def test_bad_file_is_named(bad_corpus, name, kind, message):
    from d2v_plugin.data import audio_dataset

    manifest = _manifest(bad_corpus, name)
    with pytest.raises(getattr(audio_dataset, kind)) as err:
        _dataset(manifest)
    text = str(err.value)
    assert message in text and str(bad_corpus / "wav" / name) in text and f"{manifest} line 5" in text, text


def test_skip_unreadable_counts(bad_corpus, caplog):
    manifest = _manifest(bad_corpus, "corrupt.flac", "empty.wav", "nosamples.wav", "missing.wav")
    with caplog.at_level(logging.INFO):
        ds = _dataset(manifest, skip_unreadable=True)
    assert len(ds) == 3
    assert "4 unreadable file(s), skipped" in caplog.text
    # wrong formats are never skipped silently
    from d2v_plugin.data.audio_dataset import AudioFormatError

    with pytest.raises(AudioFormatError, match="stereo.wav"):
        _dataset(_manifest(bad_corpus, "stereo.wav"), skip_unreadable=True)


def test_read_time_errors_and_resample(bad_corpus, caplog):
    from d2v_plugin.data.audio_dataset import UnreadableAudioError

    manifest = _manifest(bad_corpus, "corrupt.flac")
    ds = _dataset(manifest, check_files=False)
    with pytest.raises(UnreadableAudioError, match=r"line 5: .*corrupt\.flac: not a readable audio file"):
        ds[3]
    ds = _dataset(manifest, check_files=False, skip_unreadable=True)
    with caplog.at_level(logging.WARNING):
        batch = ds.collater([ds[i] for i in range(4)])
    assert batch["net_input"]["source"].shape[0] == 3 and "1 skipped" in caplog.text
    assert set(batch["net_input"]) == {"source", "padding_mask", "id"}
    # resampling on request: the 22.05 kHz file becomes 1 s at 16 kHz
    ds = _dataset(_manifest(bad_corpus, "rate22k.wav"), resample=True, normalize=True)
    assert ds.sizes[3] == 16000 and ds[3]["source"].shape == (16000,)
    assert abs(float(ds[3]["source"].std()) - 1) < 1e-3


def test_cropping_and_padding(tmp_path):
    root = write_corpus(tmp_path, 6, seed=3)
    ds = _dataset(root / "train.tsv", max_sample_size=12000, min_sample_size=11000)
    assert all(n >= 11000 for n in ds.sizes)
    b = ds.collater([ds[i] for i in range(len(ds))])
    n = b["net_input"]["source"].shape[1]
    assert n == min(12000, min(ds.sizes)) and not b["net_input"]["padding_mask"].any()
    ds = _dataset(root / "train.tsv", pad=True)
    b = ds.collater([ds[0], ds[1]])
    lengths = (~b["net_input"]["padding_mask"]).sum(1).tolist()
    assert sorted(lengths) == sorted([int(ds.sizes[0]), int(ds.sizes[1])])


# ---- 4. datasets/librispeech/prepare.sh against a local HTTP server -----------------------
TRANSCRIPTS = {
    ("19", "198"): ["NORTHANGER ABBEY", "THIS LITTLE WORK WAS FINISHED"],
    ("26", "495"): ["NO ONE WHO HAD EVER SEEN", "HER FATHER WAS A CLERGYMAN"],
}


# Libri-light's librispeech_finetuning.tgz: <folder>/{clean,other}/<speaker>/<chapter>/ (10m = 1h/0)
LIMITED = {
    "1h/0/clean": {("19", "198"): ["NORTHANGER ABBEY", "THIS LITTLE WORK"]},
    "1h/3/other": {("26", "495"): ["NO ONE WHO HAD EVER SEEN"]},
    "9h/clean": {("103", "1240"): ["CHAPTER ONE", "MISSUS RACHEL LYNDE"]},
}


def _speech_tar(path: Path, folders, rng, readme: str) -> None:
    """A tar.gz of LibriSpeech-style ``<folder>/<speaker>/<chapter>/`` FLACs and transcripts."""
    with tarfile.open(path, "w:gz") as tar:
        for folder, chapters in folders.items():
            for (spk, chapter), texts in chapters.items():
                base = f"{folder}/{spk}/{chapter}"
                lines = []
                for utt, text in enumerate(texts):
                    name = f"{spk}-{chapter}-{utt:04d}"
                    buf = io.BytesIO()
                    sf.write(buf, tone(0.3 + 0.1 * utt, rng), SR, format="FLAC")
                    _add(tar, f"{base}/{name}.flac", buf.getvalue())
                    lines.append(f"{name} {text}")
                _add(tar, f"{base}/{spk}-{chapter}.trans.txt", ("\n".join(lines) + "\n").encode())
        _add(tar, readme, b"test fixture\n")


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Tiny LibriSpeech archives served by ``python -m http.server`` on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mirror")
    rng = np.random.default_rng(2)
    md5 = []
    for split in ("train-clean-100", "dev-clean"):
        _speech_tar(root / f"{split}.tar.gz", {f"LibriSpeech/{split}": TRANSCRIPTS}, rng, "LibriSpeech/README.TXT")
        md5.append(f"{hashlib.md5((root / f'{split}.tar.gz').read_bytes()).hexdigest()}  {split}.tar.gz")
    (root.parent / "md5.txt").write_text("\n".join(md5) + "\n")
    _speech_tar(root / "librispeech_finetuning.tgz", {f"librispeech_finetuning/{k}": v for k, v in LIMITED.items()},
                rng, "librispeech_finetuning/README")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the local HTTP server did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", root, root.parent / "md5.txt"
    server.terminate()
    server.wait(timeout=10)


def _prepare(*args):
    e = env()
    e["PYTHON"] = sys.executable
    return subprocess.run(
        ["bash", str(REPO / "datasets" / "librispeech" / "prepare.sh"), *map(str, args)],
        env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )


def test_librispeech_prepare(mirror, tmp_path):
    url, served, md5 = mirror
    out = tmp_path / "libri"
    # a partial download from an earlier, interrupted run
    (out / "download").mkdir(parents=True)
    whole = (served / "dev-clean.tar.gz").read_bytes()
    (out / "download" / "dev-clean.tar.gz.part").write_bytes(whole[: len(whole) // 2])
    args = ["--out", out, "--splits", "train-clean-100,dev-clean", "--mirror", url, "--md5-file", md5, "--workers", "1"]
    proc = _prepare(*args)
    assert proc.returncode == 0, proc.stdout
    m = out / "manifests"
    tsv = (m / "train.tsv").read_text().splitlines()
    assert tsv[0] == str(out / "LibriSpeech") and len(tsv) == 5
    path, n = tsv[1].split("\t")
    assert path == "train-clean-100/19/198/19-198-0000.flac" and int(n) == int(0.3 * SR)
    assert sf.info(str(out / "LibriSpeech" / path)).frames == int(n)
    assert (m / "train.wrd").read_text().splitlines()[:2] == TRANSCRIPTS[("19", "198")]
    assert (m / "train.ltr").read_text().splitlines()[0] == "N O R T H A N G E R | A B B E Y |"
    assert len((m / "dev_clean.tsv").read_text().splitlines()) == 5
    assert len((m / "dev_clean.ltr").read_text().splitlines()) == 4
    letters = dict(line.split() for line in (m / "dict.ltr.txt").read_text().splitlines())
    assert letters["|"] == "18" and set(letters) <= set("|ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
    # idempotent: nothing is downloaded or written again
    again = _prepare(*args)
    assert again.returncode == 0 and "downloading" not in again.stdout and "already written, skipped" in again.stdout


def test_librispeech_bad_checksum(mirror, tmp_path):
    url, _, md5 = mirror
    wrong = tmp_path / "wrong_md5.txt"
    wrong.write_text("0" * 32 + "  dev-clean.tar.gz\n")
    out = tmp_path / "libri"
    proc = _prepare("--out", out, "--splits", "dev-clean", "--mirror", url, "--md5-file", wrong, "--workers", "1")
    assert proc.returncode != 0
    assert "dev-clean.tar.gz is corrupt: MD5" in proc.stdout and "expected " + "0" * 32 in proc.stdout, proc.stdout
    assert (out / "download" / "dev-clean.tar.gz.bad").exists()
    assert not (out / "LibriSpeech").exists()
    # an unknown split is a clear error too
    bad = _prepare("--out", out, "--splits", "dev-noisy")
    assert bad.returncode != 0 and "unknown split 'dev-noisy'" in bad.stdout


def _rows(tsv: Path):
    return [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]]


def test_librilight_limited_splits(mirror, tmp_path):
    """--limited 10m / 10h: Libri-light's training folders (SHA-256 checked) plus the dev split."""
    url, served, md5 = mirror
    sha = hashlib.sha256((served / "librispeech_finetuning.tgz").read_bytes()).hexdigest()
    common = ["--splits", "dev-clean", "--mirror", url, "--md5-file", md5, "--workers", "1",
              "--limited-url", f"{url}/librispeech_finetuning.tgz", "--limited-sha256", sha]
    out = tmp_path / "ll"
    proc = _prepare("--out", out, "--limited", "10m", *common)
    assert proc.returncode == 0, proc.stdout
    m = out / "manifests"
    tsv = (m / "train.tsv").read_text().splitlines()
    assert tsv[0] == str(out / "librispeech_finetuning")
    assert _rows(m / "train.tsv") == ["1h/0/clean/19/198/19-198-0000.flac", "1h/0/clean/19/198/19-198-0001.flac"]
    assert (m / "train.wrd").read_text().splitlines() == LIMITED["1h/0/clean"][("19", "198")]
    assert (m / "train.ltr").read_text().splitlines()[1] == "T H I S | L I T T L E | W O R K |"
    letters = dict(line.split() for line in (m / "dict.ltr.txt").read_text().splitlines())
    assert letters["|"] == "5" and "Y" in letters and "C" not in letters  # counts of the 10 min set only
    assert len(_rows(m / "dev_clean.tsv")) == 4
    # 10h = 1h/* + 9h, in the same directory: the archive is not fetched again
    proc = _prepare("--out", out, "--limited", "10h", *common)
    assert proc.returncode == 0 and "downloading" not in proc.stdout, proc.stdout
    rows = _rows(m / "train.tsv")
    assert len(rows) == 5 and rows[2].startswith("1h/3/other/26/495/") and rows[3].startswith("9h/clean/103/1240/")
    # a corrupt archive is refused and moved aside; a training split beside --limited is refused
    bad = _prepare("--out", tmp_path / "bad", "--limited", "1h", *common[:-1], "f" * 64)
    assert bad.returncode != 0 and f"librispeech_finetuning.tgz is corrupt: SHA-256 {sha}, expected {'f' * 64}" in bad.stdout, bad.stdout
    assert (tmp_path / "bad" / "download" / "librispeech_finetuning.tgz.bad").exists()
    assert not (tmp_path / "bad" / "librispeech_finetuning").exists()
    mixed = _prepare("--out", tmp_path / "bad", "--limited", "1h", "--splits", "train-clean-100,dev-clean")
    assert mixed.returncode != 0 and "--limited 1h replaces the training splits: drop train-clean-100" in mixed.stdout
