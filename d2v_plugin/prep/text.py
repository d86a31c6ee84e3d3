"""Turn raw text into a fairseq-binarized corpus for text pretraining.

Pipeline (each step is skipped when its marker in ``OUT/.done/`` says it already
finished with the same settings; outputs are written under temporary names and
renamed, so an interrupted run never looks finished):

1. ``default-corpus`` (only with ``--default-corpus``): write Python's bundled
   documentation as ``OUT/default_corpus.txt``.
2. ``split``: read the corpus, put one paragraph per line and a blank line after
   each document, and send every ``round(1 / valid_fraction)``-th document (at
   least one) to ``OUT/valid.txt``, the rest to ``OUT/train.txt``.
3. ``tokenize``: train (or reuse) a sentencepiece model, or load fairseq's GPT-2
   BPE, and write ``OUT/train.tok``, ``OUT/valid.tok`` and ``OUT/dict.txt``.
4. ``binarize``: ``fairseq-preprocess --only-source`` into ``OUT/bin``.

The result, ``OUT/bin`` (``train.{bin,idx}``, ``valid.{bin,idx}``, ``dict.txt``),
is what a pretraining task's ``task.data`` points at.

Example::

    python -m d2v_plugin.prep.text --default-corpus --out data/pydoc --vocab-size 2000
"""

import argparse
import collections
import itertools
import json
import logging
import lzma
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("d2v_plugin.prep.text")

TOKENIZERS = ("sentencepiece", "gpt2")
GPT2_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
FAIRSEQ_SPECIALS = {"<s>", "<pad>", "</s>", "<unk>"}
TAR_SUFFIXES = (".tar", ".tgz", ".txz", ".tbz2", ".gz", ".xz", ".bz2")
BATCH_LINES = 1000  # lines per encoding task
FILES_PER_TASK = 16  # corpus files per reading task


class PrepError(Exception):
    """A problem with the user's input, reported without a traceback."""


# ----------------------------------------------------------------------------
# small file helpers


def _tmp(path):
    return path.with_name(path.name + ".tmp")


def _replace(tmp, final):
    """Move a finished temporary file or directory onto its final name."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _marker(out, step):
    return out / ".done" / f"{step}.json"


def _run_step(out, step, params, fn):
    """Run ``fn()`` unless ``step`` already finished with the same ``params``."""
    marker = _marker(out, step)
    if marker.exists():
        if json.loads(marker.read_text()) == params:
            log.info("step %s: already done (%s), skipped", step, marker)
            return
        log.info("step %s: settings changed since the last run, redoing it", step)
    marker.unlink(missing_ok=True)
    log.info("step %s: running", step)
    fn()
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(marker)
    tmp.write_text(json.dumps(params, indent=1, sort_keys=True))
    os.replace(tmp, marker)
    log.info("step %s: done", step)


# ----------------------------------------------------------------------------
# reading documents


def _paragraph(line):
    """Collapse all whitespace (including exotic Unicode spaces) to single spaces."""
    return " ".join(line.split())


def _document(text):
    """The non-blank lines of a text as one-line paragraphs (one document)."""
    lines = re.split(r"\r\n|\r|\n", text)  # not splitlines(): it also splits at U+2028
    return [p for p in map(_paragraph, lines) if p]


def _is_archive(path):
    name = path.name.lower()
    return name.endswith(TAR_SUFFIXES)


def _archive_documents(path):
    """Every ``*.txt`` member of a tar archive (any compression) is one document."""
    docs = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    text = tar.extractfile(member).read().decode("utf-8", "replace")
                    docs.append(_document(text))
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as e:
        raise PrepError(f"cannot read archive {path}: {e}") from e
    return [d for d in docs if d]


def _file_documents(path):
    """Documents of one corpus file (a top-level function so workers can run it)."""
    path = Path(path)
    if _is_archive(path):
        return _archive_documents(path)
    return [_document(path.read_text(encoding="utf-8", errors="replace"))]


def _files_documents(paths):
    return [doc for path in paths for doc in _file_documents(path) if doc]


def corpus_files(corpus):
    """The files of a directory corpus: ``*.txt`` and tar archives, sorted."""
    files = [
        p for p in sorted(corpus.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
        and (p.suffix == ".txt" or _is_archive(p))
    ]
    if not files:
        raise PrepError(f"corpus directory {corpus} holds no *.txt files or tar archives")
    return files


def iter_documents(corpus, workers=1):
    """Yield the documents of ``corpus`` (each a list of one-line paragraphs).

    A text file: blank lines separate documents. A tar archive: each ``*.txt``
    member is a document. A directory: each ``*.txt`` file (and each ``*.txt``
    member of the tar archives in it, as OpenWebText ships them) is a document,
    read recursively in sorted order.
    """
    corpus = Path(corpus)
    if not corpus.exists():
        raise PrepError(f"corpus not found: {corpus}")
    if corpus.is_file():
        if _is_archive(corpus):
            yield from _archive_documents(corpus)
            return
        with open(corpus, encoding="utf-8", errors="replace") as f:
            doc = []
            for line in f:
                para = _paragraph(line)
                if para:
                    doc.append(para)
                elif doc:
                    yield doc
                    doc = []
            if doc:
                yield doc
        return
    files = corpus_files(corpus)
    groups = [files[i:i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]
    with _pool(workers) as pool, tqdm(total=len(files), unit="file", desc="read", mininterval=5) as bar:
        for group, docs in zip(groups, _imap(pool, _files_documents, groups, 2 * workers)):
            bar.update(len(group))
            yield from docs


class _NoPool:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _imap(pool, fn, items, window):
    """Ordered ``map`` over a pool that keeps at most ``window`` tasks in flight
    (``Pool.imap`` would read the whole input into memory)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _pool(workers, initializer=None, initargs=()):
    if workers <= 1:
        if initializer:
            initializer(*initargs)
        return _NoPool()
    return multiprocessing.Pool(workers, initializer=initializer, initargs=initargs)


