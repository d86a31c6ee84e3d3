#!/usr/bin/env bash
# CTC fine-tuning of a data2vec speech checkpoint (speech recognition). Run with --help for the details.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [SPLIT CHECKPOINT] [options] [hydra overrides key=value ...]

Without SPLIT and CHECKPOINT: a CPU quick start that needs no download. The speech corpus
that scripts/train_audio.sh synthesizes with espeak-ng (data/speech_demo: 40 sentences in 5
voices, transcripts in its utterances.tsv) is reused, or built by running train_audio.sh,
which also pretrains the tiny data2vec 2.0 model (checkpoints/audio_tiny) unless
--pretrained is given. The corpus is split by voice (train: 4 voices, dev: en-gb-x-rp, the
same sentences in an unseen voice) into data/speech_demo_asr; then the untrained baseline
(the pretrained encoder with a fresh CTC head) is scored, config/finetuning/asr/tiny.yaml
fine-tunes CTC on the CPU, and the dev WER / CER of checkpoint_best.pt is printed next to
the baseline's.

With SPLIT CHECKPOINT: Meta's recipe config/finetuning/asr/SPLIT_base.yaml (SPLIT: 10m, 1h,
10h, 100h, 960h; or any config name under config/finetuning/asr, e.g. tiny) on the data
that datasets/librispeech/prepare.sh writes, on GPUs; CHECKPOINT is the pretrained model
(ours or Meta's, data2vec 1.0 or 2.0). The recipes' batch is 2 GPUs x update_freq 4 (960h:
8 GPUs x 1); unless --update-freq is given the script keeps it on the GPUs it has. At the
end the validation subset is transcribed with d2v-transcribe and its WER printed.

Options:
  --data DIR         fine-tuning data: SPLIT.tsv, SPLIT.ltr, dict.ltr.txt (default:
                     data/speech_demo_asr for the quick start, data/librispeech otherwise)
  --pretrained CKPT  quick start: fine-tune CKPT instead of pretraining checkpoints/audio_tiny
  --save-dir DIR     checkpoint directory (default checkpoints/asr/tiny_demo or
                     checkpoints/asr/SPLIT); a directory with checkpoint_last.pt is resumed
  --gpus N           GPUs to train on (default: all visible; SPLIT runs only)
  --update-freq K    gradient accumulation steps (default: see above)
  --cpu              train on the CPU (single process) even with SPLIT
  --lm ARPA          also decode the dev set with this KenLM ARPA model (needs flashlight-text)
  -h, --help         show this help
  key=value          passed to fairseq-hydra-train, e.g. optimization.max_update=500

Environment:
  FAIRSEQ_HYDRA_TRAIN  the fairseq-hydra-train program (default: the one on PATH)
  PYTHON               the Python with d2v_plugin (default: the one beside fairseq-hydra-train)
USAGE
}

log() { echo "[finetune_asr] $*"; }
die() { echo "[finetune_asr] error: $*" >&2; exit 1; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$script_dir/lib/common.sh"
config_dir="$(d2v_config_dir "$script_dir")"

SPLIT="" CKPT="" DATA="" PRETRAINED="" SAVE_DIR="" GPUS="" UPDATE_FREQ="" CPU=0 LM=""
overrides=()
positional=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data) d2v_need_value "$@"; DATA="$2"; shift 2 ;;
        --pretrained) d2v_need_value "$@"; PRETRAINED="$2"; shift 2 ;;
        --save-dir) d2v_need_value "$@"; SAVE_DIR="$2"; shift 2 ;;
        --gpus) d2v_need_value "$@"; GPUS="$2"; shift 2 ;;
        --update-freq) d2v_need_value "$@"; UPDATE_FREQ="$2"; shift 2 ;;
        --cpu) CPU=1; shift ;;
        --lm) d2v_need_value "$@"; LM="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *=*) overrides+=("$1"); shift ;;
        *) positional+=("$1"); shift ;;
    esac
done
case ${#positional[@]} in
    0) ;;
    2) SPLIT="${positional[0]}"; CKPT="${positional[1]}" ;;
    *) die "give both SPLIT and CHECKPOINT, or neither (the quick start); got: ${positional[*]}" ;;
