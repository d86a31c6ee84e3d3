"""GLUE / text classification: data preparation, fine-tuning, metrics and bad input.

Fine-tuning runs through the real ``fairseq-hydra-train`` (via scripts/finetune_glue.sh)
on generated data whose labels are learnable (the presence / count of one word), starting
from a tiny data2vec text model pretrained for a few updates in a module fixture.
"""

import csv
import functools
import http.server
import io
import json
import random
import re
import shutil
import threading
import zipfile

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from helpers import BIN, REPO, compat_dir, hydra_train, run

WORDS = [f"w{i}" for i in range(30)]
KEY = "w0"  # the word whose presence (classification) or count (regression) is the label


# ----------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny data2vec text checkpoint (5 updates) and its dictionary."""
    d = tmp_path_factory.mktemp("pretrained")
    rng = random.Random(0)
    corpus = d / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 20))) + "\n" for _ in range(300)))
    run([BIN / "fairseq-preprocess", "--only-source", "--trainpref", corpus, "--validpref", corpus,
         "--destdir", d / "bin", "--workers", "1"])
    hydra_train("pretraining/text_tiny", f"task.data={d / 'bin'}", "optimization.max_update=5", f"checkpoint.save_dir={d / 'ckpt'}")
    ckpt = d / "ckpt" / "checkpoint_last.pt"
    assert ckpt.is_file()
    return ckpt, d / "bin" / "dict.txt"


def _rows(n, seed, regression=False, labels=("neg", "pos")):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        toks = rng.choices(WORDS[1:], k=rng.randint(4, 12))
        k = rng.randint(0, 3) if regression else i % len(labels)
        for _ in range(k if regression else (1 if k else 0)):
            toks.insert(rng.randrange(len(toks) + 1), KEY)
        rows.append((" ".join(toks), f"{k / 3:.4f}" if regression else labels[k]))
    return rows


def _write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _prep(tmp, name, dict_path, regression=False, labels=("neg", "pos"), extra=()):
    """Generated CSV files -> fairseq layout via the CLI of d2v_plugin.prep.classification (in-process)."""
    from d2v_plugin.prep import classification

    train = _write_csv(tmp / f"{name}_train.csv", _rows(320, 1, regression, labels))
    valid = _write_csv(tmp / f"{name}_valid.csv", _rows(64, 2, regression, labels))
    out = tmp / name
    argv = ["--train", str(train), "--valid", str(valid), "--out", str(out), "--tokenizer", "none", "--dict", str(dict_path)]
    argv += ["--regression"] if regression else []
    assert classification.main(argv + list(extra)) == 0
    return out


def _finetune_script(ckpt, data, save, *args):
    return run(["bash", REPO / "scripts" / "finetune_glue.sh", "tiny", ckpt, "--data", data, "--save-dir", save, *args], cwd=REPO)


def _evaluate(model, task, split="valid"):
    """(predictions, labels) of a model on a split, in-process."""
    model.eval()
    ds = task.dataset(split)
    preds, targs = [], []
    with torch.no_grad():
        for i in range(0, len(ds), 32):
            s = ds.collater([ds[j] for j in range(i, min(len(ds), i + 32))])
            out = model(**s["net_input"])
            if task.cfg.regression_target:
                preds += out[:, 0].tolist()
                targs += s["target"][:, 0].tolist()
            else:
                preds += out.argmax(-1).tolist()
                targs += s["target"].view(-1).tolist()
    return np.array(preds), np.array(targs)


def _finetuned_and_untrained(best, pretrained_ckpt, data):
    """The fine-tuned model re-loaded from its checkpoint, and the same setup before training."""
    from fairseq import checkpoint_utils, tasks

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(best)], arg_overrides={"data": str(data)})
    task.load_dataset("valid")
    cfg.model.pretrained_model_args = None
    cfg.model.model_path = str(pretrained_ckpt)
    torch.manual_seed(1)
    untrained = tasks.setup_task(cfg.task).build_model(cfg.model)
    return models[0], untrained, task


# ----------------------------------------------------------------------------
# fine-tuning end to end


