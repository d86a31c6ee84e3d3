"""Labelled images for classification: an ImageFolder split with the fine-tuning recipe's augmentation.

Training images get timm's ImageNet training pipeline (``timm.data.create_transform``:
random resized crop, horizontal flip, RandAugment, random erasing), as Meta's data2vec 2.0
image fine-tuning does; validation images the plain resize + center crop of
:func:`d2v_plugin.data.image_dataset.eval_transform`. The dataset itself (file list,
decoding, unreadable files, batching) is :class:`ImageFolderDataset`.
"""

import os
from typing import List, Optional

from timm.data import create_transform

from .image_dataset import IMAGENET_MEAN, IMAGENET_STD, ImageDataError, ImageFolderDataset, scan_image_folder


def classification_train_transform(
    input_size: int,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    color_jitter: float = 0.0,
    crop_min_scale: float = 0.08,
    hflip: float = 0.5,
):
    """timm's training transform with the given augmentation (``auto_augment`` None or "" = none)."""
    return create_transform(
        input_size=input_size,
        is_training=True,
        scale=(crop_min_scale, 1.0),
        hflip=hflip,
        color_jitter=color_jitter or None,
        auto_augment=auto_augment or None,
        interpolation="bicubic",
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def check_same_classes(train_root: str, other_root: str) -> List[str]:
    """The class names of ``train_root``; an ImageDataError naming the folders unless
    ``other_root`` has exactly the same class folders (a missing or extra class would shift
    every later class index, so accuracy would silently compare the wrong labels)."""
    if not os.path.isdir(other_root):
        raise ImageDataError(f"image directory {other_root} does not exist")
    train_classes = scan_image_folder(train_root)[2]
    other_classes = sorted(e.name for e in os.scandir(other_root) if e.is_dir() and not e.name.startswith("."))
    missing = sorted(set(train_classes) - set(other_classes))
    extra = sorted(set(other_classes) - set(train_classes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"class(es) {', '.join(missing[:10])} of {train_root} have no folder in {other_root}")
        if extra:
            parts.append(f"{other_root} has class folder(s) {', '.join(extra[:10])} that {train_root} lacks")
        raise ImageDataError(
            "; ".join(parts) + ". Both splits need the same class folders (one per class, with at least one image each)"
        )
    return train_classes


class LabelledImageDataset(ImageFolderDataset):
    """:class:`ImageFolderDataset` with labels (``sample["target"]``) and, for training,
    the classification recipe's augmentation (see :func:`classification_train_transform`)."""

    def __init__(self, root: str, input_size: int, train: bool, augment: Optional[dict] = None, **kwargs):
        super().__init__(root, input_size, train=False, with_labels=True, **kwargs)
        if train:
            self.transform = classification_train_transform(input_size, **(augment or {}))
