"""``d2v_image_pretraining``: images from ImageFolder directories for data2vec 2.0.

``task.data`` holds one directory per split, each in the ImageFolder layout
(``DATA/train/<class>/*.JPEG``, as ``datasets/imagenet/prepare.sh`` writes it). The task
only decodes, augments and batches images; masking happens in the model.
"""

import logging
import os
from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.image_dataset import ImageDataError, ImageFolderDataset
from ._common import NoDictionaryMixin, check_data_dir

logger = logging.getLogger(__name__)

LAYOUT = "expected DATA/<split>/<class>/<image> (ImageFolder layout); for ImageNet run datasets/imagenet/prepare.sh"
SPLIT_ALIASES = {"valid": "val", "val": "valid"}


@dataclass
class ImagePretrainingConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with one ImageFolder directory per split (train/<class>/*.JPEG, val/...)"})
    input_size: int = field(default=224, metadata={"help": "side of the square crops fed to the model (match model.modalities.image.input_size)"})
    crop_min_scale: float = field(default=0.2, metadata={"help": "smallest area fraction of a training image kept by the random resized crop"})
    skip_unreadable: bool = field(
        default=False,
        metadata={"help": "skip images that cannot be read or decoded (missing, truncated, corrupt), logging each with a "
                  "running count, instead of stopping with an error naming the file"},
    )
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the per-epoch shuffling"})


@register_task("d2v_image_pretraining", dataclass=ImagePretrainingConfig)
class ImagePretrainingTask(NoDictionaryMixin, FairseqTask):
    cfg: ImagePretrainingConfig

    @classmethod
    def setup_task(cls, cfg: ImagePretrainingConfig, **kwargs):
        check_data_dir(cfg.data, LAYOUT)
        return cls(cfg)

    def split_dir(self, split: str) -> str:
        path = os.path.join(self.cfg.data, split)
        if not os.path.isdir(path) and split in SPLIT_ALIASES:
            alias = os.path.join(self.cfg.data, SPLIT_ALIASES[split])
            if os.path.isdir(alias):
                logger.info(f"split {split!r}: using {alias}")
                return alias
        if not os.path.isdir(path):
            raise FileNotFoundError(f"task.data: no directory for split {split!r} ({path} does not exist); {LAYOUT}")
        return path

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        root = self.split_dir(split)
        try:
            dataset = ImageFolderDataset(
                root,
                self.cfg.input_size,
                train=split == "train",
                crop_min_scale=self.cfg.crop_min_scale,
                skip_unreadable=self.cfg.skip_unreadable,
                seed=self.cfg.seed,
            )
        except ImageDataError as e:
            raise ImageDataError(f"split {split!r}: {e}") from None
        logger.info(f"{split}: {len(dataset)} images in {len(dataset.classes)} classes from {root}")
        self.datasets[split] = dataset

    def max_positions(self):
        return None
