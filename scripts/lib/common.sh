# Helpers shared by the training and fine-tuning scripts of scripts/.
#
# A script sources this file from its own directory:
#
#     SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
#     source "$SCRIPT_DIR/lib/common.sh"
#
# Sourcing only defines functions. Every script keeps its own messages: the functions that
# report something call the script's own `log MESSAGE` (print a progress line) and
# `die MESSAGE` (print an error and exit 1), and d2v_parse_pretrain_args calls its `usage`.
#
# The pretraining scripts (train_audio.sh, train_image.sh) share one command line; its state
# lives in these variables, set by d2v_parse_pretrain_args and read by the d2v_*pretrain*
# functions: DATA, CONFIG, SAVE_DIR, GPUS, UPDATE_FREQ (empty when not given), CPU (0 or 1)
# and the array `overrides` (the key=value arguments for fairseq-hydra-train).

# ---- paths ---------------------------------------------------------------------------

# d2v_repo_dir SCRIPT_DIR: print the repository root (the parent of scripts/).
d2v_repo_dir() {
    dirname "$1"
}

# d2v_config_dir SCRIPT_DIR: print the absolute path of the repository's config/ (fails if missing).
d2v_config_dir() {
    cd "$(d2v_repo_dir "$1")/config" && pwd
}

# ---- command line of the pretraining scripts -----------------------------------------

# d2v_need_value OPTION [VALUE ...]: die unless OPTION is followed by a non-empty value.
d2v_need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

# d2v_parse_pretrain_args ARG...: parse the command line of train_audio.sh / train_image.sh
# ([DATA_DIR] [--gpus N] [--update-freq K] [--save-dir DIR] [--config NAME] [--cpu] [-h]
# [key=value ...]) into the variables listed at the top of this file.
d2v_parse_pretrain_args() {
    DATA=""
    GPUS=""
    UPDATE_FREQ=""
    SAVE_DIR=""
    CONFIG=""
    CPU=0
    overrides=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --gpus) d2v_need_value "$@"; GPUS="$2"; shift 2 ;;
            --update-freq) d2v_need_value "$@"; UPDATE_FREQ="$2"; shift 2 ;;
            --save-dir) d2v_need_value "$@"; SAVE_DIR="$2"; shift 2 ;;
            --config) d2v_need_value "$@"; CONFIG="$2"; shift 2 ;;
            --cpu) CPU=1; shift ;;
            -h|--help) usage; exit 0 ;;
            -*) die "unknown option '$1' (see --help)" ;;
            *=*) overrides+=("$1"); shift ;;
            *)
                [[ -z "$DATA" ]] || die "more than one data directory given ('$DATA', '$1')"
                DATA="$1"; shift ;;
        esac
    done
    [[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$GPUS'"
    [[ -z "$UPDATE_FREQ" || "$UPDATE_FREQ" =~ ^[1-9][0-9]*$ ]] || die "--update-freq must be a positive integer, got '$UPDATE_FREQ'"
}

# ---- programs and devices ------------------------------------------------------------

# d2v_find_hydra_train: set TRAIN to the fairseq-hydra-train program ($FAIRSEQ_HYDRA_TRAIN, else
# the one on PATH; die if there is none) and, unless PYTHON is set, PYTHON to the python beside
# it (else python).
d2v_find_hydra_train() {
    TRAIN="${FAIRSEQ_HYDRA_TRAIN:-$(command -v fairseq-hydra-train || true)}"
    [[ -n "$TRAIN" && -x "$TRAIN" ]] \
        || die "fairseq-hydra-train not found: install the plugin (pip install -e . in this repository) and activate its environment"
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON="$(dirname "$TRAIN")/python"
        [[ -x "$PYTHON" ]] || PYTHON=python
    fi
}

# d2v_gpu_count: print how many CUDA GPUs torch sees, asking $PYTHON (fails if torch does).
d2v_gpu_count() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'
}

# d2v_detect_gpus: set VISIBLE_GPUS to the number of visible CUDA GPUs; die when there is none
# (or torch cannot tell), pointing at the pretraining scripts' CPU options.
d2v_detect_gpus() {
    VISIBLE_GPUS="$(d2v_gpu_count 2>/dev/null || echo 0)"
    [[ "$VISIBLE_GPUS" =~ ^[0-9]+$ && "$VISIBLE_GPUS" -gt 0 ]] \
        || die "no CUDA GPU visible; use --cpu (slow) or run without DATA_DIR for the CPU smoke test"
}

# d2v_default_update_freq RECIPE_GPUS GPUS: print the gradient accumulation steps that keep the
# batch of a recipe made for RECIPE_GPUS GPUs on GPUS GPUs (RECIPE_GPUS / GPUS, rounded up).
d2v_default_update_freq() {
    local recipe_gpus="$1" gpus="$2"
    echo $(( (recipe_gpus + gpus - 1) / gpus ))
}

