"""GLUE: downloaded archives -> fairseq's sentence-prediction layout, one directory per task.

``datasets/glue/prepare.sh`` downloads and verifies the files, then runs this module::

    python -m d2v_plugin.prep.glue --downloads OUT/download --raw OUT/raw --out OUT/bin \\
        --tokenizer spm:MODEL [--dict DICT] | --tokenizer gpt2 --gpt2-dir DIR  [--tasks cola,sts_b]

For each task it extracts the archive into ``RAW/<Task>/`` (MRPC is assembled from the
SentEval files and the GLUE dev ids, as the widely used ``download_glue_data.py`` does),
picks the text and label columns as fairseq's ``preprocess_GLUE_tasks.sh`` does, tokenizes
with the pretrained model's tokenizer and binarizes into ``OUT/<task>/`` (task names as
the configs in ``config/finetuning/glue``: cola, mnli, mrpc, qnli, qqp, rte, sst_2, sts_b,
wnli). MNLI's matched / mismatched dev sets become ``valid`` / ``valid1``; STS-B scores
are divided by 5 (to [0, 1], as fairseq does); test sets are binarized without labels.
"""

import argparse
import json
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .classification import Example, PrepError, make_tokenizer, write_dataset

log = logging.getLogger("d2v_plugin.prep.glue")


@dataclass(frozen=True)
class GlueTask:
    name: str  # config name
    folder: str  # directory inside the archive
    downloads: Tuple[str, ...]  # files prepare.sh fetches (paths under the download base URL)
    files: Dict[str, str]  # fairseq split -> TSV file in the folder
    text_columns: Tuple[int, ...]  # 0-based, labelled splits
    test_text_columns: Tuple[int, ...]
    label_column: int
    labels: Optional[Tuple[str, ...]]  # None: regression
    dev_label_column: Optional[int] = None  # MNLI's gold label sits elsewhere in dev
    no_header: Tuple[str, ...] = ()  # splits without a header row (CoLA train/dev)
    exact_fields: Optional[int] = None  # drop labelled lines with another field count (QQP)
    scale: float = 1.0  # regression targets are multiplied by this


PAIR_FILES = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}
BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")

TASKS: Dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("glue/data/CoLA.zip",), PAIR_FILES, (3,), (1,), 1, BINARY, no_header=("train", "valid")),
        GlueTask("sst_2", "SST-2", ("glue/data/SST-2.zip",), PAIR_FILES, (0,), (1,), 1, BINARY),
        GlueTask(
            "mrpc", "MRPC",
            ("senteval/senteval_data/msr_paraphrase_train.txt", "senteval/senteval_data/msr_paraphrase_test.txt", "glue/data/mrpc_dev_ids.tsv"),
            PAIR_FILES, (3, 4), (3, 4), 0, BINARY,
        ),
        GlueTask("qqp", "QQP", ("glue/data/QQP-clean.zip",), PAIR_FILES, (3, 4), (1, 2), 5, BINARY, exact_fields=6),
        GlueTask("sts_b", "STS-B", ("glue/data/STS-B.zip",), PAIR_FILES, (7, 8), (7, 8), 9, None, scale=0.2),
        GlueTask(
            "mnli", "MNLI", ("glue/data/MNLI.zip",),
            {"train": "train.tsv", "valid": "dev_matched.tsv", "valid1": "dev_mismatched.tsv",
             "test": "test_matched.tsv", "test1": "test_mismatched.tsv"},
            (8, 9), (8, 9), 11, ("entailment", "neutral", "contradiction"), dev_label_column=15,
        ),
        GlueTask("qnli", "QNLI", ("glue/data/QNLIv2.zip",), PAIR_FILES, (1, 2), (1, 2), 3, NLI2),
        GlueTask("rte", "RTE", ("glue/data/RTE.zip",), PAIR_FILES, (1, 2), (1, 2), 3, NLI2),
        GlueTask("wnli", "WNLI", ("glue/data/WNLI.zip",), PAIR_FILES, (1, 2), (1, 2), 3, BINARY),
    ]
}

