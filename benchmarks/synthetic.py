"""Synthetic, reproducibly seeded training data for the benchmarks, one maker per modality.

Each maker writes a dataset under ``out_dir`` and returns the path to pass as ``task.data``.
The same arguments always produce byte-identical files, so two implementations (or two
machines) can be benchmarked on the same data. A finished dataset is reused: a stamp file
records the arguments it was made with.

Add a modality by writing ``make_<modality>(out_dir, size, seed, python)`` and listing it
in :data:`MAKERS`.
"""

import json
import os
import subprocess
import sys

import numpy as np

# --data-size when none is given: text tokens, audio clips, images
DEFAULT_SIZES = {"text": 500_000, "audio": 200, "image": 400}

STAMP = "synthetic.json"


def _finished(out_dir: str, params: dict, result: str) -> bool:
    stamp = os.path.join(out_dir, STAMP)
    if not os.path.isfile(stamp) or not os.path.isdir(result):
        return False
    with open(stamp) as f:
        return json.load(f) == params


def _write_stamp(out_dir: str, params: dict) -> None:
    with open(os.path.join(out_dir, STAMP), "w") as f:
        json.dump(params, f, indent=1, sort_keys=True)


def make_text(out_dir: str, size: int, seed: int = 1, python: str = sys.executable) -> str:
    """A Zipf-distributed word corpus of about ``size`` training tokens, binarized.

    Words are drawn from a 4,000-type vocabulary with Zipf exponent 1.1 (roughly the shape
    of natural text), in lines of 5 to 60 words; a validation split of 5% the size is
    written too. ``fairseq-preprocess --only-source`` (run by ``python``) binarizes both
    into ``out_dir/bin``, which is returned.
    """
    params = {"modality": "text", "size": int(size), "seed": int(seed), "version": 1}
    bin_dir = os.path.join(out_dir, "bin")
    if _finished(out_dir, params, bin_dir):
        return bin_dir
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(4000)])
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    for split, n_tokens in (("train", size), ("valid", max(size // 20, 1000))):
        with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
            written = 0
            while written < n_tokens:
                n = int(rng.integers(5, 61))
                f.write(" ".join(vocab[rng.choice(len(vocab), size=n, p=weights)]) + "\n")
                written += n
    cmd = [
        python, "-m", "fairseq_cli.preprocess",
        "--only-source",
        "--trainpref", os.path.join(out_dir, "train.txt"),
        "--validpref", os.path.join(out_dir, "valid.txt"),
        "--destdir", bin_dir,
        "--workers", "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    _write_stamp(out_dir, params)
    return bin_dir


def make_audio(out_dir: str, size: int, seed: int = 1, python: str = sys.executable) -> str:
    """``size`` mono 16 kHz clips of 1 to 2 s (16-bit WAV, written with soundfile) and a
    wav2vec-style manifest: ``train.tsv`` (first line the root, then ``path<TAB>samples``)
    and ``valid.tsv`` (5% as many clips, at least 2). Each clip is a few random sine tones
    with a slow amplitude envelope plus noise, so it is not silence and not white noise.
    ``out_dir`` is returned: the task's ``data``. ``python`` is unused (text binarizes with it).
    """
    import soundfile as sf

    params = {"modality": "audio", "size": int(size), "seed": int(seed), "version": 1}
    if _finished(out_dir, params, out_dir):
        return out_dir
    rate = 16000
    rng = np.random.default_rng(seed)
    for split, n_clips in (("train", size), ("valid", max(size // 20, 2))):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        rows = [os.path.abspath(out_dir)]
        for i in range(n_clips):
            n = int(rng.integers(rate, 2 * rate + 1))
            t = np.arange(n) / rate
            tones = rng.uniform(80, 4000, size=3)
            wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in tones)
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t)
            wave = 0.1 * wave * envelope + 0.02 * rng.standard_normal(n)
            rel = os.path.join(split, f"{i:06d}.wav")
            sf.write(os.path.join(out_dir, rel), wave.astype(np.float32), rate, subtype="PCM_16")
            rows.append(f"{rel}\t{n}")
        with open(os.path.join(out_dir, f"{split}.tsv"), "w") as f:
            f.write("\n".join(rows) + "\n")
    _write_stamp(out_dir, params)
    return out_dir


def make_image(out_dir: str, size: int, seed: int = 1, python: str = sys.executable) -> str:
    """``size`` RGB PNGs of 32 x 32 pixels in an ImageFolder layout, ``train/<class>/<i>.png``
    over 10 classes, and ``valid/`` with 5% as many (at least 10): what both this plugin's
    ``d2v_image_pretraining`` and Meta's ``mae_image_pretraining`` read (``DATA/<split>``,
    torchvision ImageFolder). Each image is a smooth random colour gradient with noise and a
    random rectangle. ``out_dir`` is returned: the task's ``data``.
    """
    from PIL import Image

    params = {"modality": "image", "size": int(size), "seed": int(seed), "version": 1}
    if _finished(out_dir, params, out_dir):
        return out_dir
    rng = np.random.default_rng(seed)
    px, classes = 32, 10
    ramp = np.linspace(0, 1, px)
    for split, n_images in (("train", size), ("valid", max(size // 20, classes))):
        for i in range(n_images):
            a, b = rng.uniform(0, 255, size=(2, 3))
            img = a + (b - a) * (ramp[:, None, None] * rng.uniform() + ramp[None, :, None] * rng.uniform())
            y, x = rng.integers(0, px - 4, size=2)
            h, w = rng.integers(4, px // 2, size=2)
            img[y : y + h, x : x + w] = rng.uniform(0, 255, size=3)
            img = np.clip(img + rng.normal(0, 8, size=img.shape), 0, 255).astype(np.uint8)
            folder = os.path.join(out_dir, split, f"c{i % classes}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img, "RGB").save(os.path.join(folder, f"{i:06d}.png"), optimize=False)
    _write_stamp(out_dir, params)
    return out_dir


MAKERS = {"text": make_text, "audio": make_audio, "image": make_image}
