"""``d2v_sentence_prediction``: classify (or score) sentences and sentence pairs.

Reads fairseq's sentence-prediction layout, as written by ``datasets/glue/prepare.sh``,
``python -m d2v_plugin.prep.classification`` or fairseq's ``preprocess_GLUE_tasks.sh``::

    DATA/input0/{dict.txt, train.bin/.idx, valid.bin/.idx, ...}   first sentence
    DATA/input1/...                                               second sentence (pairs only)
    DATA/label/{dict.txt, train.bin/.idx, valid.bin/.idx}         class labels, or
    DATA/label/{train,valid}.label                                regression targets (floats)

An example is ``<s> A </s>`` or ``<s> A </s> </s> B </s>`` (RoBERTa's pair format). Further
validation sets (MNLI mismatched: ``valid1``) are named in ``dataset.valid_subset``.

The input dictionary gets ``<mask>`` appended, as in pretraining, so its size matches
the pretrained checkpoint's embedding table.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from fairseq.data import (
    ConcatSentencesDataset,
    Dictionary,
    IdDataset,
    NestedDictionaryDataset,
    NumelDataset,
    NumSamplesDataset,
    OffsetTokensDataset,
    PrependTokenDataset,
    RawLabelDataset,
    RightPadDataset,
    RightPaddingMaskDataset,
    SortDataset,
    StripTokenDataset,
    data_utils,
)
from fairseq.data.shorten_dataset import maybe_shorten_dataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..criteria.sentence_prediction import forget_predictions
from ._common import TextDictionaryMixin, check_data_dir, load_text_dictionary

logger = logging.getLogger(__name__)

HOW_TO_PREPARE = (
    "prepare it with datasets/glue/prepare.sh (GLUE) or `python -m d2v_plugin.prep.classification` "
    "(any labelled CSV/TSV file)"
)


@dataclass
class TextClassificationConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with input0/, optional input1/ and label/ (see the module docstring)"})
    num_classes: int = field(default=-1, metadata={"help": "number of classes, or of regression targets per example"})
    regression_target: bool = field(default=False, metadata={"help": "targets are floats read from label/SPLIT.label (STS-B)"})
    init_token: Optional[int] = field(default=0, metadata={"help": "token put in front of every example; the head reads its output (<s> = 0 in fairseq dictionaries)"})
    separator_token: Optional[int] = field(default=2, metadata={"help": "token put in front of the second sentence of a pair (</s> = 2, giving RoBERTa's '</s> </s>')"})
    max_positions: int = field(default=512, metadata={"help": "longest example in tokens, <s> and separators included"})
    shorten_method: ChoiceEnum(["none", "truncate", "random_crop"]) = field(
        default="truncate", metadata={"help": "what happens to longer examples: truncate (cut the end), random_crop, or none (fairseq then refuses them)"}
    )
    shorten_data_split_list: str = field(default="", metadata={"help": "comma-separated splits to shorten (empty = all)"})
    no_shuffle: bool = field(default=False, metadata={"help": "keep the file order in training"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the shuffling"})


@register_task("d2v_sentence_prediction", dataclass=TextClassificationConfig)
class TextClassificationTask(TextDictionaryMixin, FairseqTask):
    cfg: TextClassificationConfig

    def __init__(self, cfg: TextClassificationConfig, dictionary: Dictionary, label_dictionary: Optional[Dictionary]):
        super().__init__(cfg)
        self.dictionary = dictionary
        self._label_dictionary = label_dictionary

    @classmethod
    def setup_task(cls, cfg: TextClassificationConfig, **kwargs):
        if cfg.num_classes <= 0:
            raise ValueError("task.num_classes must be set: the number of classes (1 for a single regression score)")
        check_data_dir(cfg.data, HOW_TO_PREPARE)
        dict_path = os.path.join(cfg.data, "input0", "dict.txt")
        dictionary = load_text_dictionary(dict_path, missing_hint=HOW_TO_PREPARE)
        logger.info(f"[input] dictionary {dict_path}: {len(dictionary)} types")
        label_dictionary = None
        if not cfg.regression_target:
            label_dictionary = cls._load_label_dictionary(cfg)
        return cls(cfg, dictionary, label_dictionary)

    @staticmethod
    def _load_label_dictionary(cfg) -> Dictionary:
        path = os.path.join(cfg.data, "label", "dict.txt")
        if not os.path.isfile(path):
            hint = ""
            if os.path.isfile(os.path.join(cfg.data, "label", "train.label")):
                hint = " (label/train.label exists: is this a regression set? set task.regression_target=true)"
            raise FileNotFoundError(f"task.data: {path} is missing{hint}; {HOW_TO_PREPARE}")
        labels = Dictionary.load(path)
        names = labels.symbols[labels.nspecial :]
        if len(names) > cfg.num_classes:
            raise ValueError(
                f"{path} lists {len(names)} labels ({', '.join(names[:20])}) but task.num_classes={cfg.num_classes}: "
                "labels outside the configured classes; set task.num_classes to the number of labels"
            )
        if len(names) < cfg.num_classes:
            logger.warning(f"{path} lists {len(names)} labels, fewer than task.num_classes={cfg.num_classes}")
        logger.info(f"[label] dictionary {path}: {len(names)} labels ({', '.join(names[:20])})")
        return labels

    @property
    def label_dictionary(self):
        return self._label_dictionary

    def max_positions(self):
        return self.cfg.max_positions

    # ---- data ------------------------------------------------------------------------
    def _indexed(self, key, split, dictionary):
        prefix = os.path.join(self.cfg.data, key, split)
        return prefix, data_utils.load_indexed_dataset(prefix, dictionary)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        prefix0, input0 = self._indexed("input0", split, self.dictionary)
        if input0 is None:
            raise FileNotFoundError(f"no split {split!r} in {self.cfg.data}: {prefix0}.bin/.idx are missing; {HOW_TO_PREPARE}")
        _check_token_ids(input0, prefix0, len(self.dictionary))
        prefix1, input1 = self._indexed("input1", split, self.dictionary)
        if input1 is not None:
            _check_token_ids(input1, prefix1, len(self.dictionary))
            if len(input1) != len(input0):
                raise ValueError(f"{prefix0}.bin holds {len(input0)} examples but {prefix1}.bin {len(input1)}")

        src = input0
        if self.cfg.init_token is not None:
            src = PrependTokenDataset(src, self.cfg.init_token)
        if input1 is not None:
            second = input1
            if self.cfg.separator_token is not None:
                second = PrependTokenDataset(second, self.cfg.separator_token)
            src = ConcatSentencesDataset(src, second)
        src = maybe_shorten_dataset(
            src, split, self.cfg.shorten_data_split_list, self.cfg.shorten_method, self.max_positions(), self.cfg.seed
        )

        dataset = {
            "id": IdDataset(),
            "net_input": {
                "source": RightPadDataset(src, pad_idx=self.dictionary.pad()),
                "padding_mask": RightPaddingMaskDataset(src),
            },
            "nsentences": NumSamplesDataset(),
            "ntokens": NumelDataset(src, reduce=True),
        }
        target = self._targets(split, len(input0))
        if target is not None:
            dataset["target"] = target
        nested = NestedDictionaryDataset(dataset, sizes=[src.sizes])
        if self.cfg.no_shuffle:
            self.datasets[split] = nested
        else:
            with data_utils.numpy_seed(self.cfg.seed):
                order = np.random.permutation(len(src))
            self.datasets[split] = SortDataset(nested, sort_order=[order])
        logger.info(f"{split}: {len(src)} examples from {self.cfg.data} ({'with' if target is not None else 'without'} labels)")
        return self.datasets[split]

    def _targets(self, split, n):
        if self.cfg.regression_target:
            path = os.path.join(self.cfg.data, "label", f"{split}.label")
            if not os.path.isfile(path):
                return None
            values = _read_regression_targets(path, self.cfg.num_classes)
            if len(values) != n:
                raise ValueError(f"{path} has {len(values)} lines but split {split!r} has {n} examples")
            return RawLabelDataset(values)
        prefix, labels = self._indexed("label", split, self._label_dictionary)
        if labels is None:
            return None
        if len(labels) != n:
            raise ValueError(f"{prefix}.bin holds {len(labels)} labels but split {split!r} has {n} examples")
        _check_labels(labels, prefix, self._label_dictionary, self.cfg.num_classes)
        return OffsetTokensDataset(
            StripTokenDataset(labels, id_to_strip=self._label_dictionary.eos()),
            offset=-self._label_dictionary.nspecial,
        )

    # ---- model -----------------------------------------------------------------------
    def build_model(self, cfg, from_checkpoint=False):
        from fairseq import models

        return models.build_model(cfg, self, from_checkpoint)

    def post_validate(self, model, stats, agg):
        # predictions were collected for the metrics of this subset; don't keep them around
        forget_predictions(agg)
        forget_predictions(metrics.get_meters("valid"))


def _token_buffer(dataset):
    """All token ids of a fairseq mmap dataset as one numpy array (None if not mmap)."""
    buf = getattr(dataset, "_bin_buffer", None)
    index = getattr(dataset, "_index", None)
    if buf is None or index is None:
        return None
    return np.frombuffer(buf, dtype=index.dtype)


def _check_token_ids(dataset, prefix, vocab_size):
    tokens = _token_buffer(dataset)
    if tokens is None or tokens.size == 0:
        return
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(
            f"dictionary mismatch: {prefix}.bin contains token id {top} but the dictionary "
            f"{os.path.join(os.path.dirname(prefix), 'dict.txt')} (+<mask>) has only {vocab_size} symbols; "
            "binarize the data with the pretrained model's dict.txt"
        )


def _check_labels(labels, prefix, label_dictionary, num_classes):
    """Every example must hold exactly one known label, within the configured classes."""
    tokens = _token_buffer(labels)
    sizes = np.asarray(labels.sizes)
    if tokens is None:
        return
    bad = np.flatnonzero(sizes != 2)  # label + </s>
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{prefix}.bin: example {i + 1} has {sizes[i] - 1} labels (expected exactly one)")
    ids = tokens[0::2]
    lo, hi = label_dictionary.nspecial, label_dictionary.nspecial + num_classes
    bad = np.flatnonzero((ids < lo) | (ids >= hi))
    if bad.size:
        i = int(bad[0])
        sym = label_dictionary[int(ids[i])]
        what = "a label missing from label/dict.txt" if sym == label_dictionary.unk_word else f"label {sym!r}"
        raise ValueError(
            f"{prefix}.bin: example {i + 1} has {what}, outside the {num_classes} configured classes "
            f"({', '.join(label_dictionary.symbols[lo:hi])}); {bad.size} example(s) affected. "
            "Re-binarize the labels with the task's label dictionary or fix task.num_classes"
        )


def _read_regression_targets(path, num_classes):
    values = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) != num_classes:
                raise ValueError(f"{path}:{lineno}: expected {num_classes} regression value(s) (task.num_classes), found {len(fields)}: {line.strip()!r}")
            try:
                row = [float(x) for x in fields]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not a number: {line.strip()!r}") from None
            if not all(math.isfinite(v) for v in row):
                raise ValueError(f"{path}:{lineno}: non-finite regression target {line.strip()!r}")
            values.append(row)
    return values
