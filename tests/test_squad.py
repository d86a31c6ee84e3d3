"""SQuAD: official-rule evaluation, tokenization and windows, fine-tuning, data download, bad input.

The expected evaluation numbers are worked out by hand in the comments (not computed with
our code). The end-to-end tests pretrain a tiny text model for a few updates, then
fine-tune it through the real ``fairseq-hydra-train`` on a generated SQuAD-format set
whose answers are learnable: the answer is the word after the marker "zorp", drawn from
a few answer words that occur nowhere else.
"""

import json
import random
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import BIN, REPO, compat_dir, env, hydra_train, run

PREPARE = REPO / "datasets" / "squad" / "prepare.sh"
FINETUNE = REPO / "scripts" / "finetune_squad.sh"


# ----------------------------------------------------------------------------
# evaluation: hand-worked examples


def squad_file(version, questions):
    """A SQuAD data file with one paragraph per question: [(id, [gold answers])]."""
    data = []
    for qid, golds in questions:
        qa = {"id": qid, "question": "q?", "answers": [{"text": g, "answer_start": 0} for g in golds]}
        if version != "1.1":
            qa["is_impossible"] = not golds
        data.append({"title": qid, "paragraphs": [{"context": "c", "qas": [qa]}]})
    return {"version": version, "data": data}


V1_DATA = squad_file("1.1", [
    ("q1", ["Denver Broncos", "The Denver Broncos"]),
    ("q2", ["the cat sat on the mat"]),
    ("q3", ["1,000 people", "one thousand"]),
    ("q4", ["anything"]),
    ("q5", ["an apple"]),
])
V1_PREDS = {"q1": "denver broncos!", "q2": "a cat sat", "q3": "1000 people were", "q5": "the"}
# q1: "denver broncos" == normalised gold 1                      EM 1, F1 1
# q2: gold "cat sat on mat" (4 tokens), pred "cat sat" (2): P=1, R=1/2  EM 0, F1 2/3
# q3: gold 1 "1000 people", pred "1000 people were": P=2/3, R=1 -> F1 0.8; gold 2: 0
# q4: no prediction: counts, scores 0 (v1.1)
# q5: gold "apple", pred "" (an article only)                      EM 0, F1 0
V1_EXPECTED = {"exact_match": 100 * 1 / 5, "f1": 100 * (1 + 2 / 3 + 0.8) / 5}

V2_DATA = squad_file("v2.0", [
    ("a1", ["Paris", "paris france"]),
    ("a2", ["in 1990"]),
    ("a3", ["blue whale"]),
    ("n1", []),
    ("n2", []),
])
V2_PREDS = {"a1": "Paris", "a2": "1990 and 1991", "a3": "", "n1": "", "n2": "something"}
# raw scores (EM, F1): a1 (1, 1); a2: gold [in, 1990], pred [1990, and, 1991]: P=1/3, R=1/2 ->
# F1 = 2*(1/6)/(5/6) = 0.4, EM 0; a3 (0, 0): empty prediction; n1 (1, 1): "" == ""; n2 (0, 0)
V2_EXPECTED = {
    "exact": 100 * 2 / 5, "f1": 100 * 2.4 / 5, "total": 5,
    "HasAns_exact": 100 * 1 / 3, "HasAns_f1": 100 * 1.4 / 3, "HasAns_total": 3,
    "NoAns_exact": 100 * 1 / 2, "NoAns_f1": 100 * 1 / 2, "NoAns_total": 2,
}
NA_PROBS = {"a1": 0.1, "a2": 0.6, "a3": 0.9, "n1": 0.3, "n2": 0.8}
# threshold 0.5 -> "no answer" for a2 (0.6), a3 (0.9), n2 (0.8): a2 0, a3 0 (answerable),
# n2 1 (unanswerable); a1 and n1 keep theirs. EM = F1 = (1+0+0+1+1)/5
V2_THRESH_05 = {
    "exact": 60.0, "f1": 60.0, "total": 5,
    "HasAns_exact": 100 / 3, "HasAns_f1": 100 / 3, "HasAns_total": 3,
    "NoAns_exact": 100.0, "NoAns_f1": 100.0, "NoAns_total": 2,
}
# best threshold: start from "all unanswerable" = 2 (n1, n2 right); in probability order
# a1 0.1 (+EM 1 / +F1 1) -> 3 | n1 0.3 (pred "" -> 0) -> 3 | a2 0.6 (+0 / +0.4) -> 3 / 3.4 |
# n2 0.8 (pred non-empty -> -1) | a3 0.9 (+0). Best EM 3 at 0.1, best F1 3.4 at 0.6.
V2_BEST = {"best_exact": 60.0, "best_exact_thresh": 0.1, "best_f1": 100 * 3.4 / 5, "best_f1_thresh": 0.6}


