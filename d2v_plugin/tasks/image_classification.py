"""``d2v_image_classification``: labelled images from an ImageFolder root for fine-tuning.

``task.data`` holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (what
``datasets/imagenet/prepare.sh`` and ``scripts/train_image.sh`` write). Classes are the
sorted folder names of ``train/``; ``val/`` must have the same folders. The class names
reach the model config (``model.class_names``), so a fine-tuned checkpoint can name its
predictions (``d2v-classify``).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.image_dataset import ImageDataError
from ..data.labelled_images import LabelledImageDataset, check_same_classes
from ._common import NoDictionaryMixin, check_data_dir

logger = logging.getLogger(__name__)

LAYOUT = "expected DATA/train/<class>/<image> and DATA/val/<class>/<image> (ImageFolder layout; datasets/imagenet/prepare.sh writes it)"
SPLIT_DIRS = {"valid": "val"}


@dataclass
class ImageClassificationConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "ImageFolder root with train/<class>/* and val/<class>/*"})
    input_size: int = field(default=224, metadata={"help": "side of the square images fed to the model"})
    auto_augment: Optional[str] = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm auto-augment policy of training images (RandAugment; Meta's recipe: rand-m9-mstd0.5-inc1); empty = none"},
    )
    re_prob: float = field(default=0.25, metadata={"help": "random erasing probability of training images (Meta's recipe: 0.25)"})
    re_mode: str = field(default="pixel", metadata={"help": "random erasing fill: const, rand or pixel (timm)"})
    re_count: int = field(default=1, metadata={"help": "random erasing: regions erased per image"})
    color_jitter: float = field(default=0.0, metadata={"help": "colour jitter strength (0 = off; timm ignores it when RandAugment is on)"})
    crop_min_scale: float = field(default=0.08, metadata={"help": "smallest area fraction kept by the random resized crop (timm/Meta: 0.08)"})
    hflip: float = field(default=0.5, metadata={"help": "probability of a horizontal flip of a training image (0 for digits or text)"})
    skip_unreadable_images: bool = field(default=False, metadata={"help": "log and skip images that cannot be decoded instead of stopping"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the per-epoch shuffling and augmentation"})


@register_task("d2v_image_classification", dataclass=ImageClassificationConfig)
class ImageClassificationTask(NoDictionaryMixin, FairseqTask):
    cfg: ImageClassificationConfig

    def __init__(self, cfg: ImageClassificationConfig, class_names):
        super().__init__(cfg)
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def setup_task(cls, cfg: ImageClassificationConfig, **kwargs):
        check_data_dir(cfg.data, LAYOUT)
        train, val = os.path.join(cfg.data, "train"), os.path.join(cfg.data, "val")
        if not os.path.isdir(train):
            raise FileNotFoundError(f"task.data: {train} does not exist; {LAYOUT}")
        try:
            classes = check_same_classes(train, val)
        except ImageDataError as e:
            raise ImageDataError(f"task.data={cfg.data}: {e}") from None
        logger.info(f"{len(classes)} classes: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        return cls(cfg, classes)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        root = os.path.join(self.cfg.data, SPLIT_DIRS.get(split, split))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"task.data: no directory for split {split!r} ({root} does not exist); {LAYOUT}")
        cfg = self.cfg
        augment = dict(
            auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count,
            color_jitter=cfg.color_jitter, crop_min_scale=cfg.crop_min_scale, hflip=cfg.hflip,
        )
        try:
            dataset = LabelledImageDataset(
                root, cfg.input_size, train=split == "train", augment=augment,
                skip_unreadable=cfg.skip_unreadable_images, seed=cfg.seed,
            )
        except ImageDataError as e:
            raise ImageDataError(f"split {split!r}: {e}") from None
        if dataset.classes != self.class_names:
            raise ImageDataError(f"split {split!r}: {root} has classes {dataset.classes[:10]}, train/ has {self.class_names[:10]}")
        logger.info(f"{split}: {len(dataset)} images in {len(dataset.classes)} classes from {root}")
        self.datasets[split] = dataset

    def max_positions(self):
        return None
