#!/usr/bin/env bash
# data2vec 2.0 (or, with --v1, 1.0) speech pretraining. Run with --help for the details.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [DATA_DIR] [options] [hydra overrides key=value ...]

Without DATA_DIR: a CPU smoke test that needs no download. A small English speech corpus
is synthesized offline with espeak-ng (about 200 utterances, several voices and speaking
rates; espeak-ng writes 22,050 Hz audio, resampled to 16 kHz mono with scipy) and written
once to ./data/speech_demo/{wav/*.wav,train.tsv}; then the tiny model
(config/pretraining/audio_tiny.yaml: 2 blocks, dim 64, a 32-channel feature extractor) trains
on it on the CPU for 200 updates (under a minute on one core).

With DATA_DIR (a directory holding train.tsv, or the output directory of
datasets/librispeech/prepare.sh, whose manifests/ is used): the LibriSpeech 960 h base recipe
(config/pretraining/audio_base.yaml) on GPUs. The recipe's batch is 8 GPUs x 1,000,000
samples per update; unless --update-freq is given the script sets update_freq = 8 / GPUs
(rounded up) to keep it.

With --v1: data2vec 1.0 (data2vec_audio) instead, config/pretraining/v1_audio_tiny.yaml
without DATA_DIR, or Meta's data2vec 1.0 LibriSpeech recipe config/pretraining/v1_audio_base.yaml
with it (16 GPUs x 3,800,000 samples per update: update_freq = 16 / GPUs unless given).

Checkpoints go to --save-dir (default ./checkpoints/audio_tiny or ./checkpoints/audio_base;
with --v1 ./checkpoints/v1_audio_tiny or ./checkpoints/v1_audio_base);
re-running the same command resumes from DIR/checkpoint_last.pt.

Options:
  --gpus N           GPUs to train on per machine (default: all visible; DATA_DIR runs only);
                     with --cpu: N training processes on the CPU (gloo; default 1)
  --update-freq K    gradient accumulation steps (default: see above)
  --save-dir DIR     checkpoint directory
  --config NAME      config under config/pretraining (default: audio_tiny without DATA_DIR,
                     audio_base with it)
  --v1               data2vec 1.0 speech: default config v1_audio_tiny / v1_audio_base
  --cpu              train on the CPU (single process) even with a DATA_DIR
$(d2v_launch_help)
  -h, --help         show this help
  key=value          passed to fairseq-hydra-train, e.g. optimization.max_update=1000
                     dataset.max_tokens=1400000 model.modalities.audio.mask_prob=0.65

Environment:
  FAIRSEQ_HYDRA_TRAIN  the fairseq-hydra-train program (default: the one on PATH)
  PYTHON               the Python that writes the demo corpus (default: the one beside
                       fairseq-hydra-train, else python); needs soundfile and scipy
USAGE
}

log() { echo "[train_audio] $*"; }
die() { echo "[train_audio] error: $*" >&2; exit 1; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$script_dir/lib/common.sh"
config_dir="$(d2v_config_dir "$script_dir")"

# --v1 is this script's own option; the rest is the shared pretraining command line
V1=0
shared_args=()
for a in "$@"; do
    if [[ "$a" == "--v1" ]]; then V1=1; else shared_args+=("$a"); fi
done
d2v_parse_pretrain_args ${shared_args[@]+"${shared_args[@]}"}
prefix=""
recipe_gpus=8
if [[ $V1 -eq 1 ]]; then
    prefix="v1_"
    recipe_gpus=16
fi
d2v_find_hydra_train

# Synthesizes the demo corpus into DIR (DIR/wav/*.wav at 16 kHz, DIR/train.tsv, and
# DIR/utterances.tsv: each file's voice, rate and sentence, the labels of the probe).
write_speech_demo() {
    local out="$1"
    if [[ -f "$out/.complete" && -f "$out/train.tsv" && -f "$out/utterances.tsv" ]]; then
        log "using the synthesized speech in $out"
        return
    fi
    if ! command -v espeak-ng >/dev/null; then
        cat >&2 <<'MSG'
[train_audio] error: espeak-ng is not installed; the no-download demo synthesizes its speech with it.
Install it with one of:
    sudo apt-get install -y espeak-ng      # Debian, Ubuntu
    sudo dnf install -y espeak-ng          # Fedora
    brew install espeak-ng                 # macOS (Homebrew)
    conda install -c conda-forge espeak-ng
or train on your own data: scripts/train_audio.sh DATA_DIR (a directory with train.tsv).
MSG
        exit 1
    fi
    log "synthesizing a small speech corpus with espeak-ng into $out"
    "$PYTHON" - "$out" <<'PY' || die "could not synthesize the demo corpus (needs soundfile and scipy: pip install soundfile scipy)"
import os, shutil, subprocess, sys, tempfile
import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

out = sys.argv[1]
tmp = out + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(os.path.join(tmp, "wav"))
sentences = [
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
    "the juice of lemons makes fine punch",
    "the box was thrown beside the parked truck",
    "four hours of steady work faced us",
    "a large size in stockings is hard to sell",
    "the boy was there when the sun rose",
    "a rod is used to catch pink salmon",
    "the source of the huge river is the clear spring",
    "kick the ball straight and follow through",
    "help the woman get back to her feet",
    "a pot of tea helps to pass the evening",
    "smoky fires lack flame and heat",
    "the soft cushion broke the man's fall",
    "the salt breeze came across from the sea",
    "the girl at the booth sold fifty bonds",
    "the small pup gnawed a hole in the sock",
    "the fish twisted and turned on the bent hook",
    "press the pants and sew a button on the vest",
    "the swan dive was far short of perfect",
    "the beauty of the view stunned the young boy",
    "two blue fish swam in the tank",
    "her purse was full of useless trash",
    "the colt reared and threw the tall rider",
    "it snowed, rained, and hailed the same morning",
    "read verse out loud for pleasure",
    "hoist the load to your left shoulder",
    "take the winding path to reach the lake",
    "note closely the size of the gas tank",
    "wipe the grease off his dirty face",
    "mend the coat before you go out",
    "the wrist was badly strained and hung limp",
    "the stray cat gave birth to kittens",
    "the young girl gave no clear response",
    "the meal was cooked before the bell rang",
    "what joy there is in living",
    "a king ruled the state in the early days",
]
voices = ["en", "en-us", "en+f3", "en+m3", "en-gb-x-rp"]
speeds = [140, 165, 190]
# every sentence in 5 voices, at varying rates
jobs = [(text, voices[(i + k) % len(voices)], speeds[(i + 2 * k) % len(speeds)])
        for i, text in enumerate(sentences) for k in range(5)]
rows = []
labels = ["path\tvoice\trate\tsentence"]
with tempfile.TemporaryDirectory() as scratch:
    raw = os.path.join(scratch, "utt.wav")
    for n, (text, voice, rate) in enumerate(jobs, 1):
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", raw, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wav, sr = sf.read(raw, dtype="float32")
        if wav.ndim > 1:
            wav = wav.mean(axis=1)
        g = np.gcd(sr, 16000)
        wav = resample_poly(wav, 16000 // g, sr // g).astype(np.float32)
        name = f"wav/{n:04d}.wav"
        sf.write(os.path.join(tmp, name), wav, 16000, subtype="PCM_16")
        rows.append(f"{name}\t{len(wav)}")
        labels.append(f"{name}\t{voice}\t{rate}\t{text}")
        if n % 50 == 0 or n == len(jobs):
            print(f"[train_audio] synthesized {n}/{len(jobs)} utterances", flush=True)
with open(os.path.join(tmp, "utterances.tsv"), "w") as f:
    f.write("\n".join(labels) + "\n")
shutil.rmtree(out, ignore_errors=True)
os.rename(tmp, out)
with open(os.path.join(out, "train.tsv"), "w") as f:
    f.write(os.path.abspath(out) + "\n" + "\n".join(rows) + "\n")
open(os.path.join(out, ".complete"), "w").close()
PY
}

args=()
# default_override KEY=VALUE: add it unless the command line overrides KEY itself
default_override() {
    local o
    for o in "${overrides[@]}"; do
        [[ "${o%%=*}" == "${1%%=*}" ]] && return 0
    done
    args+=("$1")
}
if [[ -z "$DATA" ]]; then
    CONFIG="${CONFIG:-${prefix}audio_tiny}"
    DATA="data/speech_demo"
    write_speech_demo "$DATA"
    CPU=1
    QUICK_START=1
    # the demo corpus is ~200 short utterances: a few hundred updates, logged often
    default_override optimization.max_update=200
    default_override common.log_interval=25
    default_override checkpoint.save_interval_updates=100
else
    CONFIG="${CONFIG:-${prefix}audio_base}"
    [[ -d "$DATA" ]] || die "data directory $DATA does not exist"
    if [[ ! -f "$DATA/train.tsv" && -f "$DATA/manifests/train.tsv" ]]; then
        DATA="$DATA/manifests"
    fi
    [[ -f "$DATA/train.tsv" ]] \
        || die "$DATA/train.tsv does not exist: expected a wav2vec-style manifest (see datasets/librispeech/prepare.sh, or python -m d2v_plugin.prep.librispeech manifest --audio-dir WAVS --out $DATA)"
fi
d2v_resolve_pretrain_paths "$config_dir"

if [[ $CPU -eq 0 && -z "$GPUS" ]]; then
    d2v_detect_gpus
    GPUS="$VISIBLE_GPUS"
fi
# the recipe's batch: 8 GPUs x 1,000,000 samples (1.0: 16 GPUs x 3,800,000)
d2v_add_pretrain_device_args args "$recipe_gpus"
d2v_run_pretraining "$config_dir" "${args[@]}"
# quick start: the training curves, and a linear probe of the voice on sentences it never saw
if [[ "${QUICK_START:-0}" -eq 1 ]]; then
    d2v_quick_start_checks log "$SAVE_DIR" --data "$DATA" --label voice --group sentence
fi
