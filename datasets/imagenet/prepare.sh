#!/usr/bin/env bash
# Unpack the ILSVRC2012 (ImageNet-1k) archives you downloaded into ImageFolder directories
# for data2vec image pretraining. Run with --help for the details.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") --train-tar FILE --val-tar FILE (--devkit FILE | --val-labels FILE) --out DIR [options]

ImageNet needs a licence: register at https://image-net.org, accept the terms of access and
download the ILSVRC2012 files yourself. This script fetches nothing; it

  1. reads the validation labels from the development kit (ILSVRC2012_devkit_t12.tar.gz:
     data/ILSVRC2012_validation_ground_truth.txt + data/meta.mat, read with scipy),
  2. extracts the train tar of 1,000 per-class tars into DIR/train/<wnid>/*.JPEG,
  3. sorts the 50,000 validation images into DIR/val/<wnid>/*.JPEG,
  4. verifies the counts (1,281,167 train / 50,000 val images) and that every validation
     class exists in train.

Point task.data at DIR (e.g. scripts/train_image.sh DIR). Needs about 150 GB beside the
archives (which you may delete afterwards). Idempotent: every class folder and the val folder
are written under a temporary name and renamed when complete, so re-running after an
interruption skips finished classes and redoes only the half-written one.

Options:
  --train-tar FILE       ILSVRC2012_img_train.tar (138 GB)
  --val-tar FILE         ILSVRC2012_img_val.tar (6.3 GB)
  --devkit FILE          ILSVRC2012_devkit_t12.tar.gz (validation labels)
  --val-labels FILE      instead of --devkit: a text file of '<image> <wnid>' lines
                         (e.g. 'ILSVRC2012_val_00000001.JPEG n01751748') or Kaggle's
                         LOC_val_solution.csv
  --out DIR              output directory (created)
  --expect-counts T,V    expected numbers of train and val images (default 1281167,50000)
  -h, --help             show this help

Environment:
  PYTHON                 the Python interpreter to use; it needs scipy (default: python)
USAGE
}

die() { echo "[imagenet] error: $*" >&2; exit 1; }

args=()
have_out=0
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --train-tar|--val-tar|--devkit|--val-labels|--expect-counts)
            need_value "$@"; args+=("$1" "$2"); shift 2 ;;
        --out) need_value "$@"; args+=("$1" "$2"); have_out=1; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $have_out -eq 1 ]] || die "--out DIR is required (see --help)"

# The unpacker needs only the standard library and scipy: it runs as a plain script, without
# importing the plugin (torch, fairseq), so it also works on a machine without them.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "${PYTHON:-python}" -u "$repo_root/d2v_plugin/prep/imagenet.py" "${args[@]}"
