"""Read fairseq's json training logs (``common.log_format=json``).

fairseq-hydra-train prints one line per record, ``[time][TAG][INFO] - {json}``, with TAG
``train_inner`` (every ``log_interval`` updates), ``train`` (end of an epoch: averages over the
epoch, keys prefixed ``train_``) and ``valid`` (each validation, keys prefixed ``valid_``).
Values are strings (fairseq rounds them); they are returned as floats where they parse.
"""

import json
import re
from typing import Dict, List

_LINE = re.compile(r"\]\[(\w+)\]\[INFO\] - (\{.*\})\s*$")


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def parse_line(line: str, tag: str = None):
    """The record of one log line (prefix ``TAG_`` removed), or None if it holds none (of TAG)."""
    m = _LINE.search(line)
    if not m or (tag is not None and m.group(1) != tag):
        return None
    prefix = m.group(1) + "_"
    try:
        values = json.loads(m.group(2))
    except ValueError:
        return None
    return {k[len(prefix):] if k.startswith(prefix) else k: _number(v) for k, v in values.items()}


def records(path, tag: str) -> List[Dict[str, object]]:
    """The json records with TAG in the log file ``path``, in order, prefix ``TAG_`` removed."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [r for r in (parse_line(line, tag) for line in f) if r is not None]


def pretraining_summary(path) -> Dict[str, object]:
    """Cost and curve of a pretraining run from its log.

    updates: the last epoch record's num_updates; wall_s: its ``wall`` (seconds since the
    start, fairseq's own clock, restored on resume); tokens: the sum over epochs of the
    epoch's mean tokens per batch (``wpb``) times its updates; curve: (num_updates, loss)
    of every ``train_inner`` record.
    """
    epochs = records(path, "train")
    if not epochs:
        raise ValueError(f"{path}: no end-of-epoch [train] record (did the run finish?)")
    tokens, before = 0.0, 0
    for rec in epochs:
        n = int(rec["num_updates"])
        tokens += float(rec["wpb"]) * (n - before)
        before = n
    curve = [(int(r["num_updates"]), float(r["loss"])) for r in records(path, "train_inner")]
    return {"updates": int(epochs[-1]["num_updates"]), "wall_s": float(epochs[-1]["wall"]),
            "tokens": int(round(tokens)), "curve": curve}


def best_validation(path, metric: str, others=()) -> Dict[str, object]:
    """The validation with the highest ``metric`` (ties: the earliest), its update, and the values
    of ``metric`` and of ``others`` (further keys of the same record) at that validation."""
    rows = [r for r in records(path, "valid") if isinstance(r.get(metric), float)]
    if not rows:
        raise ValueError(f"{path}: no [valid] record with '{metric}'")
    best = max(rows, key=lambda r: r[metric])  # max() keeps the first of equal values
    missing = [k for k in others if not isinstance(best.get(k), float)]
    if missing:
        raise ValueError(f"{path}: the [valid] record of update {best.get('num_updates')} has no {', '.join(missing)}")
    return {"value": best[metric], "num_updates": int(best["num_updates"]), "validations": len(rows),
            "values": {k: best[k] for k in (metric, *others)}}
