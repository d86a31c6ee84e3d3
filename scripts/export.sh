#!/usr/bin/env bash
# Export the student encoder of a data2vec checkpoint: a thin wrapper around d2v-export.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bash scripts/export.sh CHECKPOINT --out DIR --format inference|hf|onnx [--dtype fp32|bf16|fp16] [--json]

Exports the student encoder (teacher, decoder and head dropped) of a data2vec checkpoint
(1.0 or 2.0, ours or Meta's):
  inference  model.safetensors + config.json (+ dict.txt for text); load it back with
             d2v_plugin.load_encoder(DIR) (no pickle)
  hf         a Hugging Face transformers directory
  onnx       model.onnx (dynamic batch and length axes), checked against PyTorch in onnxruntime

Every option is passed to d2v-export (see d2v-export --help below). Exit code 2 and a message
naming the file for a missing, truncated or corrupt checkpoint or an unknown model.
USAGE
}

D2V_EXPORT="${D2V_EXPORT:-d2v-export}"
if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  echo
  exec "$D2V_EXPORT" --help
fi
exec "$D2V_EXPORT" "$@"
