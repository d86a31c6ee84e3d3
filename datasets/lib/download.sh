# Download and checksum helpers shared by datasets/*/prepare.sh.
#
# A prepare.sh sources this file from its own directory:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/../lib/download.sh"
#
# Sourcing defines functions and the default settings below, nothing else. Every script keeps
# its own messages: require_tools calls the script's `die MESSAGE` (print an error, exit 1), and
# download_resuming reports through the hooks below, which a script redefines after sourcing.

# ---- settings (a script changes them after sourcing) ---------------------------------

# curl options of every download (retries, timeouts, verbosity); download_resuming adds
# -C -, -o and -w itself.
DOWNLOAD_CURL_OPTIONS=(-fL)
# 1: discard curl's own error messages on the resuming attempt (the script reports failures,
# e.g. with DOWNLOAD_HTTP_CODE).
DOWNLOAD_QUIET_RESUME=0

# ---- hooks (a script redefines them after sourcing to print its messages) -------------

# on_download_complete PART: the server answered HTTP 416: PART already holds the whole file.
on_download_complete() { :; }
# on_download_restart URL: the server cannot resume URL; the download starts over.
on_download_restart() { :; }

# ---- downloads -----------------------------------------------------------------------

# download_resuming URL PART: download URL into the file PART with curl, continuing what PART
# already holds (curl -C -). Two answers that curl counts as failures are handled:
#   - HTTP 416 (the requested range starts at PART's end): PART is complete; on_download_complete
#     PART is called and the download succeeds;
#   - curl exit 33 (the server ignores range requests): on_download_restart URL is called, PART
#     is deleted and downloaded again from the start.
# Returns 0 once PART holds the file, else curl's exit status. Sets DOWNLOAD_HTTP_CODE to the
# HTTP status of the resuming request (000 when no answer came).
download_resuming() {
    local url="$1" part="$2" rc=0
    local curl_args=("${DOWNLOAD_CURL_OPTIONS[@]}" -w '%{http_code}')
    if [[ "$DOWNLOAD_QUIET_RESUME" == 1 ]]; then
        DOWNLOAD_HTTP_CODE="$(curl "${curl_args[@]}" -C - -o "$part" "$url" 2>/dev/null)" || rc=$?
    else
        DOWNLOAD_HTTP_CODE="$(curl "${curl_args[@]}" -C - -o "$part" "$url")" || rc=$?
    fi
    if [[ $rc -eq 22 && "$DOWNLOAD_HTTP_CODE" == 416 ]]; then
        on_download_complete "$part"
        rc=0
    elif [[ $rc -eq 33 ]]; then
        on_download_restart "$url"
        rm -f "$part"
        rc=0
        curl "${curl_args[@]}" -o "$part" "$url" >/dev/null || rc=$?
    fi
    return $rc
}

# ---- checks --------------------------------------------------------------------------

# require_tools TOOL...: die unless every TOOL is an available command.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "'$tool' is required but not installed"
    done
}

# file_size FILE: print the size of FILE in bytes.
file_size() {
    stat -c %s "$1"
}

# sha256_of FILE: print the SHA-256 of FILE (lowercase hex).
sha256_of() {
    sha256sum "$1" | cut -d' ' -f1
}

# md5_of FILE: print the MD5 of FILE (lowercase hex).
md5_of() {
    md5sum "$1" | cut -d' ' -f1
}
