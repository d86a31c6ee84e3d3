"""Image classification: fine-tuning and linear probing through the real fairseq-hydra-train on
scikit-learn's digits, d2v-classify, Meta's official-format checkpoints, the loss and the
layer-wise learning rates against independent computations, and bad inputs."""

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import BIN, compat_dir, hydra_train, run

FT, PROBE = "finetuning/image/tiny", "finetuning/image/linear_probe_tiny"
PRETRAIN_UPDATES, FT_UPDATES, PROBE_UPDATES = 200, 60, 100


def write_digits(root):
    """scikit-learn's digits as 32 px PNGs: root/{train,val}/<digit>/<n>.png, every 10th image in val
    (what scripts/train_image.sh writes)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("val" if i % 10 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((image * (255.0 / 16.0)).astype(np.uint8))
        gray.resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return root


def val_accuracies(output):
    return [float(m) for m in re.findall(r"valid on 'val' subset \| loss [0-9.]+ \| accuracy ([0-9.]+)", output)]


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def pretrained(digits, tmp_path_factory):
    """The tiny data2vec 2.0 image model pretrained on the digits (shared by every test here)."""
    save = tmp_path_factory.mktemp("image_tiny")
    hydra_train("pretraining/image_tiny", f"task.data={digits}", f"checkpoint.save_dir={save}",
                f"optimization.max_update={PRETRAIN_UPDATES}", "checkpoint.save_interval_updates=0")
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def finetuned(digits, pretrained, tmp_path_factory):
    save = tmp_path_factory.mktemp("image_ft")
    # without mixup / cutmix, RandAugment and random erasing (the recipe's regularisation needs more
    # than the test's 100 updates; the mixup loss has its own test below); label smoothing, layer decay stay
    proc = hydra_train(FT, f"task.data={digits}", f"model.model_path={pretrained}", f"checkpoint.save_dir={save}",
                       f"optimization.max_update={FT_UPDATES}", f"dataset.validate_interval_updates={FT_UPDATES // 2}",
                       f"checkpoint.save_interval_updates={FT_UPDATES // 2}",  # every validation can become checkpoint_best
                       "criterion.mixup=0", "criterion.cutmix=0", "task.auto_augment=", "task.re_prob=0")
    return save, proc.stdout


@pytest.fixture(scope="session")
def probes(digits, pretrained, tmp_path_factory):
    """Linear probes of the pretrained encoder and of a randomly initialised one, same budget."""
    out = {}
    for name, extra in (("pretrained", []), ("random", ["model.no_pretrained_weights=true"])):
        save = tmp_path_factory.mktemp(f"probe_{name}")
        proc = hydra_train(PROBE, f"task.data={digits}", f"model.model_path={pretrained}", f"checkpoint.save_dir={save}",
                           f"optimization.max_update={PROBE_UPDATES}", f"dataset.validate_interval_updates={PROBE_UPDATES}", *extra)
        out[name] = (save, proc.stdout)
    return out


# ---- real runs -------------------------------------------------------------------------

def test_finetune_beats_chance_and_logs_top5(finetuned):
    save, output = finetuned
    accs = val_accuracies(output)
    assert len(accs) >= 2, output[-3000:]
    assert max(accs) > 28.0, f"fine-tuned top-1 {accs} is not clearly above chance (10%)"
    top5 = [float(m) for m in re.findall(r"\| top5 ([0-9.]+)", output)]
    assert top5 and all(t >= a for t, a in zip(top5, accs))
    assert (save / "checkpoint_best.pt").is_file()


def test_linear_probe_pretrained_beats_random_and_encoder_stays_frozen(probes, pretrained):
    acc_pre = max(val_accuracies(probes["pretrained"][1]))
    acc_rand = max(val_accuracies(probes["random"][1]))
    assert acc_pre > 30.0, f"linear probe of the pretrained encoder: {acc_pre}%"
    assert acc_pre > acc_rand + 3.0, f"pretrained {acc_pre}% vs random init {acc_rand}%"
    loss = {k: float(re.search(r"valid on 'val' subset \| loss ([0-9.]+)", v[1]).group(1)) for k, v in probes.items()}
    assert loss["pretrained"] < loss["random"], loss
    import d2v_plugin
    from d2v_plugin.checkpoints import read_checkpoint

    probe = read_checkpoint(str(probes["pretrained"][0] / "checkpoint_last.pt"))["model"]
    ref = d2v_plugin.checkpoints.load_student(str(pretrained)).state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(probe["encoder." + k], v, rtol=0, atol=0, msg=f"frozen encoder changed: {k}")
    assert "fc_norm.running_mean" in probe and "fc_norm.weight" not in probe  # BatchNorm without affine


def test_d2v_classify_agrees_with_validation(finetuned, digits):
    save, output = finetuned
    best = max(val_accuracies(output))
    proc = run([BIN / "d2v-classify", save / "checkpoint_best.pt", digits / "val", "--top-k", "3"])
    rows = re.findall(r"(\S+\.png)((?:\t\d \d\.\d{4}){3})$", proc.stdout, re.M)  # path, then 3 x "class probability"
    assert len({path for path, _ in rows}) == 180, proc.stdout[-2000:]
    m = re.search(r"top-1 accuracy: ([0-9.]+)%", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert abs(float(m.group(1)) - best) < 0.01, (m.group(1), best)


def test_classifier_logits_match_fairseq_model(finetuned, digits):
    from fairseq import checkpoint_utils

    from d2v_plugin.classify import ClassPrediction, ImageClassifier

    save, _ = finetuned
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_best.pt")],
                                                                   arg_overrides={"data": str(digits)})
    model = models[0].eval()
    task.load_dataset("val")
    ds = task.dataset("val")
    batch = ds.collater([ds[i] for i in range(8)])
    with torch.no_grad():
        want = model(**batch["net_input"])
    clf = ImageClassifier.from_checkpoint(str(save / "checkpoint_best.pt"))
    got = clf.logits([ds.path(i) for i in range(8)], batch_size=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    preds = clf.predict([ds.path(0), ds.path(1)], top_k=2)
    assert isinstance(preds[0], ClassPrediction) and clf.class_names == [str(d) for d in range(10)]
    assert preds[0].indices[0] == int(want[0].argmax()) and preds[0].names[0] == str(preds[0].indices[0])
    assert abs(preds[0].probabilities[0] - float(want[0].softmax(-1).max())) < 1e-5


# ---- Meta's checkpoints, in-process ----------------------------------------------------------

def _build(digits, model_path, **model):
    from omegaconf import OmegaConf

    from d2v_plugin.models.finetuning.image_classification import ImageClassificationModel, ImageClassificationModelConfig
    from d2v_plugin.tasks.image_classification import ImageClassificationConfig, ImageClassificationTask

    task = ImageClassificationTask.setup_task(OmegaConf.structured(ImageClassificationConfig(data=str(digits), input_size=32, seed=1)))
    cfg = OmegaConf.structured(ImageClassificationModelConfig(model_path=str(model_path), **model))
    return ImageClassificationModel.build_model(cfg, task), task


@pytest.mark.parametrize("name", ["v2_image", "v1_image"])
def test_finetuning_starts_from_meta_checkpoints(digits, name):
    compat = compat_dir()
    model, task = _build(digits, compat / f"{name}.checkpoint.pt", drop_path_rate=0.0)
    expected = torch.load(compat / f"{name}.expected.pt", map_location="cpu", weights_only=True)
    model.eval()
    with torch.no_grad():
        x = model.encoder.extract_features(expected["source"])["x"]
        torch.testing.assert_close(x, expected["x"], atol=1e-4, rtol=0)
        logits = model(expected["source"])
        pooled = F.layer_norm(expected["x"].mean(1), (64,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
        torch.testing.assert_close(logits, model.head(pooled), atol=1e-4, rtol=0)
    assert logits.shape == (2, 10) and model.cfg.class_names == [str(d) for d in range(10)]
    assert model.cfg.pretrained_model_args["_name"] == ("data2vec_multi" if name.startswith("v2") else "data2vec_vision")
    model.train()
    F.cross_entropy(model(expected["source"]), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient"


# ---- independent computations --------------------------------------------------------------

def test_layer_decay_lr_scales(digits):
    """Every parameter's lr scale is decay ** (L + 1 - layer) (BEiT's layer ids for 1.0; Meta's
    2.0 code decays only the blocks), and biases / 1-D parameters get no weight decay."""
    compat = compat_dir()
    decay = 0.5
    for name in ("v2_image", "v1_image"):
        model, _ = _build(digits, compat / f"{name}.checkpoint.pt", layer_decay=decay)
        names = [n for n, _ in model.named_parameters()]
        # 2.0: prenet blocks (context_encoder.blocks.i) come first, then the shared blocks
        prenet = {int(m.group(1)) for n in names if (m := re.search(r"context_encoder\.blocks\.(\d+)\.", n))}
        shared = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.(?:encoder\.)?blocks\.(\d+)\.", n))}
        num_layers = len(prenet) + len(shared) + 1
        scales = set()
        for n, p in model.named_parameters():
            pre = re.search(r"context_encoder\.blocks\.(\d+)\.", n)
            b = re.match(r"encoder\.(?:encoder\.)?blocks\.(\d+)\.", n)
            if pre:
                layer = int(pre.group(1)) + 1
            elif b:
                layer = len(prenet) + int(b.group(1)) + 1
            elif name == "v1_image" and re.match(r"encoder\.(patch_embed|cls_emb)", n):
                layer = 0
            elif name == "v1_image" and "rel_pos_bias" in n:
                layer = num_layers - 1
            else:
                layer = num_layers
            opt = p.optim_overrides["optimizer"]
            assert math.isclose(opt.get("lr_scale", 1.0), decay ** (num_layers - layer), rel_tol=1e-12), (name, n, opt)
            assert (opt.get("weight_decay_scale") == 0) == (p.dim() == 1 or n.endswith(".bias")), (name, n, opt)
            scales.add(opt.get("lr_scale", 1.0))
        assert len(scales) >= 3


def test_finetune_optimizer_groups_have_the_decayed_lrs(finetuned):
    """fairseq's composite optimizer turned the overrides into groups with lr * 0.75 ** k (tiny.yaml)."""
    _, output = finetuned
    lrs = {float(x) for x in re.findall(r"Group : \w+:\{.*?'lr': \[([0-9.e-]+)\]", output)}
    assert sorted(lrs) == pytest.approx(sorted({0.002 * 0.75 ** k for k in range(3)}), rel=1e-9), lrs


