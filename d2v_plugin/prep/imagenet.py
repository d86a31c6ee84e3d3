"""Unpack the ILSVRC2012 (ImageNet-1k) archives into ImageFolder directories.

ImageNet is distributed under a licence, so the user downloads the archives from
image-net.org and this module only unpacks them; nothing is fetched.

- ``ILSVRC2012_img_train.tar`` holds one tar per class (``n01440764.tar``, ...), each
  holding that class's JPEGs -> ``OUT/train/<wnid>/*.JPEG`` (1,281,167 images).
- ``ILSVRC2012_img_val.tar`` holds 50,000 JPEGs without labels
  (``ILSVRC2012_val_00000001.JPEG``, ...) -> ``OUT/val/<wnid>/*.JPEG``. The labels come
  from the development kit ``ILSVRC2012_devkit_t12.tar.gz`` of the same download page:
  ``data/ILSVRC2012_validation_ground_truth.txt`` gives the ILSVRC2012_ID (1..1000) of
  each image in file order, ``data/meta.mat`` maps ILSVRC2012_ID to WordNet id.
  Alternatively ``--val-labels`` reads a text file of ``<image> <wnid>`` lines or a
  Kaggle-style ``LOC_val_solution.csv``.

Idempotent: each class directory (and the whole ``val`` directory) is written under a
temporary name and renamed when complete, so a re-run skips finished work and redoes
only what an interruption left half-written. The counts are verified at the end
(``--expect-counts``, default 1,281,167 / 50,000).

Example::

    python -m d2v_plugin.prep.imagenet --train-tar ILSVRC2012_img_train.tar \\
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz --out data/imagenet
"""

import argparse
import io
import os
import re
import shutil
import sys
import tarfile
import time
from typing import Dict, List, Optional, Tuple

TRAIN_IMAGES = 1_281_167
VAL_IMAGES = 50_000
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META_MAT = "data/meta.mat"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})(\.JPEG)?$", re.IGNORECASE)
WNID = re.compile(r"n\d{8}$")
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+$")
IMAGE_EXT = (".jpeg", ".jpg", ".png")


class PrepError(Exception):
    """A problem with the user's archives or output directory; the message says what to do."""


