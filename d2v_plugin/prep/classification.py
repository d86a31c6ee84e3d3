"""Turn a labelled CSV/TSV text-classification set into fairseq's sentence-prediction layout.

Any set with a text column (optionally a second one, for sentence pairs) and a label
column works, e.g. TweetEval emotion exported as ``text,label``::

    python -m d2v_plugin.prep.classification --train train.csv --valid dev.csv \\
        --text-column text --label-column label --tokenizer spm:data/pretrain/spm.model --out data/tweeteval

Output (what task ``d2v_sentence_prediction`` reads; point ``task.data`` at OUT)::

    OUT/input0/{dict.txt,train.bin/.idx,valid.bin/.idx[,test.bin/.idx]}   (input1/ for pairs)
    OUT/label/{dict.txt,train.bin/.idx,valid.bin/.idx}     classes, in --labels order, or
    OUT/label/{train,valid}.label                          regression values (--regression)
    OUT/processed/                                         the tokenized text, for inspection

Texts are tokenized with the pretrained model's tokenizer (``gpt2``: fairseq's GPT-2 BPE,
the vocabulary of Meta's checkpoints; ``spm:MODEL``: a sentencepiece model, e.g. the one
``d2v_plugin.prep.text`` trained; ``none``: already whitespace-tokenized) and binarized with
that model's ``dict.txt``. This module also holds the helpers ``d2v_plugin.prep.glue`` uses.

Fine-tune with a single-sentence GLUE recipe and the set's own classes and metric, e.g.::

    bash scripts/finetune_glue.sh sst_2 CHECKPOINT --data OUT task.num_classes=4 \
        criterion.report=macro_f1 checkpoint.best_checkpoint_metric=macro_f1
"""

import argparse
import collections
import csv
import json
import logging
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

log = logging.getLogger("d2v_plugin.prep.classification")

GPT2_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
SPLIT_ORDER = ("train", "valid", "valid1", "valid2", "test", "test1", "test2")


class PrepError(Exception):
    """A problem with the user's input, reported without a traceback."""


class Example(NamedTuple):
    texts: Tuple[str, ...]
    label: Optional[str]  # None: unlabelled (test sets)
    where: str  # file:line, for error messages


# ----------------------------------------------------------------------------
# tokenizers


@dataclass(frozen=True)
class Tokenizer:
    """What turns text into the pretrained model's tokens; picklable for worker processes."""

    kind: str  # gpt2 | spm | none
    path: Optional[str]  # gpt2: directory of encoder.json/vocab.bpe; spm: the model file
    dict_path: str  # the pretrained model's dict.txt

    def describe(self) -> Dict[str, str]:
        return {"kind": self.kind, "path": str(self.path), "dict": str(self.dict_path)}


def make_tokenizer(spec: str, dict_path=None, gpt2_dir=None) -> Tokenizer:
    """``gpt2`` (needs ``gpt2_dir``), ``spm:MODEL`` or ``none`` (needs ``dict_path``)."""
    if spec == "gpt2":
        if gpt2_dir is None:
            raise PrepError("--tokenizer gpt2 needs --gpt2-dir (a directory with encoder.json, vocab.bpe, dict.txt)")
        gpt2_dir = Path(gpt2_dir)
        missing = [n for n in GPT2_FILES if not (gpt2_dir / n).is_file()]
        if missing:
            raise PrepError(f"--gpt2-dir {gpt2_dir} lacks {', '.join(missing)}")
        return Tokenizer("gpt2", str(gpt2_dir), str(dict_path or gpt2_dir / "dict.txt"))
    if spec.startswith("spm:"):
        model = Path(spec[4:])
        if not model.is_file():
            raise PrepError(f"sentencepiece model {model} not found (--tokenizer spm:MODEL)")
        dict_path = Path(dict_path) if dict_path else model.parent / "dict.txt"
        if not dict_path.is_file():
            raise PrepError(
                f"dictionary {dict_path} not found: pass --dict with the dict.txt the model was pretrained with "
                "(d2v_plugin.prep.text writes it beside spm.model)"
            )
        return Tokenizer("spm", str(model), str(dict_path))
    if spec == "none":
        if not dict_path or not Path(dict_path).is_file():
            raise PrepError("--tokenizer none needs --dict FILE (the pretrained model's dict.txt)")
        return Tokenizer("none", None, str(dict_path))
    raise PrepError(f"unknown tokenizer {spec!r}: use gpt2, spm:MODEL or none")


_ENCODE = None


def _init_worker(tokenizer: Tokenizer):
    global _ENCODE
    if tokenizer.kind == "spm":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
        _ENCODE = lambda text: sp.encode(text, out_type=str)  # noqa: E731
    elif tokenizer.kind == "gpt2":
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        bpe = get_encoder(os.path.join(tokenizer.path, "encoder.json"), os.path.join(tokenizer.path, "vocab.bpe"))
        _ENCODE = lambda text: [str(i) for i in bpe.encode(text)]  # noqa: E731
    else:
        _ENCODE = str.split


