"""Large corpora: a speech manifest of 200k rows builds its dataset from the manifest alone
(no file opened, a few tens of bytes per row), and text data directories given as
``data1:data2`` are read one shard per epoch, as fairseq does."""

import gc
import os
import time
import tracemalloc

import numpy as np
import pytest

from d2v_plugin.data import audio_dataset
from d2v_plugin.data.audio_dataset import AudioManifestDataset

ROWS = 200_000


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory):
    """200k rows pointing at files of which only the first exists."""
    root = tmp_path_factory.mktemp("big_manifest")
    sizes = np.random.default_rng(0).integers(16_000, 320_000, ROWS)
    lines = "".join(f"spk{i % 1000}/utt{i:07d}.flac\t{n}\n" for i, n in enumerate(sizes))
    (root / "train.tsv").write_text(f"{root}\n{lines}")
    return root / "train.tsv", sizes


def test_manifest_sizes_without_opening_files(big_manifest, monkeypatch):
    manifest, sizes = big_manifest
    opened = []
    monkeypatch.setattr(audio_dataset.sf, "SoundFile", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(OSError))
    monkeypatch.setattr(audio_dataset.os.path, "isfile", lambda p, real=os.path.isfile: opened.append(p) if str(p).endswith(".flac") else real(p))
    start = time.perf_counter()
    ds = AudioManifestDataset(str(manifest), check_files=False, max_sample_size=250_000)
    elapsed = time.perf_counter() - start
    assert opened == [], f"{len(opened)} audio files were touched while building the dataset"
    assert len(ds) == ROWS
    np.testing.assert_array_equal(ds.sizes, sizes)
    assert ds.num_tokens(1) == min(int(sizes[1]), 250_000)
    row = ds.rows[123_456]
    assert (row.path, row.num_samples, row.line) == (f"spk456/utt0123456.flac", int(sizes[123_456]), 123_456 + 2)
    assert len(ds.ordered_indices()) == ROWS
    # a quiet 2-core machine: about 1 s
    assert elapsed < 20, f"building the dataset of {ROWS} rows took {elapsed:.1f} s"


def test_manifest_rows_cost_tens_of_bytes(big_manifest):
    """The rows the dataset keeps (what every data-loader worker shares) are numpy arrays,
    not one Python object per row (a ManifestRow list costs ~250 bytes per row)."""
    manifest, _ = big_manifest
    small = manifest.parent / "first_50k.tsv"  # tracemalloc slows every allocation down
    with open(manifest) as f:
        small.write_text("".join(next(f) for _ in range(50_001)))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ds = AudioManifestDataset(str(small), check_files=False)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(ds) == 50_000
    assert kept / len(ds) < 80, f"the dataset keeps {kept / len(ds):.0f} bytes per manifest row"


def test_text_shards_one_per_epoch(tmp_path, text_bin):
    """task.data=A:B: epoch 1 reads A, epoch 2 B, epoch 3 A again (fairseq reloads the train
    split every epoch when the task reports sharded data)."""
    from conftest import binarize, write_structured_corpus

    from d2v_plugin.tasks.text_pretraining import TextPretrainingConfig, TextPretrainingTask

    write_structured_corpus(tmp_path / "train.txt", 40, seed=5)
    write_structured_corpus(tmp_path / "valid.txt", 5, seed=6)
    binarize(tmp_path, tmp_path / "bin", srcdict=text_bin / "dict.txt")
    cfg = TextPretrainingConfig(data=f"{text_bin}{os.pathsep}{tmp_path / 'bin'}", tokens_per_sample=16, seed=1)
    task = TextPretrainingTask.setup_task(cfg)
    assert task.has_sharded_data("train"), "fairseq reloads the train split each epoch only for sharded data"
    blocks = []
    for epoch in (1, 2, 3):
        task.load_dataset("train", epoch=epoch)
        blocks.append(len(task.datasets["train"]))
    assert blocks[0] == blocks[2] != blocks[1], f"blocks per epoch {blocks}: shard A, shard B, shard A again"
