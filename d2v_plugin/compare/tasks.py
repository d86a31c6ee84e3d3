"""The downstream tasks of ``scripts/compare_text.sh``: what each is, where its data lies, what it reports.

Two kinds:

* ``classification``: the derived tasks of :mod:`d2v_plugin.prep.text_tasks` and any labelled
  CSV/TSV set (``--task``), tokenized with the pretraining corpus' sentencepiece model and
  binarized for ``d2v_sentence_prediction`` / fairseq's ``sentence_prediction``. Reported:
  accuracy and macro-F1 (both in percent, from the validation of the whole valid set).
* ``squad``: a SQuAD-format directory (``--squad``, e.g. what ``datasets/squad/prepare.sh``
  writes), fine-tuned with ``d2v_squad``. Reported: the official SQuAD F1 and exact match.

The first metric of a task selects which validation of a fine-tuning run counts (every
metric is then read at that validation); ``--metric NAME=METRIC`` changes it.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from d2v_plugin.prep import classification, text_tasks

#: task kind -> the metrics it reports (keys of fairseq's [valid] records), the default selection first
METRICS = {"classification": ("accuracy", "macro_f1"), "squad": ("f1", "exact")}
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "f1": "F1", "exact": "EM"}
#: SQuAD file pairs looked for in a --squad directory without file names
SQUAD_FILES = (("train.json", "dev.json"), ("train-v1.1.json", "dev-v1.1.json"), ("train-v2.0.json", "dev-v2.0.json"))


class TaskError(Exception):
    """A problem with a task's specification or data, reported without a traceback."""


@dataclass
class Task:
    name: str
    kind: str  # a key of METRICS
    metrics: Tuple[str, ...]
    read: Optional[Callable[[], Dict[str, list]]] = None  # classification: {"train": [Example], "valid": [...]}
    dir: Optional[Path] = None  # the prepared data (classification) or the SQuAD directory
    info: Dict[str, object] = field(default_factory=dict)  # classification: summary.json; squad: files, version

    def describe(self) -> str:
        if self.kind == "squad":
            return f"SQuAD {self.info['version']} ({self.info['train_file']}, {self.info['valid_file']} in {self.dir})"
        return f"{self.info['examples']}, {self.info['num_classes']} classes"


def _examples(pairs, where):
    out = []
    for i, (texts, label) in enumerate(pairs):
        texts = (texts,) if isinstance(texts, str) else tuple(texts)
        out.append(classification.Example(texts, str(label), f"{where}:{i + 1}"))
    return out


def derived_task(name: str, seed: int) -> Task:
    if name not in text_tasks.TASKS:
        raise TaskError(f"--tasks: unknown derived task {name!r} (known: {', '.join(text_tasks.TASKS)})")
    fn = text_tasks.TASKS[name]

    def read():
        train, valid = fn(seed)
        return {"train": _examples(train, f"{name}/train"), "valid": _examples(valid, f"{name}/valid")}

    return Task(name, "classification", METRICS["classification"], read=read)


def table_task(spec: str) -> Task:
    """``NAME=TRAIN,VALID[,TEXT_COLUMN[,TEXT2_COLUMN[,LABEL_COLUMN]]]``: a labelled CSV/TSV set."""
    usage = f"--task {spec!r}: expected NAME=TRAIN,VALID[,TEXT[,TEXT2[,LABEL]]]"
    if "=" not in spec:
        raise TaskError(usage)
    name, rest = spec.split("=", 1)
    parts = rest.split(",")
    if not name or len(parts) < 2 or len(parts) > 5:
        raise TaskError(usage)
    train, valid = parts[:2]
    text = parts[2] if len(parts) > 2 and parts[2] else "text"
    text2 = parts[3] if len(parts) > 3 and parts[3] else None
    label = parts[4] if len(parts) > 4 and parts[4] else "label"
    columns = [text] + ([text2] if text2 else [])

    def read():
        try:
            return {"train": classification.read_table(train, columns, label),
                    "valid": classification.read_table(valid, columns, label)}
        except classification.PrepError as e:
            raise TaskError(f"--task {name}: {e}") from e

    return Task(name, "classification", METRICS["classification"], read=read)


