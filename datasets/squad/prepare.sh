#!/usr/bin/env bash
# Download and check the SQuAD v1.1 / v2.0 training and development sets.
# Run with --help for the details.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../lib/download.sh"

BASE_URL="https://rajpurkar.github.io/SQuAD-explorer/dataset"
# SHA-256 and size of the official files (the same values are pinned by ParlAI and by the
# Hugging Face datasets checksum files for these URLs).
declare -A SHA256=(
    [train-v1.1.json]=3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955
    [dev-v1.1.json]=95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9
    [train-v2.0.json]=68dcfbb971bd3e96d5b46c7177b16c1a4e7d4bdef19fb204502738552dede002
    [dev-v2.0.json]=80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8
)
declare -A VERSION_FIELD=([1.1]=1.1 [2.0]=v2.0)

usage() {
    cat <<EOF
Usage: $(basename "$0") --out DIR [--version 1.1|2.0|all] [--mirror URL] [--no-checksum]

Downloads the SQuAD training and development sets (Rajpurkar et al. 2016, 2018) from
  $BASE_URL/
as DIR/train-vVERSION.json and DIR/dev-vVERSION.json (v1.1: 30 MB + 5 MB, v2.0: 42 MB + 4 MB),
the layout task d2v_squad reads (task.data=DIR).

Each file is downloaded into DIR/FILE.part (an interrupted download resumes from there),
then checked: its SHA-256 against the official file's, and that it is a SQuAD JSON file of
the expected version (a 'data' list of articles with paragraphs and questions). Only a file
that passed is renamed to DIR/FILE; a file that failed is moved to DIR/FILE.bad and the
script stops with an error (re-running downloads it afresh). Files already in place are
not downloaded again, so re-running is safe.

Options:
  --out DIR        output directory (required; created)
  --version V      1.1 (default), 2.0, or all (both)
  --mirror URL     download from URL/FILE instead of $BASE_URL/FILE
                   (e.g. http://host:port/path or file:///path)
  --no-checksum    skip the SHA-256 check (for a mirror serving other files); the
                   JSON check still applies
  -h, --help       show this help

Environment:
  PYTHON           Python interpreter for the JSON check (default: python3)
Needs: curl, sha256sum.
EOF
}

log() { echo "[squad $(date +%H:%M:%S)] $*"; }
die() { echo "[squad] error: $*" >&2; exit 1; }

OUT=""
VERSION="1.1"
MIRROR=""
CHECKSUM=1
PYTHON="${PYTHON:-python3}"

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --version) need_value "$@"; VERSION="$2"; shift 2 ;;
        --mirror) need_value "$@"; MIRROR="${2%/}"; shift 2 ;;
        --no-checksum) CHECKSUM=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n "$OUT" ]] || die "--out DIR is required (see --help)"
case "$VERSION" in
    1.1|2.0) VERSIONS=("$VERSION") ;;
    all) VERSIONS=(1.1 2.0) ;;
    *) die "--version must be 1.1, 2.0 or all, got '$VERSION'" ;;
esac
require_tools curl sha256sum
command -v "$PYTHON" >/dev/null || die "Python interpreter '$PYTHON' not found (set PYTHON)"
BASE="${MIRROR:-$BASE_URL}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

DOWNLOAD_CURL_OPTIONS=(-fsSL --retry 3 --retry-delay 2 --connect-timeout 30)
DOWNLOAD_QUIET_RESUME=1   # a failure is reported below, with its HTTP status
on_download_restart() { log "the server cannot resume; downloading $1 from the start"; }

# fetch URL PART: download URL into PART, resuming what PART already holds.
fetch() {
    local url="$1" part="$2"
    if [[ -s "$part" ]]; then
        log "resuming $url ($(file_size "$part") bytes already in $part)"
    else
        log "downloading $url"
    fi
    download_resuming "$url" "$part" \
        || die "download of $url failed (curl exit $?${DOWNLOAD_HTTP_CODE:+, HTTP $DOWNLOAD_HTTP_CODE}); re-run to resume"
}

# check_json FILE VERSION_FIELD: a SQuAD file of that version; prints a summary.
check_json() {
    "$PYTHON" - "$1" "$2" <<'PY'
import json, sys
path, expected = sys.argv[1], sys.argv[2]
try:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
except (ValueError, UnicodeDecodeError) as e:
    sys.exit(f"not valid JSON (truncated or corrupt download?): {e}")
if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    sys.exit("not a SQuAD file: no 'data' list")
if str(data.get("version")) != expected:
    sys.exit(f"version field is {data.get('version')!r}, expected {expected!r}")
paragraphs = questions = unanswerable = 0
for article in data["data"]:
    for p in article.get("paragraphs", []):
        if not isinstance(p.get("context"), str) or not isinstance(p.get("qas"), list):
            sys.exit(f"a paragraph of {article.get('title', '?')!r} lacks 'context' or 'qas'")
        paragraphs += 1
        for qa in p["qas"]:
            if not {"id", "question", "answers"} <= set(qa):
                sys.exit(f"question {qa.get('id', '?')!r} lacks 'id', 'question' or 'answers'")
            questions += 1
            unanswerable += bool(qa.get("is_impossible")) or not qa["answers"]
if questions == 0:
    sys.exit("no questions")
print(f"{len(data['data'])} articles, {paragraphs} paragraphs, {questions} questions ({unanswerable} unanswerable)")
PY
}

for version in "${VERSIONS[@]}"; do
    for split in train dev; do
        name="$split-v$version.json"
        final="$OUT/$name"
        part="$final.part"
        if [[ -f "$final" ]]; then
            log "$name: already present ($final), skipped"
            continue
        fi
        fetch "$BASE/$name" "$part"
        reason=""
        if [[ $CHECKSUM -eq 1 ]]; then
            got="$(sha256_of "$part")"
            [[ "$got" == "${SHA256[$name]}" ]] \
                || reason="SHA-256 is $got, expected ${SHA256[$name]} (use --no-checksum for a mirror of other files)"
        fi
        if [[ -z "$reason" ]]; then
            summary="$(check_json "$part" "${VERSION_FIELD[$version]}" 2>&1)" || reason="$summary"
        fi
        if [[ -n "$reason" ]]; then
            mv -f "$part" "$final.bad"
            die "$name: $reason; moved to $final.bad, re-run to download it again"
        fi
        mv -f "$part" "$final"
        log "$name: $summary"
    done
done
log "ready: $OUT (task.data=$OUT)"
