#!/usr/bin/env bash
# Fine-tune a pretrained data2vec text checkpoint on GLUE tasks and print the dev metrics.
# Run with --help for the details.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPT_DIR/lib/common.sh"
REPO="$(d2v_repo_dir "$SCRIPT_DIR")"
GLUE_TASKS=(cola mnli mrpc qnli qqp rte sst_2 sts_b wnli)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options] TASK CHECKPOINT [hydra overrides ...]

Fine-tunes CHECKPOINT (a data2vec text checkpoint: ours, e.g. checkpoints/text_base/checkpoint_last.pt,
or Meta's nlp_base.pt) with config/finetuning/glue/TASK.yaml through fairseq-hydra-train, then
prints the dev metric of the best checkpoint (GLUE's metric: CoLA Matthews corr., STS-B
Pearson/Spearman, MRPC/QQP accuracy and F1, MNLI accuracy on matched and mismatched, accuracy
otherwise; all in percent) and a markdown table of the results.

  TASK        cola mnli mrpc qnli qqp rte sst_2 sts_b wnli, 'all' (the nine, one after the
              other), or another config of config/finetuning/glue (e.g. tiny, for CPU tests)
  CHECKPOINT  the pretrained checkpoint (model.model_path)
  overrides   extra hydra overrides, e.g. dataset.batch_size=8 common.fp16=false

Options:
  --data DIR        data root written by datasets/glue/prepare.sh (DIR/TASK is used), or the
                    directory of one task itself (holding input0/). Default: data/glue/bin
  --save-dir DIR    checkpoints and logs go to DIR/TASK (DIR/TASK/lr_LR with --lr-sweep);
                    default: checkpoints/glue. A directory holding checkpoint_last.pt is
                    resumed (fairseq's behaviour): delete it to start over.
  --lr-sweep "A B"  fine-tune once per learning rate (optimization.lr) and report each run
                    and the best one per task
  -h, --help        this help

Environment: FAIRSEQ_HYDRA_TRAIN (default: fairseq-hydra-train) and PYTHON (default: python)
select the programs used.

Each run writes SAVE/train.log (fairseq's log, json format) and SAVE/result.json. The dev
value reported is the first validation subset's checkpoint.best_checkpoint_metric at its
best validation; other metrics and subsets (MNLI mismatched = valid1) come from that same
validation.

Examples:
  bash scripts/finetune_glue.sh rte ../shared/compat/v2_text.checkpoint.pt --data data/glue/bin
  bash scripts/finetune_glue.sh all nlp_base.pt --lr-sweep "1e-5 2e-5 4e-5"
EOF
}

die() { echo "error: $*" >&2; exit 1; }

DATA="data/glue/bin"
SAVE_ROOT="checkpoints/glue"
LRS=""
POSITIONAL=()
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data) DATA="${2:?--data needs a value}"; shift 2 ;;
        --save-dir) SAVE_ROOT="${2:?--save-dir needs a value}"; shift 2 ;;
        --lr-sweep) LRS="${2:?--lr-sweep needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --*) usage >&2; die "unknown option: $1" ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) POSITIONAL+=("$1"); shift ;;
    esac