def _squad_version(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TaskError(f"--squad: cannot read {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskError(f"--squad: {path} is not a SQuAD file (no top-level 'data' list)")
    version = str(data.get("version", "1.1")).lstrip("v")
    if version not in ("1.1", "2.0"):
        raise TaskError(f"--squad: {path} has version {data.get('version')!r}; expected 1.1 or v2.0")
    return version


def squad_task(spec: str) -> Task:
    """``[NAME=]DIR[,TRAIN_FILE,VALID_FILE]``; the version is the valid file's ``version`` field."""
    name, rest = spec.split("=", 1) if "=" in spec else ("squad", spec)
    parts = rest.split(",")
    if not name or not parts[0] or len(parts) not in (1, 3):
        raise TaskError(f"--squad {spec!r}: expected [NAME=]DIR[,TRAIN_FILE,VALID_FILE]")
    root = Path(parts[0]).resolve()
    if not root.is_dir():
        raise TaskError(f"--squad {name}: directory not found: {root}")
    if len(parts) == 3:
        files = [tuple(parts[1:])]
    else:
        files = [pair for pair in SQUAD_FILES if all((root / f).is_file() for f in pair)]
        if len(files) != 1:
            found = "none" if not files else " and ".join("/".join(p) for p in files)
            raise TaskError(f"--squad {name}: {root} should hold one of the pairs "
                            f"{', '.join('/'.join(p) for p in SQUAD_FILES)} (found {found}); "
                            "or name the files: --squad NAME=DIR,TRAIN_FILE,VALID_FILE")
    train_file, valid_file = files[0]
    for f in (train_file, valid_file):
        if not (root / f).is_file():
            raise TaskError(f"--squad {name}: file not found: {root / f}")
    version = _squad_version(root / valid_file)
    info = {"train_file": train_file, "valid_file": valid_file, "version": version}
    return Task(name, "squad", METRICS["squad"], dir=root, info=info)


def select_metrics(tasks: List[Task], specs: List[str]) -> None:
    """Apply ``--metric NAME=METRIC``: METRIC selects the validation and comes first."""
    by_name = {t.name: t for t in tasks}
    for spec in specs:
        name, _, metric = spec.partition("=")
        if name not in by_name:
            raise TaskError(f"--metric {spec!r}: no task {name!r} (tasks: {', '.join(by_name)})")
        task = by_name[name]
        if metric not in task.metrics:
            raise TaskError(f"--metric {spec!r}: {task.kind} tasks report {', '.join(task.metrics)}")
        task.metrics = (metric,) + tuple(m for m in task.metrics if m != metric)


def build_tasks(args) -> List[Task]:
    """The tasks the command line names, in order (derived, --task, --squad), metrics selected."""
    tasks = [derived_task(n, args.task_seed) for n in args.tasks]
    tasks += [table_task(s) for s in args.task]
    tasks += [squad_task(s) for s in args.squad]
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise TaskError(f"task {t.name!r} named twice")
        seen.add(t.name)
    select_metrics(tasks, args.metric)
    return tasks


def prepare(task: Task, data: Path, out: Path) -> Task:
    """Tokenize and binarize a classification task (once) with the corpus' sentencepiece model."""
    if task.kind != "classification":
        return task
    task.dir = out / "tasks" / task.name
    summary = task.dir / "summary.json"
    if not summary.is_file():
        print(f"== task {task.name}: tokenizing and binarizing -> {task.dir}", flush=True)
        tokenizer = classification.make_tokenizer(f"spm:{data / 'spm.model'}", data / "bin" / "dict.txt")
        try:
            classification.write_dataset(task.read(), task.dir, tokenizer)
        except classification.PrepError as e:
            raise TaskError(f"task {task.name}: {e}") from e
    task.info = json.loads(summary.read_text())
    return task