def test_classification_finetune_learns_and_reloads(pretrained, tmp_path):
    ckpt, dict_path = pretrained
    data = _prep(tmp_path, "cls", dict_path)
    start = tmp_path / "pretrained_copy.pt"  # removed before re-loading: the fine-tuned file must suffice
    shutil.copyfile(ckpt, start)
    out = _finetune_script(start, data, tmp_path / "runs", "--lr-sweep", "1e-3 3e-4",
                           "optimization.max_update=30", "criterion.report=macro_f1").stdout
    results = {lr: json.loads((tmp_path / "runs" / "tiny" / f"lr_{lr}" / "result.json").read_text()) for lr in ("1e-3", "3e-4")}
    assert "| tiny | accuracy | 1e-3 |" in out and "| tiny | accuracy | 3e-4 |" in out and "(best)" in out
    logged = results["1e-3"]
    assert logged["metric"] == "accuracy" and "macro_f1" in logged["subsets"]["valid"]
    start.unlink()

    best = tmp_path / "runs" / "tiny" / "lr_1e-3" / "checkpoint_best.pt"
    model, untrained, task = _finetuned_and_untrained(best, ckpt, data)
    import d2v_plugin  # load_encoder reads the fine-tuned file: its encoder, without the head

    tokens = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 10, 2]])
    with torch.no_grad():
        torch.testing.assert_close(d2v_plugin.load_encoder(str(best))(tokens).last_hidden_state,
                                   model.encoder.encode(tokens).last_hidden_state)
    preds, labels = _evaluate(model, task)
    acc = 100 * skm.accuracy_score(labels, preds)
    # the logged metric is that of the whole dev set, which the re-loaded model reproduces
    assert acc == pytest.approx(logged["value"], abs=0.01)
    assert 100 * skm.f1_score(labels, preds, average="macro") == pytest.approx(logged["subsets"]["valid"]["macro_f1"], abs=0.01)
    base_preds, _ = _evaluate(untrained, task)
    base = 100 * skm.accuracy_score(labels, base_preds)
    assert acc >= 95 and acc > base + 15, (acc, base)
    _check_predictors(best, data, tmp_path, logged["value"])


def _check_predictors(best, data, tmp_path, logged_accuracy):
    """d2v_plugin.load_model from the checkpoint, from its inference export (the fine-tuning
    data moved away) and the Hugging Face export with its head: the same predictions."""
    import d2v_plugin

    rows = _rows(64, 2)  # the valid rows _prep wrote
    texts = [t for t, _ in rows]
    clf = d2v_plugin.load_model(str(best))
    out = clf(texts, batch_size=7)
    assert out.classes == ["neg", "pos"]
    assert 100 * np.mean([p == gold for p, (_, gold) in zip(out.labels, rows)]) == pytest.approx(logged_accuracy, abs=0.01)
    torch.testing.assert_close(out.probabilities, out.logits.softmax(-1))
    assert out.labels == [out.classes[i] for i in out.logits.argmax(-1).tolist()]

    export = tmp_path / "export"
    printed = run([BIN / "d2v-export", best, "--out", export, "--format", "inference"]).stdout
    assert "head: d2v_text_classification" in printed
    moved = data.with_name(data.name + "_moved")
    data.rename(moved)  # the export must not need the fine-tuning data
    try:
        again = d2v_plugin.load_model(str(export))(texts)
        torch.testing.assert_close(again.logits, out.logits)
        assert again.labels == out.labels
        bf16 = d2v_plugin.load_model(str(export), dtype=torch.bfloat16)
        assert next(bf16.model.parameters()).dtype == torch.bfloat16
        low = bf16(texts)
        assert low.logits.dtype == torch.float32 and (low.probabilities - out.probabilities).abs().max() < 0.05
        tokens = torch.tensor([clf.encode(texts[0])])
        torch.testing.assert_close(d2v_plugin.load_encoder(str(export))(tokens).last_hidden_state,
                                   d2v_plugin.load_encoder(str(best))(tokens).last_hidden_state)
    finally:
        moved.rename(data)

    from transformers import AutoModelForSequenceClassification

    hf_dir = tmp_path / "hf"
    run([BIN / "d2v-export", best, "--out", hf_dir, "--format", "hf"])
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "Data2VecTextForSequenceClassification" and hf.config.id2label == {0: "neg", 1: "pos"}
    ids = [clf.encode(t) for t in texts[:8]]
    width = max(map(len, ids))
    batch = torch.tensor([r + [1] * (width - len(r)) for r in ids])
    with torch.no_grad():
        logits = hf(input_ids=batch, attention_mask=batch.ne(1).long()).logits
    torch.testing.assert_close(logits, out.logits[:8], atol=1e-4, rtol=1e-4)

    import onnxruntime as ort

    onnx_dir = tmp_path / "onnx"
    assert "head: d2v_text_classification" in run([BIN / "d2v-export", best, "--out", onnx_dir, "--format", "onnx"]).stdout
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"source": batch.numpy(), "padding_mask": batch.eq(1).numpy()}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    torch.testing.assert_close(torch.from_numpy(got), out.logits[:8], atol=1e-4, rtol=1e-4)


