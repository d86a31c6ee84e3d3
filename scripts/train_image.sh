#!/usr/bin/env bash
# data2vec 2.0 (or, with --v1, 1.0) image pretraining. Run with --help for the details.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [DATA_DIR] [options] [hydra overrides key=value ...]

Without DATA_DIR: a CPU smoke test that needs no download. scikit-learn's bundled
handwritten digits (1,797 8x8 images) are upscaled to 32x32 and written once as an
ImageFolder of PNGs (./data/digits_images/{train,val}/<digit>/*.png), then the tiny model
(config/pretraining/image_tiny.yaml: 32 px, patch 8, 2 blocks, dim 64) trains on them on the
CPU for 300 updates (well under a minute).

With DATA_DIR (DATA_DIR/train/<class>/*.JPEG, e.g. from datasets/imagenet/prepare.sh): the
ViT-B/16 ImageNet recipe (config/pretraining/image_base.yaml) on GPUs. The recipe's batch is
256 images per update (16 GPUs x 16 images); unless --update-freq is given, the script sets
update_freq = 16 / GPUs (rounded up) to keep it.

With --v1: data2vec 1.0 (data2vec_vision, a BEiT-style ViT with BEiT block masking) instead:
config/pretraining/v1_image_tiny.yaml without DATA_DIR, v1_image_base.yaml (ViT-B/16, Meta's
base_imagenet_d2v1 recipe: 2048 images per update, 16 GPUs x 128) with it.

Checkpoints go to --save-dir (default ./checkpoints/image_tiny or ./checkpoints/image_base,
with --v1 ./checkpoints/v1_image_tiny or ./checkpoints/v1_image_base);
re-running the same command resumes from DIR/checkpoint_last.pt.

Options:
  --gpus N           GPUs to train on per machine (default: all visible; DATA_DIR runs only);
                     with --cpu: N training processes on the CPU (gloo; default 1)
  --update-freq K    gradient accumulation steps (default: see above)
  --save-dir DIR     checkpoint directory
  --config NAME      config under config/pretraining (default: image_tiny without DATA_DIR,
                     image_base with it; with --v1 v1_image_tiny / v1_image_base)
  --v1               data2vec 1.0 vision instead of 2.0 (see above)
  --cpu              train on the CPU (single process) even with a DATA_DIR
$(d2v_launch_help)
  -h, --help         show this help
  key=value          passed to fairseq-hydra-train, e.g. optimization.max_update=1000
                     dataset.batch_size=32 model.modalities.image.mask_prob=0.75

Environment:
  FAIRSEQ_HYDRA_TRAIN  the fairseq-hydra-train program (default: the one on PATH)
  PYTHON               the Python that writes the digits (default: the one beside
                       fairseq-hydra-train, else python)
USAGE
}

log() { echo "[train_image] $*"; }
die() { echo "[train_image] error: $*" >&2; exit 1; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$script_dir/lib/common.sh"
config_dir="$(d2v_config_dir "$script_dir")"

# --v1 is this script's own switch; the shared parser reads the rest
V1=0
rest=()
for arg in "$@"; do
    if [[ "$arg" == "--v1" ]]; then V1=1; else rest+=("$arg"); fi
done
prefix=""
if [[ $V1 -eq 1 ]]; then prefix="v1_"; fi
d2v_parse_pretrain_args ${rest[@]+"${rest[@]}"}
d2v_find_hydra_train

# Writes scikit-learn's digits as DIR/{train,val}/<digit>/<n>.png (every 10th image to val).
write_digits() {
    local out="$1"
    if [[ -f "$out/.complete" ]]; then
        log "using the digits images in $out"
        return
    fi
    log "writing scikit-learn's digits as 32x32 PNGs into $out"
    "$PYTHON" - "$out" <<'PY' || die "could not write the digits images (needs scikit-learn and pillow: pip install scikit-learn pillow)"
import os, shutil, sys
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

out = sys.argv[1]
tmp = out + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
digits = load_digits()
for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    split = "val" if i % 10 == 0 else "train"
    folder = os.path.join(tmp, split, str(label))
    os.makedirs(folder, exist_ok=True)
    gray = Image.fromarray((image * (255.0 / 16.0)).astype(np.uint8))  # values 0..16
    gray.resize((32, 32), Image.BICUBIC).convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
shutil.rmtree(out, ignore_errors=True)
os.rename(tmp, out)
open(os.path.join(out, ".complete"), "w").close()
print(f"[train_image] wrote {len(digits.images)} images", flush=True)
PY
}

args=()
if [[ -z "$DATA" ]]; then
    CONFIG="${CONFIG:-${prefix}image_tiny}"
    DATA="data/digits_images"
    write_digits "$DATA"
    CPU=1
    QUICK_START=1
else
    CONFIG="${CONFIG:-${prefix}image_base}"
    [[ -d "$DATA/train" ]] || die "$DATA/train does not exist: expected $DATA/train/<class>/<image> (see datasets/imagenet/prepare.sh)"
fi
d2v_resolve_pretrain_paths "$config_dir"

if [[ $CPU -eq 0 ]]; then
    d2v_detect_gpus
    GPUS="${GPUS:-$VISIBLE_GPUS}"
    [[ "$GPUS" -le "$VISIBLE_GPUS" ]] || die "--gpus $GPUS but only $VISIBLE_GPUS GPU(s) visible (multi-node runs: pass fairseq's distributed_training.* overrides)"
fi
# the recipe's batch: 16 GPUs x 16 images (1.0: 16 GPUs x 128 images, also 16 GPUs)
d2v_add_pretrain_device_args args 16
d2v_run_pretraining "$config_dir" "${args[@]}"
# quick start: the training curves, and a linear probe of the digits' classes (train/ vs val/)
if [[ "${QUICK_START:-0}" -eq 1 ]]; then
    d2v_quick_start_checks log "$SAVE_DIR" --data "$DATA"
fi