esac
[[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$GPUS'"
[[ -z "$UPDATE_FREQ" || "$UPDATE_FREQ" =~ ^[1-9][0-9]*$ ]] || die "--update-freq must be a positive integer, got '$UPDATE_FREQ'"
[[ -z "$LM" || -f "$LM" ]] || die "--lm: $LM does not exist"
d2v_find_hydra_train
TRANSCRIBE="$(dirname "$TRAIN")/d2v-transcribe"
[[ -x "$TRANSCRIBE" ]] || TRANSCRIBE="d2v-transcribe"

args=()
if [[ -z "$SPLIT" ]]; then
    # ---- quick start ----------------------------------------------------------------
    CONFIG="tiny"
    corpus="data/speech_demo"
    if [[ -z "$PRETRAINED" || ! -f "$corpus/utterances.tsv" ]]; then
        log "pretraining the tiny model on the synthesized corpus (scripts/train_audio.sh)"
        FAIRSEQ_HYDRA_TRAIN="$TRAIN" PYTHON="$PYTHON" bash "$script_dir/train_audio.sh"
    fi
    [[ -f "$corpus/utterances.tsv" ]] || die "$corpus/utterances.tsv is missing: delete $corpus and run scripts/train_audio.sh again"
    CKPT="${PRETRAINED:-checkpoints/audio_tiny/checkpoint_last.pt}"
    DATA="${DATA:-data/speech_demo_asr}"
    SAVE_DIR="${SAVE_DIR:-checkpoints/asr/tiny_demo}"
    log "writing the fine-tuning split of $corpus into $DATA (dev: the voice en-gb-x-rp)"
    "$PYTHON" - "$corpus" "$DATA" <<'PY' || die "could not write $DATA"
import csv, os, sys
corpus, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
with open(os.path.join(corpus, "train.tsv")) as f:
    root = f.readline().strip()
    lengths = dict(line.rstrip("\n").split("\t") for line in f if line.strip())
with open(os.path.join(corpus, "utterances.tsv")) as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
def words(s):
    return " ".join("".join(c for c in s.upper() if c.isalpha() or c in " '").split())
splits = {"train": [r for r in rows if r["voice"] != "en-gb-x-rp"], "valid": [r for r in rows if r["voice"] == "en-gb-x-rp"]}
letters = set()
for split, items in splits.items():
    with open(os.path.join(out, f"{split}.tsv"), "w") as tsv, open(os.path.join(out, f"{split}.wrd"), "w") as wrd, \
            open(os.path.join(out, f"{split}.ltr"), "w") as ltr:
        tsv.write(os.path.abspath(root) + "\n")
        for r in items:
            w = words(r["sentence"])
            tsv.write(f"{r['path']}\t{lengths[r['path']]}\n")
            wrd.write(w + "\n")
            ltr.write(" ".join(w.replace(" ", "|")) + " |\n")
            letters |= set(w.replace(" ", "|"))
with open(os.path.join(out, "dict.ltr.txt"), "w") as f:
    f.write("".join(f"{c} 1\n" for c in sorted(letters)))
print(f"[finetune_asr] {len(splits['train'])} training and {len(splits['valid'])} dev utterances, {len(letters)} letters")
PY
    CPU=1
else
    # ---- a recipe ---------------------------------------------------------------------
    CONFIG="$SPLIT"
    [[ -f "$config_dir/finetuning/asr/$CONFIG.yaml" ]] || CONFIG="${SPLIT}_base"
    [[ -f "$config_dir/finetuning/asr/$CONFIG.yaml" ]] \
        || die "no config finetuning/asr/$SPLIT.yaml or ${SPLIT}_base.yaml (splits: 10m 1h 10h 100h 960h, or tiny)"
    DATA="${DATA:-data/librispeech}"
    SAVE_DIR="${SAVE_DIR:-checkpoints/asr/$SPLIT}"
fi
[[ -f "$CKPT" ]] || die "checkpoint $CKPT does not exist"
[[ -f "$DATA/dict.ltr.txt" ]] || die "$DATA/dict.ltr.txt does not exist: prepare the data with datasets/librispeech/prepare.sh"
DATA="$(cd "$DATA" && pwd)"
CKPT="$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")"
mkdir -p "$SAVE_DIR"
SAVE_DIR="$(cd "$SAVE_DIR" && pwd)"
valid_subset="$("$PYTHON" -c "import sys; from omegaconf import OmegaConf; print(OmegaConf.load(sys.argv[1]).dataset.get('valid_subset', 'valid'))" "$config_dir/finetuning/asr/$CONFIG.yaml")"
for o in ${overrides[@]+"${overrides[@]}"}; do
    [[ "${o%%=*}" == "dataset.valid_subset" ]] && valid_subset="${o#*=}"
done

if [[ $CPU -eq 1 ]]; then
    d2v_add_cpu_args args "$UPDATE_FREQ"
else
    if [[ -z "$GPUS" ]]; then
        d2v_detect_gpus
        GPUS="$VISIBLE_GPUS"
    fi
    recipe="$("$PYTHON" -c "import sys; from omegaconf import OmegaConf; c = OmegaConf.load(sys.argv[1]); print(c.distributed_training.distributed_world_size * c.optimization.get('update_freq', [1])[0])" "$config_dir/finetuning/asr/$CONFIG.yaml")"
    d2v_add_gpu_args args "$GPUS" "${UPDATE_FREQ:-$(d2v_default_update_freq "$recipe" "$GPUS")}"
fi

if [[ -z "$SPLIT" ]]; then
    log "untrained baseline: $CKPT with a fresh CTC head, on $DATA/valid.tsv"
    baseline="$("$PYTHON" -m d2v_plugin.asr.baseline "$CKPT" --data "$DATA" 2>/dev/null | tail -1)"
    log "$baseline"
fi
d2v_log_resume "$SAVE_DIR"
log "fine-tuning $CKPT with config/finetuning/asr/$CONFIG.yaml into $SAVE_DIR"
d2v_hydra_train "$TRAIN" "$config_dir" "finetuning/asr/$CONFIG" \
    "task.data=$DATA" "model.model_path=$CKPT" "checkpoint.save_dir=$SAVE_DIR" \
    ${args[@]+"${args[@]}"} ${overrides[@]+"${overrides[@]}"}

best="$SAVE_DIR/checkpoint_best.pt"
[[ -f "$best" ]] || die "no $best was written (did validation run? see the log above)"
log "transcribing $DATA/$valid_subset.tsv with $best"
result="$("$TRANSCRIBE" "$best" --manifest "$DATA/$valid_subset.tsv" --out "$SAVE_DIR/$valid_subset.hyp.tsv" 2>&1 | tail -1)"
log "dev ($valid_subset) fine-tuned: $result (transcripts: $SAVE_DIR/$valid_subset.hyp.tsv)"
if [[ -n "$LM" ]]; then
    lm_result="$("$TRANSCRIBE" "$best" --manifest "$DATA/$valid_subset.tsv" --lm "$LM" --out "$SAVE_DIR/$valid_subset.lm.hyp.tsv" 2>&1 | tail -1)"
    log "dev ($valid_subset) fine-tuned + $LM: $lm_result"
fi
if [[ -z "$SPLIT" ]]; then
    log "dev untrained baseline:   $baseline"
fi