# ----------------------------------------------------------------------------
# step 1: the embedded default corpus


def write_default_corpus(path):
    """Write Python's bundled documentation topics as a fairseq-format corpus."""
    from pydoc_data.topics import topics

    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(topics):
            # paragraphs are separated by blank lines; join each one onto a line
            paragraphs = [_paragraph(p) for p in re.split(r"\n\s*\n", topics[key])]
            f.writelines(p + "\n" for p in paragraphs if p)
            f.write("\n")
    _replace(tmp, path)


# ----------------------------------------------------------------------------
# step 2: train / valid split


def _write_doc(f, doc):
    f.writelines(p + "\n" for p in doc)
    f.write("\n")


def split_corpus(documents, train_path, valid_path, valid_fraction):
    """Write every ``round(1/valid_fraction)``-th document to valid, the rest to train.

    Valid always gets at least one document; a corpus of a single document is
    split by lines instead. Returns ``(n_train, n_valid)`` counted in documents.
    """
    period = max(1, round(1 / valid_fraction))
    n_train = n_valid = 0
    held = None  # the latest train document, kept back in case valid stays empty
    train_tmp, valid_tmp = _tmp(train_path), _tmp(valid_path)
    with open(train_tmp, "w", encoding="utf-8") as train, open(valid_tmp, "w", encoding="utf-8") as valid:
        for i, doc in enumerate(documents):
            if held is not None:
                _write_doc(train, held)
                n_train += 1
                held = None
            if i % period == period - 1:
                _write_doc(valid, doc)
                n_valid += 1
            else:
                held = doc
        if held is not None and n_valid > 0:
            _write_doc(train, held)
            n_train += 1
        elif held is not None and n_train > 0:
            _write_doc(valid, held)
            n_valid += 1
        elif held is not None:
            if len(held) < 2:
                raise PrepError("corpus holds a single line of text; need at least two lines "
                                "to make a train and a valid split")
            n_valid = min(len(held) - 1, max(1, round(len(held) * valid_fraction)))
            _write_doc(train, held[:-n_valid])
            _write_doc(valid, held[-n_valid:])
            n_train = 1
    if n_train + n_valid == 0:
        raise PrepError("corpus is empty: no non-blank text found")
    _replace(train_tmp, train_path)
    _replace(valid_tmp, valid_path)
    return n_train, n_valid


# ----------------------------------------------------------------------------
# step 3: tokenization


def train_sentencepiece(train_txt, model_path, vocab_size, workers, input_sentences):
    """Train a unigram sentencepiece model; lower the vocabulary if the text is too small."""
    import sentencepiece as spm

    prefix = model_path.with_name(model_path.stem + ".tmp")
    while True:
        try:
            spm.SentencePieceTrainer.train(
                input=str(train_txt), model_prefix=str(prefix), vocab_size=vocab_size,
                model_type="unigram", num_threads=max(1, workers),
                input_sentence_size=input_sentences, shuffle_input_sentence=True,
                minloglevel=2,
            )
            break
        except RuntimeError as e:
            limit = re.search(r"Vocabulary size too high.*<= (\d+)", str(e))
            if not limit:
                raise PrepError(f"sentencepiece training on {train_txt} failed: {e}") from e
            log.warning("corpus too small for --vocab-size %d; using the largest possible, %s",
                        vocab_size, limit.group(1))
            vocab_size = int(limit.group(1))
    os.replace(f"{prefix}.model", model_path)
    os.replace(f"{prefix}.vocab", model_path.with_suffix(".vocab"))
    return vocab_size