def test_mixup_and_label_smoothing_loss_against_independent_computation(digits):
    from timm.loss import LabelSmoothingCrossEntropy

    from d2v_plugin.criteria.image_classification import ImageClassificationCriterion, ImageClassificationCriterionConfig

    class Task:
        num_classes = 10

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    x, y = torch.randn(5, 3, 4, 4), torch.tensor([0, 3, 3, 7, 9])
    sample = {"net_input": {"source": x}, "target": y}
    eps = 0.1

    plain = ImageClassificationCriterion(ImageClassificationCriterionConfig(mixup=0, cutmix=0, label_smoothing=eps), Task())
    loss, n, _ = plain(head.train(), sample)
    torch.testing.assert_close(loss, LabelSmoothingCrossEntropy(eps)(head(x), y) * 5)

    mix = ImageClassificationCriterion(ImageClassificationCriterionConfig(mixup=1.0, cutmix=0, mixup_prob=1.0, label_smoothing=eps), Task())
    np.random.seed(3)
    loss, n, _ = mix(head.train(), sample)
    np.random.seed(3)
    mixed, _ = mix.training_targets(x, y)
    # timm mixes the even part of the batch with its reverse: recover the mixing weight from the images
    lam = float(((mixed[0] - x[3]) / (x[0] - x[3])).median())
    torch.testing.assert_close(mixed[:4], lam * x[:4] + (1 - lam) * x[:4].flip(0))
    torch.testing.assert_close(mixed[4], x[4])
    smooth = torch.full((5, 10), eps / 10).scatter_(1, y[:, None], 1 - eps + eps / 10)
    target = torch.cat([lam * smooth[:4] + (1 - lam) * smooth[:4].flip(0), smooth[4:]])
    torch.testing.assert_close(loss, -(target * F.log_softmax(head(mixed), -1)).sum())
    assert 0 < lam < 1 and n == 5


