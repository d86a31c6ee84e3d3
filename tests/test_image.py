"""data2vec 2.0 images: pretraining through ``fairseq-hydra-train``, Meta checkpoint
compatibility, bad input, ``datasets/imagenet/prepare.sh`` and ``scripts/train_image.sh``."""

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, compat_dir, env, hydra_train, train_log

TINY = "pretraining/image_tiny"


def write_images(root: Path, classes: int = 4, per_class: int = 16, size: int = 40, seed: int = 0) -> Path:
    """Striped / checkered PNGs (a different pattern family per class) in ImageFolder layout."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            freq, phase = rng.uniform(0.1, 0.4), rng.uniform(0, 2 * np.pi)
            wave = np.sin(freq * (xx if c % 2 else yy) + phase)
            if c >= 2:
                wave = wave * np.sin(freq * yy + phase)
            rgb = np.stack([wave * rng.uniform(0.3, 1.0) for _ in range(3)], axis=-1)
            Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(folder / f"{i}.png")
    return root


# ---- pretraining --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data = write_images(tmp_path_factory.mktemp("images"))
    save = tmp_path_factory.mktemp("image_tiny")
    proc = hydra_train(
        TINY, f"task.data={data}", f"checkpoint.save_dir={save}",
        "optimization.max_update=80", "common.log_interval=10",
        cwd=tmp_path_factory.mktemp("cwd"),
    )
    return save, proc.stdout, train_log(proc.stdout)


def test_loss_falls_and_mask_ratio(tiny_run):
    _, out, rows = tiny_run
    assert len(rows) == 8, out[-3000:]
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.9 * first, [r["loss"] for r in rows]
    # 16 patches, inverse block mask with mask_prob 0.75: int(16 * 0.25) = 4 stay visible
    assert rows[-1]["masked_pct"] == pytest.approx(0.75, abs=1e-4)
    # 2 clones x 16 images x 12 masked patches are predicted; the CLS loss is logged too
    assert rows[-1]["sample_size"] == pytest.approx(2 * 16 * 12)
    assert rows[-1]["loss_cls"] > 0 and rows[-1]["loss_IMAGE_regression"] > 0


def test_checkpoint_layout_and_encoder(tiny_run):
    import d2v_plugin
    from d2v_plugin.models.modalities.image import sincos_positions_2d

    save, _, _ = tiny_run
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    teacher = state["_ema"]
    # full-model teacher with its own local encoder, no decoder (ema_encoder_only=false)
    assert set(teacher) == {k for k in state if k != "_ema" and ".decoder." not in k}
    pos = state["modality_encoders.IMAGE.fixed_positional_encoder.positions"]
    assert torch.equal(pos[0], sincos_positions_2d(64, 4, 4))  # computed, never trained
    encoder = d2v_plugin.load_encoder(str(save / "checkpoint_last.pt"))
    with torch.no_grad():
        out = encoder.extract_features(torch.randn(3, 3, 32, 32), None)
    assert out["x"].shape == (3, 16, 64)  # CLS removed


# ---- Meta's checkpoint --------------------------------------------------------------
def test_loads_meta_image_checkpoint():
    import d2v_plugin

    compat = compat_dir()
    encoder = d2v_plugin.load_encoder(str(compat / "v2_image.checkpoint.pt"))
    expected = torch.load(compat / "v2_image.expected.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        out = encoder(expected["source"])
        with_cls = encoder(expected["source"], keep_extra_tokens=True)
        meta_format = encoder.extract_features(expected["source"], None, remove_extra_tokens=False)
    assert out.last_hidden_state.shape == expected["x"].shape
    torch.testing.assert_close(out.last_hidden_state, expected["x"], atol=1e-4, rtol=0)
    # the CLS token on request: in the typed output and in Meta's extract_features format
    assert with_cls.last_hidden_state.shape == (2, 17, 64)
    assert torch.equal(with_cls.last_hidden_state[:, 0], out.cls)
    assert torch.equal(meta_format["x"], with_cls.last_hidden_state)


# ---- masks and ALiBi ----------------------------------------------------------------
def test_block_mask_counts_and_reproducibility():
    from d2v_plugin.models.block_masking import block_mask_2d, num_masked_patches

    for h, prob, length, inverse in [(14, 0.8, 3, True), (4, 0.75, 3, True), (7, 0.6, 2, False)]:
        mask = block_mask_2d(64, h, h, prob, length, mask_prob_adjust=0.07, inverse_mask=inverse)
        assert (mask.sum(1) == num_masked_patches(h * h, prob, inverse)).all()
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    assert torch.equal(block_mask_2d(4, 14, 14, 0.8, 3, 0.07, True, generator=g1),
                       block_mask_2d(4, 14, 14, 0.8, 3, 0.07, True, generator=g2))
    # inverse masks leave square blocks visible: most visible patches have a visible neighbour
    visible = (1 - block_mask_2d(256, 14, 14, 0.8, 3, 0.07, True)).view(-1, 14, 14).float()
    neighbours = torch.nn.functional.max_pool2d(visible[:, None], 3, 1, 1)[:, 0] * 9 - visible
    assert ((neighbours > 0) & (visible > 0)).sum() > 0.9 * visible.sum()


def tiny_model(**image):
    from d2v_plugin.checkpoints import model_config
    from d2v_plugin.models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel

    image = {"input_size": 16, "patch_size": 4, "embed_dim": 32, "prenet_depth": 0, "num_extra_tokens": 1,
             "mask_prob": 0.8, "mask_length": 2, "inverse_mask": True, "ema_local_encoder": True,
             "decoder": {"decoder_dim": 16, "decoder_groups": 1, "decoder_kernel": 3, "decoder_layers": 1}, **image}
    cfg = model_config({"supported_modality": "IMAGE", "depth": 2, "embed_dim": 32, "num_heads": 2,
                        "average_top_k_layers": 2, "clone_batch": 2, "cls_loss": 0.01, "ema_encoder_only": False,
                        "modalities": {"image": image}, "max_update": 10}, Data2VecMultiConfig)
    return Data2VecMultiModel(cfg)


def test_image_alibi_and_no_prenet():
    model = tiny_model(use_alibi_encoder=True, learned_alibi_scale=True, learned_alibi_scale_per_layer=True)
    enc = model.modality_encoders["IMAGE"]
    assert enc.alibi_scale.shape == (2, 1, 1, 1, 1)
    assert enc.context_encoder.norm is not None  # post-norm image encoders keep it without prenet blocks
    out = model(torch.randn(3, 3, 16, 16), id=torch.arange(3))
    sum(v.sum() for v in out["losses"].values()).backward()
    assert enc.alibi_scale.grad is not None
    assert out["masked_pct"] == pytest.approx(1 - int(16 * 0.2) / 16)
    model.eval()
    assert model.extract_features(torch.randn(3, 3, 16, 16))["x"].shape == (3, 16, 32)


def test_half_precision_student_with_fp32_teacher():
    """fp16/bf16 training: the image batch arrives in the student's dtype, the teacher stays fp32."""
    model = tiny_model(prenet_depth=1).to(torch.bfloat16)
    out = model(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16), id=torch.arange(2))
    assert all(torch.isfinite(v.float()).all() for v in out["losses"].values())


