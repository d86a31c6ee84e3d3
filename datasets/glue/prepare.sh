#!/usr/bin/env bash
# Download, verify, tokenize and binarize the nine GLUE tasks for data2vec text fine-tuning.
# Run with --help for the details.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../lib/download.sh"

BASE_URL="https://dl.fbaipublicfiles.com"
ALL_TASKS="cola,mnli,mrpc,qnli,qqp,rte,sst_2,sts_b,wnli"

# Files per task (paths under BASE_URL: the URLs of the widely used download_glue_data.py,
# which fairseq's examples/roberta/README.glue.md points to).
declare -A TASK_FILES=(
    [cola]="glue/data/CoLA.zip"
    [sst_2]="glue/data/SST-2.zip"
    [mrpc]="senteval/senteval_data/msr_paraphrase_train.txt senteval/senteval_data/msr_paraphrase_test.txt glue/data/mrpc_dev_ids.tsv"
    [qqp]="glue/data/QQP-clean.zip"
    [sts_b]="glue/data/STS-B.zip"
    [mnli]="glue/data/MNLI.zip"
    [qnli]="glue/data/QNLIv2.zip"
    [rte]="glue/data/RTE.zip"
    [wnli]="glue/data/WNLI.zip"
)
# SHA-256 and size of each file, as recorded for these URLs in the Hugging Face `datasets`
# GLUE checksum file (datasets/glue/dataset_infos.json).
declare -A SHA256=(
    [CoLA.zip]="f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff 376971"
    [SST-2.zip]="d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa 7439277"
    [msr_paraphrase_train.txt]="60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89 1047044"
    [msr_paraphrase_test.txt]="a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784 441275"
    [mrpc_dev_ids.tsv]="971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7 6222"
    [QQP-clean.zip]="40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0 41696084"
    [STS-B.zip]="e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85 802872"
    [MNLI.zip]="e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633 312783507"
    [QNLIv2.zip]="e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5 10627589"
    [RTE.zip]="6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee 697150"
    [WNLI.zip]="ae0e8e4d16f4d46d4a0a566ec7ecceccfd3fbfaa4a7a4b4e02848c0f2561ac46 28999"
)
GPT2_FILES=(encoder.json vocab.bpe dict.txt)

usage() {
    cat <<EOF
Usage: $(basename "$0") --out DIR --tokenizer gpt2|spm:MODEL [options]

Prepares the nine GLUE tasks (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI; ~375 MB
of downloads, MNLI being 313 MB) for fine-tuning a data2vec text model:

  1. download  every task's files from $BASE_URL/glue/data/ (MRPC: the SentEval files
               from $BASE_URL/senteval/senteval_data/ and GLUE's mrpc_dev_ids.tsv) into
               DIR/download/, resuming partial downloads (*.part); gpt2 also fetches
               fairseq's GPT-2 BPE files (encoder.json, vocab.bpe, dict.txt) from
               $BASE_URL/fairseq/gpt2_bpe/ into DIR/gpt2_bpe/
  2. verify    each file's size and SHA-256 (see --no-verify); a bad file is moved to
               FILE.bad and the script stops with an error (re-running downloads it again)
  3. extract, tokenize and binarize with 'python -m d2v_plugin.prep.glue': archives are
               extracted into DIR/raw/, texts tokenized with the pretrained model's
               tokenizer and binarized with its dict.txt into
               DIR/bin/<task>/{input0,input1,label}  <- task.data of config/finetuning/glue/<task>
               (tasks: cola mnli mrpc qnli qqp rte sst_2 sts_b wnli; MNLI dev matched =
               valid, mismatched = valid1; STS-B scores divided by 5; test sets unlabelled)

Re-running skips finished downloads and tasks (DIR/bin/<task>/.done.json).
Needs: curl, sha256sum, a Python with fairseq (and sentencepiece for spm:).

Options:
  --out DIR            output directory (required; created)
  --tokenizer T        the tokenizer of the pretrained model (required):
                         gpt2       fairseq's GPT-2 BPE: the vocabulary of Meta's released
                                    data2vec text checkpoints (nlp_base.pt)
                         spm:MODEL  a sentencepiece model file, e.g. DIR/spm.model written by
                                    'python -m d2v_plugin.prep.text' for our own pretraining
  --dict FILE          the pretrained model's dict.txt (default: gpt2: the downloaded one;
                       spm: dict.txt beside MODEL, where d2v_plugin.prep.text puts it)
  --tasks LIST         comma-separated subset of: $ALL_TASKS (default: all)
  --mirror URL         replace the download base URL $BASE_URL with URL (a local mirror,
                       http://host:port/path or file:///path). The mirror keeps the same paths:
                         URL/glue/data/{CoLA,SST-2,QQP-clean,STS-B,MNLI,QNLIv2,RTE,WNLI}.zip
                         URL/glue/data/mrpc_dev_ids.tsv
                         URL/senteval/senteval_data/msr_paraphrase_{train,test}.txt
                         URL/fairseq/gpt2_bpe/{encoder.json,vocab.bpe,dict.txt}   (gpt2 only)
  --no-verify          skip the SHA-256 / size checks (for mirrors holding other files);
                       archives are still tested for integrity when extracted
  --workers N          tokenizer / binarizer processes (default: $(nproc 2>/dev/null || echo 1))
  --python PY          Python interpreter with fairseq and d2v_plugin (default: python)
  -h, --help           this help

Example:
  bash datasets/glue/prepare.sh --out data/glue --tokenizer gpt2
  bash scripts/finetune_glue.sh rte /path/to/nlp_base.pt --data data/glue/bin
EOF
}

