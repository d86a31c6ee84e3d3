"""``d2v-extract``: features of text lines, audio files and images, checked against the
encoder (and Meta's output for text), with clear errors for inputs of the wrong modality."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import d2v_plugin
from d2v_plugin.export.extract import main
from helpers import compat_dir, env


def test_text_lines_match_meta_output(tmp_path):
    """Row 1 of v1_text.expected.pt is one sentence: its features are Meta's."""
    ckpt = tmp_path / "v1_text.checkpoint.pt"
    shutil.copyfile(compat_dir() / "v1_text.checkpoint.pt", ckpt)
    shutil.copyfile(compat_dir() / "v1_text.dict.txt", tmp_path / "dict.txt")  # found beside the checkpoint
    e = torch.load(compat_dir() / "v1_text.expected.pt", weights_only=True)
    (tmp_path / "lines.txt").write_text("\n" + e["text_rows"][1] + "\n\nthe old man helps a red ball .\n")
    assert main([str(ckpt), str(tmp_path / "lines.txt"), "--out", str(tmp_path / "out")]) == 0
    first = np.load(tmp_path / "out" / "lines_00000.npy")
    n = int((~e["padding_mask"][1]).sum())
    assert first.shape == (n, 64)
    assert np.abs(first - e["x"][1, :n].numpy()).max() < 1e-4
    assert (tmp_path / "out" / "lines_00001.npy").is_file() and not (tmp_path / "out" / "lines_00002.npy").exists()
    # all layers, in one safetensors file
    assert main([str(ckpt), str(tmp_path / "lines.txt"), "--out", str(tmp_path / "all"), "--layer", "all", "--format", "safetensors"]) == 0
    from safetensors.numpy import load_file

    stacked = load_file(str(tmp_path / "all" / "features.safetensors"))
    assert sorted(stacked) == ["lines_00000", "lines_00001"] and stacked["lines_00000"].shape == (2, n, 64)
    np.testing.assert_allclose(stacked["lines_00000"][-1], first, atol=1e-6)  # the last block's output is the output


def test_audio_files_each_as_if_alone(tmp_path):
    """Files of different lengths: each file's features are those of the file alone (speech
    models see padding, so only files of one length share a batch)."""
    ckpt = str(compat_dir() / "v1_audio.checkpoint.pt")
    rng = np.random.default_rng(0)
    waves = {"long": rng.standard_normal(16000).astype(np.float32) * 0.1, "short": rng.standard_normal(9000).astype(np.float32) * 0.1,
             "short2": rng.standard_normal(9000).astype(np.float32) * 0.1}
    for name, w in waves.items():
        sf.write(tmp_path / f"{name}.wav", w, 16000)
    assert main([ckpt, *[str(tmp_path / f"{n}.wav") for n in waves], "--out", str(tmp_path / "out")]) == 0
    enc = d2v_plugin.load_encoder(ckpt)
    for name, w in waves.items():
        x = torch.from_numpy(w)
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)
        with torch.no_grad():
            alone = enc(x[None]).last_hidden_state[0].numpy()
        got = np.load(tmp_path / "out" / f"{name}.npy")
        assert got.shape == alone.shape
        assert np.abs(got - alone).max() < 1e-4, name


def test_images_and_a_chosen_layer(tmp_path):
    ckpt = str(compat_dir() / "v2_image.checkpoint.pt")
    Image.fromarray((np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert main([ckpt, str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--layer", "0"]) == 0
    from d2v_plugin.data.image_dataset import eval_transform, load_rgb

    enc = d2v_plugin.load_encoder(ckpt)
    img = eval_transform(enc.cfg.modalities.image.input_size)(load_rgb(str(tmp_path / "a.png")))
    with torch.no_grad():
        ref = enc(img[None], output_hidden_states=True).hidden_states[0][0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out" / "a.npy"), ref, atol=1e-5)


def test_wrong_inputs_are_named(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"not an image")
    assert main([str(compat_dir() / "v1_audio.checkpoint.pt"), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "a.png" in capsys.readouterr().err
    assert main([str(compat_dir() / "v2_image.checkpoint.pt"), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    assert main([str(compat_dir() / "v2_image.checkpoint.pt"), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "a.png" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello\n")
    assert main([str(compat_dir() / "v1_text.checkpoint.pt"), str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--dict" in capsys.readouterr().err  # no dict.txt beside the shared checkpoint
    assert main([str(compat_dir() / "v2_image.checkpoint.pt"), str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--layer", "x"]) == 2
    assert "--layer 'x'" in capsys.readouterr().err


def test_command_line_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "d2v_plugin.export.extract", "--help"], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--layer" in proc.stdout and "--no-normalize" in proc.stdout
