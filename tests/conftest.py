"""Fixtures shared by the test modules."""

import random
import subprocess

import pytest

from helpers import BIN, env


def write_structured_corpus(path, lines: int, seed: int = 0, vocab: int = 200) -> None:
    """Sentences built from short repeating patterns, so a model can learn something."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    with open(path, "w") as f:
        for _ in range(lines):
            start = rng.randrange(vocab - 10)
            period = rng.randint(3, 7)
            f.write(" ".join(words[start + j % period] for j in range(rng.randint(10, 40))) + "\n")


def binarize(text_dir, out_dir, train="train.txt", valid="valid.txt", srcdict=None) -> None:
    cmd = [
        str(BIN / "fairseq-preprocess"), "--only-source",
        "--trainpref", str(text_dir / train), "--validpref", str(text_dir / valid),
        "--destdir", str(out_dir), "--workers", "1",
    ]
    if srcdict:
        cmd += ["--srcdict", str(srcdict)]
    subprocess.run(cmd, check=True, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def text_bin(tmp_path_factory):
    """A small fairseq-binarized corpus (train/valid + dict.txt)."""
    root = tmp_path_factory.mktemp("text_corpus")
    write_structured_corpus(root / "train.txt", 3000, seed=0)
    write_structured_corpus(root / "valid.txt", 50, seed=1)
    binarize(root, root / "bin")
    return root / "bin"