def _encode_chunk(texts: List[str]) -> List[str]:
    return [" ".join(_ENCODE(t.strip())) for t in texts]


def encode(tokenizer: Tokenizer, texts: Sequence[str], workers: int = 1) -> List[str]:
    """Each text as a line of space-separated tokens."""
    chunk = 2000
    chunks = [list(texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        _init_worker(tokenizer)
        return [line for c in chunks for line in _encode_chunk(c)]
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) as pool:
        return [line for part in pool.imap(_encode_chunk, chunks) for line in part]


# ----------------------------------------------------------------------------
# binarization


def fairseq_preprocess(argv: List[str]) -> None:
    """``fairseq-preprocess ARGV`` in this process (saves starting fairseq again per call)."""
    from fairseq import options
    from fairseq_cli import preprocess

    args = options.get_preprocessing_parser().parse_args(argv)
    before = list(preprocess.logger.handlers)
    try:
        preprocess.main(args)
    finally:
        for h in preprocess.logger.handlers[:]:
            if h not in before:
                preprocess.logger.removeHandler(h)
                h.close()


def label_order(splits: Dict[str, List[Example]], labels: Optional[Sequence[str]]) -> List[str]:
    """The classes: as given, else the training set's labels sorted (numerically if all integers)."""
    if labels:
        return list(labels)
    seen = sorted({ex.label for ex in splits["train"] if ex.label is not None})
    if seen and all(s.lstrip("-").isdigit() for s in seen):
        seen.sort(key=int)
    return seen


def _check_labels(splits, labels):
    allowed = set(labels)
    for split, examples in splits.items():
        for ex in examples:
            if ex.label is not None and ex.label not in allowed:
                raise PrepError(
                    f"{ex.where}: label {ex.label!r} is not one of the classes {labels} "
                    f"(split {split}); pass --labels with every class, or fix the file"
                )


def _check_regression(splits, num_values):
    for examples in splits.values():
        for ex in examples:
            if ex.label is None:
                continue
            fields = ex.label.split()
            try:
                ok = len(fields) == num_values and all(abs(float(v)) < float("inf") for v in fields)
            except ValueError:
                ok = False
            if not ok:
                raise PrepError(f"{ex.where}: regression label {ex.label!r} is not {num_values} finite number(s)")


def write_dataset(
    splits: Dict[str, List[Example]],
    out,
    tokenizer: Tokenizer,
    labels: Optional[Sequence[str]] = None,
    regression: bool = False,
    regression_scale: float = 1.0,
    workers: int = 1,
) -> Dict[str, object]:
    """Tokenize and binarize ``splits`` (fairseq split names -> examples) into ``out``.

    The result is written to ``out.tmp`` and renamed, so a half-written directory never
    looks finished. Returns a summary (examples per split, labels).
    """
    out = Path(out)
    if "train" not in splits or "valid" not in splits:
        raise PrepError("a dataset needs a train and a valid split")
    order = [s for s in SPLIT_ORDER if s in splits] + sorted(set(splits) - set(SPLIT_ORDER))
    n_inputs = {len(ex.texts) for exs in splits.values() for ex in exs}
    if len(n_inputs) != 1:
        raise PrepError(f"every example needs the same number of texts, found {sorted(n_inputs)}")
    n_inputs = n_inputs.pop()
    for split in order:
        if not splits[split]:
            raise PrepError(f"split {split} has no examples")
    labelled = [s for s in order if all(ex.label is not None for ex in splits[s])]
    for s in ("train", "valid"):
        if s not in labelled:
            raise PrepError(f"split {s} has examples without labels")

    if regression:
        _check_regression({s: splits[s] for s in labelled}, 1)
        classes = None
    else:
        classes = label_order(splits, labels)
        if not classes:
            raise PrepError("no labels found in the training split")
        _check_labels({s: splits[s] for s in labelled}, classes)

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    proc = tmp / "processed"
    proc.mkdir(parents=True)

    for split in order:
        for i in range(n_inputs):
            lines = encode(tokenizer, [ex.texts[i] for ex in splits[split]], workers)
            (proc / f"{split}.input{i}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        if split in labelled:
            with open(proc / f"{split}.label", "w", encoding="utf-8") as f:
                for ex in splits[split]:
                    value = ex.label
                    if regression:
                        value = " ".join(f"{float(v) * regression_scale:g}" for v in value.split())
                    f.write(value + "\n")

    def prefixes(names, suffix):
        return ",".join(str(proc / f"{s}.{suffix}") for s in names)

    valid = [s for s in order if s.startswith("valid")]
    test = [s for s in order if s.startswith("test")]
    for i in range(n_inputs):
        argv = ["--only-source", "--srcdict", tokenizer.dict_path, "--destdir", str(tmp / f"input{i}"),
                "--workers", str(max(1, workers)), "--trainpref", str(proc / f"train.input{i}"),
                "--validpref", prefixes(valid, f"input{i}")]
        if test:
            argv += ["--testpref", prefixes(test, f"input{i}")]
        fairseq_preprocess(argv)

    (tmp / "label").mkdir()
    if regression:
        for split in labelled:
            shutil.copyfile(proc / f"{split}.label", tmp / "label" / f"{split}.label")
    else:
        counts = collections.Counter(ex.label for ex in splits["train"])
        with open(proc / "label.dict.txt", "w", encoding="utf-8") as f:
            for c in classes:
                if any(ch.isspace() for ch in c) or not c:
                    raise PrepError(f"label {c!r} contains whitespace; fairseq dictionaries cannot hold it")
                f.write(f"{c} {counts.get(c, 0)}\n")
        argv = ["--only-source", "--srcdict", str(proc / "label.dict.txt"), "--destdir", str(tmp / "label"),
                "--workers", "1", "--trainpref", str(proc / "train.label"),
                "--validpref", prefixes([s for s in valid if s in labelled], "label")]
        fairseq_preprocess(argv)

    summary = {
        "examples": {s: len(splits[s]) for s in order},
        "inputs": n_inputs,
        "labels": classes if classes is not None else "regression",
        "num_classes": len(classes) if classes is not None else 1,
        "tokenizer": tokenizer.describe(),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


# ----------------------------------------------------------------------------
# reading CSV / TSV files


def read_table(path, text_columns: Sequence[str], label_column: Optional[str], delimiter: Optional[str] = None) -> List[Example]:
    """Rows of a CSV/TSV file with a header row. TSV is read without quote handling (GLUE style)."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path} does not exist")
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise PrepError(f"{path} is empty")
        header = [h.strip() for h in header]
        wanted = list(text_columns) + ([label_column] if label_column else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise PrepError(f"{path}: no column {', '.join(map(repr, missing))} in its header {header}")
        idx = [header.index(c) for c in text_columns]
        lab = header.index(label_column) if label_column else None
        rows = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < len(header):
                raise PrepError(f"{where}: {len(row)} fields, the header has {len(header)}")
            label = row[lab].strip() if lab is not None else None
            rows.append(Example(tuple(row[i] for i in idx), label, where))
    return rows


def get_parser():
    p = argparse.ArgumentParser(
        prog="python -m d2v_plugin.prep.classification",
        description="Tokenize and binarize a labelled CSV/TSV text-classification (or regression) set for "
        "task d2v_sentence_prediction. Files need a header row; .tsv files are tab-separated without quoting, "
        "others comma-separated CSV.",
    )
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--valid", required=True, help="validation file (its metrics are reported)")
    p.add_argument("--test", help="test file (labels optional)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--text-column", default="text", help="column of the (first) text (default: text)")
    p.add_argument("--text2-column", help="column of the second text, for sentence-pair tasks")
    p.add_argument("--label-column", default="label", help="column of the label (default: label)")
    p.add_argument("--labels", help="comma-separated classes in the order of the model's outputs "
                   "(default: the training labels, sorted); labels elsewhere are an error")
    p.add_argument("--regression", action="store_true", help="the label is a number (one regression output)")
    p.add_argument("--delimiter", help="field separator (default: tab for .tsv, comma otherwise)")
    p.add_argument("--tokenizer", required=True, help="gpt2 | spm:MODEL | none (already whitespace-tokenized)")
    p.add_argument("--dict", help="the pretrained model's dict.txt (default: gpt2: GPT2_DIR/dict.txt; "
                   "spm: dict.txt beside the model)")
    p.add_argument("--gpt2-dir", help="directory with encoder.json, vocab.bpe, dict.txt (for --tokenizer gpt2)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer / binarizer processes")
    return p


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    args = get_parser().parse_args(argv)
    try:
        tokenizer = make_tokenizer(args.tokenizer, args.dict, args.gpt2_dir)
        texts = [args.text_column] + ([args.text2_column] if args.text2_column else [])
        splits = {
            "train": read_table(args.train, texts, args.label_column, args.delimiter),
            "valid": read_table(args.valid, texts, args.label_column, args.delimiter),
        }
        if args.test:
            test = read_table(args.test, texts, None, args.delimiter)
            splits["test"] = test
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
        summary = write_dataset(splits, args.out, tokenizer, labels=labels, regression=args.regression, workers=args.workers)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), **summary}))
    if args.regression:
        hint = "task.num_classes=1 task.regression_target=true criterion.report=pearson_and_spearman"
    else:
        hint = f"task.num_classes={summary['num_classes']} criterion.report=macro_f1"
    print(f"fine-tune with: bash scripts/finetune_glue.sh sst_2 CHECKPOINT --data {args.out} {hint} "
          f"checkpoint.best_checkpoint_metric={hint.split('report=')[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