# ---- fairseq-hydra-train arguments and runs ------------------------------------------

# d2v_add_cpu_args ARRAY UPDATE_FREQ: append to the array named ARRAY the hydra overrides of a
# single-process CPU run, and optimization.update_freq when UPDATE_FREQ is not empty.
d2v_add_cpu_args() {
    local -n d2v_cpu_args_out="$1"
    d2v_cpu_args_out+=(common.cpu=true common.fp16=false distributed_training.distributed_world_size=1)
    if [[ -n "$2" ]]; then
        d2v_cpu_args_out+=("optimization.update_freq=[$2]")
    fi
}

# d2v_add_gpu_args ARRAY GPUS UPDATE_FREQ: append to the array named ARRAY the hydra overrides of
# a run on GPUS GPUs with UPDATE_FREQ gradient accumulation steps.
d2v_add_gpu_args() {
    local -n d2v_gpu_args_out="$1"
    d2v_gpu_args_out+=("distributed_training.distributed_world_size=$2" "optimization.update_freq=[$3]")
}

# d2v_log_resume SAVE_DIR [LOG_FUNCTION]: when SAVE_DIR holds checkpoint_last.pt (which
# fairseq resumes from), say so with LOG_FUNCTION (default: the script's log).
d2v_log_resume() {
    local checkpoint="$1/checkpoint_last.pt" say="${2:-log}"
    if [[ -f "$checkpoint" ]]; then
        "$say" "resuming from $checkpoint"
    fi
}

# d2v_hydra_train TRAIN CONFIG_DIR CONFIG_NAME [OVERRIDE ...]: run the fairseq-hydra-train
# program TRAIN on CONFIG_DIR/CONFIG_NAME.yaml with the given hydra overrides.
d2v_hydra_train() {
    local train="$1" config_dir="$2" config_name="$3"
    shift 3
    "$train" --config-dir "$config_dir" --config-name "$config_name" "$@"
}

# ---- the pretraining scripts' run ----------------------------------------------------

# d2v_resolve_pretrain_paths CONFIG_DIR: check that CONFIG_DIR/pretraining/$CONFIG.yaml exists,
# make DATA absolute and create SAVE_DIR (default: checkpoints/$CONFIG), made absolute too.
d2v_resolve_pretrain_paths() {
    local config_dir="$1"
    DATA="$(cd "$DATA" && pwd)"
    [[ -f "$config_dir/pretraining/$CONFIG.yaml" ]] || die "no config $config_dir/pretraining/$CONFIG.yaml"
    SAVE_DIR="${SAVE_DIR:-checkpoints/$CONFIG}"
    mkdir -p "$SAVE_DIR"
    SAVE_DIR="$(cd "$SAVE_DIR" && pwd)"
}

# d2v_add_pretrain_device_args ARRAY RECIPE_GPUS: append to the array named ARRAY the overrides
# of a CPU run (CPU=1) or of a run on $GPUS GPUs, whose update_freq defaults to what keeps the
# batch of a recipe made for RECIPE_GPUS GPUs; log which it is.
d2v_add_pretrain_device_args() {
    local array="$1" recipe_gpus="$2"
    if [[ $CPU -eq 1 ]]; then
        d2v_add_cpu_args "$array" "$UPDATE_FREQ"
        log "training $CONFIG on the CPU"
    else
        UPDATE_FREQ="${UPDATE_FREQ:-$(d2v_default_update_freq "$recipe_gpus" "$GPUS")}"
        local -n d2v_device_args_out="$array"
        d2v_device_args_out+=(common.cpu=false)
        d2v_add_gpu_args "$array" "$GPUS" "$UPDATE_FREQ"
        log "training $CONFIG on $GPUS GPU(s), update_freq $UPDATE_FREQ"
    fi
}

# d2v_run_pretraining CONFIG_DIR [OVERRIDE ...]: train pretraining/$CONFIG on DATA into SAVE_DIR
# (resuming from its checkpoint_last.pt), with the given overrides then the command line's, and
# say where the checkpoint is and how to load its encoder.
d2v_run_pretraining() {
    local config_dir="$1"
    shift
    d2v_log_resume "$SAVE_DIR"
    d2v_hydra_train "$TRAIN" "$config_dir" "pretraining/$CONFIG" \
        "task.data=$DATA" "checkpoint.save_dir=$SAVE_DIR" "$@" "${overrides[@]}"
    log "done. checkpoints: $SAVE_DIR (checkpoint_last.pt)"
    log "load the encoder with: python -c \"import d2v_plugin; enc = d2v_plugin.load_encoder('$SAVE_DIR/checkpoint_last.pt')\""
}
