#!/usr/bin/env bash
# Does data2vec beat masked language modelling on my data? Pretrains data2vec 2.0, data2vec 1.0 and
# a RoBERTa masked-LM baseline at the same size and budget, fine-tunes each on the same tasks with the
# same recipe and seeds, and writes comparison.md and comparison.png. Run with --help for the details;
# the work is done by d2v_plugin/compare/run.py.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$SCRIPT_DIR/lib/common.sh"
die() { echo "compare_text.sh: $*" >&2; exit 1; }

d2v_find_hydra_train
if ! err="$("$PYTHON" -c "import d2v_plugin" 2>&1 >/dev/null)"; then
    die "d2v_plugin is not importable with '$PYTHON' ($(tail -n 1 <<<"$err")); install it with: pip install -e $(d2v_repo_dir "$SCRIPT_DIR")"
fi
exec "$PYTHON" -m d2v_plugin.compare.run "$@"