def test_regression_finetune_learns(pretrained, tmp_path):
    ckpt, dict_path = pretrained
    data = _prep(tmp_path, "reg", dict_path, regression=True)
    # a second validation set, as MNLI's mismatched dev set (here a copy of the first)
    for ext in ("bin", "idx"):
        shutil.copyfile(data / "input0" / f"valid.{ext}", data / "input0" / f"valid1.{ext}")
    shutil.copyfile(data / "label" / "valid.label", data / "label" / "valid1.label")
    out = _finetune_script(
        ckpt, data, tmp_path / "runs", "optimization.max_update=60", "task.num_classes=1", "task.regression_target=true",
        "criterion.report=pearson_and_spearman", "checkpoint.best_checkpoint_metric=pearson_and_spearman",
        "dataset.valid_subset='valid,valid1'",
    ).stdout
    logged = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    assert logged["metric"] == "pearson_and_spearman" and "dev tiny: pearson_and_spearman=" in out
    assert logged["subsets"]["valid1"] == logged["subsets"]["valid"]
    model, untrained, task = _finetuned_and_untrained(tmp_path / "runs" / "tiny" / "checkpoint_best.pt", ckpt, data)
    preds, labels = _evaluate(model, task)
    pearson = 100 * stats.pearsonr(preds, labels)[0]
    assert pearson == pytest.approx(logged["subsets"]["valid"]["pearson"], abs=0.01)
    base_preds, _ = _evaluate(untrained, task)
    base = 100 * stats.pearsonr(base_preds, labels)[0]
    assert pearson >= 80 and pearson > base + 20, (pearson, base)


# ----------------------------------------------------------------------------
# metrics


PREDS = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
LABELS = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])


def test_metrics_match_sklearn_and_scipy():
    from d2v_plugin import metrics

    assert metrics.accuracy(PREDS, LABELS) == pytest.approx(skm.accuracy_score(LABELS, PREDS)) == pytest.approx(0.7)
    # tp=4 tn=3 fp=2 fn=1: MCC = (4*3 - 2*1) / sqrt(6*5*5*4), F1 = 8/11
    assert metrics.matthews_corr(PREDS, LABELS) == pytest.approx(skm.matthews_corrcoef(LABELS, PREDS))
    assert metrics.matthews_corr(PREDS, LABELS) == pytest.approx(10 / np.sqrt(600))
    assert metrics.f1(PREDS, LABELS) == pytest.approx(skm.f1_score(LABELS, PREDS)) == pytest.approx(8 / 11)
    assert metrics.f1(PREDS, LABELS, pos_label=0) == pytest.approx(skm.f1_score(LABELS, PREDS, pos_label=0))
    multi_p, multi_l = np.array([0, 2, 1, 2, 2, 0, 1]), np.array([0, 1, 1, 2, 0, 0, 2])
    assert metrics.macro_f1(multi_p, multi_l) == pytest.approx(skm.f1_score(multi_l, multi_p, average="macro"))
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.9])
    y = np.array([0.0, 0.5, 0.3, 0.7, 0.6, 1.0])
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    both = metrics.compute("pearson_and_spearman", x, y)
    assert both["pearson_and_spearman"] == pytest.approx((both["pearson"] + both["spearman"]) / 2)
    acc_f1 = metrics.compute("acc_and_f1", PREDS, LABELS)
    assert acc_f1["acc_and_f1"] == pytest.approx((0.7 + 8 / 11) / 2)
    assert metrics.pearson(np.ones(5), np.arange(5)) == 0.0  # undefined -> 0, not NaN
    assert metrics.GLUE_METRIC["cola"] == "mcc" and metrics.GLUE_METRIC["sts_b"] == "pearson_and_spearman"
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy([1, 0], [1])


