#!/usr/bin/env bash
# Download, verify, extract, tokenize and binarize OpenWebText for data2vec text pretraining.
# Run with --help for the details.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../lib/download.sh"

ZENODO_URL="https://zenodo.org/record/3834942/files"
GPT2_URL="https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe"
ARCHIVE="openwebtext.tar.xz"
# SHA-256 and size of openwebtext.tar.xz (Zenodo record 3834942), as recorded in the
# Hugging Face `datasets` checksum file for this URL (datasets/openwebtext/dataset_infos.json).
ARCHIVE_SHA256="9fe39d154c5bc67da8c359415372b79510eb1e2edb0d035fe4f7fc3a732b9336"
ARCHIVE_BYTES=12880027468
GPT2_FILES=(encoder.json vocab.bpe dict.txt)

usage() {
    cat <<EOF
Usage: $(basename "$0") --out DIR [options]

Prepares OpenWebText (Gokaslan & Cohen 2019; ~12.9 GB download, ~40 GB of text,
8M documents) for data2vec text pretraining:

  1. download  $ZENODO_URL/$ARCHIVE
               into DIR/download/, resuming a partial download (DIR/download/$ARCHIVE.part);
               also fetch fairseq's GPT-2 BPE files (encoder.json, vocab.bpe, dict.txt)
               from $GPT2_URL/ into DIR/gpt2_bpe/ (gpt2 tokenizer only)
  2. verify    the archive's size and SHA-256 (see --sha256), then rename the .part file;
               a corrupt download is moved to DIR/download/$ARCHIVE.part.bad and the
               script stops with an error (re-running downloads it afresh)
  3. extract   the archive into DIR/raw/openwebtext/ (urlsf_subset*-*_data.xz files,
               each an xz-compressed tar of .txt documents; left compressed)
  4. split, tokenize and binarize with 'python -m d2v_plugin.prep.text' (parallel, --workers):
               DIR/{train,valid}.txt, DIR/{train,valid}.tok, DIR/dict.txt, and finally
               DIR/bin/{train,valid}.{bin,idx} + DIR/bin/dict.txt  <- point task.data here

Every step leaves a marker in DIR/.done/ only after it succeeded; re-running skips
finished steps and resumes the download. Once step 3 is done you may delete
DIR/download/$ARCHIVE (12.9 GB); once step 4 is done, DIR/raw and DIR/*.txt/*.tok too.
Needs: curl, xz, tar, sha256sum, a Python with fairseq (+ sentencepiece), and about
150 GB of disk at the peak (archive 13 GB, extracted subsets 13 GB, text 40 GB, tokens
and the binarized corpus the rest).

Options:
  --out DIR            output directory (required; created)
  --tokenizer NAME     gpt2 (default; fairseq's GPT-2 BPE, the vocabulary of Meta's
                       released data2vec text checkpoints) or sentencepiece (trains a
                       unigram model on the training split, written to DIR/spm.model)
  --vocab-size N       sentencepiece vocabulary size (default: 8000)
  --workers N          parallel processes for extraction, encoding and binarization
                       (default: number of CPUs, $(nproc 2>/dev/null || echo 1) here)
  --valid-fraction F   fraction of documents held out for validation (default: 0.01)
  --mirror URL         replace every download base URL with URL (e.g. a local mirror,
                       http://host:port/path or file:///path). The mirror must hold:
                         URL/$ARCHIVE
                         URL/gpt2_bpe/encoder.json
                         URL/gpt2_bpe/vocab.bpe
                         URL/gpt2_bpe/dict.txt
  --sha256 HEX|none    expected SHA-256 of $ARCHIVE (default: Zenodo's file as recorded
                       by Hugging Face datasets: $ARCHIVE_SHA256,
                       $ARCHIVE_BYTES bytes). 'none' skips the checksum and tests the
                       archive's integrity with 'xz -t' and 'tar -t' instead.
  --download-only      stop after steps 1-2 (e.g. on a login node with internet access)
  -h, --help           show this help

Environment:
  PYTHON               the Python interpreter to run d2v_plugin with (default: python).
                       This checkout's root is added to PYTHONPATH, so an uninstalled
                       source tree works too.
EOF
}

log() { echo "[openwebtext $(date +%H:%M:%S)] $*"; }
die() { echo "[openwebtext] error: $*" >&2; exit 1; }

OUT=""
MIRROR=""
TOKENIZER="gpt2"
VOCAB_SIZE=8000
WORKERS="$(nproc 2>/dev/null || echo 1)"
VALID_FRACTION=0.01
SHA256="$ARCHIVE_SHA256"
DOWNLOAD_ONLY=0

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --mirror) need_value "$@"; MIRROR="${2%/}"; shift 2 ;;
        --tokenizer) need_value "$@"; TOKENIZER="$2"; shift 2 ;;
        --vocab-size) need_value "$@"; VOCAB_SIZE="$2"; shift 2 ;;
        --workers) need_value "$@"; WORKERS="$2"; shift 2 ;;
        --valid-fraction) need_value "$@"; VALID_FRACTION="$2"; shift 2 ;;
        --sha256) need_value "$@"; SHA256="$2"; shift 2 ;;
        --download-only) DOWNLOAD_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n "$OUT" ]] || die "--out DIR is required (see --help)"
[[ "$TOKENIZER" == gpt2 || "$TOKENIZER" == sentencepiece ]] \
    || die "--tokenizer must be gpt2 or sentencepiece, got '$TOKENIZER'"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"
require_tools curl xz tar sha256sum

if [[ -n "$MIRROR" ]]; then
    ARCHIVE_URL="$MIRROR/$ARCHIVE"
    GPT2_BASE="$MIRROR/gpt2_bpe"
else
    ARCHIVE_URL="$ZENODO_URL/$ARCHIVE"
    GPT2_BASE="$GPT2_URL"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DONE="$OUT/.done"
mkdir -p "$DONE"

is_done() { [[ -f "$DONE/$1" ]]; }
mark_done() { touch "$DONE/$1"; }
skip_msg() { log "step $1: already done ($DONE/$1), skipped"; }

DOWNLOAD_CURL_OPTIONS=(-fL --retry 5 --retry-delay 5 --connect-timeout 30)
on_download_complete() { log "$1 already holds the whole file"; }
on_download_restart() { log "server cannot resume $1; downloading it from the start"; }

# fetch URL PART: download URL into the file PART, resuming what PART already holds.
fetch() {
    local url="$1" part="$2"
    log "downloading $url"
    download_resuming "$url" "$part" || die "download of $url into $part failed (curl exit $?); re-run to resume"
}

# verify_archive FILE: checksum (or integrity test); a bad file is moved to FILE.bad.
verify_archive() {
    local file="$1" reason=""
    if [[ "$SHA256" == "$ARCHIVE_SHA256" && "$(file_size "$file")" != "$ARCHIVE_BYTES" ]]; then
        reason="size is $(file_size "$file") bytes, expected $ARCHIVE_BYTES"
    elif [[ "$SHA256" != none ]]; then
        log "checking the SHA-256 of $file"
        local got
        got="$(sha256_of "$file")"
        [[ "$got" == "$SHA256" ]] || reason="SHA-256 is $got, expected $SHA256"
    else
        log "testing the integrity of $file (xz -t, tar -t)"
        if ! xz -t -T "$WORKERS" "$file" 2>/dev/null; then
            reason="xz integrity test failed"
        elif ! xz -dc -T "$WORKERS" "$file" | tar -t >/dev/null 2>&1; then
            reason="not a valid tar archive"
        fi
    fi
    if [[ -n "$reason" ]]; then
        mv -f "$file" "$file.bad"
        die "archive $file is corrupt ($reason); moved it to $file.bad. Re-run to download it again."
    fi
}

step_download() {
    local dest="$OUT/download/$ARCHIVE"
    if is_done download; then skip_msg download; return; fi
    mkdir -p "$OUT/download"
    if [[ ! -f "$dest" ]]; then
        fetch "$ARCHIVE_URL" "$dest.part"
        verify_archive "$dest.part"
        mv -f "$dest.part" "$dest"
    else
        verify_archive "$dest"
    fi
    mark_done download
}

step_gpt2_files() {
    if is_done gpt2-files; then skip_msg gpt2-files; return; fi
    mkdir -p "$OUT/gpt2_bpe"
    local name
    for name in "${GPT2_FILES[@]}"; do
        if [[ ! -s "$OUT/gpt2_bpe/$name" ]]; then
            fetch "$GPT2_BASE/$name" "$OUT/gpt2_bpe/$name.part"
            mv -f "$OUT/gpt2_bpe/$name.part" "$OUT/gpt2_bpe/$name"
        fi
    done
    mark_done gpt2-files
}

step_extract() {
    local archive="$OUT/download/$ARCHIVE" tmp="$OUT/raw.tmp"
    if is_done extract; then skip_msg extract; return; fi
    [[ -f "$archive" ]] || die "$archive is missing; delete $DONE/download and re-run"
    log "extracting $archive into $OUT/raw"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if ! xz -dc -T "$WORKERS" "$archive" | tar -x -C "$tmp"; then
        rm -rf "$tmp"
        die "extracting $archive failed (corrupt archive?); delete it and $DONE/download, then re-run"
    fi
    if ! compgen -G "$tmp/openwebtext/urlsf_subset*_data.xz" >/dev/null; then
        rm -rf "$tmp"
        die "$archive does not hold openwebtext/urlsf_subset*_data.xz files; is it the OpenWebText archive?"
    fi
    rm -rf "$OUT/raw"
    mv "$tmp" "$OUT/raw"
    log "extracted $(find "$OUT/raw/openwebtext" -name '*_data.xz' | wc -l) subset files"
    mark_done extract
}

step_text() {
    local repo_root args
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    args=(--corpus "$OUT/raw/openwebtext" --out "$OUT" --tokenizer "$TOKENIZER"
          --valid-fraction "$VALID_FRACTION" --workers "$WORKERS")
    if [[ "$TOKENIZER" == gpt2 ]]; then
        args+=(--gpt2-dir "$OUT/gpt2_bpe")
    else
        args+=(--vocab-size "$VOCAB_SIZE")
    fi
    PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m d2v_plugin.prep.text "${args[@]}"
}

step_download
if [[ "$TOKENIZER" == gpt2 ]]; then
    step_gpt2_files
fi
if [[ $DOWNLOAD_ONLY -eq 1 ]]; then
    log "download finished (--download-only)"
    exit 0
fi
step_extract
step_text
log "done: point task.data at $OUT/bin"