_ENCODER = None


def _init_encoder(kind, path):
    """Load the tokenizer once per worker process."""
    global _ENCODER
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        _ENCODER = lambda line: sp.encode(line, out_type=str)  # noqa: E731
    else:
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        bpe = get_encoder(str(Path(path) / "encoder.json"), str(Path(path) / "vocab.bpe"))
        _ENCODER = lambda line: [str(i) for i in bpe.encode(line)]  # noqa: E731


def _encode_batch(lines):
    """Encode lines (blank lines stay blank: they mark document ends). Returns (text, counts)."""
    out, counts = [], collections.Counter()
    for line in lines:
        line = line.strip()
        tokens = _ENCODER(line) if line else []
        if line and not tokens:  # text the tokenizer drops entirely must not look like a document end
            tokens = ["<unk>"]
        counts.update(tokens)
        out.append(" ".join(tokens) + "\n")
    return "".join(out), counts


def _batches(f):
    while True:
        batch = list(itertools.islice(f, BATCH_LINES))
        if not batch:
            return
        yield batch


def encode_files(pairs, kind, path, workers):
    """Encode each (src, dst) text file; returns the token counts of the first one."""
    first_counts = None
    with _pool(workers, _init_encoder, (kind, str(path))) as pool:
        for src, dst in pairs:
            counts = collections.Counter()
            tmp = _tmp(dst)
            with open(src, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
                results = _imap(pool, _encode_batch, _batches(fin), 4 * workers)
                for text, c in tqdm(results, desc=f"encode {src.name}", unit="kline", mininterval=5):
                    fout.write(text)
                    counts.update(c)
            _replace(tmp, dst)
            first_counts = counts if first_counts is None else first_counts
    return first_counts


def write_spm_dict(model_path, counts, dict_path):
    """A fairseq dictionary holding every sentencepiece piece, in the model's id order."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tmp = _tmp(dict_path)
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or piece in FAIRSEQ_SPECIALS:
                continue
            f.write(f"{piece} {counts.get(piece, 0)}\n")
    _replace(tmp, dict_path)


def check_gpt2_dir(gpt2_dir):
    gpt2_dir = Path(gpt2_dir)
    if not gpt2_dir.is_dir():
        raise PrepError(f"--gpt2-dir {gpt2_dir} is not a directory")
    missing = [n for n in GPT2_FILES if not (gpt2_dir / n).is_file()]
    if missing:
        raise PrepError(f"--gpt2-dir {gpt2_dir} lacks {', '.join(missing)} "
                        f"(fairseq's GPT-2 BPE needs {', '.join(GPT2_FILES)})")
    return gpt2_dir


# ----------------------------------------------------------------------------
# step 4: binarization


def binarize(out, workers):
    """Run fairseq-preprocess (with this interpreter) into ``out/bin``."""
    dest = out / "bin"
    tmp = _tmp(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
        "--trainpref", str(out / "train.tok"), "--validpref", str(out / "valid.tok"),
        "--srcdict", str(out / "dict.txt"), "--destdir", str(tmp), "--workers", str(workers),
    ]
    log.info("running %s", " ".join(cmd))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise PrepError(f"fairseq-preprocess failed (exit {result.returncode}); "
                        f"its output is above, partial files in {tmp}")
    _replace(tmp, dest)


# ----------------------------------------------------------------------------
# the whole pipeline


def prepare_text(corpus, out, tokenizer="sentencepiece", vocab_size=8000, spm_model=None,
                 gpt2_dir=None, valid_fraction=0.01, workers=1, spm_input_sentences=1_000_000):
    """Prepare ``corpus`` for pretraining and return the path of the binarized directory.

    ``corpus``: a text file (blank lines separate documents), a tar archive, a
    directory (``*.txt`` files and tar archives, read recursively), or ``None`` for
    the embedded default corpus (Python's documentation). See the module doc and
    ``--help`` for the other arguments.
    """
    out = Path(out).resolve()
    if tokenizer not in TOKENIZERS:
        raise PrepError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if not 0 < valid_fraction < 1:
        raise PrepError(f"--valid-fraction must lie between 0 and 1, got {valid_fraction}")
    if tokenizer == "gpt2":
        if gpt2_dir is None:
            raise PrepError("--tokenizer gpt2 needs --gpt2-dir (encoder.json, vocab.bpe, dict.txt)")
        if spm_model is not None:
            raise PrepError("--spm-model applies only to --tokenizer sentencepiece")
        gpt2_dir = check_gpt2_dir(gpt2_dir).resolve()
    if spm_model is not None:
        spm_model = Path(spm_model).resolve()
        if not spm_model.is_file():
            raise PrepError(f"--spm-model not found: {spm_model}")
    if corpus is not None:
        corpus = Path(corpus).resolve()
        if not corpus.exists():
            raise PrepError(f"corpus not found: {corpus}")
    workers = max(1, int(workers))
    out.mkdir(parents=True, exist_ok=True)

    params = {}
    if corpus is None:
        corpus = out / "default_corpus.txt"
        params["default_corpus"] = True
        _run_step(out, "default-corpus", dict(params), lambda: write_default_corpus(corpus))

    params.update(corpus=str(corpus), valid_fraction=valid_fraction)

    def split():
        n_train, n_valid = split_corpus(iter_documents(corpus, workers), out / "train.txt",
                                        out / "valid.txt", valid_fraction)
        log.info("split: %d train and %d valid documents", n_train, n_valid)

    _run_step(out, "split", dict(params), split)

    params.update(tokenizer=tokenizer)
    if tokenizer == "gpt2":
        params.update(gpt2_dir=str(gpt2_dir))
    elif spm_model is not None:
        params.update(spm_model=str(spm_model))
    else:
        params.update(vocab_size=vocab_size, spm_input_sentences=spm_input_sentences)

    def tokenize():
        pairs = [(out / f"{s}.txt", out / f"{s}.tok") for s in ("train", "valid")]
        if tokenizer == "gpt2":
            encode_files(pairs, "gpt2", gpt2_dir, workers)
            shutil.copyfile(gpt2_dir / "dict.txt", out / "dict.txt")
            return
        model = out / "spm.model"
        if spm_model is None:
            size = train_sentencepiece(out / "train.txt", model, vocab_size, workers,
                                       spm_input_sentences)
            log.info("trained sentencepiece model %s (vocabulary %d)", model, size)
        elif spm_model != model:
            shutil.copyfile(spm_model, _tmp(model))
            _replace(_tmp(model), model)
        counts = encode_files(pairs, "sentencepiece", model, workers)
        write_spm_dict(model, counts, out / "dict.txt")

    _run_step(out, "tokenize", dict(params), tokenize)
    _run_step(out, "binarize", dict(params), lambda: binarize(out, workers))
    log.info("ready: %s (point task.data at it)", out / "bin")
    return out / "bin"


def get_parser():
    p = argparse.ArgumentParser(
        prog="python -m d2v_plugin.prep.text",
        description="Turn raw text into a fairseq-binarized corpus for data2vec text "
                    "pretraining. Output: OUT/bin/{train,valid}.{bin,idx} and OUT/bin/dict.txt "
                    "(point task.data at OUT/bin), plus OUT/spm.model for sentencepiece. "
                    "Finished steps are skipped when re-run with the same settings.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", metavar="PATH",
                     help="a text file (one paragraph per line, blank lines between documents), "
                          "a tar archive of *.txt documents, or a directory whose *.txt files "
                          "(one document each) and tar archives are read recursively in sorted order")
    src.add_argument("--default-corpus", action="store_true",
                     help="build a small English corpus offline from Python's bundled "
                          "documentation (pydoc_data.topics); no download")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created; holds the intermediate files and bin/)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="sentencepiece",
                   help="sentencepiece: train (or reuse, --spm-model) a unigram model; "
                        "gpt2: fairseq's GPT-2 BPE from --gpt2-dir (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, metavar="N",
                   help="sentencepiece vocabulary size; lowered (with a warning) when the "
                        "corpus is too small for it (default: %(default)s)")
    p.add_argument("--spm-model", metavar="FILE",
                   help="reuse this sentencepiece model instead of training one")
    p.add_argument("--spm-input-sentences", type=int, default=1_000_000, metavar="N",
                   help="train sentencepiece on at most N randomly sampled lines "
                        "(default: %(default)s)")
    p.add_argument("--gpt2-dir", metavar="DIR",
                   help="directory with fairseq's GPT-2 BPE files encoder.json, vocab.bpe and "
                        "dict.txt (needed with --tokenizer gpt2)")
    p.add_argument("--valid-fraction", type=float, default=0.01, metavar="F",
                   help="fraction of documents held out for validation; at least one document "
                        "(or line, for a one-document corpus) goes there (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes for reading and encoding, also passed to "
                        "fairseq-preprocess --workers (default: %(default)s)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    # log progress to stdout, whatever logging fairseq set up when it was imported
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        prepare_text(
            None if args.default_corpus else args.corpus, args.out, tokenizer=args.tokenizer,
            vocab_size=args.vocab_size, spm_model=args.spm_model, gpt2_dir=args.gpt2_dir,
            valid_fraction=args.valid_fraction, workers=args.workers,
            spm_input_sentences=args.spm_input_sentences,
        )
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
        log.propagate = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