def test_criterion_metrics_cover_the_whole_dev_set():
    """MCC over several validation batches is the MCC of all predictions, not a batch average."""
    from fairseq.logging import metrics as fs_metrics

    from d2v_plugin.criteria.sentence_prediction import D2VSentencePredictionCriterion

    batches = [(PREDS[:4], LABELS[:4]), (PREDS[4:], LABELS[4:])]
    with fs_metrics.aggregate(new_root=True) as agg:
        for p, t in batches:
            log = {"loss": 1.0, "ntokens": 10, "nsentences": len(p), "sample_size": len(p),
                   "ncorrect": int((p == t).sum()), "_pred": p.tolist(), "_targ": t.tolist(), "_report": "mcc", "_pos": 1}
            with fs_metrics.aggregate():
                D2VSentencePredictionCriterion.reduce_metrics([log])
        values = agg.get_smoothed_values()
    assert values["mcc"] == pytest.approx(100 * skm.matthews_corrcoef(LABELS, PREDS), abs=0.01)
    assert values["accuracy"] == pytest.approx(70.0)
    assert "_pred" not in values


# ----------------------------------------------------------------------------
# GLUE preparation against a local mirror


def _zip(path, files):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def _sentences(rng, n):
    return [" ".join(rng.choices(["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"], k=rng.randint(3, 8))) for _ in range(n)]


def _glue_mirror(root):
    """Tiny files laid out like the real GLUE downloads (CoLA, STS-B, MRPC) plus a truncated RTE.zip."""
    rng = random.Random(3)
    s = _sentences(rng, 60)
    cola = lambda lines: "".join(f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\t{t}\n" for i, t in enumerate(lines))  # noqa: E731
    _zip(root / "glue/data/CoLA.zip", {
        "CoLA/train.tsv": cola(s[:20]),
        "CoLA/dev.tsv": cola(s[20:28]),
        "CoLA/test.tsv": "index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(s[28:33])),
    })
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    sts = lambda lines, score: head + ("\tscore\n" if score else "\n") + "".join(  # noqa: E731
        f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}" + (f"\t{(i % 6):.3f}\n" if score else "\n")
        for i, (a, b) in enumerate(zip(lines[::2], lines[1::2])))
    _zip(root / "glue/data/STS-B.zip", {"STS-B/train.tsv": sts(s[:24], True), "STS-B/dev.tsv": sts(s[24:36], True),
                                         "STS-B/test.tsv": sts(s[36:42], False)})
    senteval = root / "senteval/senteval_data"
    senteval.mkdir(parents=True)
    msr = lambda lines, off: "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(  # noqa: E731
        f"{i % 2}\t{off + 2 * i}\t{off + 2 * i + 1}\t{a}\t{b}\n" for i, (a, b) in enumerate(zip(lines[::2], lines[1::2])))
    (senteval / "msr_paraphrase_train.txt").write_text(msr(s[:20], 1000), encoding="utf-8")
    (senteval / "msr_paraphrase_test.txt").write_text(msr(s[20:28], 5000), encoding="utf-8")
    (root / "glue/data/mrpc_dev_ids.tsv").write_text("1000\t1001\n1004\t1005\n1008\t1009\n")
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n" + "0\ta\tb\tentailment\n" * 200)
    (root / "glue/data/RTE.zip").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return s


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    sentences = _glue_mirror(root)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sentences
    server.shutdown()
    server.server_close()


def _train_spm(tmp, sentences):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 5), model_prefix=str(tmp / "spm"), vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    (tmp / "dict.txt").write_text("".join(f"{p} 1\n" for p in pieces), encoding="utf-8")
    return tmp / "spm.model", sp


def _prepare(*args, check=True):
    return run(["bash", REPO / "datasets" / "glue" / "prepare.sh", "--workers", "1", *args], check=check)