def assert_close(got, expected):
    assert list(got) == list(expected), f"keys {list(got)} != {list(expected)}"
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_normalisation_and_scores():
    from d2v_plugin.squad_eval import exact_match, f1_v1, f1_v2, normalize_answer

    assert normalize_answer("  The  Quick, brown-fox's   AN apple!") == "quick brownfoxs apple"
    # articles go as whole words only, after the punctuation: "a.n." becomes the article "an"
    assert normalize_answer("Theatre a.n. then another") == "theatre then another"
    assert exact_match("The Denver Broncos", "denver  broncos.") == 1
    assert f1_v1("w x y z", "x y q") == pytest.approx(4 / 7)  # P = 2/3, R = 2/4: 2PR/(P+R) = 4/7
    assert f1_v1("a b c d", "b c e") == pytest.approx(2 / 3)  # "a" is an article: gold "b c d"
    assert f1_v1("x x y", "x y y") == pytest.approx(2 / 3)  # counts: common x1 y1 -> P=R=2/3
    # an answer that normalises to nothing: v1.1 gives F1 0, v2.0 compares empty with empty
    assert (exact_match("the", "a"), f1_v1("the", "a"), f1_v2("the", "a")) == (1, 0.0, 1.0)


def test_evaluate_v1_hand_worked(capsys):
    from d2v_plugin.squad_eval import evaluate_v1

    assert_close(evaluate_v1(V1_DATA, V1_PREDS), V1_EXPECTED)
    assert "Unanswered question q4 will receive score 0." in capsys.readouterr().err


def test_evaluate_v2_hand_worked():
    from d2v_plugin.squad_eval import evaluate_v2

    assert_close(evaluate_v2(V2_DATA, V2_PREDS), V2_EXPECTED)
    assert_close(evaluate_v2(V2_DATA, V2_PREDS, NA_PROBS, na_prob_thresh=0.5), {**V2_THRESH_05, **V2_BEST})
    # a gold answer that normalises to nothing is dropped; with none left the gold is ""
    data = squad_file("v2.0", [("x", ["The", "a"])])
    assert evaluate_v2(data, {"x": ""})["exact"] == 100.0
    assert evaluate_v2(data, {"x": "an"})["f1"] == 100.0


def test_eval_cli(tmp_path, capsys):
    from d2v_plugin.squad_eval import main

    files = {}
    for name, obj in [("v1", V1_DATA), ("p1", V1_PREDS), ("v2", V2_DATA), ("p2", V2_PREDS), ("na", NA_PROBS)]:
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(obj))

    # the real command line once (python -m; d2v-squad-eval is the same main()); stdout: the JSON only
    out = run([sys.executable, "-m", "d2v_plugin.squad_eval", files["v2"], files["p2"], "--na-prob-file", files["na"]]).stdout
    # default threshold 1.0: no probability exceeds it, the raw scores stay
    assert_close(json.loads(out[out.index("{"):]), {**V2_EXPECTED, **V2_BEST})

    def cli(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = cli(files["v1"], files["p1"])
    assert code == 0 and out.startswith('{"exact_match": ')  # the v1.1 script's one-line output
    assert_close(json.loads(out), V1_EXPECTED)
    assert cli(files["v2"], files["p2"], "-n", files["na"], "--na-prob-thresh", "0.5", "--out-file", tmp_path / "o.json")[0] == 0
    assert_close(json.loads((tmp_path / "o.json").read_text()), {**V2_THRESH_05, **V2_BEST})
    # v1.1 data evaluated with the v2.0 rules (the missing q4 is then an error, as in the official script)
    (tmp_path / "p1full.json").write_text(json.dumps({**V1_PREDS, "q4": "x"}))
    code, out, _ = cli(files["v1"], tmp_path / "p1full.json", "--version", "2.0")
    assert code == 0 and json.loads(out)["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0.8) / 5)

    (tmp_path / "partial.json").write_text(json.dumps({"a1": "Paris"}))
    code, _, err = cli(files["v2"], tmp_path / "partial.json")
    assert code == 2 and "4 of 5 questions have no prediction" in err
    (tmp_path / "broken.json").write_text('{"a1": "Par')
    code, _, err = cli(files["v2"], tmp_path / "broken.json")
    assert code == 2 and "not valid JSON" in err


# ----------------------------------------------------------------------------
# windows, labels and decoding (a whitespace tokenizer)


class WordTokenizer:
    name = "words"

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        ids, spans, pos = [], [], 0
        for word in text.split():
            start = text.index(word, pos)
            pos = start + len(word)
            ids.append(self.vocab.setdefault(word, 10 + len(self.vocab)))
            spans.append((start, pos))
        return ids, spans


def one_question(context, question, answer, start, version="1.1"):
    answers = [{"text": answer, "answer_start": start}] if answer else []
    qa = {"id": "q", "question": question, "answers": answers, "is_impossible": not answer}
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [qa]}]}]}


