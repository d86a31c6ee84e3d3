"""scripts/compare_text.sh end to end at a minimal size, and the derived tasks of prep/text_tasks.

The table's numbers are checked against the runs' own fairseq json logs, parsed here
independently of d2v_plugin.compare.logs.
"""

import json
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


def _args(out):
    # two arms at a time, one thread each; validations at updates 2 and 4 of each fine-tuning,
    # so that "best" has a choice
    return ["--out", str(out), "--updates", "20", "--seeds", ",".join(map(str, SEEDS)), "--finetune-updates", "4",
            "--tasks", "topic", "--threads", "1", "--jobs", "2", "--vocab-size", "500",
            "--finetune-override", "dataset.validate_interval_updates=2"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    proc = run(["bash", REPO / "scripts" / "compare_text.sh", *_args(out)], timeout=900)
    return out, proc.stdout


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


def test_writes_table_and_plot_with_every_arm(comparison):
    out, stdout = comparison
    md = (out / "comparison.md").read_text()
    rows = _table(md)
    assert [r["arm"] for r in rows] == list(ARMS.values())
    assert "| arm |" in stdout  # the table is printed
    import matplotlib.image

    image = matplotlib.image.imread(out / "comparison.png")
    assert image.shape[0] > 200 and image.shape[1] > 400


def test_table_numbers_equal_the_runs_logs(comparison):
    out, _ = comparison
    rows = {r["arm"]: r for r in _table((out / "comparison.md").read_text())}
    for arm, label in ARMS.items():
        row = rows[label]
        epochs = _records(out / "pretrain" / arm / "train.log", "train")
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
        inner = _records(out / "pretrain" / arm / "train.log", "train_inner")
        assert float(row["final train loss"]) == pytest.approx(float(inner[-1]["loss"]), abs=5e-4)

        best = []
        for seed in SEEDS:
            valid = _records(out / "finetune" / arm / "topic" / f"seed{seed}" / "train.log", "valid")
            assert len(valid) >= 2, (arm, seed)
            best.append(max(float(v["valid_accuracy"]) for v in valid))
        m = re.fullmatch(r"([-\d.]+) ± ([\d.]+) \(n=(\d+)\)", row["topic accuracy (%)"])
        assert m, row
        assert float(m.group(1)) == pytest.approx(statistics.mean(best), abs=0.05)
        std = statistics.stdev(best) if len(best) > 1 else 0.0
        assert float(m.group(2)) == pytest.approx(std, abs=0.05)
        assert int(m.group(3)) == len(SEEDS)


def test_rerun_reuses_finished_runs(comparison, capsys):
    out, _ = comparison
    before = (out / "comparison.md").read_text()
    assert compare_run.main(_args(out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, reusing") == len(ARMS) * (1 + len(SEEDS))
    assert (out / "comparison.md").read_text() == before


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
    assert logs.best_validation(log, "accuracy") == {"value": 55.5, "num_updates": 25, "validations": 3}
    values = [55.5, 50.0, 61.25]
    mean, std, n = report.spread(values)
    assert (mean, n) == (pytest.approx(float(np.mean(values))), 3)
    assert std == pytest.approx(float(np.std(values, ddof=1)))


def test_bad_arm_and_missing_corpus_are_named(tmp_path, capsys):
    assert compare_run.main(["--arms", "data2vec2,bert", "--out", str(tmp_path)]) == 1
    assert "unknown arm(s) bert" in capsys.readouterr().err
    assert compare_run.main([str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 1
    assert f"corpus not found: {tmp_path / 'nope.txt'}" in capsys.readouterr().err