done
[[ ${#POSITIONAL[@]} -eq 2 ]] || { usage >&2; die "expected TASK and CHECKPOINT"; }
TASK="${POSITIONAL[0]}"
CHECKPOINT="${POSITIONAL[1]}"
[[ -f "$CHECKPOINT" ]] || die "checkpoint $CHECKPOINT not found"
CHECKPOINT="$(cd "$(dirname "$CHECKPOINT")" && pwd)/$(basename "$CHECKPOINT")"
TRAIN="${FAIRSEQ_HYDRA_TRAIN:-fairseq-hydra-train}"
PYTHON="${PYTHON:-python}"
command -v "$TRAIN" >/dev/null || die "$TRAIN not found (activate the venv with fairseq)"

if [[ "$TASK" == all ]]; then
    TASKS=("${GLUE_TASKS[@]}")
else
    [[ -f "$REPO/config/finetuning/glue/$TASK.yaml" ]] || die "no config config/finetuning/glue/$TASK.yaml (tasks: ${GLUE_TASKS[*]}, all, tiny)"
    TASKS=("$TASK")
fi

data_dir() {  # data_dir TASK
    if [[ "$TASK" != all && -d "$DATA/input0" ]]; then
        echo "$DATA"
    else
        echo "$DATA/$1"
    fi
}

# summarize LOG HYDRA_CONFIG RESULT_JSON TASK LR: the dev metrics of the best validation
summarize() {
    "$PYTHON" - "$@" <<'PY'
import json, re, sys
import yaml

log_path, cfg_path, out_path, task, lr = sys.argv[1:6]
cfg = yaml.safe_load(open(cfg_path))
metric = cfg["checkpoint"]["best_checkpoint_metric"]
maximize = cfg["checkpoint"].get("maximize_best_checkpoint_metric", False)
subsets = str(cfg["dataset"].get("valid_subset", "valid")).split(",")
rows = {s: [] for s in subsets}
line_re = re.compile(r"\]\[(\w+)\]\[INFO\] - (\{.*\})\s*$")
for line in open(log_path, errors="replace"):
    m = line_re.search(line)
    if not m or m.group(1) not in rows:
        continue
    tag = m.group(1)
    stats = json.loads(m.group(2))
    rows[tag].append({k[len(tag) + 1:]: v for k, v in stats.items() if k.startswith(tag + "_")})

def number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

first = [r for r in rows[subsets[0]] if number(r.get(metric)) is not None]
if not first:
    sys.exit(f"no validation result with '{metric}' in {log_path}")
pick = max if maximize else min
best = pick(first, key=lambda r: number(r[metric]))
update = best.get("num_updates")
skip = {"loss", "wps", "wpb", "bsz", "num_updates"}
result = {
    "task": task, "lr": lr, "metric": metric, "value": number(best[metric]), "num_updates": number(update),
    "subsets": {},
}
for s in subsets:
    match = [r for r in rows[s] if r.get("num_updates") == update]
    if match:
        result["subsets"][s] = {k: number(v) for k, v in match[-1].items() if k not in skip and not k.startswith("best_")}
json.dump(result, open(out_path, "w"), indent=1)
details = "; ".join(f"{s}: " + ", ".join(f"{k}={v:g}" for k, v in vals.items()) for s, vals in result["subsets"].items())
print(f"dev {task}: {metric}={result['value']:g} at update {int(result['num_updates'] or 0)} ({details})")
PY
}

RESULTS=()
FAILED=0
for task in "${TASKS[@]}"; do
    data="$(data_dir "$task")"
    if [[ ! -d "$data/input0" ]]; then
        echo "error: $data/input0 not found: prepare the data with datasets/glue/prepare.sh (or pass --data)" >&2
        FAILED=1
        continue
    fi
    for lr in ${LRS:-default}; do
        save="$SAVE_ROOT/$task"
        extra=()
        if [[ "$lr" != default ]]; then
            save="$save/lr_$lr"
            extra+=("optimization.lr=[$lr]")
        fi
        mkdir -p "$save"
        echo "[finetune] $task (lr $lr) data=$data save_dir=$save"
        if ! d2v_hydra_train "$TRAIN" "$REPO/config" "finetuning/glue/$task" \
                "task.data=$data" "model.model_path=$CHECKPOINT" "checkpoint.save_dir=$save" \
                "${extra[@]}" "${OVERRIDES[@]}" 2>&1 | tee "$save/train.log"; then
            echo "error: fine-tuning $task (lr $lr) failed; see $save/train.log" >&2
            FAILED=1
            continue
        fi
        if summarize "$save/train.log" "$save/hydra/.hydra/config.yaml" "$save/result.json" "$task" "$lr"; then
            RESULTS+=("$save/result.json")
        else
            FAILED=1
        fi
    done
done

if [[ ${#RESULTS[@]} -gt 0 ]]; then
    "$PYTHON" - "${RESULTS[@]}" <<'PY'
import json, sys

results = [json.load(open(p)) for p in sys.argv[1:]]
best = {}
for r in results:
    if r["task"] not in best or r["value"] > best[r["task"]]["value"]:
        best[r["task"]] = r
print()
print("| task | metric | lr | dev | all dev metrics (percent) |")
print("| --- | --- | --- | --- | --- |")
for r in results:
    mark = " (best)" if sum(x["task"] == r["task"] for x in results) > 1 and best[r["task"]] is r else ""
    details = "; ".join(
        f"{s}: " + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()) for s, vals in r["subsets"].items()
    )
    print(f"| {r['task']} | {r['metric']} | {r['lr']} | {r['value']:.2f}{mark} | {details} |")
PY
fi
exit $FAILED
