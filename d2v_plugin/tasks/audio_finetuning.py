"""``d2v_audio_finetuning``: speech with letter transcripts, for CTC fine-tuning (``d2v_ctc``).

``task.data`` is what ``datasets/librispeech/prepare.sh`` writes: ``SPLIT.tsv`` manifests
(audio root on the first line, then ``relative/path<TAB>num_samples``), ``SPLIT.ltr``
transcripts (letters separated by spaces, ``|`` between words; line i transcribes row i)
and ``dict.ltr.txt``, the letter dictionary (fairseq format). The CTC blank is the
dictionary's ``<s>`` (index 0), as in fairseq's wav2vec 2.0 recipe.

Audio normalisation is not a setting of this task: ``d2v_ctc`` applies the one its
pretrained encoder was trained with.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from fairseq.data import Dictionary
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.labelled_audio import labelled_audio_dataset
from ._common import check_data_dir

logger = logging.getLogger(__name__)

HOW_TO_PREPARE = "prepare LibriSpeech / Libri-light with datasets/librispeech/prepare.sh (it writes SPLIT.tsv, SPLIT.ltr and dict.ltr.txt)"


@dataclass
class D2vAudioFinetuningConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with SPLIT.tsv manifests, SPLIT.ltr transcripts and dict.ltr.txt"})
    labels: str = field(default="ltr", metadata={"help": "extension of the transcript files (SPLIT.<labels>) and of the dictionary (dict.<labels>.txt)"})
    sample_rate: int = field(default=16_000, metadata={"help": "sample rate the model expects; files at another rate are an error unless resample=true"})
    resample: bool = field(default=False, metadata={"help": "resample files at another rate on the fly instead of failing"})
    max_sample_size: Optional[int] = field(
        default=None,
        metadata={"help": "longest file in samples; longer files are left out (dataset.skip_invalid_size_inputs_valid_test=true) or an error, never cropped"},
    )
    min_sample_size: Optional[int] = field(default=None, metadata={"help": "skip files shorter than this many samples"})
    skip_unreadable: bool = field(default=False, metadata={"help": "skip missing, corrupt and empty files (and log how many) instead of failing"})
    check_files: bool = field(default=True, metadata={"help": "read every file's header when a split is loaded (also checks each row's num_samples against its file)"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the shuffling"})


@register_task("d2v_audio_finetuning", dataclass=D2vAudioFinetuningConfig)
class D2vAudioFinetuningTask(FairseqTask):
    cfg: D2vAudioFinetuningConfig

    def __init__(self, cfg: D2vAudioFinetuningConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary

    @classmethod
    def setup_task(cls, cfg: D2vAudioFinetuningConfig, **kwargs):
        check_data_dir(cfg.data, HOW_TO_PREPARE)
        path = cls.dict_path(cfg)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"task.data: {path} is missing; {HOW_TO_PREPARE}")
        dictionary = Dictionary.load(path)
        logger.info(f"letter dictionary {path}: {len(dictionary)} symbols")
        return cls(cfg, dictionary)

    @staticmethod
    def dict_path(cfg) -> str:
        return os.path.join(cfg.data, f"dict.{cfg.labels}.txt")

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return self.dictionary

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        labels = os.path.join(self.cfg.data, f"{split}.{self.cfg.labels}")
        for path in (manifest, labels):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"split {split!r}: {path} is missing; {HOW_TO_PREPARE}")
        self.datasets[split] = labelled_audio_dataset(
            manifest,
            labels,
            self.dictionary,
            dict_path=self.dict_path(self.cfg),
            sample_rate=self.cfg.sample_rate,
            min_sample_size=self.cfg.min_sample_size or 0,
            skip_unreadable=self.cfg.skip_unreadable,
            check_files=self.cfg.check_files,
            resample=self.cfg.resample,
            normalize=False,  # the model normalises as its encoder was pretrained
            random_crop=False,
            seed=self.cfg.seed,
        )
        if len(self.datasets[split]) == 0:
            raise ValueError(f"{manifest}: no usable audio files left (see the messages above)")

    def max_positions(self):
        return (self.cfg.max_sample_size or sys.maxsize, sys.maxsize)
