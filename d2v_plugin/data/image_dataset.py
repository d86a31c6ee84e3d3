"""Images in an ImageFolder layout (``ROOT/<class>/<image>``) as a fairseq dataset.

Training crops and flips each image at random (MAE / data2vec 2.0 recipe: random
resized crop with scale (0.2, 1), bicubic, horizontal flip); other splits are resized
and center-cropped. Both normalise with the ImageNet mean and std.

The file list is kept as numpy arrays rather than Python objects so that data-loader
worker processes share it instead of copying it (1.28M ImageNet paths).
"""

import logging
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils
from PIL import Image
from torchvision import transforms

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 224 / 256  # eval images are resized to input_size / ratio, then center-cropped


class ImageDataError(ValueError):
    """The image directory or one of its files cannot be used; the message names it."""


def scan_image_folder(root: str) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``(relative paths as bytes, class indices, class names)`` of ``root/<class>/**/<image>``.

    Classes are the sorted sub-directories of ``root``; images are files with an
    extension in :data:`IMG_EXTENSIONS` (any case), found recursively. A class folder
    without images is an error (it would silently shift every later class index).
    """
    if not os.path.isdir(root):
        raise ImageDataError(f"image directory {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ImageDataError(f"{root} holds no class folders: expected the layout {root}/<class>/<image>.JPEG")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            found.extend(os.path.join(rel, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
        if not found:
            empty.append(name)
        paths.extend(found)
        labels.extend([label] * len(found))
    if empty:
        shown = ", ".join(os.path.join(root, n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ImageDataError(
            f"{len(empty)} class folder(s) hold no images ({', '.join(IMG_EXTENSIONS)}): {shown}. "
            "Remove the empty folders or add their images."
        )
    return np.array([os.fsencode(p) for p in paths]), np.array(labels, dtype=np.int64), classes


def train_transform(input_size: int, crop_min_scale: float = 0.2):
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                input_size, scale=(crop_min_scale, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(input_size: int):
    return transforms.Compose(
        [
            transforms.Resize(int(round(input_size / EVAL_CROP_RATIO)), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB; any decoding problem becomes an ImageDataError naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # forces the full decode (truncated files fail here)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDataError(f"cannot read image {path}: {e}") from e


class ImageFolderDataset(FairseqDataset):
    """One sample per image: ``{"id", "source": (C, H, W) float[, "target"]}``.

    ``skip_unreadable``: an image that cannot be decoded is logged (with a running
    count) and left out of its batch instead of stopping training.
    """

    def __init__(
        self,
        root: str,
        input_size: int,
        train: bool,
        crop_min_scale: float = 0.2,
        skip_unreadable: bool = False,
        with_labels: bool = False,
        shuffle: bool = True,
        seed: int = 1,
    ):
        super().__init__()
        self.root = root
        self.paths, self.labels, self.classes = scan_image_folder(root)
        self.transform = train_transform(input_size, crop_min_scale) if train else eval_transform(input_size)
        self.skip_unreadable = skip_unreadable
        self.with_labels = with_labels
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 1
        self.num_skipped = 0  # in this process (each data-loader worker counts its own)

    def __len__(self):
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def __getitem__(self, index):
        path = self.path(index)
        try:
            img = load_rgb(path)
        except ImageDataError as e:
            if not self.skip_unreadable:
                raise ImageDataError(f"{e} (sample {index} of {self.root}). Replace or delete the file, or set task.skip_unreadable=true to skip such files") from e
            self.num_skipped += 1
            logger.warning(f"skipped unreadable image {path} ({self.num_skipped} skipped so far in this process): {e.__cause__}")
            return None
        # the random augmentation of a sample depends only on (seed, epoch, index), never on
        # what the process drew before: a resumed run sees the images an uninterrupted one sees
        # (the CPU generator only: torch.manual_seed would also queue lazy seeds for every
        # accelerator, each with a formatted stack trace: ~5 ms a sample, a third of a tiny update)
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(hash((int(self.seed), int(self.epoch), int(index))) % (2**63 - 1))
            sample = {"id": index, "source": self.transform(img)}
        finally:
            torch.set_rng_state(state)
        if self.with_labels:
            sample["target"] = int(self.labels[index])
        return sample

    def collater(self, samples):
        samples = [s for s in samples if s is not None]
        if not samples:
            return {}
        ids = torch.LongTensor([s["id"] for s in samples])
        batch = {
            "id": ids,
            "net_input": {"source": torch.stack([s["source"] for s in samples]), "id": ids},
            "nsentences": len(samples),
            "ntokens": len(samples),  # one "token" per image: fairseq's wps then reads images/s
        }
        if self.with_labels:
            batch["target"] = torch.LongTensor([s["target"] for s in samples])
        return batch

    # every image has the same size after the transform
    def num_tokens(self, index):
        return 1

    def num_tokens_vec(self, indices):
        return np.ones(len(indices), dtype=np.int64)

    def size(self, index):
        return 1

    @property
    def sizes(self):
        return np.ones(len(self), dtype=np.int64)

    @property
    def supports_prefetch(self):
        return False

    @property
    def can_reuse_epoch_itr_across_epochs(self):
        return False  # batches are re-drawn each epoch (see ordered_indices)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def ordered_indices(self):
        """A fresh permutation per epoch, so batches mix classes differently every epoch."""
        if not self.shuffle:
            return np.arange(len(self))
        with data_utils.numpy_seed(self.seed, self.epoch):
            return np.random.permutation(len(self))
