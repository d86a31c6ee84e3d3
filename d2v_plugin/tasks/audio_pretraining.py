"""``d2v_audio_pretraining``: raw 16 kHz speech from wav2vec-style manifests for data2vec.

``task.data`` holds ``train.tsv`` (and ``valid.tsv`` when validation is on): the root
directory on the first line, then ``relative/path<TAB>num_samples`` per file. The task
only reads, crops and batches waveforms; masking happens in the model.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.audio_dataset import AudioManifestDataset
from ._common import NoDictionaryMixin, check_data_dir

logger = logging.getLogger(__name__)

HOW_TO_PREPARE = (
    "write one with `python -m d2v_plugin.prep.librispeech manifest --audio-dir DIR --out DATA` or "
    "prepare LibriSpeech with datasets/librispeech/prepare.sh"
)


@dataclass
class D2vAudioPretrainingConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with the manifests SPLIT.tsv (first line: audio root; then relative/path<TAB>num_samples)"})
    sample_rate: int = field(default=16_000, metadata={"help": "sample rate the model expects; files at another rate are an error unless resample=true"})
    resample: bool = field(default=False, metadata={"help": "resample files at another rate on the fly (scipy.signal.resample_poly) instead of failing"})
    normalize: bool = field(default=False, metadata={"help": "normalise each waveform to zero mean and unit variance (true for data2vec 2.0 speech)"})
    enable_padding: bool = field(default=False, metadata={"help": "pad a batch to its longest file instead of cropping it to its shortest"})
    max_sample_size: Optional[int] = field(default=None, metadata={"help": "crop longer files to this many samples (a random window in training)"})
    min_sample_size: Optional[int] = field(default=None, metadata={"help": "skip files shorter than this many samples"})
    skip_unreadable: bool = field(default=False, metadata={"help": "skip missing, corrupt and empty files (and log how many) instead of failing; stereo and wrong-rate files remain errors"})
    check_files: bool = field(default=True, metadata={"help": "read every file's header when a split is loaded, so bad files are reported before training (about 20-30 s per 100k files on a local disk)"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the shuffling and the random crops"})


@register_task("d2v_audio_pretraining", dataclass=D2vAudioPretrainingConfig)
class D2vAudioPretrainingTask(NoDictionaryMixin, FairseqTask):
    cfg: D2vAudioPretrainingConfig

    @classmethod
    def setup_task(cls, cfg: D2vAudioPretrainingConfig, **kwargs):
        check_data_dir(cfg.data, HOW_TO_PREPARE)
        return cls(cfg)

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"no manifest for split {split!r}: {manifest} is missing; {HOW_TO_PREPARE}")
        self.datasets[split] = AudioManifestDataset(
            manifest,
            sample_rate=self.cfg.sample_rate,
            max_sample_size=self.cfg.max_sample_size,
            min_sample_size=self.cfg.min_sample_size or 0,
            pad=self.cfg.enable_padding,
            normalize=self.cfg.normalize,
            skip_unreadable=self.cfg.skip_unreadable,
            check_files=self.cfg.check_files,
            resample=self.cfg.resample,
            random_crop=split.startswith("train"),  # fixed windows for validation
            seed=self.cfg.seed,
        )
        if len(self.datasets[split]) == 0:
            raise ValueError(f"{manifest}: no usable audio files left (see the messages above)")

    def max_positions(self):
        return sys.maxsize, sys.maxsize

    def get_batch_iterator(self, dataset, max_tokens=None, *args, **kwargs):
        if max_tokens and isinstance(dataset, AudioManifestDataset) and len(dataset):
            longest = int(dataset.num_tokens_vec(np.arange(len(dataset))).max())
            if longest > max_tokens:
                raise ValueError(
                    f"dataset.max_tokens={max_tokens} samples cannot hold the longest file of {dataset.manifest} "
                    f"({longest} samples after cropping): raise dataset.max_tokens or lower task.max_sample_size"
                )
        return super().get_batch_iterator(dataset, max_tokens, *args, **kwargs)
