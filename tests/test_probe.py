"""python -m d2v_plugin.probe on a tiny image checkpoint (image_tiny trained 6 updates on a
few digits through fairseq-hydra-train): the printed accuracies are what scikit-learn's
logistic regression gives on mean-pooled features computed here independently, from the
pretrained encoder and from an untrained one of the same architecture; the speech data
holds out whole sentences."""

import json
import re

import numpy as np
import pytest

from helpers import hydra_train


def write_digits(root):
    """150 of scikit-learn's digits as a 32 px ImageFolder in ``root``: every 5th image in val/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (image, label) in enumerate(zip(d.images[:150], d.target[:150])):
        folder = root / ("val" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((image * (255.0 / 16.0)).astype(np.uint8))
        gray.resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")


IMAGE_RUN_UPDATES = 6


def image_run(tmp_path_factory):
    """(digits folder, save dir) of image_tiny trained IMAGE_RUN_UPDATES updates on the digits,
    logged every update in the simple format, with model.min_target_var=2 (above its target_var;
    the check starts at update 5000). Trained once per session: tests/test_plot.py reads its log."""
    root = tmp_path_factory.getbasetemp() / "shared_image_run"
    digits, save = root / "digits", root / "image_run"
    if not (save / "checkpoint_last.pt").is_file():
        write_digits(digits)
        hydra_train("pretraining/image_tiny", f"task.data={digits}", f"checkpoint.save_dir={save}",
                    f"optimization.max_update={IMAGE_RUN_UPDATES}", "common.log_interval=1",
                    "common.log_format=simple", "model.min_target_var=2.0")
    return digits, save


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    return image_run(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def image_checkpoint(tmp_path_factory):
    return image_run(tmp_path_factory)[1] / "checkpoint_last.pt"


def _pooled(encoder, images):
    import torch

    with torch.no_grad():
        return encoder(torch.stack(images)).last_hidden_state.mean(1).numpy()


def _sklearn_accuracy(train_x, train_y, test_x, test_y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0)).fit(train_x, train_y)
    return clf.score(test_x, test_y)


def test_image_probe_against_sklearn(image_checkpoint, digits, tmp_path, capsys):
    import torchvision

    import d2v_plugin
    from d2v_plugin.data.image_dataset import eval_transform
    from d2v_plugin.probe import main, untrained_copy

    out = tmp_path / "probe.json"
    assert main([str(image_checkpoint), "--data", str(digits), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["train_examples"] == 120 and result["eval_examples"] == 30 and result["classes"] == 10
    assert f"pretrained  {image_checkpoint}: held-out accuracy {result['pretrained']:.3f}" in printed
    assert f"random init (same architecture, untrained): held-out accuracy {result['random_init']:.3f}" in printed
    assert re.search(r"120 train / 30 held-out examples, 10 classes", printed)

    # the same numbers from features computed here (torchvision's ImageFolder, plain mean over patches)
    splits = [torchvision.datasets.ImageFolder(str(digits / s), transform=eval_transform(32)) for s in ("train", "val")]
    (train_x, train_y), (test_x, test_y) = [([x for x, _ in ds], [ds.classes[y] for _, y in ds]) for ds in splits]
    pretrained = d2v_plugin.load_encoder(str(image_checkpoint))
    for name, enc in (("pretrained", pretrained), ("random_init", untrained_copy(pretrained, seed=0))):
        expected = _sklearn_accuracy(_pooled(enc, train_x), train_y, _pooled(enc, test_x), test_y)
        assert result[name] == pytest.approx(expected, abs=1e-9), name
    assert result["majority"] == max(test_y.count(c) for c in set(test_y)) / len(test_y)


def test_untrained_copy_is_the_same_architecture_untrained(image_checkpoint):
    import torch

    import d2v_plugin
    from d2v_plugin.probe import untrained_copy

    pretrained = d2v_plugin.load_encoder(str(image_checkpoint))
    trained = pretrained.state_dict()
    fresh = untrained_copy(pretrained, seed=0).state_dict()
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in trained.items()}
    weights = [k for k, v in trained.items() if v.dtype.is_floating_point and v.dim() >= 2 and "pos" not in k]
    assert weights and not any(torch.equal(fresh[k], trained[k]) for k in weights)
    again = untrained_copy(pretrained, seed=0).state_dict()
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)


def test_speech_examples_hold_out_whole_sentences(tmp_path):
    import soundfile as sf

    from d2v_plugin.probe import ProbeError, speech_examples

    rows = ["path\tvoice\trate\tsentence"]
    t = np.arange(3200) / 16000
    for s in range(10):
        for v, pitch in enumerate((120, 200, 310)):
            name = f"wav/{s}_{v}.wav"
            (tmp_path / "wav").mkdir(exist_ok=True)
            sf.write(tmp_path / name, 0.3 * np.sin(2 * np.pi * pitch * (1 + s / 20) * t), 16000, subtype="PCM_16")
            rows.append(f"{name}\tvoice{v}\t160\tsentence number {s}")
    (tmp_path / "utterances.tsv").write_text("\n".join(rows) + "\n")
    (train_x, train_y), (valid_x, valid_y) = speech_examples(tmp_path, "voice", "sentence")
    # every 5th sentence (0 and 5) is held out, in all three voices
    assert len(train_x) == 24 and len(valid_x) == 6
    assert sorted(valid_y) == sorted(["voice0", "voice1", "voice2"] * 2)
    assert all(x.shape == (3200,) and abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2 for x in valid_x)
    with pytest.raises(ProbeError, match="no column 'speaker'"):
        speech_examples(tmp_path, "speaker", "sentence")
    with pytest.raises(ProbeError, match="utterances.tsv does not exist"):
        speech_examples(tmp_path / "wav", "voice", "sentence")


def test_every_flag_has_help():
    from d2v_plugin.probe import build_parser

    actions = [a for a in build_parser()._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions)


def test_text_examples_are_the_topic_task_tokenized(tmp_path):
    import sentencepiece as spm

    from d2v_plugin.prep.text_tasks import topic_task
    from d2v_plugin.probe import ProbeError, text_examples

    train, valid = topic_task(seed=0)
    (tmp_path / "corpus.txt").write_text("\n".join(t for t, _ in train + valid) + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spm"),
                                   vocab_size=300, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]
    (tmp_path / "dict.txt").write_text("".join(f"{p} 1\n" for p in pieces))
    (tr_ids, tr_y), (va_ids, va_y) = text_examples(tmp_path, 16, 0, None, None)
    assert tr_y == [str(lab) for _, lab in train] and va_y == [str(lab) for _, lab in valid]
    first = tr_ids[0].tolist()
    assert first[0] == 0 and first[-1] == 2 and len(first) == 16  # <s> ... </s>, cut to 16 positions
    # fairseq's dictionary: 4 specials, then dict.txt's pieces in order
    assert [pieces[i - 4] for i in first[1:-1]] == sp.encode(train[0][0], out_type=str)[:14]
    (tmp_path / "dict.txt").unlink()
    with pytest.raises(ProbeError, match="dict.txt does not exist"):
        text_examples(tmp_path, 16, 0, None, None)