# ---- bad input ----------------------------------------------------------------------
def test_corrupt_image_names_the_file(tmp_path):
    from d2v_plugin.data.image_dataset import ImageDataError, ImageFolderDataset

    data = write_images(tmp_path, classes=2, per_class=3)
    bad = tmp_path / "train" / "class1" / "zz_corrupt.JPEG"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, format="JPEG")
    truncated = tmp_path / "train" / "class0" / "zz_truncated.JPEG"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])

    ds = ImageFolderDataset(str(data / "train"), 32, train=True)
    bad_ids = [i for i in range(len(ds)) if "zz_" in ds.path(i)]
    assert len(bad_ids) == 2
    for i in bad_ids:
        with pytest.raises(ImageDataError, match=rf"{ds.path(i)}.*task.skip_unreadable=true"):
            ds[i]

    skipping = ImageFolderDataset(str(data / "train"), 32, train=True, skip_unreadable=True)
    batch = skipping.collater([skipping[i] for i in range(len(skipping))])
    assert batch["net_input"]["source"].shape == (6, 3, 32, 32)
    assert skipping.num_skipped == 2


def test_empty_class_folder_and_missing_split(tmp_path):
    from d2v_plugin.data.image_dataset import ImageDataError
    from d2v_plugin.tasks.image_pretraining import ImagePretrainingConfig, ImagePretrainingTask

    data = write_images(tmp_path, classes=2, per_class=2)
    (data / "train" / "class_empty").mkdir()
    (data / "train" / "class_empty" / "notes.txt").write_text("no images here")
    task = ImagePretrainingTask.setup_task(ImagePretrainingConfig(data=str(data), input_size=32, seed=1))
    with pytest.raises(ImageDataError, match=r"class_empty"):
        task.load_dataset("train")
    with pytest.raises(FileNotFoundError, match=r"split 'valid'.*prepare.sh"):
        task.load_dataset("valid")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        ImagePretrainingTask.setup_task(ImagePretrainingConfig(data=str(tmp_path / "nope"), seed=1))


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    """A restarted process (a resumed run) must see the same augmented images: the random crop
    and flip of a sample come from (seed, epoch, index), not from the process's RNG state."""
    from d2v_plugin.data.image_dataset import ImageFolderDataset

    data = write_images(tmp_path, classes=1, per_class=3)
    ds = ImageFolderDataset(str(data / "train"), 32, train=True, seed=1)
    first = ds[1]["source"]
    torch.manual_seed(123)
    torch.rand(1000)  # whatever the process drew before
    torch.testing.assert_close(ds[1]["source"], first, rtol=0, atol=0)
    assert not torch.equal(ds[2]["source"], first)
    ds.set_epoch(2)
    assert not torch.equal(ds[1]["source"], first)  # a new epoch, new crops
    other_seed = ImageFolderDataset(str(data / "train"), 32, train=True, seed=2)
    assert not torch.equal(other_seed[1]["source"], first)


