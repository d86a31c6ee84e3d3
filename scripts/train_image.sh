#!/usr/bin/env bash
# data2vec 2.0 image pretraining. Run with --help for the details.
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

Checkpoints go to --save-dir (default ./checkpoints/image_tiny or ./checkpoints/image_base);
re-running the same command resumes from DIR/checkpoint_last.pt.

Options:
  --gpus N           GPUs to train on (default: all visible; DATA_DIR runs only)
  --update-freq K    gradient accumulation steps (default: see above)
  --save-dir DIR     checkpoint directory
  --config NAME      config under config/pretraining (default: image_tiny without DATA_DIR,
                     image_base with it)
  --cpu              train on the CPU (single process) even with a DATA_DIR
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
config_dir="$(cd "$script_dir/../config" && pwd)"

DATA=""
GPUS=""
UPDATE_FREQ=""
SAVE_DIR=""
CONFIG=""
CPU=0
overrides=()
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --gpus) need_value "$@"; GPUS="$2"; shift 2 ;;
        --update-freq) need_value "$@"; UPDATE_FREQ="$2"; shift 2 ;;
        --save-dir) need_value "$@"; SAVE_DIR="$2"; shift 2 ;;
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --cpu) CPU=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *=*) overrides+=("$1"); shift ;;
        *)
            [[ -z "$DATA" ]] || die "more than one data directory given ('$DATA', '$1')"
            DATA="$1"; shift ;;
    esac
done
[[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$GPUS'"
[[ -z "$UPDATE_FREQ" || "$UPDATE_FREQ" =~ ^[1-9][0-9]*$ ]] || die "--update-freq must be a positive integer, got '$UPDATE_FREQ'"

TRAIN="${FAIRSEQ_HYDRA_TRAIN:-$(command -v fairseq-hydra-train || true)}"
[[ -n "$TRAIN" && -x "$TRAIN" ]] \
    || die "fairseq-hydra-train not found: install the plugin (pip install -e . in this repository) and activate its environment"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON="$(dirname "$TRAIN")/python"
    [[ -x "$PYTHON" ]] || PYTHON=python
fi

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
    CONFIG="${CONFIG:-image_tiny}"
    DATA="data/digits_images"
    write_digits "$DATA"
    CPU=1
else
    CONFIG="${CONFIG:-image_base}"
    [[ -d "$DATA/train" ]] || die "$DATA/train does not exist: expected $DATA/train/<class>/<image> (see datasets/imagenet/prepare.sh)"
fi
DATA="$(cd "$DATA" && pwd)"
[[ -f "$config_dir/pretraining/$CONFIG.yaml" ]] || die "no config $config_dir/pretraining/$CONFIG.yaml"
SAVE_DIR="${SAVE_DIR:-checkpoints/$CONFIG}"
mkdir -p "$SAVE_DIR"
SAVE_DIR="$(cd "$SAVE_DIR" && pwd)"

if [[ $CPU -eq 1 ]]; then
    args+=(common.cpu=true common.fp16=false distributed_training.distributed_world_size=1)
    [[ -z "$UPDATE_FREQ" ]] || args+=("optimization.update_freq=[$UPDATE_FREQ]")
    log "training $CONFIG on the CPU"
else
    visible="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    [[ "$visible" =~ ^[0-9]+$ && "$visible" -gt 0 ]] || die "no CUDA GPU visible; use --cpu (slow) or run without DATA_DIR for the CPU smoke test"
    GPUS="${GPUS:-$visible}"
    [[ "$GPUS" -le "$visible" ]] || die "--gpus $GPUS but only $visible GPU(s) visible (multi-node runs: pass fairseq's distributed_training.* overrides)"
    UPDATE_FREQ="${UPDATE_FREQ:-$(( (16 + GPUS - 1) / GPUS ))}"
    args+=(common.cpu=false "distributed_training.distributed_world_size=$GPUS" "optimization.update_freq=[$UPDATE_FREQ]")
    log "training $CONFIG on $GPUS GPU(s), update_freq $UPDATE_FREQ"
fi
if [[ -f "$SAVE_DIR/checkpoint_last.pt" ]]; then
    log "resuming from $SAVE_DIR/checkpoint_last.pt"
fi

"$TRAIN" --config-dir "$config_dir" --config-name "pretraining/$CONFIG" \
    "task.data=$DATA" "checkpoint.save_dir=$SAVE_DIR" "${args[@]}" "${overrides[@]}"

log "done. checkpoints: $SAVE_DIR (checkpoint_last.pt)"
log "load the encoder with: python -c \"import d2v_plugin; enc = d2v_plugin.load_encoder('$SAVE_DIR/checkpoint_last.pt')\""
