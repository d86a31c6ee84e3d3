"""Image classification with a fine-tuned ``d2v_image_classification`` checkpoint, and ``d2v-classify``.

    clf = ImageClassifier.from_checkpoint("checkpoints/image_finetune_tiny/checkpoint_best.pt")
    for p in clf.predict(["cat.jpg", "dog.png"], top_k=5):
        print(p.names, p.probabilities)

Images are preprocessed as validation images are during fine-tuning (bicubic resize to
``input_size / 0.875``, center crop, ImageNet mean and std). Nothing in the checkpoint is
executed (``weights_only`` loading); neither the pretrained checkpoint nor the data is needed.
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from .data.image_dataset import EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, eval_transform, load_rgb

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]


@dataclass
class ClassPrediction:
    """The top-k classes of one image, most probable first."""

    indices: List[int]
    names: List[str]  # the class folder names of the training data ("0", "1", ... when unknown)
    probabilities: List[float]


class ImageClassifier:
    """A fine-tuned image classifier (``d2v_image_classification`` checkpoint) in eval mode."""

    def __init__(self, model, input_size: int, class_names: Sequence[str], device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.input_size = int(input_size)
        self.class_names = list(class_names)
        self.device = torch.device(device)
        self.dtype = dtype
        self._pil_transform = eval_transform(self.input_size)
        self._tensor_transform = T.Compose([
            T.Resize(int(round(self.input_size / EVAL_CROP_RATIO)), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(self.input_size),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    @classmethod
    def from_checkpoint(cls, path: str, device="cpu", dtype=torch.float32) -> "ImageClassifier":
        """A ``d2v_image_classification`` checkpoint, or its ``d2v-export --format inference`` directory."""
        from .predict.finetuned import find_finetuned

        rec = find_finetuned(path)
        name = rec.name if rec is not None else None
        if name != "d2v_image_classification":
            raise ValueError(
                f"{path} is a {name or 'pretraining'!r} model, not a fine-tuned image classifier "
                "(d2v_image_classification: bash scripts/finetune_image.sh); for features of a pretrained model use d2v-extract"
            )
        return cls.from_record(rec, device=device, dtype=dtype)

    @classmethod
    def from_record(cls, rec, device="cpu", dtype=torch.float32) -> "ImageClassifier":
        """From a :class:`d2v_plugin.predict.finetuned.Finetuned` record of an image classifier."""
        from .predict.finetuned import build_model

        model = build_model(rec)
        names = model.cfg.class_names or [str(i) for i in range(model.cfg.num_classes)]
        return cls(model, rec.task_cfg.get("input_size") or 224, names, device=device, dtype=dtype)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """(3, S, S) model input of an image file, a PIL image or a (3, H, W) float tensor of RGB in [0, 1]."""
        if isinstance(image, (str, os.PathLike)):
            return self._pil_transform(load_rgb(os.fspath(image)))
        if isinstance(image, Image.Image):
            return self._pil_transform(image.convert("RGB"))
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.size(0) != 3 or not image.is_floating_point():
                raise ValueError(f"an image tensor must be float (3, H, W) RGB in [0, 1], got {tuple(image.shape)} {image.dtype}")
            return self._tensor_transform(image.float())
        raise TypeError(f"cannot classify a {type(image).__name__}: give a path, a PIL image or a (3, H, W) tensor")

    @torch.no_grad()
    def logits(self, images: Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
        """(N, num_classes) float32 logits of ``images``, computed ``batch_size`` at a time."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            out.append(self.model(batch.to(self.device, self.dtype)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.class_names))

    def predict(self, images: Sequence[ImageInput], top_k: int = 5, batch_size: int = 32) -> List[ClassPrediction]:
        """The ``top_k`` most probable classes of each image (softmax probabilities)."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, torch.Tensor) and images.dim() == 3):
            images = [images]
        k = max(1, min(top_k, len(self.class_names)))
        probs = self.logits(list(images), batch_size).softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        return [
            ClassPrediction(idx.tolist(), [self.class_names[j] for j in idx.tolist()], p.tolist())
            for idx, p in zip(top.indices, top.values)
        ]


def image_files(inputs: Sequence[str]) -> List[str]:
    """Files as given, and the image files under each directory (recursively, sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = [os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs if f.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                raise FileNotFoundError(f"{item} holds no image files ({', '.join(IMG_EXTENSIONS)})")
            files.extend(sorted(found))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return files


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="d2v-classify",
        description="Print the top-k classes of images with a fine-tuned d2v_image_classification checkpoint. "
        "When every image lies in a folder named after one of the classes (an ImageFolder split such as DATA/val), "
        "the top-1 and top-k accuracy are printed too.",
    )
    parser.add_argument("checkpoint", help="fine-tuned checkpoint (scripts/finetune_image.sh writes checkpoint_best.pt)")
    parser.add_argument("images", nargs="+", help="image files, or directories searched recursively for images")
    parser.add_argument("--top-k", type=int, default=5, help="classes printed per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    logging.getLogger("PIL").setLevel(logging.WARNING)  # fairseq's import may leave the root logger at DEBUG
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    try:
        clf = ImageClassifier.from_checkpoint(args.checkpoint, device=args.device)
        files = image_files(args.images)
    except (ValueError, FileNotFoundError) as e:
        print(f"d2v-classify: error: {e}", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar only
        tqdm = None
    top1 = topk = 0
    labelled = all(os.path.basename(os.path.dirname(os.path.abspath(f))) in clf.class_names for f in files)
    chunks = range(0, len(files), args.batch_size)
    for i in (tqdm(chunks, desc="classify", unit="batch", file=sys.stderr, disable=len(chunks) < 2) if tqdm else chunks):
        batch = files[i:i + args.batch_size]
        for f, p in zip(batch, clf.predict(batch, top_k=args.top_k, batch_size=args.batch_size)):
            print(f + "\t" + "\t".join(f"{n} {q:.4f}" for n, q in zip(p.names, p.probabilities)))
            if labelled:
                truth = os.path.basename(os.path.dirname(os.path.abspath(f)))
                top1 += p.names[0] == truth
                topk += truth in p.names
    if labelled:
        n = len(files)
        print(f"top-1 accuracy: {100.0 * top1 / n:.3f}% top-{args.top_k} accuracy: {100.0 * topk / n:.3f}% ({n} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