# ---- datasets/imagenet/prepare.sh ---------------------------------------------------
WNIDS = ["n01440764", "n01443537", "n01484850"]
TRAIN_PER_CLASS = [3, 2, 4]
VAL_LABELS = [2, 1, 3, 3, 2, 1]  # ILSVRC2012_IDs of val images 1..6


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 80, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def imagenet_tars(tmp_path_factory):
    """Tiny archives laid out like ILSVRC2012_img_train.tar, _img_val.tar and the devkit."""
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("ilsvrc")
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, n in zip(WNIDS, TRAIN_PER_CLASS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(n):
                    _add(t, f"{wnid}_{i + 10}.JPEG", _jpeg(i))
            _add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
        for i in range(len(VAL_LABELS)):
            _add(t, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(100 + i))
    # meta.mat: the 3 leaf synsets plus a parent synset (ILSVRC2012_ID > 1000 in the real one)
    synsets = np.array(
        [(k + 1, w, f"class {k}", 0) for k, w in enumerate(WNIDS)] + [(1001, "n00001740", "entity", 3)],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets.reshape(-1, 1)})
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        _add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
             "".join(f"{v}\n" for v in VAL_LABELS).encode())
        _add(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
    return root


def run_prepare(tars: Path, out: Path, *extra):
    cmd = ["bash", REPO / "datasets/imagenet/prepare.sh", "--train-tar", tars / "ILSVRC2012_img_train.tar",
           "--val-tar", tars / "ILSVRC2012_img_val.tar", "--devkit", tars / "ILSVRC2012_devkit_t12.tar.gz",
           "--out", out, *extra]
    e = dict(env(), PYTHON=sys.executable)
    return subprocess.run([str(c) for c in cmd], env=e, cwd=out.parent, capture_output=True, text=True, timeout=300)


def test_prepare_imagenet(imagenet_tars, tmp_path):
    out = tmp_path / "imagenet"
    proc = run_prepare(imagenet_tars, out, "--expect-counts", "9,6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for wnid, n in zip(WNIDS, TRAIN_PER_CLASS):
        files = sorted(p.name for p in (out / "train" / wnid).iterdir())
        assert files == [f"{wnid}_{i + 10}.JPEG" for i in range(n)]
    for i, label in enumerate(VAL_LABELS):
        path = out / "val" / WNIDS[label - 1] / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        assert path.read_bytes() == _jpeg(100 + i)
    assert "verified: train 9 images in 3 classes, val 6 images in 3 classes" in proc.stdout

    # idempotent: a finished run is kept; an interrupted class is redone
    import shutil
    shutil.rmtree(out / "train" / WNIDS[1])
    (out / "train" / f".{WNIDS[1]}.partial").mkdir()
    (out / "train" / f".{WNIDS[1]}.partial" / "half_written.JPEG").write_bytes(b"")
    proc = run_prepare(imagenet_tars, out, "--expect-counts", "9,6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 3 classes were already extracted" in proc.stdout and "val: " in proc.stdout
    assert sorted(p.name for p in (out / "train" / WNIDS[1]).iterdir()) == [f"{WNIDS[1]}_10.JPEG", f"{WNIDS[1]}_11.JPEG"]
    assert not (out / "train" / f".{WNIDS[1]}.partial").exists()

    # the default counts are ImageNet's: this tiny set fails the check, naming both numbers
    proc = run_prepare(imagenet_tars, out)
    assert proc.returncode != 0
    assert "train has 9 images, expected 1,281,167" in proc.stderr and "val has 6 images, expected 50,000" in proc.stderr

    # the result is a dataset the image task reads
    from d2v_plugin.data.image_dataset import ImageFolderDataset

    assert len(ImageFolderDataset(str(out / "val"), 32, train=False)) == 6


def test_val_labels_file(tmp_path):
    from d2v_plugin.prep.imagenet import PrepError, labels_from_file

    txt = tmp_path / "labels.txt"
    txt.write_text("ILSVRC2012_val_00000002.JPEG n01443537\nILSVRC2012_val_00000001.JPEG\tn01440764\n")
    assert labels_from_file(str(txt)) == ["n01440764", "n01443537"]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4 n01751748 5 6 7 8 \n")
    assert labels_from_file(str(csv)) == ["n01751748"]
    txt.write_text("ILSVRC2012_val_00000003.JPEG n01443537\n")
    with pytest.raises(PrepError, match="no label for 2"):
        labels_from_file(str(txt))


# ---- scripts/train_image.sh ---------------------------------------------------------
def test_train_image_script_default_and_resume(tmp_path):
    script = REPO / "scripts" / "train_image.sh"
    run = lambda *a, checks="0": subprocess.run(["bash", str(script), *a], cwd=tmp_path,  # noqa: E731
                                                env={**env(), "D2V_QUICK_START_CHECKS": checks},
                                                capture_output=True, text=True, timeout=300)
    proc = run("optimization.max_update=10", "common.log_interval=5", checks="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # the quick start ends with the training curves and the held-out probe
    save = tmp_path / "checkpoints" / "image_tiny"
    assert (save / "training.png").is_file() and f"plot: {save}/training.png" in out
    probe = re.search(r"pretrained .*held-out accuracy ([0-9.]+)\n  random init .*held-out accuracy ([0-9.]+)", out)
    assert probe and 0 <= float(probe.group(1)) <= 1 and 0 <= float(probe.group(2)) <= 1, out[-3000:]
    digits = tmp_path / "data" / "digits_images"
    assert len(list((digits / "train" / "3").glob("*.png"))) > 150
    assert Image.open(next((digits / "val" / "7").glob("*.png"))).size == (32, 32)
    assert [r["num_updates"] for r in train_log(out)] == [5, 10]
    ckpt = tmp_path / "checkpoints" / "image_tiny" / "checkpoint_last.pt"
    assert ckpt.is_file() and str(ckpt) in out

    proc = run("optimization.max_update=15", "common.log_interval=5")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out and "using the digits images" in out
    assert [r["num_updates"] for r in train_log(out)] == [15]