def test_prepare_glue_from_mirror(mirror, tmp_path):
    from fairseq.data import Dictionary, data_utils

    url, sentences = mirror
    model, sp = _train_spm(tmp_path, sentences)
    out = tmp_path / "glue"
    # RTE.zip on the mirror is truncated: the tasks before it are prepared, then it fails clearly
    proc = _prepare("--out", out, "--tokenizer", f"spm:{model}", "--mirror", url, "--tasks", "cola,STS-B,mrpc,rte",
                    "--no-verify", check=False)
    assert proc.returncode != 0 and "corrupt or truncated archive" in proc.stdout and "RTE.zip" in proc.stdout

    cola = out / "bin" / "cola"
    d = Dictionary.load(str(cola / "input0" / "dict.txt"))
    assert len(d) == len(Dictionary.load(str(tmp_path / "dict.txt")))  # the pretraining dictionary
    assert not (cola / "input1").exists()
    assert (cola / "label" / "dict.txt").read_text().split()[::2] == ["0", "1"]
    train = data_utils.load_indexed_dataset(str(cola / "input0" / "train"), d)
    assert len(train) == 20  # CoLA train has no header line: nothing dropped
    first = d.string(train[0][:-1]).split()
    assert "".join(first).replace("\u2581", " ").strip() == sentences[0]
    assert sp.encode(sentences[0], out_type=str) == first
    assert len(data_utils.load_indexed_dataset(str(cola / "input0" / "test"), d)) == 5
    labels = data_utils.load_indexed_dataset(str(cola / "label" / "valid"), Dictionary.load(str(cola / "label" / "dict.txt")))
    assert [int(x[0]) - 4 for x in labels] == [i % 2 for i in range(8)]

    sts = out / "bin" / "sts_b"
    assert (sts / "input1" / "valid.bin").is_file() and not (sts / "label" / "dict.txt").exists()
    scores = [float(x) for x in (sts / "label" / "train.label").read_text().split()]
    assert scores == pytest.approx([(i % 6) / 5 for i in range(12)])  # scaled to [0, 1] as fairseq does

    mrpc = out / "bin" / "mrpc"
    summary = json.loads((mrpc / "summary.json").read_text())
    assert summary["examples"] == {"train": 7, "valid": 3, "test": 4} and summary["inputs"] == 2



def test_prepare_glue_rejects_bad_downloads(mirror, tmp_path):
    url, sentences = mirror
    model, _ = _train_spm(tmp_path, sentences)
    # checksums are on by default: the mirror's tiny CoLA.zip is not the real one
    proc = _prepare("--out", tmp_path / "a", "--tokenizer", f"spm:{model}", "--mirror", url, "--tasks", "cola", check=False)
    assert proc.returncode != 0 and "CoLA.zip: size" in proc.stdout and "expected 376971" in proc.stdout
    assert (tmp_path / "a" / "download" / "CoLA.zip.part.bad").is_file()
    proc = _prepare("--out", tmp_path / "b", "--tokenizer", f"spm:{model}", "--mirror", url, "--tasks", "cola,nope", check=False)
    assert proc.returncode != 0 and "unknown task 'nope'" in proc.stdout
    proc = _prepare("--out", tmp_path / "c", "--tokenizer", "bpe", check=False)
    assert proc.returncode != 0 and "--tokenizer must be gpt2 or spm:MODEL" in proc.stdout
    assert "--mirror URL" in _prepare("--help").stdout


# ----------------------------------------------------------------------------
# bad input


def _tiny(data, model_path, save, *overrides):
    return hydra_train("finetuning/glue/tiny", f"task.data={data}", f"model.model_path={model_path}",
                       f"checkpoint.save_dir={save}", *overrides, check=False)


def test_checkpoint_of_another_modality_is_refused(pretrained, tmp_path):
    _, dict_path = pretrained
    data = _prep(tmp_path, "cls", dict_path)
    proc = _tiny(data, compat_dir() / "v2_audio.checkpoint.pt", tmp_path / "run")
    assert proc.returncode != 0
    assert "is a AUDIO model; this task needs a TEXT checkpoint" in proc.stdout


def test_dictionary_mismatch_is_refused(pretrained, tmp_path):
    ckpt, dict_path = pretrained
    bigger = tmp_path / "bigger_dict.txt"
    bigger.write_text(dict_path.read_text() + "".join(f"extra{i} 1\n" for i in range(5)))
    data = _prep(tmp_path, "cls", bigger)
    proc = _tiny(data, ckpt, tmp_path / "run")
    assert proc.returncode != 0
    assert re.search(r"dictionary has \d+ symbols but \S+ was trained with \d+", proc.stdout)
    assert "was not made with the pretrained model's dictionary" in proc.stdout


