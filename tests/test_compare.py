"""scripts/compare_text.sh end to end at a minimal size, and the derived tasks of prep/text_tasks.

The table's numbers are checked against the runs' own fairseq json logs, parsed here
independently of d2v_plugin.compare.logs.
"""

import json
import random
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from d2v_plugin.compare import run as compare_run
from d2v_plugin.prep import text_tasks
from helpers import REPO, run

ARMS = {"data2vec2": "data2vec 2.0", "data2vec1": "data2vec 1.0", "roberta": "RoBERTa (MLM)"}
SEEDS = (1,)  # one seed keeps the test within its time budget; spread() is checked below


# ----------------------------------------------------------------------------
# the derived tasks


def _normalized_topics():
    from pydoc_data.topics import topics

    return {key: " ".join(text.split()) for key, text in topics.items()}


def test_topic_task_deterministic_balanced_disjoint_and_labelled_by_source():
    train, valid = text_tasks.topic_task(0)
    assert (train, valid) == text_tasks.topic_task(0)
    assert (train, valid) != text_tasks.topic_task(1)
    labels = sorted({label for _, label in train})
    assert len(labels) == 4
    for split in (train, valid):
        counts = [sum(1 for _, l in split if l == label) for label in labels]
        assert len(set(counts)) == 1, counts  # exactly balanced
    assert not {t for t, _ in train} & {t for t, _ in valid}
    docs = _normalized_topics()
    for text, label in train + valid:
        # the paragraph comes from its label's topic, and from no other topic
        assert [k for k, d in docs.items() if text in d] == [label], text


def test_next_sentence_task_pairs_are_consecutive_exactly_when_labelled_1():
    train, valid = text_tasks.next_sentence_task(0)
    assert (train, valid) == text_tasks.next_sentence_task(0)
    docs = _normalized_topics()
    for split in (train, valid):
        assert sum(1 for _, l in split if l == "1") == sum(1 for _, l in split if l == "0") > 0
    train_sentences = {s for (a, b), _ in train for s in (a, b)}
    assert not train_sentences & {s for (a, b), _ in valid for s in (a, b)}
    for (a, b), label in train[:300] + valid[:300]:
        owners = [k for k, d in docs.items() if a in d]
        assert owners, a
        consecutive = any(f"{a} {b}" in docs[k] for k in owners)
        assert consecutive == (label == "1"), (a, b, label)
        if label == "0":  # the negative comes from the same topic
            assert any(b in docs[k] for k in owners)


# ----------------------------------------------------------------------------
# the script end to end

WORDS = ("the", "a", "function", "value", "class", "object", "method", "list", "string", "module", "error")
ANSWERS = ("alpha", "beta", "gamma", "delta")


def tiny_squad(n, seed):
    """SQuAD 1.1 json: paragraphs of documentation words, each holding 'named ANSWER' once."""
    rng = random.Random(seed)
    data = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 30))]
        pos = rng.randrange(len(words) - 1)
        words[pos], words[pos + 1] = "named", rng.choice(ANSWERS)
        start = len(" ".join(words[:pos + 1])) + 1
        qa = {"id": f"q{i}", "question": "what is it named ?", "answers": [{"text": words[pos + 1], "answer_start": start}]}
        data.append({"title": f"t{i}", "paragraphs": [{"context": " ".join(words) + ".", "qas": [qa]}]})
    return {"version": "1.1", "data": data}