die() { echo "error: $*" >&2; exit 1; }

OUT=""
TOKENIZER=""
DICT=""
TASKS="$ALL_TASKS"
VERIFY=1
WORKERS="$(nproc 2>/dev/null || echo 1)"
PYTHON="${PYTHON:-python}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --tokenizer) TOKENIZER="${2:?--tokenizer needs a value}"; shift 2 ;;
        --dict) DICT="${2:?--dict needs a value}"; shift 2 ;;
        --tasks) TASKS="${2:?--tasks needs a value}"; shift 2 ;;
        --mirror) BASE_URL="${2:?--mirror needs a value}"; BASE_URL="${BASE_URL%/}"; shift 2 ;;
        --no-verify) VERIFY=0; shift ;;
        --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ -n "$OUT" ]] || { usage >&2; die "--out is required"; }
[[ -n "$TOKENIZER" ]] || { usage >&2; die "--tokenizer is required (gpt2 or spm:MODEL)"; }
case "$TOKENIZER" in
    gpt2) ;;
    spm:*) [[ -f "${TOKENIZER#spm:}" ]] || die "sentencepiece model ${TOKENIZER#spm:} not found" ;;
    *) die "--tokenizer must be gpt2 or spm:MODEL, not '$TOKENIZER'" ;;
esac
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"
command -v curl >/dev/null || die "curl is required"
command -v sha256sum >/dev/null || die "sha256sum is required"
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('fairseq') and u.find_spec('d2v_plugin')))" 2>/dev/null || die "$PYTHON cannot import fairseq and d2v_plugin (pip install -e . in a venv, or pass --python)"

# normalise the task list (GLUE spellings accepted)
SELECTED=()
for t in ${TASKS//,/ }; do
    t="${t,,}"
    case "$t" in sst2|sst-2) t=sst_2 ;; stsb|sts-b) t=sts_b ;; all) SELECTED=(${ALL_TASKS//,/ }); continue ;; esac
    [[ -n "${TASK_FILES[$t]+x}" ]] || die "unknown task '$t' (known: $ALL_TASKS)"
    SELECTED+=("$t")
done
[[ ${#SELECTED[@]} -gt 0 ]] || die "--tasks selects nothing"

mkdir -p "$OUT/download"

verify() {  # verify FILE NAME
    local file="$1" name="$2" expected size actual
    [[ $VERIFY -eq 1 && -n "${SHA256[$name]+x}" ]] || return 0
    read -r expected size <<<"${SHA256[$name]}"
    actual=$(file_size "$file")
    if [[ "$actual" != "$size" ]]; then
        mv -f "$file" "$file.bad"
        die "$name: size $actual bytes, expected $size (truncated or wrong file; kept as $file.bad). Re-run to download it again, or pass --no-verify for a mirror with other files."
    fi
    actual=$(sha256_of "$file")
    if [[ "$actual" != "$expected" ]]; then
        mv -f "$file" "$file.bad"
        die "$name: SHA-256 mismatch ($actual, expected $expected; kept as $file.bad). Re-run to download it again, or pass --no-verify for a mirror with other files."
    fi
}

DOWNLOAD_CURL_OPTIONS=(--fail --location --silent --show-error --retry 3 --retry-delay 2)
# HTTP 416 to a resumed download (DEST.part already complete) stays an error here, as it always was

fetch() {  # fetch URL DEST: download to DEST.part (resuming), verify, rename
    local url="$1" dest="$2" name
    name="$(basename "$dest")"
    if [[ -f "$dest" ]]; then
        echo "[download] $name: present"
        return 0
    fi
    echo "[download] $url"
    download_resuming "$url" "$dest.part" || die "download of $url failed (curl exit $?); re-run to resume"
    verify "$dest.part" "$name"
    mv -f "$dest.part" "$dest"
}

for t in "${SELECTED[@]}"; do
    for path in ${TASK_FILES[$t]}; do
        fetch "$BASE_URL/$path" "$OUT/download/$(basename "$path")"
    done
done

PY_TOKENIZER=(--tokenizer "$TOKENIZER")
if [[ "$TOKENIZER" == gpt2 ]]; then
    mkdir -p "$OUT/gpt2_bpe"
    for f in "${GPT2_FILES[@]}"; do
        fetch "$BASE_URL/fairseq/gpt2_bpe/$f" "$OUT/gpt2_bpe/$f"
    done
    PY_TOKENIZER+=(--gpt2-dir "$OUT/gpt2_bpe")
fi
[[ -z "$DICT" ]] || PY_TOKENIZER+=(--dict "$DICT")

TASK_LIST="$(IFS=,; echo "${SELECTED[*]}")"
echo "[prepare] $TASK_LIST -> $OUT/bin"
"$PYTHON" -m d2v_plugin.prep.glue --downloads "$OUT/download" --raw "$OUT/raw" --out "$OUT/bin" \
    --tasks "$TASK_LIST" --workers "$WORKERS" "${PY_TOKENIZER[@]}"
echo "[done] fine-tune with: bash scripts/finetune_glue.sh TASK CHECKPOINT --data $OUT/bin"
