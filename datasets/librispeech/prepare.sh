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
LIBRILIGHT_URL="https://dl.fbaipublicfiles.com/librilight/data/librispeech_finetuning.tgz"
# SHA-256 of librispeech_finetuning.tgz, as torchaudio's LibriLightLimited dataset checks it
# (torchaudio/datasets/librilight_limited.py, _CHECKSUM); Libri-light does not publish one.
LIBRILIGHT_SHA256="5d1efdc777b548194d7e09ba89126e2188026df9fd57aa57eb14408d2b2342af"
LIBRILIGHT_ARCHIVE="librispeech_finetuning.tgz"

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

With --limited 10m|1h|10h: a Libri-light limited-resource training set (Kahn et al. 2020,
the 10 min / 1 h / 10 h fine-tuning splits of wav2vec 2.0 and data2vec) instead of the
LibriSpeech training splits; --splits then defaults to dev-clean,dev-other (validation):
  1. download  $LIBRILIGHT_URL
               (0.6 GB, resumable) into DIR/download/
  2. verify    its SHA-256 ($LIBRILIGHT_SHA256,
               torchaudio's LibriLightLimited checksum); a corrupt download -> .bad, error
  3. extract   into DIR/librispeech_finetuning/ (1h/{0..5}/{clean,other}/, 9h/{clean,other}/)
  4. manifests DIR/manifests/train.{tsv,wrd,ltr} and dict.ltr.txt from 1h/0 (10m), 1h/* (1h)
               or 1h/* + 9h (10h); the dev splits as above (dev_other.tsv is the recipes' valid)

Each finished step leaves a marker in DIR/.done/; re-running skips finished steps, resumes
downloads and adds newly chosen splits. Once a split is extracted its archive may be deleted
(or use --delete-archives). Needs curl, tar, gzip, md5sum (sha256sum for --limited) and a Python with soundfile.

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
  --limited SUBSET    10m, 1h or 10h: train on that Libri-light limited-resource set (see
                      above); training splits in --splits are then refused
  --limited-url URL   where to download $LIBRILIGHT_ARCHIVE from (default: $LIBRILIGHT_URL;
                      a mirror, http://host:port/path or file:///path)
  --limited-sha256 S  its expected SHA-256 (default: the official archive's, above)
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
SPLITS=""
LIMITED=""
LIMITED_URL="$LIBRILIGHT_URL"
LIMITED_SHA256="$LIBRILIGHT_SHA256"
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
        --limited) need_value "$@"; LIMITED="$2"; shift 2 ;;
        --limited-url) need_value "$@"; LIMITED_URL="$2"; shift 2 ;;
        --limited-sha256) need_value "$@"; LIMITED_SHA256="${2,,}"; shift 2 ;;
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
case "$LIMITED" in
    "") SPLITS="${SPLITS:-$ALL_SPLITS}" ;;
    10m|1h|10h)
        SPLITS="${SPLITS:-dev-clean,dev-other}"
        require_tools sha256sum
        [[ "$LIMITED_SHA256" =~ ^[0-9a-f]{64}$ ]] || die "--limited-sha256 must be 64 hex digits, got '$LIMITED_SHA256'" ;;
    *) die "--limited must be 10m, 1h or 10h, got '$LIMITED'" ;;
esac

IFS=', ' read -r -a SPLIT_LIST <<<"$SPLITS"
[[ ${#SPLIT_LIST[@]} -gt 0 ]] || die "--splits is empty"
for split in "${SPLIT_LIST[@]}"; do
    [[ ",$ALL_SPLITS," == *",$split,"* ]] || die "unknown split '$split'; choose from $ALL_SPLITS"
    [[ -z "$LIMITED" || "$split" != train-* ]] \
        || die "--limited $LIMITED replaces the training splits: drop $split from --splits"
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

# the Libri-light archive: download (resumable), SHA-256 check, extraction
step_limited() {
    local dest="$OUT/download/$LIBRILIGHT_ARCHIVE" tmp="$OUT/extract.tmp" got
    if ! is_done "download-librilight"; then
        [[ -f "$dest" ]] || { fetch "$LIMITED_URL" "$dest.part"; mv -f "$dest.part" "$dest"; }
        log "checking the SHA-256 of $LIBRILIGHT_ARCHIVE ($(du -h "$dest" | cut -f1))"
        got="$(sha256_of "$dest")"
        if [[ "$got" != "$LIMITED_SHA256" ]]; then
            mv -f "$dest" "$OUT/download/$LIBRILIGHT_ARCHIVE.bad"
            die "$LIBRILIGHT_ARCHIVE is corrupt: SHA-256 $got, expected $LIMITED_SHA256; moved it to $OUT/download/$LIBRILIGHT_ARCHIVE.bad. Re-run to download it again."
        fi
        mark_done "download-librilight"
    fi
    [[ $DOWNLOAD_ONLY -eq 1 ]] && return
    if is_done "extract-librilight"; then log "Libri-light: already extracted, skipped"; return; fi
    [[ -f "$dest" ]] || die "$dest is missing; delete $DONE/download-librilight and re-run"
    log "Libri-light: extracting $dest"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    tar -xzf "$dest" -C "$tmp" || { rm -rf "$tmp"; die "extracting $dest failed (corrupt archive?); delete it and $DONE/download-librilight, then re-run"; }
    if [[ ! -d "$tmp/librispeech_finetuning/1h" ]]; then
        rm -rf "$tmp"
        die "$dest does not hold librispeech_finetuning/1h/; is it Libri-light's $LIBRILIGHT_ARCHIVE?"
    fi
    rm -rf "$OUT/librispeech_finetuning"
    mv "$tmp/librispeech_finetuning" "$OUT/librispeech_finetuning"
    rm -rf "$tmp"
    mark_done "extract-librilight"
    if [[ $DELETE_ARCHIVES -eq 1 ]]; then
        rm -f "$dest"
        log "Libri-light: deleted $dest (--delete-archives)"
    fi
}

step_manifests() {
    local stamp="$DONE/manifests" wanted
    wanted="$(printf '%s\n' "${SPLIT_LIST[@]}" | sort -u | tr '\n' ' ')${LIMITED:+limited-$LIMITED}"
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
    if [[ -n "$LIMITED" ]]; then
        # after the dev splits: train.* and dict.ltr.txt come from the Libri-light set
        "${PYTHON:-python}" "$REPO_ROOT/d2v_plugin/prep/librispeech.py" librilight \
            --root "$OUT/librispeech_finetuning" --subset "$LIMITED" \
            --out "$OUT/manifests" --workers "$WORKERS" \
            || die "writing the Libri-light $LIMITED manifest failed (see above)"
    fi
    echo "$wanted" >"$stamp"
}

for split in "${SPLIT_LIST[@]}"; do
    step_download "$split"
done
[[ -z "$LIMITED" ]] || step_limited
if [[ $DOWNLOAD_ONLY -eq 1 ]]; then
    log "downloads finished and verified (--download-only)"
    exit 0
fi
for split in "${SPLIT_LIST[@]}"; do
    step_extract "$split"
done
step_manifests
log "done: point task.data at $OUT/manifests"