def test_windows_labels_and_decoding(tmp_path):
    from d2v_plugin.data.squad_features import build_features, decode_example, read_squad, window_starts

    assert window_starts(10, 4, 2) == [(0, 4), (2, 4), (4, 4), (6, 4)]
    assert window_starts(3, 4, 2) == [(0, 3)]
    context = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"
    path = tmp_path / "one.json"
    path.write_text(json.dumps(one_question(context, "where", "w5 w6", context.index("w5"))))
    data = read_squad(str(path), allow_impossible=False)
    # <s> where </s> </s> + 4 context tokens + </s> = 9; windows start 2 context tokens apart
    feats, unlocated = build_features(data, WordTokenizer(), max_seq_length=9, doc_stride=2, max_query_length=8, bos=0, eos=2)
    assert unlocated == 0
    assert [int(s) for s in feats.window_start] == [0, 2, 4, 6]
    # the answer is context tokens 5-6: only window 2 (tokens 4-7) holds both, at offsets 1-2,
    # after the 4 tokens of "<s> where </s> </s>"; the other windows point at <s>
    assert [int(s) for s in feats.start_positions] == [0, 0, 5, 0]
    assert [int(e) for e in feats.end_positions] == [0, 0, 6, 0]
    assert feats.tokens[2][0] == 0 and list(feats.tokens[2][2:4]) == [2, 2] and feats.tokens[2][-1] == 2

    # an answer_start a little off is found at the nearest occurrence; an absent answer is
    # left out of training (no windows) and labelled "no answer" otherwise
    for answer, start, found in (("w5 w6", context.index("w5") - 2, True), ("w77", 3, False)):
        path.write_text(json.dumps(one_question(context, "where", answer, start)))
        other = read_squad(str(path), allow_impossible=False)
        for skip in (True, False):
            f, missing = build_features(other, WordTokenizer(), 9, 2, 8, bos=0, eos=2, skip_unlocated=skip)
            assert missing == (0 if found else 1)
            assert len(f.tokens) == (0 if skip and not found else 4)
            assert list(f.start_positions) == ([0, 0, 5, 0] if found else [] if skip else [0, 0, 0, 0])

    # decoding: window 2 prefers w5..w6, w6 has its most context in window 2 (offset 2 of 4)
    n = len(feats.tokens[0])
    start = [np.full(n, -5.0) for _ in range(4)]
    end = [np.full(n, -5.0) for _ in range(4)]
    start[2][5], end[2][6] = 3.0, 3.0
    start[3][4], end[3][4] = 4.0, 4.0  # w6 in window 3 sits at its edge: not its max-context window
    pred = decode_example(data, feats, 0, start, end, n_best_size=5, max_answer_length=5)
    assert pred.text == "w5 w6"
    pred = decode_example(data, feats, 0, start, end, n_best_size=5, max_answer_length=1)
    assert pred.text != "w5 w6"  # two tokens are too long now
    # SQuAD 2.0: a null score (<s>) above the best span predicts ""; null odds = null - best
    for s in start:
        s[0] = 5.0
    for e in end:
        e[0] = 5.0
    pred = decode_example(data, feats, 0, start, end, n_best_size=5, max_answer_length=5, version_2=True)
    assert (pred.text, pred.null_odds) == ("", pytest.approx(10.0 - 6.0))
    pred = decode_example(data, feats, 0, start, end, max_answer_length=5, version_2=True, null_score_diff_threshold=5.0)
    assert pred.text == "w5 w6"
    pred = decode_example(data, feats, 0, start, end, max_answer_length=5, version_2=False)
    assert pred.text == "w5 w6"


