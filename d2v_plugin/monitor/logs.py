"""Read a fairseq training run into per-key series against the update count.

A run is one of:

- a training log in fairseq's ``json`` or ``simple`` format (``common.log_format``), as
  ``fairseq-hydra-train`` writes it to ``hydra_train.log`` or ``fairseq-train`` to its
  output / ``common.log_file``;
- a save directory (``checkpoint.save_dir``): its log is ``hydra/hydra_train.log`` (our
  configs put hydra's output directory there), else a ``*.log`` file in it or in ``hydra/``,
  else the tensorboard event files under it;
- a tensorboard log directory (``common.tensorboard_logdir``: ``train_inner/``, ``valid/``,
  ... holding ``events.out.tfevents.*``), read with tensorboard's event reader.

The collapse thresholds (``model.min_target_var``, ``model.min_pred_var``) come from the
config fairseq prints at the top of its log and from hydra's ``.hydra/config.yaml`` beside
the log (for a tensorboard directory: in the ``hydra/`` beside or inside it), when present.
"""

import ast
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

#: the tags fairseq logs under: inner training intervals, end-of-epoch training, validation
TRAIN, VALID = "train_inner", "valid"

Series = Dict[str, List[Tuple[int, float]]]

#: the model config fields a run's plot uses: the collapse thresholds and the update they apply from
CONFIG_KEYS = ("min_target_var", "min_pred_var", "collapse_check_start")


class RunError(ValueError):
    """A run that cannot be read; the message names the path and what was expected."""


@dataclass
class Run:
    """One training run: ``train`` (the ``train_inner`` intervals) and ``valid`` series,
    each ``{key: [(num_updates, value), ...]}`` sorted by update; ``config``: the model's
    collapse thresholds when the run recorded them (``min_target_var``, ``min_pred_var``)."""

    name: str
    source: str
    format: str
    train: Series = field(default_factory=dict)
    valid: Series = field(default_factory=dict)
    config: Dict[str, float] = field(default_factory=dict)


# hydra: "[2026-01-01 10:00:00,000][train_inner][INFO] - BODY";
# fairseq-train: "2026-01-01 10:00:00 | INFO | train_inner | BODY"
_HYDRA_LINE = re.compile(r"^\[[^\]]*\]\[(?P<tag>[^\]]+)\]\[[A-Z]+\] - (?P<body>.*)$")
_PLAIN_LINE = re.compile(r"^[^|]*\| [A-Z]+ \| (?P<tag>[^|]+?) \| (?P<body>.*)$")
_COMMA_KV = re.compile(r"(\w+)=([^,\s]+)")


def _number(text) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _simple_body(body: str) -> Dict[str, float]:
    """``epoch 001:  10 / 375 loss=1.2, lr=0.001, ...`` (intervals) or
    ``epoch 001 | valid on 'valid' subset | loss 1.2 | ... | num_updates 10`` (summaries)."""
    if "=" in body:
        pairs = _COMMA_KV.findall(body)
    else:
        pairs = [tuple(part.strip().split(" ", 1)) for part in body.split(" | ") if " " in part.strip()]
    out = {}
    for key, value in pairs:
        v = _number(value)
        if v is not None:
            out[key] = v
    return out


def _json_body(body: str, tag: str) -> Dict[str, float]:
    stats = json.loads(body)
    out = {}
    for key, value in stats.items():
        v = _number(value)
        if v is None:
            continue
        # end-of-epoch summaries prefix every key with their tag: valid_loss, train_loss
        if key.startswith(tag + "_"):
            key = key[len(tag) + 1:]
        out[key] = v
    return out


def _add(series: Series, stats: Dict[str, float]) -> None:
    step = stats.get("num_updates")
    if step is None:
        return
    for key, value in stats.items():
        if key != "num_updates":
            series.setdefault(key, []).append((int(step), value))


def _sorted(series: Series) -> Series:
    """Sorted by update; a resumed run that logs an update again keeps its latest value."""
    return {key: sorted(dict(points).items()) for key, points in series.items()}


def _tag_kind(tag: str) -> Optional[str]:
    tag = tag.strip()
    if tag == TRAIN:
        return TRAIN
    if tag == VALID or tag.startswith(VALID + "_") or tag.startswith(VALID):
        return VALID
    return None


