#!/usr/bin/env bash
# Download, verify and extract LibriSpeech (OpenSLR resource 12), then write manifests and
# letter/word transcripts for data2vec speech pretraining and fine-tuning. See --help.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
source "$HERE/../lib/download.sh"
OPENSLR_URL="https://www.openslr.org/resources/12"
ALL_SPLITS="train-clean-100,train-clean-360,train-other-500,dev-clean,dev-other,test-clean,test-other"
DEFAULT_MD5_FILE="$HERE/md5sum.txt"

usage() {
    cat <<EOF
Usage: $(basename "$0") --out DIR [options]

Prepares LibriSpeech (Panayotov et al. 2015; 16 kHz read English speech, CC BY 4.0) for
data2vec: 960 h of training speech (train-clean-100, train-clean-360, train-other-500)
plus the dev and test sets. Download sizes: train-clean-100 6.3 GB, train-clean-360
23 GB, train-other-500 30 GB, each dev/test split about 0.3 GB (about 60 GB in all;
the extracted audio takes as much again).

For every chosen split:
  1. download  $OPENSLR_URL/<split>.tar.gz into DIR/download/,
               resuming a partial download (DIR/download/<split>.tar.gz.part)
  2. verify    its MD5 against the sums OpenSLR publishes ($OPENSLR_URL/md5sum.txt,
               kept in $DEFAULT_MD5_FILE); a corrupt download is moved to
               <split>.tar.gz.bad and the script stops with an error (re-run to fetch it again)
  3. extract   into DIR/LibriSpeech/<split>/<speaker>/<chapter>/*.flac + *.trans.txt
Then, with d2v_plugin/prep/librispeech.py of this checkout (--workers processes):
  4. manifests DIR/manifests/<split>.tsv (dev-clean -> dev_clean.tsv; root line, then
               relative/path<TAB>num_samples), .wrd (words) and .ltr (letters) per split;
               DIR/manifests/train.{tsv,wrd,ltr} for all chosen training splits together;
               DIR/manifests/dict.ltr.txt (letter dictionary for CTC fine-tuning).
               Point task.data at DIR/manifests.

Each finished step leaves a marker in DIR/.done/; re-running skips finished steps, resumes
downloads and adds newly chosen splits. Once a split is extracted its archive may be deleted
(or use --delete-archives). Needs curl, tar, gzip, md5sum and a Python with soundfile.

Options:
  --out DIR           output directory (required; created)
  --splits LIST       comma-separated splits (default: all seven:
                      $ALL_SPLITS)
  --mirror URL        download from URL/<split>.tar.gz instead of $OPENSLR_URL
                      (e.g. https://us.openslr.org/resources/12, a local http://host:port/path,
                      or file:///path)
  --workers N         processes reading audio headers for the manifests
                      (default: number of CPUs, $(nproc 2>/dev/null || echo 1) here)
  --md5-file FILE     expected MD5 sums, md5sum format ('<md5>  <split>.tar.gz' per line)
                      (default: $DEFAULT_MD5_FILE). Lets a mirror
                      with other archives, or a test, state its own sums.
  --delete-archives   delete each archive once it is extracted
  --download-only     stop after steps 1-2 (e.g. on a login node with internet access)
  -h, --help          show this help

Environment:
  PYTHON              the Python interpreter that writes the manifests (default: python);
                      it needs the soundfile package only
EOF
}

log() { echo "[librispeech $(date +%H:%M:%S)] $*"; }
die() { echo "[librispeech] error: $*" >&2; exit 1; }

OUT=""
SPLITS="$ALL_SPLITS"
MIRROR=""
WORKERS="$(nproc 2>/dev/null || echo 1)"
MD5_FILE="$DEFAULT_MD5_FILE"
DELETE_ARCHIVES=0
DOWNLOAD_ONLY=0

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --splits) need_value "$@"; SPLITS="$2"; shift 2 ;;
        --mirror) need_value "$@"; MIRROR="${2%/}"; shift 2 ;;
        --workers) need_value "$@"; WORKERS="$2"; shift 2 ;;
        --md5-file) need_value "$@"; MD5_FILE="$2"; shift 2 ;;
        --delete-archives) DELETE_ARCHIVES=1; shift ;;
        --download-only) DOWNLOAD_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n "$OUT" ]] || die "--out DIR is required (see --help)"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"
[[ -f "$MD5_FILE" ]] || die "MD5 file $MD5_FILE does not exist"
require_tools curl tar gzip md5sum

IFS=', ' read -r -a SPLIT_LIST <<<"$SPLITS"
[[ ${#SPLIT_LIST[@]} -gt 0 ]] || die "--splits is empty"
for split in "${SPLIT_LIST[@]}"; do
    [[ ",$ALL_SPLITS," == *",$split,"* ]] || die "unknown split '$split'; choose from $ALL_SPLITS"
done
BASE_URL="${MIRROR:-$OPENSLR_URL}"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DONE="$OUT/.done"
mkdir -p "$DONE" "$OUT/download"

is_done() { [[ -f "$DONE/$1" ]]; }
mark_done() { touch "$DONE/$1"; }

expected_md5() {
    local sum
    sum="$(awk -v f="$1" '$2 == f || $2 == "*" f { print $1; exit }' "$MD5_FILE")"
    [[ "$sum" =~ ^[0-9a-fA-F]{32}$ ]] || die "no MD5 sum for $1 in $MD5_FILE"
    echo "${sum,,}"
}

progress=(-sS)
if [[ -t 2 ]]; then progress=(--progress-bar); fi   # a progress bar on a terminal
DOWNLOAD_CURL_OPTIONS=(-fL --retry 5 --retry-delay 5 --connect-timeout 30 "${progress[@]}")
on_download_complete() { log "$1 already holds the whole file"; }
on_download_restart() { log "the server cannot resume downloads; downloading $1 from the start"; }

# fetch URL PART: download URL into PART, continuing what PART already holds.
fetch() {
    local url="$1" part="$2"
    if [[ -s "$part" ]]; then
        log "resuming $url at byte $(file_size "$part")"
    else
        log "downloading $url"
    fi
    download_resuming "$url" "$part" || die "download of $url failed (curl exit $?); re-run to resume"
}

# verify FILE NAME: MD5 check; a corrupt file is moved to DIR/download/NAME.bad.
verify() {
    local file="$1" name="$2" want got
    want="$(expected_md5 "$name")"
    log "checking the MD5 of $name ($(du -h "$file" | cut -f1))"
    got="$(md5_of "$file")"
    if [[ "$got" != "$want" ]]; then
        mv -f "$file" "$OUT/download/$name.bad"
        die "$name is corrupt: MD5 $got, expected $want (from $MD5_FILE); moved it to $OUT/download/$name.bad. Re-run to download it again."
    fi
}

step_download() {
    local split="$1" name="$1.tar.gz" dest="$OUT/download/$1.tar.gz"
    if is_done "download-$split"; then log "$split: download already verified, skipped"; return; fi
    if [[ ! -f "$dest" ]]; then
        fetch "$BASE_URL/$name" "$dest.part"
        verify "$dest.part" "$name"
        mv -f "$dest.part" "$dest"
    else
        verify "$dest" "$name"
    fi
    mark_done "download-$split"
}

step_extract() {
    local split="$1" archive="$OUT/download/$1.tar.gz" tmp="$OUT/extract.tmp"
    if is_done "extract-$split"; then log "$split: already extracted, skipped"; return; fi
    [[ -f "$archive" ]] || die "$archive is missing; delete $DONE/download-$split and re-run"
    log "$split: extracting $archive"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if ! tar -xzf "$archive" -C "$tmp"; then
        rm -rf "$tmp"
        die "extracting $archive failed (corrupt archive?); delete it and $DONE/download-$split, then re-run"
    fi
    if [[ ! -d "$tmp/LibriSpeech/$split" ]]; then
        rm -rf "$tmp"
        die "$archive does not hold LibriSpeech/$split/; is it the LibriSpeech $split archive?"
    fi
    mkdir -p "$OUT/LibriSpeech"
    rm -rf "$OUT/LibriSpeech/$split"
    mv "$tmp/LibriSpeech/$split" "$OUT/LibriSpeech/$split"
    # the corpus-level files (README, SPEAKERS.TXT, ...) are the same in every archive
    find "$tmp/LibriSpeech" -maxdepth 1 -type f -exec mv -f {} "$OUT/LibriSpeech/" \;
    rm -rf "$tmp"
    log "$split: $(find "$OUT/LibriSpeech/$split" -name '*.flac' | wc -l) utterances in $OUT/LibriSpeech/$split"
    mark_done "extract-$split"
    if [[ $DELETE_ARCHIVES -eq 1 ]]; then
        rm -f "$archive"
        log "$split: deleted $archive (--delete-archives)"
    fi
}

step_manifests() {
    local stamp="$DONE/manifests" wanted
    wanted="$(printf '%s\n' "${SPLIT_LIST[@]}" | sort -u | tr '\n' ' ')"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        log "manifests for $wanted already written, skipped"
        return
    fi
    log "writing manifests and transcripts into $OUT/manifests"
    # run as a file: it needs only soundfile, not the plugin's fairseq import
    "${PYTHON:-python}" "$REPO_ROOT/d2v_plugin/prep/librispeech.py" librispeech \
        --root "$OUT/LibriSpeech" --splits "$(IFS=,; echo "${SPLIT_LIST[*]}")" \
        --out "$OUT/manifests" --workers "$WORKERS" \
        || die "writing the manifests failed (see above)"
    echo "$wanted" >"$stamp"
}

for split in "${SPLIT_LIST[@]}"; do
    step_download "$split"
done
if [[ $DOWNLOAD_ONLY -eq 1 ]]; then
    log "downloads finished and verified (--download-only)"
    exit 0
fi
for split in "${SPLIT_LIST[@]}"; do
    step_extract "$split"
done
step_manifests
log "done: point task.data at $OUT/manifests"
