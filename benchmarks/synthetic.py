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


MAKERS = {"text": make_text}
