#!/usr/bin/env bash
# Fine-tune a pretrained data2vec text checkpoint on SQuAD v1.1 / v2.0 and print the official evaluation.
# Run with --help for the details.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPT_DIR/lib/common.sh"
REPO="$(d2v_repo_dir "$SCRIPT_DIR")"

usage() {
    cat <<EOF
Usage: $(basename "$0") [options] VERSION CHECKPOINT [hydra overrides ...]

Fine-tunes CHECKPOINT (a data2vec text checkpoint: ours or Meta's nlp_base.pt) on SQuAD with
config/finetuning/squad/v1.yaml (VERSION 1.1) or v2.yaml (VERSION 2.0) through
fairseq-hydra-train. Validation on the dev set writes SAVE/predictions.json (question id ->
answer) and SAVE/null_odds.json (no-answer scores); at the end the script evaluates them with
d2v-squad-eval (the official SQuAD rules; for 2.0 with --na-prob-file SAVE/null_odds.json)
and prints that JSON on stdout. Training output goes to stderr and SAVE/train.log.

  VERSION     1.1 or 2.0
  CHECKPOINT  the pretrained checkpoint (model.model_path)
  overrides   hydra overrides; the tokenizer of the checkpoint is required:
                GPT-2 BPE (Meta's checkpoints): task.dict_path=DIR/dict.txt, with encoder.json and
                  vocab.bpe beside it (or task.gpt2_encoder_json=... task.gpt2_vocab_bpe=...)
                sentencepiece (ours): task.bpe=sentencepiece task.dict_path=DICT
                  task.sentencepiece_model=MODEL

Options:
  --data DIR        SQuAD files from datasets/squad/prepare.sh (default: data/squad)
  --save-dir DIR    checkpoints, predictions and logs (default: checkpoints/squad_vVERSION).
                    A directory holding checkpoint_last.pt is resumed (fairseq's behaviour).
  --config NAME     config under config/ (default: finetuning/squad/v1 or v2; e.g.
                    finetuning/squad/tiny for a CPU smoke test)
  -h, --help        this help

Environment: FAIRSEQ_HYDRA_TRAIN (default: fairseq-hydra-train) and PYTHON (default: python)
select the programs used.

Example:
  bash datasets/squad/prepare.sh --out data/squad --version 2.0
  bash scripts/finetune_squad.sh 2.0 nlp_base.pt task.dict_path=gpt2_bpe/dict.txt
EOF
}

die() { echo "error: $*" >&2; exit 1; }

DATA="data/squad"
SAVE_DIR=""
CONFIG=""
POSITIONAL=()
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data) DATA="${2:?--data needs a value}"; shift 2 ;;
        --save-dir) SAVE_DIR="${2:?--save-dir needs a value}"; shift 2 ;;
        --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES+=("$@"); break ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) POSITIONAL+=("$1"); shift ;;
    esac
done
[[ ${#POSITIONAL[@]} -eq 2 ]] || die "expected VERSION and CHECKPOINT (see --help)"
VERSION="${POSITIONAL[0]}"
CHECKPOINT="${POSITIONAL[1]}"
case "$VERSION" in
    1.1|v1|v1.1) VERSION=1.1; V2=false; CONFIG="${CONFIG:-finetuning/squad/v1}" ;;
    2.0|v2|v2.0) VERSION=2.0; V2=true; CONFIG="${CONFIG:-finetuning/squad/v2}" ;;
    *) die "VERSION must be 1.1 or 2.0, got '$VERSION'" ;;
esac
[[ -f "$CHECKPOINT" ]] || die "checkpoint $CHECKPOINT does not exist"
[[ -d "$DATA" ]] || die "SQuAD directory $DATA does not exist; run: bash $REPO/datasets/squad/prepare.sh --out $DATA --version $VERSION"
[[ -f "$REPO/config/$CONFIG.yaml" ]] || die "no config $REPO/config/$CONFIG.yaml"
SAVE_DIR="${SAVE_DIR:-checkpoints/squad_v$VERSION}"
PYTHON="${PYTHON:-python}"
TRAIN="${FAIRSEQ_HYDRA_TRAIN:-fairseq-hydra-train}"
mkdir -p "$SAVE_DIR"
rm -f "$SAVE_DIR/predictions.json" "$SAVE_DIR/null_odds.json"

echo "== fine-tuning $CHECKPOINT on SQuAD $VERSION ($CONFIG) into $SAVE_DIR" >&2
rc=0
d2v_hydra_train "$TRAIN" "$REPO/config" "$CONFIG" \
    "task.data=$DATA" "task.version_2_with_negative=$V2" "model.model_path=$CHECKPOINT" \
    "checkpoint.save_dir=$SAVE_DIR" "${OVERRIDES[@]}" 2>&1 | tee "$SAVE_DIR/train.log" >&2 || rc=$?
[[ $rc -eq 0 ]] || die "training failed (exit $rc); see $SAVE_DIR/train.log"
[[ -f "$SAVE_DIR/predictions.json" ]] \
    || die "no $SAVE_DIR/predictions.json: validation did not run to the end (dataset.disable_validation or max_valid_steps set?)"

# the dev file the run validated on, from the run's own resolved config
DEV_FILE="$("$PYTHON" - "$SAVE_DIR/hydra/.hydra/config.yaml" <<'PY'
import os, sys
from omegaconf import OmegaConf
task = OmegaConf.load(sys.argv[1]).task
print(os.path.join(str(task.data), str(task.valid_file)))
PY
)" || die "cannot read the run's config $SAVE_DIR/hydra/.hydra/config.yaml"

EVAL_ARGS=("$DEV_FILE" "$SAVE_DIR/predictions.json" --version "$VERSION" --out-file "$SAVE_DIR/eval_official.json")
if [[ "$VERSION" == 2.0 ]]; then
    EVAL_ARGS+=(--na-prob-file "$SAVE_DIR/null_odds.json")
fi
echo "== SQuAD $VERSION evaluation of $SAVE_DIR/predictions.json on $DEV_FILE" >&2
# d2v_plugin/squad_eval.py (what d2v-squad-eval runs) loaded on its own: no torch/fairseq import
"$PYTHON" -c '
import importlib.util, sys
spec = importlib.util.spec_from_file_location("d2v_squad_eval", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[2:]))
' "$REPO/d2v_plugin/squad_eval.py" "${EVAL_ARGS[@]}" || die "evaluation failed"
"$PYTHON" -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1])), indent=2))' "$SAVE_DIR/eval_official.json"
