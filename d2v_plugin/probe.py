"""``python -m d2v_plugin.probe CHECKPOINT --data DIR``: did pretraining learn anything?

The data2vec loss is no quality measure (it rises again as the teacher improves), so this
asks a question with an answer: a linear probe (scikit-learn's logistic regression on
standardised, mean-pooled encoder features) is fit on labelled training examples and scored
on held-out ones, once with the pretrained encoder (``d2v_plugin.load_encoder``) and once
with the same architecture randomly initialised (untrained). Both accuracies are printed;
pretraining helped when the first beats the second.

The labelled data, by the checkpoint's modality (all offline, written by the quick starts):

- images: an ImageFolder with ``train/<class>/*`` and ``val/<class>/*`` (``scripts/train_image.sh``
  writes scikit-learn's digits to ``data/digits_images``); label = the class folder;
- speech: a directory with ``utterances.tsv`` (a header, then one row per audio file:
  ``path`` relative to the directory and its attributes; ``scripts/train_audio.sh`` writes
  ``data/speech_demo`` with ``voice``, ``rate`` and ``sentence``); label = ``--label``
  (default ``voice``), and the files of every fifth ``--group`` value (default ``sentence``)
  are held out, so that no held-out sentence was seen by the probe;
- text: the quick start's work directory (``data/text_demo``: ``spm.model`` and
  ``dict.txt``); examples from :func:`d2v_plugin.prep.text_tasks.topic_task` (which
  documentation topic a paragraph of the embedded corpus comes from).
"""

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .export.extract import pad_batch

Examples = Tuple[List[torch.Tensor], List[str]]


class ProbeError(ValueError):
    """Unusable data or settings; the message names the file or flag."""


# ---- the encoders ---------------------------------------------------------------------


def untrained_copy(encoder, seed: int):
    """The same architecture as ``encoder`` (a :class:`d2v_plugin.Encoder`), freshly initialised."""
    from omegaconf import OmegaConf

    from .checkpoints import VocabularyInfo, _TaskInfo
    from .encoder import Encoder
    from .models.architectures import architecture_of
    from .models.finetuning.pretrained import encoder_from_args

    arch = architecture_of(encoder.model)
    args = OmegaConf.to_container(OmegaConf.structured(encoder.cfg), resolve=True, enum_to_str=True)
    args["_name"] = arch.name
    state = encoder.model.state_dict()
    task = None
    if arch.vocab_key in state:  # text: the vocabulary size is the embedding's
        task = _TaskInfo(VocabularyInfo(state[arch.vocab_key].size(0)))
    torch.manual_seed(seed)
    return Encoder(encoder_from_args(args, task))


def mean_features(encoder, inputs: Sequence[torch.Tensor], batch_size: int, pad, desc: str) -> np.ndarray:
    """(N, C): each input's encoder output averaged over its (non-padded) time steps."""
    from tqdm import tqdm

    same_length = encoder.modality == "AUDIO"  # a padded speech batch changes the features
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i])) if same_length else list(range(len(inputs)))
    feats: Dict[int, np.ndarray] = {}
    with torch.no_grad():
        i = 0
        bar = tqdm(total=len(order), desc=desc, unit="example", file=sys.stderr, leave=False)
        while i < len(order):
            chunk = [order[i]]
            while len(chunk) < batch_size and i + len(chunk) < len(order):
                nxt = order[i + len(chunk)]
                if same_length and len(inputs[nxt]) != len(inputs[chunk[0]]):
                    break
                chunk.append(nxt)
            x, padding = pad_batch([inputs[j] for j in chunk], encoder.modality, pad)
            res = encoder(x, padding)
            h = res.last_hidden_state.float()
            if res.padding_mask is not None:
                keep = (~res.padding_mask).unsqueeze(-1).float()
                pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
            else:
                pooled = h.mean(1)
            for j, v in zip(chunk, pooled.numpy()):
                feats[j] = v
            i += len(chunk)
            bar.update(len(chunk))
        bar.close()
    return np.stack([feats[j] for j in range(len(inputs))])


