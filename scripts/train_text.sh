#!/usr/bin/env bash
# data2vec text pretraining (2.0, or 1.0 with --v1), from an embedded corpus on a laptop CPU to OpenWebText on GPUs.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPT_DIR/lib/common.sh"
REPO_DIR="$(d2v_repo_dir "$SCRIPT_DIR")"
CONFIG_DIR="$REPO_DIR/config"
PYTHON="${PYTHON:-python}"

usage() {
  cat <<USAGE
Usage: bash scripts/train_text.sh [DATA_DIR] [options] [hydra.key=value ...]

Without DATA_DIR (quick start, no downloads):
  builds an English corpus from Python's bundled documentation (pydoc_data), trains a
  sentencepiece vocabulary, binarizes it and pretrains config/pretraining/text_tiny.yaml
  on the CPU (2 blocks, dim 64; 4000 updates, about 2 minutes on 2 cores).

With DATA_DIR (a directory with dict.txt and train/valid .bin/.idx, e.g. the bin/ output of
datasets/openwebtext/prepare.sh): pretrains config/pretraining/text_base.yaml on the GPUs.

With --v1: data2vec 1.0 text (data2vec_text) instead of 2.0: config/pretraining/v1_text_tiny.yaml
for the quick start, config/pretraining/v1_text_base.yaml (Meta's 1.0 recipe) with DATA_DIR.

Re-running the same command resumes from SAVE_DIR/checkpoint_last.pt.

Options:
  --v1               data2vec 1.0 text: the default config becomes pretraining/v1_text_tiny or
                     pretraining/v1_text_base, the default save dir checkpoints/v1_text_tiny or
                     checkpoints/v1_text_base
  --config NAME      config under config/ (default: pretraining/text_tiny without DATA_DIR,
                     pretraining/text_base with it; see --v1)
  --save-dir DIR     where checkpoints go (default: checkpoints/text_tiny or checkpoints/text_base under
                     the current directory; see --v1)
  --work-dir DIR     where the quick start writes its corpus and vocabulary (default: data/text_demo)
  --gpus N           GPUs to train on per machine (default: all visible; 0 = CPU)
  --cpu-procs N      with --gpus 0: N training processes on the CPU (gloo; default 1), to try
                     distributed training without GPUs
  --update-freq N    gradient accumulation steps (default with GPUs: 16 / gpus, so that the
                     base recipe keeps Meta's 16-GPU batch)
  --max-update N     stop after N updates (default: the config's)
$(d2v_launch_help)
  -h, --help         this help
Any argument of the form key=value is passed to fairseq-hydra-train as a hydra override,
e.g. dataset.batch_size=8 optimization.lr=[0.0001].
USAGE
}

say() { echo "== $*"; }

DATA=""; CONFIG=""; SAVE_DIR=""; V1=""; WORK_DIR="data/text_demo"; GPUS=""; UPDATE_FREQ=""; MAX_UPDATE=""; CPU_PROCS=1
OVERRIDES=()
d2v_init_launch_args
log() { say "$*"; }
die() { echo "train_text.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  d2v_launch_option "$@"
  if [[ $D2V_SHIFT -gt 0 ]]; then shift "$D2V_SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --v1) V1="v1_"; shift ;;
    --config) CONFIG="$2"; shift 2 ;;
    --save-dir) SAVE_DIR="$2"; shift 2 ;;
    --work-dir) WORK_DIR="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --update-freq) UPDATE_FREQ="$2"; shift 2 ;;
    --cpu-procs) d2v_need_value "$@"; CPU_PROCS="$2"; shift 2 ;;
    --max-update) MAX_UPDATE="$2"; shift 2 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    -*) echo "train_text.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [[ -n "$DATA" ]]; then echo "train_text.sh: only one DATA_DIR can be given (got '$DATA' and '$1')" >&2; exit 2; fi
      DATA="$1"; shift ;;
  esac
done
d2v_check_launch_args

if ! "$PYTHON" -c "import d2v_plugin" 2>/dev/null; then
  echo "train_text.sh: d2v_plugin is not importable with '$PYTHON'; install it first: pip install -e $REPO_DIR" >&2
  exit 1
fi

if [[ -z "$DATA" ]]; then
  CONFIG="${CONFIG:-pretraining/${V1}text_tiny}"
  SAVE_DIR="${SAVE_DIR:-checkpoints/${V1}text_tiny}"
  GPUS="${GPUS:-0}"
  say "quick start: embedded corpus (Python's documentation) -> sentencepiece -> binarized data in $WORK_DIR"
  "$PYTHON" -m d2v_plugin.prep.text --default-corpus --out "$WORK_DIR" --vocab-size 4000 --workers 2
  DATA="$WORK_DIR/bin"
  QUICK_START=1
else
  if [[ ! -f "$DATA/dict.txt" ]]; then
    echo "train_text.sh: $DATA has no dict.txt; pass the binarized directory (e.g. the bin/ output of datasets/openwebtext/prepare.sh)" >&2
    exit 1
  fi
  CONFIG="${CONFIG:-pretraining/${V1}text_base}"
  SAVE_DIR="${SAVE_DIR:-checkpoints/${V1}text_base}"
  if [[ -z "$GPUS" ]]; then
    GPUS="$(d2v_gpu_count)"
  fi
fi

ARGS=("task.data=$(cd "$DATA" && pwd)" "checkpoint.save_dir=$SAVE_DIR")
if [[ "$GPUS" == "0" ]]; then
  d2v_setup_launch ARGS "$CPU_PROCS" 1
  d2v_add_cpu_args ARGS "$UPDATE_FREQ" "$WORLD_SIZE_ARG"
else
  d2v_setup_launch ARGS "$GPUS" 0
  # the base recipe's batch: 16 GPUs
  if [[ -z "$UPDATE_FREQ" ]]; then UPDATE_FREQ="$(d2v_default_update_freq 16 "$WORLD_SIZE_ARG")"; fi
  d2v_add_gpu_args ARGS "$WORLD_SIZE_ARG" "$UPDATE_FREQ"
fi
[[ -n "$MAX_UPDATE" ]] && ARGS+=("optimization.max_update=$MAX_UPDATE")

d2v_log_resume "$SAVE_DIR" say
TRAIN="${FAIRSEQ_HYDRA_TRAIN:-$(command -v fairseq-hydra-train || echo fairseq-hydra-train)}"
d2v_hydra_train "$TRAIN" "$CONFIG_DIR" "$CONFIG" "${ARGS[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}

cat <<DONE

== done. Checkpoints: $SAVE_DIR/checkpoint_last.pt (training state, EMA teacher under _ema)
Next:
  - continue training: run the same command again (it resumes), e.g. with --max-update N
  - features in Python:
      import d2v_plugin, torch
      enc = d2v_plugin.load_encoder("$SAVE_DIR/checkpoint_last.pt")
      x = enc.extract_features(tokens, padding_mask=None)["x"]   # (B, T, C)
  - real data: datasets/openwebtext/prepare.sh --out data/owt, then
      bash scripts/train_text.sh data/owt/bin
DONE
# quick start: the training curves, and a linear probe of which documentation topic a held-out paragraph is from
if [[ "${QUICK_START:-0}" -eq 1 ]]; then
  d2v_quick_start_checks say "$SAVE_DIR" --data "$WORK_DIR"
fi