def test_labels_outside_the_classes_are_errors(pretrained, tmp_path):
    """More labels than classes, labels unknown to the label dictionary, malformed regression targets."""
    from omegaconf import OmegaConf

    from d2v_plugin.prep.classification import fairseq_preprocess, main
    from d2v_plugin.tasks.text_classification import TextClassificationConfig, TextClassificationTask

    _, dict_path = pretrained
    # three labels in the data, two configured classes
    three = _prep(tmp_path, "three", dict_path, labels=("a", "b", "c"))
    cfg = OmegaConf.structured(TextClassificationConfig(data=str(three), num_classes=2, seed=1))
    with pytest.raises(ValueError, match=r"label/dict\.txt lists 3 labels \(a, b, c\) but task\.num_classes=2"):
        TextClassificationTask.setup_task(cfg)

    train = _write_csv(tmp_path / "train.csv", _rows(20, 1))
    valid = _write_csv(tmp_path / "valid.csv", _rows(4, 2) + [("w1 w2", "maybe")])
    rc = main(["--train", str(train), "--valid", str(valid), "--out", str(tmp_path / "x"), "--tokenizer", "none", "--dict", str(dict_path)])
    assert rc == 1 and not (tmp_path / "x").exists()

    # binarized elsewhere with a label dictionary lacking "maybe": <unk> in label/valid.bin
    data = tmp_path / "hand"
    (tmp_path / "t.in").write_text("w1 w2\nw3\n")
    (tmp_path / "t.lab").write_text("neg\npos\n")
    (tmp_path / "v.lab").write_text("pos\nmaybe\n")
    (tmp_path / "labels.txt").write_text("neg 1\npos 1\n")
    fairseq_preprocess(["--only-source", "--srcdict", str(dict_path), "--trainpref", str(tmp_path / "t.in"),
                        "--validpref", str(tmp_path / "t.in"), "--destdir", str(data / "input0")])
    fairseq_preprocess(["--only-source", "--srcdict", str(tmp_path / "labels.txt"), "--trainpref", str(tmp_path / "t.lab"),
                        "--validpref", str(tmp_path / "v.lab"), "--destdir", str(data / "label")])
    cfg = OmegaConf.structured(TextClassificationConfig(data=str(data), num_classes=2, seed=1))
    task = TextClassificationTask.setup_task(cfg)
    task.load_dataset("train")
    with pytest.raises(ValueError, match=r"label/valid\.bin: example 2 has a label missing from label/dict\.txt"):
        task.load_dataset("valid")

    # regression targets: one value per line, as many lines as examples
    (data / "label" / "train.label").write_text("0.5\n0.1 0.2\n")
    cfg = OmegaConf.structured(TextClassificationConfig(data=str(data), num_classes=1, regression_target=True, seed=1))
    with pytest.raises(ValueError, match=r"train\.label:2: expected 1 regression value"):
        TextClassificationTask.setup_task(cfg).load_dataset("train")


def _root_config(data, model_path, num_classes=2, **task):
    """The task / model configs of a run, built in-process."""
    from omegaconf import OmegaConf

    from d2v_plugin.models.finetuning.text_classification import Data2VecTextClassificationConfig
    from d2v_plugin.tasks.text_classification import TextClassificationConfig

    return OmegaConf.create({
        "common": {"seed": 1},
        "task": OmegaConf.structured(TextClassificationConfig(data=str(data), num_classes=num_classes, seed=1, **task)),
        "model": OmegaConf.merge(
            OmegaConf.structured(Data2VecTextClassificationConfig(model_path=str(model_path), num_classes=num_classes)),
            {"_name": "d2v_text_classification"},
        ),
    })


def test_meta_checkpoint_builds_a_classifier(tmp_path):
    """Meta's official-format text checkpoint (24 symbols + <mask>) under a classification head."""
    from d2v_plugin.tasks.text_classification import TextClassificationTask

    ckpt = compat_dir() / "v2_text.checkpoint.pt"
    for n, name in ((20, "ok"), (21, "bad")):
        (tmp_path / name / "input0").mkdir(parents=True)
        (tmp_path / name / "input0" / "dict.txt").write_text("".join(f"t{i} 1\n" for i in range(n)))
        (tmp_path / name / "label").mkdir()
        (tmp_path / name / "label" / "dict.txt").write_text("0 1\n1 1\n")
    root = _root_config(tmp_path / "bad", ckpt)
    with pytest.raises(ValueError, match="dictionary has 26 symbols but .* was trained with 25"):
        TextClassificationTask.setup_task(root.task).build_model(root.model)
    root = _root_config(tmp_path / "ok", ckpt)
    model = TextClassificationTask.setup_task(root.task).build_model(root.model).eval()
    source = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
    logits = model(source, padding_mask=source.eq(1))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert root.model.pretrained_model_args["embed_dim"] == 64  # recorded for re-loading