ALIASES = {"sst2": "sst_2", "sst-2": "sst_2", "stsb": "sts_b", "sts-b": "sts_b"}


def task_names(spec: str) -> List[str]:
    """``all`` or a comma/space-separated list (GLUE spellings such as SST-2 or STS-B accepted)."""
    if spec.strip().lower() in ("all", ""):
        return list(TASKS)
    names = []
    for raw in spec.replace(",", " ").split():
        name = ALIASES.get(raw.lower(), raw.lower())
        if name not in TASKS:
            raise PrepError(f"unknown GLUE task {raw!r}; known: {', '.join(TASKS)}")
        names.append(name)
    return names


# ----------------------------------------------------------------------------
# raw files


def _lines(path: Path):
    """Lines split at \\n only (GLUE text may hold a stray \\r), without the line end."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")


def extract(archive: Path, raw_dir: Path, task: GlueTask) -> Path:
    folder = raw_dir / task.folder
    marker = folder / ".extracted"
    if marker.is_file():
        return folder
    if not archive.is_file():
        raise PrepError(f"{archive} is missing: run datasets/glue/prepare.sh (it downloads it)")
    try:
        with zipfile.ZipFile(archive) as z:
            bad = z.testzip()
            if bad is not None:
                raise PrepError(f"corrupt archive {archive}: member {bad} fails its CRC check; delete the file and re-run")
            z.extractall(raw_dir)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise PrepError(f"corrupt or truncated archive {archive} ({e}); delete it and re-run to download it again") from e
    if not folder.is_dir():
        raise PrepError(f"{archive} did not contain the folder {task.folder}/ (unexpected archive layout)")
    marker.write_text("ok\n")
    return folder


def _senteval_mrpc_rows(path: Path):
    """The rows of a SentEval MRPC file, each a list of its 5 tab-separated fields (quality or
    index, #1 ID, #2 ID, #1 String, #2 String); the header line and blank lines are skipped."""
    for lineno, line in _lines(path):
        if lineno == 1 or not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 5:
            raise PrepError(f"{path}:{lineno}: expected 5 tab-separated fields, found {len(parts)}")
        yield parts


def build_mrpc(downloads: Path, raw_dir: Path) -> Path:
    """GLUE's MRPC train/dev/test TSVs from the SentEval files and GLUE's list of dev pairs."""
    folder = raw_dir / "MRPC"
    if (folder / ".extracted").is_file():
        return folder
    train_txt = downloads / "msr_paraphrase_train.txt"
    test_txt = downloads / "msr_paraphrase_test.txt"
    dev_ids_tsv = downloads / "mrpc_dev_ids.tsv"
    for p in (train_txt, test_txt, dev_ids_tsv):
        if not p.is_file():
            raise PrepError(f"{p} is missing: run datasets/glue/prepare.sh (it downloads it)")
    dev_ids = set()
    for _, line in _lines(dev_ids_tsv):
        parts = line.lstrip("\ufeff").split("\t")
        if len(parts) >= 2:
            dev_ids.add((parts[0].strip(), parts[1].strip()))
    folder.mkdir(parents=True, exist_ok=True)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    with open(folder / "train.tsv", "w", encoding="utf-8") as tr, open(folder / "dev.tsv", "w", encoding="utf-8") as dv:
        tr.write(header)
        dv.write(header)
        for label, id1, id2, s1, s2 in _senteval_mrpc_rows(train_txt):
            out = dv if (id1, id2) in dev_ids else tr
            out.write(f"{label}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    with open(folder / "test.tsv", "w", encoding="utf-8") as te:
        te.write("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for idx, (_, id1, id2, s1, s2) in enumerate(_senteval_mrpc_rows(test_txt)):
            te.write(f"{idx}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    (folder / ".extracted").write_text("ok\n")
    return folder


def read_split(task: GlueTask, path: Path, split: str) -> List[Example]:
    labelled = not split.startswith("test")
    cols = task.text_columns if labelled else task.test_text_columns
    label_col = None
    if labelled:
        label_col = task.dev_label_column if (split != "train" and task.dev_label_column is not None) else task.label_column
    need = max(cols + ((label_col,) if label_col is not None else ())) + 1
    examples, dropped = [], 0
    for lineno, line in _lines(path):
        if lineno == 1 and split not in task.no_header:
            continue
        if not line.strip():
            continue
        parts = line.split("\t")
        if labelled and task.exact_fields is not None and len(parts) != task.exact_fields:
            dropped += 1  # fairseq drops QQP's malformed lines the same way
            continue
        if len(parts) < need:
            raise PrepError(f"{path}:{lineno}: {len(parts)} tab-separated fields, {task.name} needs at least {need}")
        label = parts[label_col].strip() if label_col is not None else None
        examples.append(Example(tuple(parts[c] for c in cols), label, f"{path}:{lineno}"))
    if dropped:
        log.warning("%s: dropped %d malformed line(s) (not %d fields)", path, dropped, task.exact_fields)
    return examples


def prepare_task(name: str, downloads: Path, raw_dir: Path, out_dir: Path, tokenizer, workers: int = 1) -> Dict:
    task = TASKS[name]
    dest = out_dir / name
    marker = dest / ".done.json"
    settings = {"task": name, "tokenizer": tokenizer.describe()}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        log.info("%s: already prepared in %s (delete it to redo)", name, dest)
        return json.loads((dest / "summary.json").read_text())
    if name == "mrpc":
        folder = build_mrpc(downloads, raw_dir)
    else:
        folder = extract(downloads / Path(task.downloads[0]).name, raw_dir, task)
    splits = {}
    for split, filename in task.files.items():
        path = folder / filename
        if not path.is_file():
            if split.startswith("test"):
                log.warning("%s: %s not found, no test split", name, path)
                continue
            raise PrepError(f"{path} not found (unexpected layout of the {task.folder} download)")
        splits[split] = read_split(task, path, split)
    log.info("%s: %s", name, ", ".join(f"{s} {len(v)}" for s, v in splits.items()))
    summary = write_dataset(
        splits, dest, tokenizer, labels=task.labels, regression=task.labels is None, regression_scale=task.scale, workers=workers
    )
    marker.write_text(json.dumps(settings, indent=1))
    return summary


def get_parser():
    p = argparse.ArgumentParser(
        prog="python -m d2v_plugin.prep.glue",
        description="Extract, tokenize and binarize downloaded GLUE tasks (datasets/glue/prepare.sh runs this).",
    )
    p.add_argument("--downloads", required=True, help="directory holding the downloaded archives / MRPC files")
    p.add_argument("--raw", required=True, help="directory to extract the archives into")
    p.add_argument("--out", required=True, help="output root: OUT/<task>/{input0,input1,label}")
    p.add_argument("--tasks", default="all", help=f"comma-separated tasks or 'all' ({', '.join(TASKS)})")
    p.add_argument("--tokenizer", required=True, help="gpt2 | spm:MODEL | none")
    p.add_argument("--dict", help="the pretrained model's dict.txt (default: beside the sentencepiece model / in --gpt2-dir)")
    p.add_argument("--gpt2-dir", help="directory with encoder.json, vocab.bpe, dict.txt")
    p.add_argument("--workers", type=int, default=1, help="tokenizer / binarizer processes")
    return p


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    args = get_parser().parse_args(argv)
    try:
        tokenizer = make_tokenizer(args.tokenizer, args.dict, args.gpt2_dir)
        names = task_names(args.tasks)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            summary = prepare_task(name, Path(args.downloads), Path(args.raw), out, tokenizer, args.workers)
            print(json.dumps({"task": name, "data": str(out / name), **summary}))
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