def _args(out, squad):
    # two runs at a time, one thread each; validations (and, for the test's own predictions, a checkpoint)
    # at updates 2 and 4 of each fine-tuning, so that "best" has a choice; a high learning rate without
    # warmup, so that 4 updates already move the predictions away from one class
    return ["--out", str(out), "--updates", "20", "--seeds", ",".join(map(str, SEEDS)), "--finetune-updates", "4",
            "--tasks", "topic", "--squad", f"squad={squad}", "--threads", "1", "--jobs", "2", "--vocab-size", "500",
            "--finetune-override", "dataset.validate_interval_updates=2",
            "--finetune-override", "checkpoint.no_save=false", "--finetune-override", "checkpoint.save_interval_updates=2",
            "--finetune-override", "optimization.lr=[0.01]", "--finetune-override", "lr_scheduler.warmup_updates=0"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    squad = root / "squad"
    squad.mkdir()
    (squad / "train.json").write_text(json.dumps(tiny_squad(48, 0)))
    (squad / "dev.json").write_text(json.dumps(tiny_squad(12, 1)))
    out = root / "out"
    proc = run(["bash", REPO / "scripts" / "compare_text.sh", *_args(out, squad)], timeout=900)
    return out, proc.stdout, squad


_LINE = re.compile(r"\]\[(\w+)\]\[INFO\] - (\{.*\})\s*$")


def _records(path, tag):
    rows = []
    for line in Path(path).read_text().splitlines():
        m = _LINE.search(line)
        if m and m.group(1) == tag:
            rows.append(json.loads(m.group(2)))
    return rows


def _table(md):
    lines = [l for l in md.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


def _cell(text):
    m = re.fullmatch(r"([-\d.]+) ± ([\d.]+) \(n=(\d+)\)", text)
    assert m, text
    return float(m.group(1)), float(m.group(2)), int(m.group(3))


def _best(valid, select, other):
    """(select, other) of the validation with the highest select (the earliest of equal ones)."""
    best = max(valid, key=lambda v: float(v[f"valid_{select}"]))
    return float(best[f"valid_{select}"]), float(best[f"valid_{other}"])


def _ft_dir(out, arm, task, pretrain_seed=1, seed=1):
    return out / "finetune" / arm / f"pretrain{pretrain_seed}" / task / f"seed{seed}"


def test_writes_table_and_plot_with_every_arm(comparison):
    out, stdout, _ = comparison
    md = (out / "comparison.md").read_text()
    rows = _table(md)
    assert [r["arm"] for r in rows] == list(ARMS.values())
    assert "| arm |" in stdout  # the table is printed
    assert re.search(r"== \[\d+m\d\ds\] fine-tune roberta \(pretraining seed 1\) on topic, seed 1: done in \d+ s "
                     r"\(run \d+/8\)", stdout)  # progress: what, elapsed, count
    import matplotlib.image

    image = matplotlib.image.imread(out / "comparison.png")
    assert image.shape[0] > 200 and image.shape[1] > 400


def test_table_numbers_equal_the_runs_logs(comparison):
    out, _, _ = comparison
    rows = {r["arm"]: r for r in _table((out / "comparison.md").read_text())}
    for arm, label in ARMS.items():
        row = rows[label]
        log = out / "pretrain" / arm / "seed1" / "train.log"
        epochs = _records(log, "train")
        last = epochs[-1]
        assert int(row["pretraining updates"]) == int(last["train_num_updates"]) == 20
        assert float(row["wall time (s)"]) == pytest.approx(float(last["train_wall"]), abs=0.5)
        tokens, before = 0.0, 0
        for e in epochs:
            tokens += float(e["train_wpb"]) * (int(e["train_num_updates"]) - before)
            before = int(e["train_num_updates"])
        assert int(row["tokens seen"].replace(",", "")) == round(tokens)
        # 20 updates of 8 x 64-token sequences
        assert abs(round(tokens) - 20 * 8 * 64) <= 20 * 8
        inner = _records(log, "train_inner")
        assert float(row["final train loss"]) == pytest.approx(float(inner[-1]["loss"]), abs=5e-4)

        tasks = [("topic", "accuracy", "macro_f1", "accuracy", "macro-F1")]
        if arm != "roberta":
            tasks.append(("squad", "f1", "exact", "F1", "EM"))
        for task, select, other, select_label, other_label in tasks:
            best = []
            for seed in SEEDS:
                valid = _records(_ft_dir(out, arm, task, seed=seed) / "train.log", "valid")
                assert len(valid) >= 2, (arm, task, seed)
                best.append(_best(valid, select, other))
            for i, col in enumerate((f"{task} {select_label} (%)", f"{task} {other_label} (%)")):
                mean, std, n = _cell(row[col])
                values = [b[i] for b in best]
                assert mean == pytest.approx(statistics.mean(values), abs=0.05), (arm, col)
                assert std == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0, abs=0.05)
                assert n == len(SEEDS)
    # fairseq's roberta has no span head: said, not dropped
    assert rows["RoBERTa (MLM)"]["squad F1 (%)"] == rows["RoBERTa (MLM)"]["squad EM (%)"] == compare_run.ROBERTA_NO_SPAN_HEAD


def _predict_valid(checkpoint):
    """Predicted and true classes of the valid set, by the fine-tuned checkpoint, loaded by fairseq."""
    import torch
    from fairseq import checkpoint_utils

    (model,), cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    model.eval()
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    preds, labels = [], []
    with torch.no_grad():
        for i in range(0, len(dataset), 16):
            sample = dataset.collater([dataset[j] for j in range(i, min(i + 16, len(dataset)))])
            if hasattr(model, "classification_heads"):  # fairseq's roberta
                logits = model(**sample["net_input"], features_only=True,
                               classification_head_name="sentence_classification_head")[0]
            else:
                logits = model(**sample["net_input"])
            preds += logits.argmax(-1).tolist()
            labels += sample["target"].view(-1).tolist()
    return preds, labels


def test_macro_f1_equals_sklearn_on_the_models_own_predictions(comparison):
    """For every arm (RoBERTa too), the table's accuracy and macro-F1 are those of the fine-tuned models'
    valid-set predictions, computed here from the checkpoints of the validations (updates 2 and 4)."""
    from sklearn.metrics import accuracy_score, f1_score

    out, _, _ = comparison
    rows = {r["arm"]: r for r in _table((out / "comparison.md").read_text())}
    results = json.loads((out / "results.json").read_text())
    for arm, label in ARMS.items():
        scores = []
        for update in (2, 4):
            (checkpoint,) = _ft_dir(out, arm, "topic").glob(f"checkpoint_*_{update}.pt")  # checkpoint_EPOCH_UPDATE
            preds, labels = _predict_valid(checkpoint)
            assert len(labels) == 80
            scores.append((100 * accuracy_score(labels, preds), 100 * f1_score(labels, preds, average="macro")))
        accuracy, macro_f1 = max(scores, key=lambda s: s[0])  # max() keeps the first of equal values
        run_values = results["arms"][arm]["tasks"]["topic"]["runs"][0]["values"]
        assert run_values["accuracy"] == pytest.approx(accuracy, abs=0.006)
        assert run_values["macro_f1"] == pytest.approx(macro_f1, abs=0.006)
        assert _cell(rows[label]["topic macro-F1 (%)"])[0] == pytest.approx(macro_f1, abs=0.051)


def test_rerun_reuses_finished_runs_and_adds_pretraining_seeds(comparison, capsys):
    out, _, squad = comparison
    before = (out / "comparison.md").read_text()
    assert compare_run.main(_args(out, squad)) == 0
    printed = capsys.readouterr().out
    # 3 pretrainings, 3 topic and 2 squad fine-tunings
    assert printed.count("finished before, reusing") == len(ARMS) + len(ARMS) * len(SEEDS) + 2 * len(SEEDS)
    assert (out / "comparison.md").read_text() == before

    # a second pretraining seed of the RoBERTa arm: its seed-1 runs are reused, seed 2's are new
    assert compare_run.main([*_args(out, squad), "--arms", "roberta", "--pretrain-seeds", "1,2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, reusing") == 1 + len(SEEDS)
    row = _table((out / "comparison.md").read_text())[0]
    assert row["arm"] == "RoBERTa (MLM)"
    best, losses, walls = [], [], []
    for ps in (1, 2):
        best.append(_best(_records(_ft_dir(out, "roberta", "topic", ps) / "train.log", "valid"), "accuracy", "macro_f1")[0])
        log = out / "pretrain" / "roberta" / f"seed{ps}" / "train.log"
        losses.append(float(_records(log, "train_inner")[-1]["loss"]))
        walls.append(float(_records(log, "train")[-1]["train_wall"]))
    mean, std, n = _cell(row["topic accuracy (%)"])
    assert n == 2 * len(SEEDS)
    assert (mean, std) == (pytest.approx(np.mean(best), abs=0.05), pytest.approx(np.std(best, ddof=1), abs=0.05))
    mean, std, n = _cell(row["final train loss"])
    assert (mean, std, n) == (pytest.approx(np.mean(losses), abs=5e-4), pytest.approx(np.std(losses, ddof=1), abs=5e-4), 2)
    assert float(row["wall time (s)"]) == pytest.approx(np.mean(walls), abs=0.5)
    assert losses[0] != losses[1]  # the seed reached the pretraining run


def _log_line(tag, values):
    return f"[2026-01-01 00:00:00,000][{tag}][INFO] - " + json.dumps({k: str(v) for k, v in values.items()}) + "\n"


def test_log_parsing_with_several_epochs_and_validations(tmp_path):
    """The runs above are too short for two epochs or distinct validations: fairseq's line format here."""
    from d2v_plugin.compare import logs, report

    log = tmp_path / "train.log"
    log.write_text(
        _log_line("train_inner", {"epoch": 1, "loss": 3.0, "num_updates": 10})
        + _log_line("valid", {"epoch": 1, "valid_accuracy": 40.0, "valid_num_updates": 10})
        + _log_line("train", {"epoch": 1, "train_wpb": 500.0, "train_num_updates": 10, "train_wall": 7})
        + _log_line("valid", {"epoch": 2, "valid_accuracy": 55.5, "valid_num_updates": 25})
        + _log_line("valid", {"epoch": 3, "valid_accuracy": 50.0, "valid_num_updates": 30})
        + _log_line("train", {"epoch": 2, "train_wpb": 400.0, "train_num_updates": 30, "train_wall": 19})
    )
    summary = logs.pretraining_summary(log)
    assert summary["tokens"] == 10 * 500 + 20 * 400
    assert (summary["updates"], summary["wall_s"], summary["curve"]) == (30, 19.0, [(10, 3.0)])
    assert logs.best_validation(log, "accuracy") == {"value": 55.5, "num_updates": 25, "validations": 3,
                                                     "values": {"accuracy": 55.5}}
    values = [55.5, 50.0, 61.25]
    mean, std, n = report.spread(values)
    assert (mean, n) == (pytest.approx(float(np.mean(values))), 3)
    assert std == pytest.approx(float(np.std(values, ddof=1)))


def test_bad_arm_and_missing_corpus_are_named(tmp_path, capsys):
    assert compare_run.main(["--arms", "data2vec2,bert", "--out", str(tmp_path)]) == 1
    assert "unknown arm(s) bert" in capsys.readouterr().err
    assert compare_run.main([str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 1
    assert f"corpus not found: {tmp_path / 'nope.txt'}" in capsys.readouterr().err
    assert compare_run.main(["--squad", str(tmp_path / "nosquad"), "--out", str(tmp_path)]) == 1
    assert f"--squad squad: directory not found: {tmp_path / 'nosquad'}" in capsys.readouterr().err
    assert compare_run.main(["--tasks", "topic", "--metric", "topic=f1", "--out", str(tmp_path)]) == 1
    assert "--metric 'topic=f1': classification tasks report accuracy, macro_f1" in capsys.readouterr().err