def test_data2vec_1_0_checkpoint_finetunes_and_reloads(pretrained, tmp_path):
    """Our data2vec 1.0 text model (v1_text_tiny, 5 updates) fine-tuned with the same recipe as 2.0."""
    from d2v_plugin.models.v1.text import Data2VecTextModel

    _, dict_path = pretrained
    corpus_bin = dict_path.parent
    hydra_train("pretraining/v1_text_tiny", f"task.data={corpus_bin}", "optimization.max_update=5", f"checkpoint.save_dir={tmp_path / 'v1'}")
    ckpt = tmp_path / "v1" / "checkpoint_last.pt"
    data = _prep(tmp_path, "cls", dict_path)
    start = tmp_path / "pretrained_copy.pt"  # removed before re-loading: the fine-tuned file must suffice
    shutil.copyfile(ckpt, start)
    _finetune_script(start, data, tmp_path / "runs", "optimization.max_update=30")
    logged = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    start.unlink()
    model, untrained, task = _finetuned_and_untrained(tmp_path / "runs" / "tiny" / "checkpoint_best.pt", ckpt, data)
    assert isinstance(model.encoder, Data2VecTextModel) and isinstance(untrained.encoder, Data2VecTextModel)
    # load_encoder reads the fine-tuned file too: its encoder, without the head
    import d2v_plugin

    enc = d2v_plugin.load_encoder(str(tmp_path / "runs" / "tiny" / "checkpoint_best.pt"))
    tokens = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens).last_hidden_state, model.encoder.encode(tokens).last_hidden_state)
    preds, labels = _evaluate(model, task)
    acc = 100 * skm.accuracy_score(labels, preds)
    assert acc == pytest.approx(logged["value"], abs=0.01)
    base = 100 * skm.accuracy_score(labels, _evaluate(untrained, task)[0])
    assert acc >= 95 and acc > base + 15, (acc, base)


def test_meta_data2vec_1_0_checkpoint_builds_a_classifier(tmp_path):
    """Meta's data2vec 1.0 text checkpoint (RoBERTa-style keys, 52 symbols + 4 specials + <mask>):
    the classifier's encoder computes what load_encoder computes, Meta's output within 1e-4."""
    import d2v_plugin
    from d2v_plugin.tasks.text_classification import TextClassificationTask

    ckpt = compat_dir() / "v1_text.checkpoint.pt"
    (tmp_path / "input0").mkdir()
    shutil.copyfile(compat_dir() / "v1_text.dict.txt", tmp_path / "input0" / "dict.txt")
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "dict.txt").write_text("0 1\n1 1\n")
    root = _root_config(tmp_path, ckpt, max_positions=32)
    model = TextClassificationTask.setup_task(root.task).build_model(root.model).eval()
    expected = torch.load(compat_dir() / "v1_text.expected.pt", weights_only=True)
    source, pad = expected["source"], expected["padding_mask"]
    with torch.no_grad():
        x = model.encoder.extract_features(source, padding_mask=pad)["x"]
        logits = model(source, padding_mask=pad)
        ref = d2v_plugin.load_encoder(str(ckpt))(source).last_hidden_state
    torch.testing.assert_close(x, ref)
    assert (x - expected["x"])[~pad].abs().max() < 1e-4
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert root.model.pretrained_model_args["_name"] == "data2vec_text"


def test_longer_inputs_than_the_encoder_knows_are_refused(pretrained, tmp_path):
    from d2v_plugin.tasks.text_classification import TextClassificationTask

    ckpt, dict_path = pretrained
    data = _prep(tmp_path, "cls", dict_path)
    root = _root_config(data, ckpt, max_positions=512)
    with pytest.raises(ValueError, match="task.max_positions=512 exceeds the 64 positions"):
        TextClassificationTask.setup_task(root.task).build_model(root.model)