def write_tiny_gpt2(d):
    """GPT-2 byte-level BPE files (a few merges) and a fairseq dict.txt of BPE ids."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    d.mkdir(parents=True, exist_ok=True)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("o", "r"), ("Ġ", "w"), ("Ġw", "or")]
    symbols = list(bytes_to_unicode().values()) + ["".join(m) for m in merges]
    (d / "encoder.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (d / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(len(symbols))))


def test_gpt2_offsets_match_fairseq_encoding(tmp_path):
    from fairseq.data import Dictionary
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    from d2v_plugin.data.squad_features import GPT2Tokenizer

    write_tiny_gpt2(tmp_path)
    dictionary = Dictionary.load(str(tmp_path / "dict.txt"))
    tok = GPT2Tokenizer(str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"), dictionary)
    text = "The world  of théâtre,\n the word 1990s"
    ids, spans = tok.encode(text)
    reference = get_encoder(str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe")).encode(text)
    assert ids == [dictionary.index(str(i)) for i in reference]
    pieces = [text[a:b] for a, b in spans]
    # every non-space character once (the byte tokens of one character share its span)
    assert "".join(text[a:b] for a, b in dict.fromkeys(spans)) == "".join(text.split())
    # "The" -> T + he; " the" -> "the" (its space excluded); " world" -> "wor" l d
    assert pieces[:2] == ["T", "he"] and "the" in pieces and "wor" in pieces and " the" not in pieces
    assert pieces.count("é") == 2  # two byte tokens, both mapped to the character


# ----------------------------------------------------------------------------
# tiny end-to-end fine-tuning

SYLLABLES = ["ba", "ko", "li", "mu", "ne", "ra", "so", "ti", "vo", "ze"]
FILLERS = sorted({a + b for a in SYLLABLES for b in SYLLABLES})[:60]
ANSWERS = ["gaga", "gugu", "gogo", "gigi", "hehe", "haha", "huhu", "hoho"]
MARKER = "zorp"
QUESTION = f"what comes after {MARKER} ?"


def generated_squad(n, seed, version="1.1", unanswerable_every=0):
    """Paragraphs of filler words; answerable ones hold 'zorp ANSWER' once."""
    rng = random.Random(seed)
    data = []
    for i in range(n):
        words = [rng.choice(FILLERS) for _ in range(rng.randint(12, 70))]
        answerable = not (unanswerable_every and i % unanswerable_every == 0)
        qa = {"id": f"{version}-{i}", "question": QUESTION, "answers": []}
        if answerable:
            pos = rng.randrange(len(words) - 1)
            words[pos], words[pos + 1] = MARKER, rng.choice(ANSWERS)
            start = len(" ".join(words[:pos + 1])) + 1
            qa["answers"] = [{"text": words[pos + 1], "answer_start": start}]
        if version != "1.1":
            qa["is_impossible"] = not answerable
        data.append({"title": f"t{i}", "paragraphs": [{"context": " ".join(words) + ".", "qas": [qa]}]})
    return {"version": version, "data": data}


def train_sentencepiece(lines, prefix):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=120, hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def write_spm_dict(sp, path, extra=()):
    with open(path, "w") as f:
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)):
                f.write(f"{sp.id_to_piece(i)} 1\n")
        for sym in extra:
            f.write(f"{sym} 1\n")


@pytest.fixture(scope="module")
def squad_env(tmp_path_factory):
    """SQuAD v1.1 / v2.0 sets, a sentencepiece tokenizer and a tiny checkpoint pretrained on their text."""
    root = tmp_path_factory.mktemp("squad")
    for version, sub, extra in (("1.1", "v1", {}), ("v2.0", "v2", {"unanswerable_every": 3})):
        (root / sub).mkdir()
        (root / sub / "train.json").write_text(json.dumps(generated_squad(500, 0, version, **extra)))
        (root / sub / "dev.json").write_text(json.dumps(generated_squad(60, 1, version, **extra)))
    train = json.loads((root / "v1" / "train.json").read_text())
    lines = [p["context"] for a in train["data"] for p in a["paragraphs"]] + [QUESTION] * 50
    rng = random.Random(5)
    lines += [" ".join(rng.choice(ANSWERS + [MARKER]) for _ in range(12)) for _ in range(300)]
    pre = root / "pre"
    pre.mkdir()
    sp = train_sentencepiece(lines, pre / "spm")
    write_spm_dict(sp, pre / "dict.txt")
    encoded = [" ".join(sp.encode(line, out_type=str)) for line in lines]
    (pre / "train.tok").write_text("\n".join(encoded[:-40]) + "\n")
    (pre / "valid.tok").write_text("\n".join(encoded[-40:]) + "\n")
    run([BIN / "fairseq-preprocess", "--only-source", "--trainpref", pre / "train.tok", "--validpref", pre / "valid.tok",
         "--srcdict", pre / "dict.txt", "--destdir", pre / "bin", "--workers", "1"])
    ckpt_dir = root / "pretrained"
    hydra_train("pretraining/text_tiny", f"task.data={pre / 'bin'}", "optimization.max_update=5", f"checkpoint.save_dir={ckpt_dir}")
    return {"root": root, "dict": pre / "dict.txt", "spm": pre / "spm.model", "ckpt": ckpt_dir / "checkpoint_last.pt"}


def tokenizer_overrides(e):
    return [f"task.dict_path={e['dict']}", "task.bpe=sentencepiece", f"task.sentencepiece_model={e['spm']}"]


def untrained_metrics(e, version_2, out_dir):
    """Validation metrics of the pretrained encoder with a fresh span head (no fine-tuning)."""
    import torch
    from fairseq import metrics
    from omegaconf import OmegaConf

    from d2v_plugin.criteria.span_qa import SpanQACriterion
    from d2v_plugin.models.finetuning.span_qa import SpanQAConfig, SpanQAModel
    from d2v_plugin.tasks.squad import SquadConfig, SquadTask

    cfg = OmegaConf.structured(SquadConfig)
    cfg.update(data=str(e["root"] / ("v2" if version_2 else "v1")), train_file="train.json", valid_file="dev.json",
               version_2_with_negative=version_2, dict_path=str(e["dict"]), bpe="sentencepiece",
               sentencepiece_model=str(e["spm"]), max_seq_length=64, doc_stride=24, max_query_length=16,
               max_answer_length=10, n_best_size=10, predictions_dir=str(out_dir), seed=1)
    task = SquadTask.setup_task(cfg)
    task.load_dataset("valid")
    torch.manual_seed(1)
    model = SpanQAModel.build_model(OmegaConf.structured(SpanQAConfig(model_path=str(e["ckpt"]))), task).eval()
    criterion = SpanQACriterion(task).eval()
    assert task.logging_outputs_can_be_summed(criterion) is False  # eval mode: answers are gathered
    dataset = task.datasets["valid"]
    batches = [dataset.collater([dataset[j] for j in range(i, min(i + 16, len(dataset)))]) for i in range(0, len(dataset), 16)]
    with metrics.aggregate(new_root=True) as agg:
        # pairs of batches reduced together, as the gathered outputs of two GPUs are
        for pair in (batches[i:i + 2] for i in range(0, len(batches), 2)):
            task.reduce_metrics([task.valid_step(b, model, criterion)[2] for b in pair], criterion)
        return agg.get_smoothed_values()


def test_finetune_v1_learns_the_answers(squad_env, tmp_path):
    e = squad_env
    before = untrained_metrics(e, False, tmp_path / "untrained")
    assert (tmp_path / "untrained" / "predictions.json").is_file()
    save = tmp_path / "ft"
    start = tmp_path / "pretrained_copy.pt"  # removed before re-loading: the fine-tuned file must suffice
    shutil.copyfile(e["ckpt"], start)
    out = hydra_train("finetuning/squad/tiny", f"task.data={e['root'] / 'v1'}", *tokenizer_overrides(e),
                      f"model.model_path={start}", f"checkpoint.save_dir={save}", "optimization.max_update=60").stdout
    assert "SQuAD 1.1 evaluation of valid" in out
    result = json.loads((save / "eval.json").read_text())
    assert list(result) == ["exact_match", "f1"]
    assert result["f1"] >= before["f1"] + 40, (before, result)
    predictions = json.loads((save / "predictions.json").read_text())
    odds = json.loads((save / "null_odds.json").read_text())
    dev = json.loads((e["root"] / "v1" / "dev.json").read_text())
    qids = [qa["id"] for a in dev["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert sorted(predictions) == sorted(qids) == sorted(odds)
    assert set(predictions.values()) <= set(ANSWERS) | {""}
    _check_reader_and_hf_export(save / "checkpoint_last.pt", dev, predictions, tmp_path)

    from fairseq import checkpoint_utils

    start.unlink()
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    for name, value in models[0].state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)


def _check_reader_and_hf_export(ckpt, dev, predictions, tmp_path):
    """d2v_plugin.load_model answers as validation did; the Hugging Face export (QA head and
    sentencepiece tokenizer) gives our token ids and our span logits."""
    import d2v_plugin
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    qas = [(qa["id"], qa["question"], p["context"]) for a in dev["data"] for p in a["paragraphs"] for qa in p["qas"]]
    reader = d2v_plugin.load_model(str(ckpt))
    answers = reader([q for _, q, _ in qas], [c for _, _, c in qas], batch_size=16)
    assert {qid: a.text for (qid, _, _), a in zip(qas, answers)} == predictions

    hf_dir = tmp_path / "hf"
    printed = run([BIN / "d2v-export", ckpt, "--out", hf_dir, "--format", "hf"]).stdout
    assert "as XLMRobertaTokenizer" in printed
    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = sorted({c for _, _, c in qas} | {q for _, q, _ in qas})
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == [reader.tokenizer.encode(t) for t in texts]
    hf = AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    question, context = qas[0][1], qas[0][2]
    ids = tok(question, context, return_tensors="pt")["input_ids"]
    expected = [0, *reader.tokenizer.encode(question), 2, 2, *reader.tokenizer.encode(context), 2]
    assert ids[0].tolist() == expected
    with torch.no_grad():
        got = hf(input_ids=ids)
        ours = reader.model(ids)
    torch.testing.assert_close(got.start_logits, ours["start_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.end_logits, ours["end_logits"], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def squad_v1_ckpt(squad_env, tmp_path_factory):
    """A tiny data2vec 1.0 text checkpoint (5 updates) on the same tokens as squad_env's."""
    save = tmp_path_factory.mktemp("pretrained_v1")
    hydra_train("pretraining/v1_text_tiny", f"task.data={squad_env['root'] / 'pre' / 'bin'}", "optimization.max_update=5",
                f"checkpoint.save_dir={save}")
    return save / "checkpoint_last.pt"