# ---- bad input --------------------------------------------------------------------------------

def test_text_or_speech_checkpoint_is_refused(digits):
    compat = compat_dir()
    for name, modality in (("v2_text", "TEXT"), ("v2_audio", "AUDIO")):
        with pytest.raises(ValueError, match=f"{name}.checkpoint.pt is a {modality} model; this task needs a IMAGE checkpoint"):
            _build(digits, compat / f"{name}.checkpoint.pt")


def test_class_missing_from_val_is_an_error(tmp_path):
    """The task refuses it at setup (before any model is built), naming the class and both folders."""
    import shutil

    from d2v_plugin.data.image_dataset import ImageDataError

    data = write_digits(tmp_path / "digits")
    shutil.rmtree(data / "val" / "7")
    with pytest.raises(ImageDataError, match=r"class\(es\) 7 of .*train have no folder in .*val"):
        _build(data, "unused.pt")


def test_load_model_and_inference_export(finetuned, digits, tmp_path):
    """d2v_plugin.load_model classifies as ImageClassifier does, from the checkpoint and from its
    inference export (encoder + head in safetensors, class names and input size in config.json)."""
    import d2v_plugin
    from d2v_plugin.classify import ImageClassifier

    save, _ = finetuned
    ckpt = save / "checkpoint_best.pt"
    images = sorted((digits / "val").glob("*/*.png"))[::18]
    want = ImageClassifier.from_checkpoint(str(ckpt)).logits(images)
    clf = d2v_plugin.load_model(str(ckpt))
    assert isinstance(clf, ImageClassifier)
    torch.testing.assert_close(clf.logits(images), want)
    export = tmp_path / "export"
    printed = run([BIN / "d2v-export", ckpt, "--out", export, "--format", "inference"]).stdout
    assert "head: d2v_image_classification" in printed
    again = d2v_plugin.load_model(str(export))
    assert again.class_names == clf.class_names and again.input_size == clf.input_size
    torch.testing.assert_close(again.logits(images), want)
    assert [p.names for p in again.predict(images, top_k=2)] == [p.names for p in clf.predict(images, top_k=2)]

    import onnxruntime as ort

    onnx_dir = tmp_path / "onnx"
    assert "head: d2v_image_classification" in run([BIN / "d2v-export", ckpt, "--out", onnx_dir, "--format", "onnx"]).stdout
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.stack([clf.preprocess(im) for im in images])
    got = session.run(None, {"source": batch.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)
