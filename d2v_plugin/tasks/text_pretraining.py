"""``d2v_text_pretraining``: fixed-length blocks of a fairseq-binarized corpus for data2vec.

The task only cuts and batches tokens; masking happens in the model.
"""

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from fairseq.data import (
    Dictionary,
    IdDataset,
    NestedDictionaryDataset,
    NumelDataset,
    NumSamplesDataset,
    PrependTokenDataset,
    RightPadDataset,
    RightPaddingMaskDataset,
    SortDataset,
    TokenBlockDataset,
    data_utils,
)
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ._common import TextDictionaryMixin, check_data_dir, load_text_dictionary

logger = logging.getLogger(__name__)

HOW_TO_PREPARE = "prepare one with `python -m d2v_plugin.prep.text --corpus TEXT --out DIR` (then task.data=DIR/bin)"


@dataclass
class TextPretrainingConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with dict.txt and fairseq-preprocess output (train.bin/.idx, valid.bin/.idx)"})
    tokens_per_sample: int = field(default=512, metadata={"help": "tokens per sample, including the <s> added in front"})
    sample_break_mode: ChoiceEnum(["none", "complete", "complete_doc", "eos"]) = field(
        default="none", metadata={"help": "how blocks are cut: none = fixed-length blocks across sentence boundaries (see fairseq's TokenBlockDataset)"}
    )
    vocab_check_tokens: int = field(default=50_000_000, metadata={"help": "tokens of each split scanned to verify they fit the dictionary (0 = off)"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the shuffling"})


@register_task("d2v_text_pretraining", dataclass=TextPretrainingConfig)
class TextPretrainingTask(TextDictionaryMixin, FairseqTask):
    cfg: TextPretrainingConfig

    def __init__(self, cfg: TextPretrainingConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary

    @classmethod
    def setup_task(cls, cfg: TextPretrainingConfig, **kwargs):
        data = cfg.data.split(os.pathsep)[0]
        check_data_dir(data, HOW_TO_PREPARE)
        dict_path = os.path.join(data, "dict.txt")
        dictionary = load_text_dictionary(dict_path, missing_hint=HOW_TO_PREPARE)
        logger.info(f"dictionary {dict_path}: {len(dictionary)} types")
        return cls(cfg, dictionary)

    def max_positions(self):
        return self.cfg.tokens_per_sample

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = self.cfg.data.split(os.pathsep)
        data_path = paths[(epoch - 1) % len(paths)]
        prefix = os.path.join(data_path, split)
        if os.path.isfile(prefix + ".bin") and os.path.getsize(prefix + ".bin") == 0:
            raise ValueError(f"split {split!r} in {data_path} holds no tokens ({prefix}.bin is empty): the corpus it was made from was empty")
        tokens = data_utils.load_indexed_dataset(prefix, self.dictionary, combine=combine)
        if tokens is None:
            raise FileNotFoundError(f"no binarized split {split!r} in {data_path} (expected {prefix}.bin and {prefix}.idx); {HOW_TO_PREPARE}")
        if len(tokens) == 0 or tokens.sizes.sum() == 0:
            raise ValueError(f"split {split!r} in {data_path} holds no tokens; the corpus it was made from was empty")
        self._check_vocabulary(tokens, prefix)
        blocks = TokenBlockDataset(
            tokens,
            tokens.sizes,
            self.cfg.tokens_per_sample - 1,  # room for <s>
            pad=self.dictionary.pad(),
            eos=self.dictionary.eos(),
            break_mode=self.cfg.sample_break_mode,
        )
        src = PrependTokenDataset(blocks, self.dictionary.bos())
        logger.info(f"{split}: {len(src)} blocks of up to {self.cfg.tokens_per_sample} tokens from {prefix}")
        dataset = NestedDictionaryDataset(
            {
                "id": IdDataset(),
                "net_input": {
                    "source": RightPadDataset(src, pad_idx=self.dictionary.pad()),
                    "id": IdDataset(),
                    "padding_mask": RightPaddingMaskDataset(src),
                },
                "nsentences": NumSamplesDataset(),
                "ntokens": NumelDataset(src, reduce=True),
            },
            sizes=[src.sizes],
        )
        with data_utils.numpy_seed(self.cfg.seed, epoch):
            order = np.random.permutation(len(src))
        self.datasets[split] = SortDataset(dataset, sort_order=[order, src.sizes])

    def _check_vocabulary(self, tokens, prefix):
        """Fail early, naming the files, when the data was binarized with another dictionary."""
        limit = self.cfg.vocab_check_tokens
        if limit <= 0:
            return
        bin_buffer = getattr(tokens, "_bin_buffer", None)
        dtype = getattr(getattr(tokens, "_index", None), "dtype", None)
        if bin_buffer is None or dtype is None:
            return
        count = min(limit, len(bin_buffer) // np.dtype(dtype).itemsize)
        if count == 0:
            return
        max_id = int(np.frombuffer(bin_buffer, dtype=dtype, count=count).max())
        if max_id >= len(self.dictionary):
            raise ValueError(
                f"dictionary mismatch: {prefix}.bin contains token id {max_id} but "
                f"{os.path.join(os.path.dirname(prefix), 'dict.txt')} defines only {len(self.dictionary)} symbols; "
                "binarize the data with this dictionary (fairseq-preprocess --srcdict)"
            )
