"""Manifests and transcripts for speech pretraining and fine-tuning.

Two commands:

``librispeech``: for extracted LibriSpeech splits (``ROOT/<split>/<speaker>/<chapter>/
<speaker>-<chapter>-<utt>.flac`` plus ``<speaker>-<chapter>.trans.txt``) write, per split,
``OUT/<split>.tsv`` (``-`` becomes ``_``: ``dev_clean.tsv``), ``.wrd`` (one transcript per
line) and ``.ltr`` (letters separated by spaces, ``|`` between and after words); the
training splits together as ``OUT/train.{tsv,wrd,ltr}``; and ``OUT/dict.ltr.txt``, the
letter dictionary (fairseq format, counts from the training transcripts)::

    python -m d2v_plugin.prep.librispeech librispeech --root RAW/LibriSpeech \\
        --splits train-clean-100,dev-clean --out DATA --workers 8

``librilight``: the Libri-light limited-resource training sets (Kahn et al. 2020), extracted
from ``librispeech_finetuning.tgz`` (``ROOT/1h/{0..5}/{clean,other}/<speaker>/<chapter>/`` and
``ROOT/9h/{clean,other}/...``, LibriSpeech's file layout below that): ``10m`` = ``1h/0``,
``1h`` = ``1h/*``, ``10h`` = ``1h/*`` + ``9h``. Writes ``OUT/train.{tsv,wrd,ltr}`` and
``OUT/dict.ltr.txt``::

    python -m d2v_plugin.prep.librispeech librilight --root RAW/librispeech_finetuning --subset 10m --out DATA

``manifest``: a manifest of every audio file under a directory (any layout), e.g. for
your own corpus; ``--valid-percent`` holds out a random part as ``valid.tsv``::

    python -m d2v_plugin.prep.librispeech manifest --audio-dir WAVS --out DATA

Manifests are what ``task.data`` of ``d2v_audio_pretraining`` points at: the audio root on
the first line, then ``relative/path<TAB>num_samples``. Every file's header is read
(``--workers`` processes) to get its length and to check that it is mono 16 kHz audio.
Outputs are written under temporary names and renamed, so re-running is safe.
"""

import argparse
import collections
import logging
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import soundfile as sf

log = logging.getLogger("d2v_plugin.prep.librispeech")

LIBRISPEECH_SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
AUDIO_EXTENSIONS = ("flac", "wav")


class PrepError(Exception):
    """A problem with the input, reported without a traceback."""