def log(msg: str) -> None:
    print(f"[imagenet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- validation labels --------------------------------------------------------------
def _read_member(tar: tarfile.TarFile, suffix: str, archive: str) -> bytes:
    for member in tar.getmembers():
        if member.isfile() and (member.name == suffix or member.name.endswith("/" + suffix)):
            return tar.extractfile(member).read()
    raise PrepError(f"{archive} has no {suffix}: is it the ILSVRC2012 development kit (ILSVRC2012_devkit_t12.tar.gz)?")


def wnids_by_ilsvrc_id(meta_mat: bytes) -> Dict[int, str]:
    """ILSVRC2012_ID -> WordNet id, from the devkit's ``meta.mat`` (``synsets`` struct array)."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise PrepError("reading the devkit's meta.mat needs scipy: pip install scipy") from e
    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    mapping = {}
    for entry in synsets.reshape(-1):
        mapping[int(entry["ILSVRC2012_ID"])] = str(entry["WNID"])
    return mapping


def labels_from_devkit(devkit: str) -> List[str]:
    """The WordNet id of each validation image, in file order (image i+1 -> index i)."""
    with tarfile.open(devkit, "r:*") as tar:
        truth = _read_member(tar, GROUND_TRUTH, devkit).decode().split()
        mapping = wnids_by_ilsvrc_id(_read_member(tar, META_MAT, devkit))
    labels = []
    for line_no, value in enumerate(truth, 1):
        wnid = mapping.get(int(value))
        if wnid is None:
            raise PrepError(f"{devkit}: {GROUND_TRUTH} line {line_no} has ILSVRC2012_ID {value}, which meta.mat does not define")
        labels.append(wnid)
    return labels


def labels_from_file(path: str) -> List[str]:
    """``<image> <wnid>`` lines, or a CSV ``ImageId,PredictionString`` whose string starts with the wnid."""
    by_index: Dict[int, str] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("ImageId"):
                continue
            image, *rest = re.split(r"[,\s]+", line, maxsplit=1)
            fields = rest[0].split() if rest else []
            m = VAL_NAME.match(image)
            if m is None or not fields or not WNID.match(fields[0]):
                raise PrepError(f"{path} line {line_no}: expected '<ILSVRC2012_val_NNNNNNNN[.JPEG]> <wnid>', got {line!r}")
            by_index[int(m.group(1))] = fields[0]
    n = max(by_index, default=0)
    missing = [i for i in range(1, n + 1) if i not in by_index]
    if missing:
        raise PrepError(f"{path} has no label for {len(missing)} validation images (e.g. number {missing[0]})")
    return [by_index[i] for i in range(1, n + 1)]


# ---- extraction ---------------------------------------------------------------------
def _safe_image_name(name: str, archive: str) -> Optional[str]:
    """The base name of an archive member if it is an image we should write, else None."""
    base = os.path.basename(name)
    if not base.lower().endswith(IMAGE_EXT):
        return None
    if not SAFE_NAME.match(base):
        raise PrepError(f"{archive}: unexpected file name {name!r}")
    return base


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: str) -> None:
    src = tar.extractfile(member)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _count_images(directory: str) -> int:
    return sum(1 for e in os.scandir(directory) if e.is_file() and e.name.lower().endswith(IMAGE_EXT))


def extract_train(train_tar: str, out: str) -> Dict[str, int]:
    """``train_tar`` (a tar of per-class tars) -> ``out/<wnid>/``; returns images per class."""
    os.makedirs(out, exist_ok=True)
    counts: Dict[str, int] = {}
    try:
        outer = tarfile.open(train_tar, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise PrepError(f"cannot read {train_tar}: {e}") from e
    with outer:
        try:
            members = [m for m in outer.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PrepError(f"{train_tar} is corrupt or truncated: {e}") from e
        class_tars = [m for m in members if WNID.match(os.path.basename(m.name).removesuffix(".tar")) and m.name.endswith(".tar")]
        if not class_tars:
            raise PrepError(f"{train_tar} holds no per-class tars (n01440764.tar, ...): is it ILSVRC2012_img_train.tar?")
        start, done_before, total, new_images = time.time(), 0, 0, 0
        for i, member in enumerate(class_tars, 1):
            wnid = os.path.basename(member.name)[: -len(".tar")]
            dest = os.path.join(out, wnid)
            if os.path.isdir(dest):
                counts[wnid] = _count_images(dest)
                done_before += 1
                total += counts[wnid]
                continue
            tmp = os.path.join(out, f".{wnid}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            n = 0
            try:
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
                    for image in inner:
                        name = _safe_image_name(image.name, f"{train_tar}:{member.name}") if image.isfile() else None
                        if name is not None:
                            _copy_member(inner, image, os.path.join(tmp, name))
                            n += 1
            except (tarfile.TarError, OSError, EOFError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise PrepError(f"{train_tar}: class archive {member.name} is corrupt or truncated: {e}") from e
            if n == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise PrepError(f"{train_tar}: class archive {member.name} holds no images")
            os.rename(tmp, dest)
            counts[wnid] = n
            total += n
            new_images += n
            elapsed = max(time.time() - start, 1e-9)
            eta = elapsed / (i - done_before) * (len(class_tars) - i)
            log(f"train {i}/{len(class_tars)} {wnid}: {n} images (total {total:,}, {new_images / elapsed:,.0f} images/s, ~{eta / 60:.0f} min left)")
        if done_before:
            log(f"train: {done_before} of {len(class_tars)} classes were already extracted (kept)")
    return counts


def extract_val(val_tar: str, labels: List[str], out: str) -> Dict[str, int]:
    """``val_tar`` (flat JPEGs) -> ``out/<wnid>/`` using ``labels`` (index = image number - 1)."""
    if os.path.isdir(out):
        log(f"val: {out} already complete (kept)")
        return {e.name: _count_images(e.path) for e in os.scandir(out) if e.is_dir()}
    tmp = os.path.join(os.path.dirname(out), ".val.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    counts: Dict[str, int] = {}
    n = 0
    try:
        with tarfile.open(val_tar, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = _safe_image_name(member.name, val_tar)
                m = VAL_NAME.match(base or "")
                if m is None:
                    raise PrepError(f"{val_tar}: unexpected member {member.name!r} (expected ILSVRC2012_val_NNNNNNNN.JPEG)")
                index = int(m.group(1))
                if not 1 <= index <= len(labels):
                    raise PrepError(f"{val_tar}: {base} has no label (the labels cover images 1..{len(labels)})")
                wnid = labels[index - 1]
                os.makedirs(os.path.join(tmp, wnid), exist_ok=True)
                _copy_member(tar, member, os.path.join(tmp, wnid, base))
                counts[wnid] = counts.get(wnid, 0) + 1
                n += 1
                if n % 5000 == 0:
                    log(f"val: {n:,} images sorted into {len(counts)} classes")
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrepError(f"{val_tar} is corrupt or truncated: {e}") from e
    except PrepError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)
    log(f"val: {n:,} images sorted into {len(counts)} classes")
    return counts


def verify(train: Dict[str, int], val: Dict[str, int], expect: Tuple[int, int], out: str) -> None:
    problems = []
    n_train, n_val = sum(train.values()), sum(val.values())
    if n_train != expect[0]:
        problems.append(f"train has {n_train:,} images, expected {expect[0]:,}")
    if n_val != expect[1]:
        problems.append(f"val has {n_val:,} images, expected {expect[1]:,}")
    unknown = sorted(set(val) - set(train))
    if unknown:
        problems.append(f"val classes missing from train: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if problems:
        raise PrepError(
            "; ".join(problems)
            + f". The archives may be incomplete or not the ILSVRC2012 ones. To redo a class, delete its folder in {out}/train "
            f"(or {out}/val entirely) and re-run; --expect-counts TRAIN,VAL changes the expected counts."
        )
    log(f"verified: train {n_train:,} images in {len(train)} classes, val {n_val:,} images in {len(val)} classes")


def _disk_check(out: str, archives: List[str]) -> None:
    need = sum(os.path.getsize(a) for a in archives)
    free = shutil.disk_usage(out).free
    if free < need:
        log(f"warning: {free / 1e9:.1f} GB free in {out} but the archives hold {need / 1e9:.1f} GB; "
            "extraction may run out of space (already extracted classes need no more)")


def parse_counts(text: str) -> Tuple[int, int]:
    try:
        train, val = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL image counts, got {text!r}") from None
    return train, val


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m d2v_plugin.prep.imagenet",
        description="Unpack the ILSVRC2012 archives into OUT/train/<wnid>/ and OUT/val/<wnid>/ (ImageFolder layout).",
    )
    p.add_argument("--train-tar", required=True, help="ILSVRC2012_img_train.tar (a tar of 1000 per-class tars)")
    p.add_argument("--val-tar", required=True, help="ILSVRC2012_img_val.tar (50,000 JPEGs)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz: validation labels (ground truth + meta.mat)")
    labels.add_argument("--val-labels", help="instead of --devkit: '<image> <wnid>' lines or LOC_val_solution.csv")
    p.add_argument("--out", required=True, help="output directory (train/ and val/ are created inside)")
    p.add_argument("--expect-counts", type=parse_counts, default=(TRAIN_IMAGES, VAL_IMAGES), metavar="TRAIN,VAL",
                   help=f"expected image counts (default {TRAIN_IMAGES},{VAL_IMAGES})")
    args = p.parse_args(argv)
    try:
        for path in (args.train_tar, args.val_tar, args.devkit or args.val_labels):
            if not os.path.isfile(path):
                raise PrepError(f"{path} does not exist")
        os.makedirs(args.out, exist_ok=True)
        _disk_check(args.out, [args.train_tar, args.val_tar])
        log("reading validation labels from " + (args.devkit or args.val_labels))
        val_labels = labels_from_devkit(args.devkit) if args.devkit else labels_from_file(args.val_labels)
        log(f"{len(val_labels):,} validation labels, {len(set(val_labels))} classes")
        train = extract_train(args.train_tar, os.path.join(args.out, "train"))
        val = extract_val(args.val_tar, val_labels, os.path.join(args.out, "val"))
        verify(train, val, args.expect_counts, args.out)
    except PrepError as e:
        print(f"[imagenet] error: {e}", file=sys.stderr)
        return 1
    log(f"done: point task.data at {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