# ---- the labelled data ----------------------------------------------------------------


def image_examples(data: Path, encoder) -> Tuple[Examples, Examples]:
    from .data.image_dataset import ImageDataError, eval_transform, load_rgb, scan_image_folder

    cfg = encoder.cfg
    size = cfg.image_size if hasattr(cfg, "image_size") else cfg.modalities.image.input_size
    transform = eval_transform(size)
    splits = []
    for split in ("train", "val"):
        root = data / split
        try:
            paths, labels, classes = scan_image_folder(str(root))
        except ImageDataError as e:
            raise ProbeError(f"{e} (images: --data needs {data}/train/<class>/* and {data}/val/<class>/*)") from None
        images = [transform(load_rgb(os.path.join(root, os.fsdecode(p)))) for p in paths]
        splits.append((images, [classes[i] for i in labels]))
    return splits[0], splits[1]


def read_table(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        raise ProbeError(f"{path} does not exist (speech: --data needs a directory with utterances.tsv: "
                         f"a header, then path<TAB>attribute... per audio file, as scripts/train_audio.sh writes)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def held_out_groups(groups: Sequence[str], every: int = 5) -> set:
    """Every ``every``-th distinct group, in order of first appearance."""
    distinct = list(dict.fromkeys(groups))
    return set(distinct[::every])


def speech_examples(data: Path, label: str, group: str) -> Tuple[Examples, Examples]:
    from .data.audio_dataset import AudioFileError, read_audio

    rows = read_table(data / "utterances.tsv")
    for column in ("path", label, group):
        if rows and column not in rows[0]:
            raise ProbeError(f"{data / 'utterances.tsv'} has no column {column!r} (it has {', '.join(rows[0])})")
    held = held_out_groups([r[group] for r in rows])
    train: Examples = ([], [])
    valid: Examples = ([], [])
    for r in rows:
        try:
            wav = torch.from_numpy(read_audio(str(data / r["path"]), 16000))
        except AudioFileError as e:
            raise ProbeError(str(e)) from None
        wav = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-5)  # as the configs' task.normalize
        target = valid if r[group] in held else train
        target[0].append(wav)
        target[1].append(r[label])
    return train, valid


def text_examples(data: Path, limit: int, seed: int, spm_path: Optional[str], dict_path: Optional[str]) -> Tuple[Examples, Examples]:
    """topic_task's paragraphs as ``<s> pieces </s>`` ids of the model's dictionary, cut to ``limit`` positions."""
    import sentencepiece as spm

    from .prep.text_tasks import topic_task
    from .tasks._common import load_text_dictionary

    spm_file = Path(spm_path) if spm_path else data / "spm.model"
    dict_file = Path(dict_path) if dict_path else next((p for p in (data / "bin" / "dict.txt", data / "dict.txt") if p.is_file()), data / "dict.txt")
    for f, flag in ((spm_file, "--spm"), (dict_file, "--dict")):
        if not f.is_file():
            raise ProbeError(f"{f} does not exist (text: --data is the quick start's work directory, or pass {flag})")
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    dictionary = load_text_dictionary(str(dict_file))

    def encode(pairs):
        ids = []
        for text, _ in pairs:
            body = [dictionary.index(t) for t in sp.encode(text, out_type=str)][: limit - 2]
            ids.append(torch.tensor([dictionary.bos()] + body + [dictionary.eos()]))
        return ids, [str(lab) for _, lab in pairs]

    train, valid = topic_task(seed=seed)
    return encode(train), encode(valid)


def _subsample(ex: Examples, limit: Optional[int], rng: np.random.Generator) -> Examples:
    if limit is None or len(ex[0]) <= limit:
        return ex
    keep = sorted(rng.choice(len(ex[0]), size=limit, replace=False))
    return [ex[0][i] for i in keep], [ex[1][i] for i in keep]


# ---- the probe ------------------------------------------------------------------------


def probe_accuracy(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray, test_y: Sequence[str], seed: int) -> float:
    """Held-out accuracy of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(train_x, list(train_y))
    return float(clf.score(test_x, list(test_y)))


def run_probe(args) -> Dict[str, object]:
    import d2v_plugin

    encoder = d2v_plugin.load_encoder(args.checkpoint)
    modality = encoder.modality
    data = Path(args.data)
    if not data.is_dir():
        raise ProbeError(f"--data {data}: no such directory")
    if modality == "IMAGE":
        (train, valid), pad = image_examples(data, encoder), 0.0
    elif modality == "AUDIO":
        (train, valid), pad = speech_examples(data, args.label, args.group), 0.0
    else:
        limit = encoder.model.max_positions() or 512
        (train, valid), pad = text_examples(data, limit, args.seed, args.spm, args.dict), 1  # fairseq's <pad>
    rng = np.random.default_rng(args.seed)
    train, valid = _subsample(train, args.max_train, rng), _subsample(valid, args.max_eval, rng)
    if len(set(train[1])) < 2:
        raise ProbeError(f"{data}: the training examples hold fewer than two labels")
    if not valid[0]:
        raise ProbeError(f"{data}: no held-out examples")
    result: Dict[str, object] = {
        "modality": modality, "checkpoint": args.checkpoint, "data": str(data),
        "train_examples": len(train[0]), "eval_examples": len(valid[0]), "classes": len(set(train[1]) | set(valid[1])),
        "majority": max(valid[1].count(c) for c in set(valid[1])) / len(valid[1]),
    }
    for name, enc in (("pretrained", encoder), ("random_init", untrained_copy(encoder, args.seed))):
        tx = mean_features(enc, train[0], args.batch_size, pad, f"{name} features (train)")
        vx = mean_features(enc, valid[0], args.batch_size, pad, f"{name} features (held out)")
        result[name] = probe_accuracy(tx, train[1], vx, valid[1], args.seed)
    return result


def report(r: Dict[str, object]) -> str:
    return (
        f"probe ({str(r['modality']).lower()}, {r['data']}): logistic regression on mean-pooled features, "
        f"{r['train_examples']} train / {r['eval_examples']} held-out examples, {r['classes']} classes "
        f"(majority class {r['majority']:.3f})\n"
        f"  pretrained  {r['checkpoint']}: held-out accuracy {r['pretrained']:.3f}\n"
        f"  random init (same architecture, untrained): held-out accuracy {r['random_init']:.3f}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2v_plugin.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a data2vec checkpoint (any that d2v_plugin.load_encoder reads)")
    p.add_argument("--data", required=True,
                   help="labelled data: an ImageFolder with train/ and val/ (images), a directory with "
                        "utterances.tsv (speech) or the text quick start's work directory (text)")
    p.add_argument("--label", default="voice", help="speech: the utterances.tsv column to predict (default: voice)")
    p.add_argument("--group", default="sentence",
                   help="speech: the column whose every fifth value is held out (default: sentence)")
    p.add_argument("--spm", help="text: the sentencepiece model (default: DATA/spm.model)")
    p.add_argument("--dict", help="text: the model's dict.txt (default: DATA/bin/dict.txt, else DATA/dict.txt)")
    p.add_argument("--max-train", type=int, help="use at most this many training examples (a random subset)")
    p.add_argument("--max-eval", type=int, help="use at most this many held-out examples (a random subset)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random initialisation, the subsets, the text task's split and the probe (default: 0)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # importing d2v_plugin (fairseq) may leave the root logger at DEBUG: keep the image decoder quiet
    logging.getLogger("PIL").setLevel(logging.WARNING)
    try:
        result = run_probe(args)
    except (ProbeError, FileNotFoundError, ValueError) as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 1
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