def _write_atomic(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def _probe(path: str) -> Tuple[str, int, int, int, str]:
    """(path, frames, samplerate, channels, error) from the header of one file."""
    try:
        info = sf.info(path)
        return path, info.frames, info.samplerate, info.channels, ""
    except Exception as e:  # unreadable: reported by the caller
        return path, 0, 0, 0, str(e) or type(e).__name__


def probe_lengths(paths: List[str], workers: int, sample_rate: int = 16000, what: str = "files") -> List[int]:
    """Lengths in samples of ``paths``; fails naming every unusable file."""
    lengths, problems = [], []
    start = last = time.time()
    total = len(paths)
    chunks = max(1, min(256, total // (workers * 8) if workers > 1 else 256))
    with multiprocessing.Pool(workers) if workers > 1 else _Serial() as pool:
        for done, (path, frames, rate, channels, err) in enumerate(pool.imap(_probe, paths, chunksize=chunks), 1):
            if err:
                problems.append(f"{path}: not a readable audio file ({err})")
            elif channels != 1:
                problems.append(f"{path}: {channels} channels, expected mono")
            elif rate != sample_rate:
                problems.append(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz")
            elif frames <= 0:
                problems.append(f"{path}: empty audio (0 samples)")
            lengths.append(frames)
            now = time.time()
            if now - last >= 5 or done == total:
                log.info(f"{what}: read {done}/{total} headers ({done / max(now - start, 1e-6):.0f}/s)")
                last = now
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise PrepError(f"{len(problems)} unusable audio file(s) among {what}:\n  {shown}{more}")
    return lengths


class _Serial:
    """Stands in for a process pool with one worker."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, items, chunksize=1):
        return map(fn, items)


def letters(words: str) -> str:
    """``"HELLO WORLD"`` -> ``"H E L L O | W O R L D |"`` (wav2vec 2.0 letter targets)."""
    return " ".join(words.replace(" ", "|")) + " |"


# ---- LibriSpeech ------------------------------------------------------------------
def read_split(root: Path, split: str) -> List[Tuple[str, str]]:
    """[(path relative to root, transcript)] of one split, sorted by path."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise PrepError(f"split {split}: directory {split_dir} does not exist (extract {split}.tar.gz into {root.parent})")
    transcripts: Dict[str, str] = {}
    for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
        with open(trans, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                utt, _, text = line.partition(" ")
                if not text.strip():
                    raise PrepError(f"{trans} line {number}: no transcript after the utterance id {utt!r}")
                transcripts[utt] = " ".join(text.split())
    rows = []
    for audio in sorted(split_dir.glob("*/*/*.flac")):
        utt = audio.stem
        if utt not in transcripts:
            raise PrepError(f"{audio}: no transcript for {utt} in {audio.parent}/*.trans.txt")
        rows.append((audio.relative_to(root).as_posix(), transcripts[utt]))
    if not rows:
        raise PrepError(f"split {split}: no .flac files under {split_dir}/<speaker>/<chapter>/")
    return rows


def write_split(out: Path, name: str, root: Path, rows: List[Tuple[str, str, int]]) -> None:
    _write_atomic(out / f"{name}.tsv", [str(root)] + [f"{path}\t{n}" for path, _, n in rows])
    _write_atomic(out / f"{name}.wrd", [text for _, text, _ in rows])
    _write_atomic(out / f"{name}.ltr", [letters(text) for _, text, _ in rows])


def write_letter_dict(out: Path, transcripts: List[str]) -> None:
    counts = collections.Counter(tok for text in transcripts for tok in letters(text).split())
    _write_atomic(out / "dict.ltr.txt", [f"{tok} {n}" for tok, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])


def prepare_librispeech(root: Path, splits: List[str], out: Path, workers: int) -> None:
    root = root.resolve()
    out.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in splits if s not in LIBRISPEECH_SPLITS]
    if unknown:
        raise PrepError(f"unknown LibriSpeech split(s) {unknown}; choose from {', '.join(LIBRISPEECH_SPLITS)}")
    train_rows, train_texts, dict_texts = [], [], []
    for split in splits:
        rows = read_split(root, split)
        lengths = probe_lengths([str(root / p) for p, _ in rows], workers, what=split)
        full = [(p, t, n) for (p, t), n in zip(rows, lengths)]
        name = split.replace("-", "_")
        write_split(out, name, root, full)
        hours = sum(lengths) / 16000 / 3600
        log.info(f"{split}: {len(full)} utterances, {hours:.2f} h -> {out / name}.tsv/.wrd/.ltr")
        if split.startswith("train"):
            train_rows += full
            train_texts += [t for _, t, _ in full]
        dict_texts += [t for _, t, _ in full]
    if train_rows:
        write_split(out, "train", root, train_rows)
        log.info(f"train (all training splits): {len(train_rows)} utterances -> {out}/train.tsv/.wrd/.ltr")
    write_letter_dict(out, train_texts or dict_texts)
    log.info(f"letter dictionary -> {out}/dict.ltr.txt")


# ---- Libri-light limited-resource splits -----------------------------------------------
LIBRILIGHT_SUBSETS = {"10m": ("1h/0",), "1h": ("1h/*",), "10h": ("1h/*", "9h")}


def prepare_librilight(root: Path, subset: str, out: Path, workers: int) -> None:
    root = root.resolve()
    if subset not in LIBRILIGHT_SUBSETS:
        raise PrepError(f"unknown Libri-light subset {subset!r}; choose from {', '.join(LIBRILIGHT_SUBSETS)}")
    folders = sorted({d for pattern in LIBRILIGHT_SUBSETS[subset] for d in root.glob(f"{pattern}/*") if d.is_dir()})
    if not folders:
        raise PrepError(f"Libri-light {subset}: no {' or '.join(p + '/{clean,other}/' for p in LIBRILIGHT_SUBSETS[subset])} "
                        f"under {root} (extract librispeech_finetuning.tgz there)")
    rows = [row for d in folders for row in read_split(root, d.relative_to(root).as_posix())]
    lengths = probe_lengths([str(root / p) for p, _ in rows], workers, what=f"Libri-light {subset}")
    full = [(p, t, n) for (p, t), n in zip(rows, lengths)]
    out.mkdir(parents=True, exist_ok=True)
    write_split(out, "train", root, full)
    write_letter_dict(out, [t for _, t, _ in full])
    log.info(f"Libri-light {subset}: {len(full)} utterances, {sum(lengths) / 16000 / 3600:.2f} h "
             f"-> {out}/train.tsv/.wrd/.ltr and dict.ltr.txt")


# ---- any directory ------------------------------------------------------------------
def prepare_manifest(audio_dir: Path, out: Path, extensions: List[str], valid_percent: float, seed: int, workers: int, name: str) -> None:
    audio_dir = audio_dir.resolve()
    if not audio_dir.is_dir():
        raise PrepError(f"--audio-dir {audio_dir} is not a directory")
    if not 0 <= valid_percent < 1:
        raise PrepError(f"--valid-percent must be in [0, 1), got {valid_percent}")
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    files = sorted(p for p in audio_dir.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise PrepError(f"no {'/'.join(sorted(exts))} files under {audio_dir}")
    lengths = probe_lengths([str(p) for p in files], workers, what=str(audio_dir))
    rows = [f"{p.relative_to(audio_dir).as_posix()}\t{n}" for p, n in zip(files, lengths)]
    out.mkdir(parents=True, exist_ok=True)
    valid = []
    if valid_percent > 0:
        rng = random.Random(seed)
        rng.shuffle(rows)
        n_valid = max(1, round(len(rows) * valid_percent))
        valid, rows = sorted(rows[:n_valid]), sorted(rows[n_valid:])
    _write_atomic(out / f"{name}.tsv", [str(audio_dir)] + rows)
    log.info(f"{len(files)} files, {sum(lengths) / 16000 / 3600:.3f} h; {len(rows)} of them -> {out / name}.tsv")
    if valid:
        _write_atomic(out / "valid.tsv", [str(audio_dir)] + valid)
        log.info(f"{len(valid)} held-out files -> {out / 'valid.tsv'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v_plugin.prep.librispeech", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lib = sub.add_parser("librispeech", help="manifests + transcripts of extracted LibriSpeech splits")
    lib.add_argument("--root", required=True, type=Path, help="the extracted LibriSpeech/ directory (holding <split>/ folders)")
    lib.add_argument("--splits", default="train-clean-100,train-clean-360,train-other-500,dev-clean,dev-other,test-clean,test-other",
                     help="comma-separated splits (default: all seven)")
    lib.add_argument("--out", required=True, type=Path, help="output directory (task.data)")
    lib.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading audio headers")
    ll = sub.add_parser("librilight", help="manifest + transcripts of a Libri-light limited-resource training set")
    ll.add_argument("--root", required=True, type=Path, help="the extracted librispeech_finetuning/ directory (holding 1h/ and 9h/)")
    ll.add_argument("--subset", required=True, choices=sorted(LIBRILIGHT_SUBSETS), help="10m (1h/0), 1h (1h/*) or 10h (1h/* and 9h)")
    ll.add_argument("--out", required=True, type=Path, help="output directory (task.data): train.tsv/.wrd/.ltr, dict.ltr.txt")
    ll.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading audio headers")
    man = sub.add_parser("manifest", help="a manifest of every audio file under a directory")
    man.add_argument("--audio-dir", required=True, type=Path, help="directory searched recursively")
    man.add_argument("--out", required=True, type=Path, help="output directory (task.data)")
    man.add_argument("--ext", nargs="+", default=list(AUDIO_EXTENSIONS), help="file extensions (default: flac wav)")
    man.add_argument("--name", default="train", help="manifest name (default: train -> train.tsv)")
    man.add_argument("--valid-percent", type=float, default=0.0, help="fraction held out as valid.tsv (default: 0)")
    man.add_argument("--seed", type=int, default=1, help="seed of the held-out selection")
    man.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading audio headers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[librispeech %(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        if args.command == "librispeech":
            splits = [s.strip() for s in args.splits.replace(" ", ",").split(",") if s.strip()]
            prepare_librispeech(args.root, splits, args.out, args.workers)
        elif args.command == "librilight":
            prepare_librilight(args.root, args.subset, args.out, args.workers)
        else:
            prepare_manifest(args.audio_dir, args.out, args.ext, args.valid_percent, args.seed, args.workers, args.name)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
