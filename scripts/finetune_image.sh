#!/usr/bin/env bash
# Image classification: fine-tune (and linear-probe) a data2vec image encoder. Run with --help.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [CHECKPOINT [DATA_DIR]] [options] [hydra overrides key=value ...]

Without arguments: the offline quick start on scikit-learn's digits (CPU, no download).
scripts/train_image.sh writes the digits as an ImageFolder (data/digits_images) and pretrains
the tiny data2vec 2.0 model (checkpoints/image_tiny) unless that checkpoint exists; then this
script fine-tunes it (config/finetuning/image/tiny.yaml), linear-probes it
(linear_probe_tiny.yaml), runs the same fine-tuning from a randomly initialised encoder of the
same architecture (the untrained baseline) and prints the three validation accuracies.

With CHECKPOINT (a data2vec image checkpoint: 2.0 or 1.0, ours or Meta's, e.g.
base_imagenet.pt) and DATA_DIR (DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/*, e.g. from
datasets/imagenet/prepare.sh): fine-tunes with config/finetuning/image/vit_base.yaml (Meta's
data2vec 2.0 ViT-B recipe, 16 GPUs x 32 images; update_freq = 16 / GPUs unless given), or
linear-probes with --linear-probe, on all visible GPUs. With CHECKPOINT only, DATA_DIR is
data/digits_images and the tiny CPU configs are used.

The best checkpoint (validation top-1 accuracy) is SAVE_DIR/checkpoint_best.pt; classify
images with: d2v-classify SAVE_DIR/checkpoint_best.pt IMAGE... [--top-k K]

Options:
  --config NAME      config under config/finetuning/image (default: tiny on the digits,
                     vit_base otherwise; vit_large for large_imagenet.pt)
  --linear-probe     linear probing only (linear_probe_tiny / linear_probe_base)
  --no-baseline      quick start: skip the randomly initialised baseline run
  --gpus N           GPUs to train on (default: all visible; DATA_DIR runs only)
  --update-freq K    gradient accumulation steps (default: keeps the recipe's batch)
  --save-dir DIR     checkpoint directory (default: checkpoints/image_finetune/<config>)
  --cpu              train on the CPU (single process) even with a DATA_DIR
  -h, --help         show this help
  key=value          passed to fairseq-hydra-train, e.g. optimization.max_update=1000
                     model.layer_decay=0.75 criterion.mixup=0 dataset.batch_size=64

Environment:
  FAIRSEQ_HYDRA_TRAIN  the fairseq-hydra-train program (default: the one on PATH)
  PYTHON               the Python used to read the logs (default: the one beside fairseq-hydra-train)
USAGE
}

log() { echo "[finetune_image] $*"; }
die() { echo "[finetune_image] error: $*" >&2; exit 1; }
log_err() { log "$@" >&2; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$script_dir/lib/common.sh"
config_dir="$(d2v_config_dir "$script_dir")"

CHECKPOINT="" DATA="" CONFIG="" SAVE_DIR="" GPUS="" UPDATE_FREQ="" CPU=0 LINEAR=0 BASELINE=1
overrides=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) d2v_need_value "$@"; CONFIG="$2"; shift 2 ;;
        --save-dir) d2v_need_value "$@"; SAVE_DIR="$2"; shift 2 ;;
        --gpus) d2v_need_value "$@"; GPUS="$2"; shift 2 ;;
        --update-freq) d2v_need_value "$@"; UPDATE_FREQ="$2"; shift 2 ;;
        --linear-probe) LINEAR=1; shift ;;
        --no-baseline) BASELINE=0; shift ;;
        --cpu) CPU=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *=*) overrides+=("$1"); shift ;;
        *)
            if [[ -z "$CHECKPOINT" ]]; then CHECKPOINT="$1"
            elif [[ -z "$DATA" ]]; then DATA="$1"
            else die "unexpected argument '$1' (see --help)"; fi
            shift ;;
    esac
done
[[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$GPUS'"
[[ -z "$UPDATE_FREQ" || "$UPDATE_FREQ" =~ ^[1-9][0-9]*$ ]] || die "--update-freq must be a positive integer, got '$UPDATE_FREQ'"
d2v_find_hydra_train

QUICK=0
if [[ -z "$DATA" ]]; then
    QUICK=1
    DATA="data/digits_images"
    CPU=1
fi
if [[ -z "$CHECKPOINT" ]]; then
    CHECKPOINT="checkpoints/image_tiny/checkpoint_last.pt"
    if [[ ! -f "$CHECKPOINT" || ! -f "$DATA/.complete" ]]; then
        log "no pretrained tiny model yet: running scripts/train_image.sh (digits + image_tiny pretraining)"
        bash "$script_dir/train_image.sh" --save-dir checkpoints/image_tiny
    fi
fi
[[ -f "$CHECKPOINT" ]] || die "checkpoint $CHECKPOINT does not exist"
[[ -d "$DATA/train" && -d "$DATA/val" ]] || die "$DATA must hold train/<class>/<image> and val/<class>/<image> (see datasets/imagenet/prepare.sh)"
CHECKPOINT="$(cd "$(dirname "$CHECKPOINT")" && pwd)/$(basename "$CHECKPOINT")"
DATA="$(cd "$DATA" && pwd)"

if [[ -z "$CONFIG" ]]; then
    if [[ $QUICK -eq 1 ]]; then CONFIG=tiny
    elif [[ "$(basename "$CHECKPOINT")" == large* ]]; then CONFIG=vit_large
    else CONFIG=vit_base; fi
fi
probe_config=linear_probe_tiny
[[ $QUICK -eq 1 ]] || probe_config=linear_probe_base
for c in "$CONFIG" "$probe_config"; do
    [[ -f "$config_dir/finetuning/image/$c.yaml" ]] || die "no config $config_dir/finetuning/image/$c.yaml"
done

device_args=()
if [[ $CPU -eq 1 ]]; then
    d2v_add_cpu_args device_args "$UPDATE_FREQ"
else
    d2v_detect_gpus
    GPUS="${GPUS:-$VISIBLE_GPUS}"
    [[ "$GPUS" -le "$VISIBLE_GPUS" ]] || die "--gpus $GPUS but only $VISIBLE_GPUS GPU(s) visible"
    device_args+=(common.cpu=false)
    d2v_add_gpu_args device_args "$GPUS" "${UPDATE_FREQ:-$(d2v_default_update_freq 16 "$GPUS")}"
fi

# run NAME CONFIG SAVE_DIR [override ...]: one fine-tuning run; prints its best validation accuracy
run() {
    local name="$1" config="$2" save="$3"
    shift 3
    mkdir -p "$save"
    d2v_log_resume "$save" log_err
    log_err "$name: finetuning/image/$config -> $save"
    d2v_hydra_train "$TRAIN" "$config_dir" "finetuning/image/$config" \
        "task.data=$DATA" "model.model_path=$CHECKPOINT" "checkpoint.save_dir=$save" \
        "${device_args[@]}" "$@" ${overrides[@]+"${overrides[@]}"} 2>&1 | tee "$save/train.log" \
        | { grep --line-buffered -E "\[(train_inner|val)\]|valid on|Error" >&2 || true; } \
        || die "$name failed (log: $save/train.log)"
    best_accuracy "$save/train.log"
}

# best_accuracy LOG: the best validation top-1 accuracy (and its top-5) of a run's log
best_accuracy() {
    "$PYTHON" - "$1" <<'PY'
import json, re, sys
best = None
for line in open(sys.argv[1], errors="replace"):
    if "valid on" not in line:
        continue
    m = re.search(r"\{.*\}", line)
    vals = json.loads(m.group(0)) if m else dict(re.findall(r"\| (\w+) ([-0-9.]+)", line))
    acc = vals.get("valid_accuracy", vals.get("accuracy"))
    top5 = vals.get("valid_top5", vals.get("top5"))
    if acc is not None and (best is None or float(acc) > best[0]):
        best = (float(acc), float(top5) if top5 is not None else float("nan"))
if best is None:
    sys.exit(f"no validation accuracy in {sys.argv[1]}")
print(f"{best[0]:.2f} {best[1]:.2f}")
PY
}

root="${SAVE_DIR:-checkpoints/image_finetune}"
results=()
if [[ $LINEAR -eq 0 ]]; then
    acc="$(run "fine-tuning" "$CONFIG" "$root/$CONFIG" | tail -1)"
    results+=("fine-tuned ($CONFIG)|$acc|$root/$CONFIG/checkpoint_best.pt")
fi
if [[ $LINEAR -eq 1 || $QUICK -eq 1 ]]; then
    acc="$(run "linear probe" "$probe_config" "$root/$probe_config" | tail -1)"
    results+=("linear probe ($probe_config)|$acc|$root/$probe_config/checkpoint_best.pt")
fi
if [[ $QUICK -eq 1 && $BASELINE -eq 1 && $LINEAR -eq 0 ]]; then
    acc="$(run "untrained baseline" "$CONFIG" "$root/${CONFIG}_random_init" model.no_pretrained_weights=true | tail -1)"
    results+=("untrained encoder, fine-tuned ($CONFIG)|$acc|$root/${CONFIG}_random_init/checkpoint_best.pt")
fi

log "validation accuracy on $DATA/val (best checkpoint):"
printf '%-42s %8s %8s  %s\n' "run" "top-1 %" "top-5 %" "checkpoint"
for r in "${results[@]}"; do
    IFS='|' read -r name acc ckpt <<<"$r"
    read -r top1 top5 <<<"$acc"
    printf '%-42s %8s %8s  %s\n' "$name" "$top1" "$top5" "$ckpt"
done
log "classify images with: d2v-classify ${results[0]##*|} IMAGE... --top-k 5"