def read_text_log(path: Path) -> Tuple[Series, Series, str]:
    """(train, valid, format) of a fairseq training log in json or simple format."""
    train: Series = {}
    valid: Series = {}
    formats = set()
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise RunError(f"{path}: cannot read it ({e})") from None
    for line in lines:
        m = _HYDRA_LINE.match(line) or _PLAIN_LINE.match(line)
        if not m:
            continue
        tag, body = m.group("tag").strip(), m.group("body").strip()
        kind = _tag_kind(tag)
        if kind is None:
            continue
        if body.startswith("{"):
            try:
                stats = _json_body(body, tag)
            except json.JSONDecodeError:
                continue
            formats.add("json")
        else:
            stats = _simple_body(body)
            formats.add("simple")
        _add(train if kind == TRAIN else valid, stats)
    if not train and not valid:
        raise RunError(
            f"{path}: no fairseq training statistics found (expected lines tagged train_inner or valid "
            f"in fairseq's json or simple log format, common.log_format; tqdm bars are not logged)"
        )
    return _sorted(train), _sorted(valid), "+".join(sorted(formats))


def _event_files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("events.out.tfevents.*") if p.is_file())


def read_tensorboard(root: Path) -> Tuple[Series, Series]:
    """(train, valid) of a tensorboard log directory written through common.tensorboard_logdir:
    one sub-directory per tag (train_inner, train, valid), scalars keyed by statistic."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise RunError(f"{root}: reading tensorboard logs needs tensorboard: pip install 'd2v_plugin[monitor]' (or pip install tensorboard)") from None
    train: Series = {}
    valid: Series = {}
    for folder in sorted({p.parent for p in _event_files(root)}):
        tag = folder.name if folder != root else TRAIN
        kind = _tag_kind(tag)
        if kind is None:
            continue
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        target = train if kind == TRAIN else valid
        for key in acc.Tags().get("scalars", []):
            target.setdefault(key, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(key))
    if not train and not valid:
        raise RunError(f"{root}: its tensorboard event files hold no train_inner or valid scalars")
    return _sorted(train), _sorted(valid)


def _hydra_config(log_dir: Path) -> Dict[str, float]:
    """min_target_var / min_pred_var of the run's model from hydra's .hydra/config.yaml."""
    path = log_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        model = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("model") or {}
    except Exception:
        return {}
    return {k: float(model[k]) for k in CONFIG_KEYS if _number(model.get(k)) is not None}


_CONFIG_LINE = re.compile(r"'(min_target_var|min_pred_var|collapse_check_start)': ([-+0-9.eE]+)")


def _logged_config(path: Path) -> Dict[str, float]:
    """The thresholds from the config fairseq prints at the start of a log (fairseq-train runs)."""
    out: Dict[str, float] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for _, line in zip(range(2000), f):
                for key, value in _CONFIG_LINE.findall(line):
                    out.setdefault(key, float(ast.literal_eval(value)))
    except (OSError, ValueError, SyntaxError):
        return {}
    return out


def find_log(run_dir: Path) -> Optional[Path]:
    """The training log of a save directory or hydra output directory, if any."""
    for candidate in (run_dir / "hydra" / "hydra_train.log", run_dir / "hydra_train.log"):
        if candidate.is_file():
            return candidate
    for folder in (run_dir, run_dir / "hydra"):
        logs = sorted(folder.glob("*.log")) if folder.is_dir() else []
        if logs:
            return logs[0]
    return None


def _label(p: Path) -> str:
    """A run's name in legends: its save directory's name (``SAVE_DIR/hydra/hydra_train.log``,
    ``SAVE_DIR/hydra``, ``SAVE_DIR``), else the log file's name without suffix."""
    p = p.resolve()
    if p.is_file():
        if p.name != "hydra_train.log":
            return p.stem
        p = p.parent
    return p.parent.name if p.name == "hydra" else p.name


def read_run(path: str, name: Optional[str] = None) -> Run:
    """Read RUN (a log file, a save directory or a tensorboard directory; see the module doc)."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"{path}: no such file or directory")
    label = name or _label(p)
    log = p if p.is_file() else find_log(p)
    if log is not None:
        train, valid, fmt = read_text_log(log)
        # the config fairseq prints has every field; hydra's config.yaml only the run's own
        config = {**_logged_config(log), **_hydra_config(log.parent)}
        return Run(label, str(log), fmt, train, valid, config)
    if _event_files(p):
        train, valid = read_tensorboard(p)
        # a tensorboard directory inside a save directory: hydra's config beside it
        config = _hydra_config(p.parent / "hydra") or _hydra_config(p / "hydra")
        return Run(label, str(p), "tensorboard", train, valid, config)
    raise RunError(
        f"{path}: no training log found: expected hydra/hydra_train.log or a *.log file (a save directory "
        f"of fairseq-hydra-train), or tensorboard event files (common.tensorboard_logdir)"
    )