def test_finetune_from_data2vec_1_0(squad_env, squad_v1_ckpt, tmp_path):
    """A data2vec 1.0 encoder under the span head: it learns, and the fine-tuned file re-loads alone."""
    e = dict(squad_env, ckpt=squad_v1_ckpt)
    before = untrained_metrics(e, False, tmp_path / "untrained")
    save = tmp_path / "ft"
    start = tmp_path / "pretrained_copy.pt"
    shutil.copyfile(squad_v1_ckpt, start)
    hydra_train("finetuning/squad/tiny", f"task.data={e['root'] / 'v1'}", *tokenizer_overrides(e),
                f"model.model_path={start}", f"checkpoint.save_dir={save}", "optimization.max_update=60")
    result = json.loads((save / "eval.json").read_text())
    assert result["f1"] >= before["f1"] + 40, (before, result)

    from fairseq import checkpoint_utils

    from d2v_plugin.models.v1.text import Data2VecTextModel

    start.unlink()
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    assert isinstance(models[0].encoder, Data2VecTextModel)
    assert cfg.model.pretrained_model_args["_name"] == "data2vec_text"
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    for name, value in models[0].state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)


def test_finetune_script_v2(squad_env, tmp_path):
    """scripts/finetune_squad.sh 2.0: trains, writes predictions and null odds, prints the official v2.0 JSON."""
    e = squad_env
    before = untrained_metrics(e, True, tmp_path / "untrained")
    save = tmp_path / "ft2"
    cmd = ["bash", FINETUNE, "2.0", e["ckpt"], "--config", "finetuning/squad/tiny", "--data", e["root"] / "v2",
           "--save-dir", save, *tokenizer_overrides(e), "optimization.max_update=80"]
    proc = subprocess.run([str(c) for c in cmd], env={**env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout)  # stdout: the evaluation only; training output went to stderr
    assert list(result) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact",
                            "NoAns_f1", "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    assert result["total"] == 60 and result["NoAns_total"] == 20
    assert result["f1"] >= before["f1"] + 30, (before, result)
    assert result["HasAns_f1"] >= before["HasAns_f1"] + 30
    assert result["best_f1"] >= result["f1"]
    assert (save / "train.log").is_file() and (save / "checkpoint_best.pt").is_file()
    # the task's own evaluation of the same files agrees with the script's
    task_eval = json.loads((save / "eval.json").read_text())
    assert task_eval == pytest.approx(result)


# ----------------------------------------------------------------------------
# bad input


def test_checkpoint_of_another_modality(squad_env, tmp_path):
    audio = compat_dir() / "v2_audio.checkpoint.pt"
    e = squad_env
    proc = hydra_train("finetuning/squad/tiny", f"task.data={e['root'] / 'v1'}", *tokenizer_overrides(e),
                       f"model.model_path={audio}", f"checkpoint.save_dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "is a AUDIO model; this task needs a TEXT checkpoint" in proc.stdout


def test_dictionary_or_tokenizer_not_matching(squad_env, tmp_path):
    import sentencepiece as spm
    from omegaconf import OmegaConf

    from d2v_plugin.data.squad_features import SquadDataError
    from d2v_plugin.models.finetuning.span_qa import SpanQAConfig, SpanQAModel
    from d2v_plugin.tasks.squad import SquadConfig, SquadTask

    e = squad_env
    sp = spm.SentencePieceProcessor(model_file=str(e["spm"]))
    base = dict(data=str(e["root"] / "v1"), bpe="sentencepiece", sentencepiece_model=str(e["spm"]),
                max_seq_length=64, predictions_dir=str(tmp_path), seed=1)

    # a dictionary with more symbols than the checkpoint's embedding table
    write_spm_dict(sp, tmp_path / "bigger.txt", extra=["extra1", "extra2"])
    task = SquadTask.setup_task(OmegaConf.merge(OmegaConf.structured(SquadConfig), {**base, "dict_path": str(tmp_path / "bigger.txt")}))
    with pytest.raises(ValueError, match=r"dictionary has \d+ symbols but .* was trained with \d+"):
        SpanQAModel.build_model(OmegaConf.structured(SpanQAConfig(model_path=str(e["ckpt"]))), task)

    # a sentencepiece model trained on other text, with the checkpoint's dictionary
    train_sentencepiece([f"completely different text number {i} about xylophones" for i in range(200)], tmp_path / "other")
    cfg = OmegaConf.merge(OmegaConf.structured(SquadConfig),
                          {**base, "dict_path": str(e["dict"]), "sentencepiece_model": f"{tmp_path / 'other'}.model"})
    with pytest.raises(SquadDataError, match="tokenizer/dictionary mismatch"):
        SquadTask.setup_task(cfg)

    # GPT-2 BPE files with a sentencepiece dictionary
    write_tiny_gpt2(tmp_path / "gpt2")
    cfg = OmegaConf.merge(OmegaConf.structured(SquadConfig),
                          {**base, "dict_path": str(e["dict"]), "bpe": "gpt2",
                           "gpt2_encoder_json": str(tmp_path / "gpt2" / "encoder.json"),
                           "gpt2_vocab_bpe": str(tmp_path / "gpt2" / "vocab.bpe")})
    with pytest.raises(SquadDataError, match="tokenizer/dictionary mismatch"):
        SquadTask.setup_task(cfg)


def test_bad_squad_files(tmp_path):
    from d2v_plugin.data.squad_features import SquadDataError, read_squad

    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps(generated_squad(6, 0, "v2.0", unanswerable_every=2)))
    with pytest.raises(SquadDataError, match="has no answer; that is SQuAD 2.0 data"):
        read_squad(str(v2), allow_impossible=False)
    assert len(read_squad(str(v2), allow_impossible=True).examples) == 6
    broken = tmp_path / "broken.json"
    broken.write_text(v2.read_text()[:100])
    with pytest.raises(SquadDataError, match="not valid JSON"):
        read_squad(str(broken), allow_impossible=True)
    with pytest.raises(FileNotFoundError, match="prepare.sh"):
        read_squad(str(tmp_path / "absent.json"), allow_impossible=True)


# ----------------------------------------------------------------------------
# datasets/squad/prepare.sh against python -m http.server on 127.0.0.1


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """good/ (v1.1 train/dev), truncated/ (dev cut short), mislabelled/ (v1.1 data named v2.0),
    served by python -m http.server."""
    root = tmp_path_factory.mktemp("squad_mirror")
    for sub in ("good", "truncated", "mislabelled"):
        (root / sub).mkdir()
    for split, seed in (("train", 0), ("dev", 1)):
        text = json.dumps(generated_squad(20, seed))
        (root / "good" / f"{split}-v1.1.json").write_text(text)
        (root / "truncated" / f"{split}-v1.1.json").write_text(text if split == "train" else text[: len(text) // 2])
        (root / "mislabelled" / f"{split}-v2.0.json").write_text(text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield {"root": root, "url": f"http://127.0.0.1:{port}"}
    finally:
        server.terminate()
        server.wait(timeout=10)


def prepare(*args):
    return subprocess.run(["bash", PREPARE, *map(str, args)], env={**env(), "PYTHON": sys.executable},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)


def test_prepare_downloads_checks_and_is_idempotent(mirror, tmp_path):
    assert prepare("--help").returncode == 0 and "--mirror URL" in prepare("--help").stdout
    out = tmp_path / "squad"
    # resume: a partial download is completed (http.server cannot resume: restarted)
    out.mkdir()
    good = (mirror["root"] / "good" / "dev-v1.1.json").read_bytes()
    (out / "dev-v1.1.json.part").write_bytes(good[:100])
    proc = prepare("--out", out, "--mirror", f"{mirror['url']}/good", "--no-checksum")
    assert proc.returncode == 0, proc.stdout
    assert "resuming" in proc.stdout and "the server cannot resume" in proc.stdout
    assert "20 articles, 20 paragraphs, 20 questions (0 unanswerable)" in proc.stdout
    for split in ("train", "dev"):
        assert (out / f"{split}-v1.1.json").read_bytes() == (mirror["root"] / "good" / f"{split}-v1.1.json").read_bytes()
    assert not list(out.glob("*.part"))
    again = prepare("--out", out, "--mirror", f"{mirror['url']}/good", "--no-checksum")
    assert again.returncode == 0 and again.stdout.count("already present") == 2 and "downloading" not in again.stdout


def test_prepare_resumes_a_partial_download(mirror, tmp_path):
    """A server that honours byte ranges (curl on a file:// mirror): the .part is extended, not replaced."""
    source = (mirror["root"] / "good" / "dev-v1.1.json").read_bytes()
    assert source[:100].count(b'"title": "t0"') == 1
    (tmp_path / "dev-v1.1.json.part").write_bytes(source[:100].replace(b'"title": "t0"', b'"title": "X0"'))
    proc = prepare("--out", tmp_path, "--mirror", (mirror["root"] / "good").as_uri(), "--no-checksum")
    assert proc.returncode == 0 and "resuming" in proc.stdout, proc.stdout
    got = (tmp_path / "dev-v1.1.json").read_bytes()
    assert got == source.replace(b'"title": "t0"', b'"title": "X0"', 1)  # kept the first 100 bytes we wrote


def test_prepare_rejects_bad_downloads(mirror, tmp_path):
    # the generated files are not the official ones: the default SHA-256 check refuses them
    proc = prepare("--out", tmp_path / "a", "--mirror", f"{mirror['url']}/good")
    assert proc.returncode != 0 and "SHA-256 is" in proc.stdout
    assert (tmp_path / "a" / "train-v1.1.json.bad").is_file() and not (tmp_path / "a" / "train-v1.1.json").exists()
    # a truncated file is not valid JSON
    proc = prepare("--out", tmp_path / "b", "--mirror", f"{mirror['url']}/truncated", "--no-checksum")
    assert proc.returncode != 0 and "dev-v1.1.json: not valid JSON" in proc.stdout
    assert (tmp_path / "b" / "train-v1.1.json").is_file() and (tmp_path / "b" / "dev-v1.1.json.bad").is_file()
    assert not (tmp_path / "b" / "dev-v1.1.json").exists()
    # the wrong version field, and a file the server does not have
    proc = prepare("--out", tmp_path / "c", "--mirror", f"{mirror['url']}/good", "--version", "2.0", "--no-checksum")
    assert proc.returncode != 0 and "train-v2.0.json failed" in proc.stdout and "HTTP 404" in proc.stdout
    assert prepare("--out", tmp_path / "d", "--version", "3").returncode != 0
    proc = prepare("--out", tmp_path / "e", "--mirror", f"{mirror['url']}/mislabelled", "--version", "2.0", "--no-checksum")
    assert proc.returncode != 0 and "version field is '1.1', expected 'v2.0'" in proc.stdout
