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
#
# Every training script also takes the launcher options (d2v_launch_option): --nodes,
# --node-rank, --master-addr, --master-port, --launcher, --dry-run; their state lives in the
# D2V_* variables below, and d2v_setup_launch turns it into the launcher prefix LAUNCH (empty,
# or torchrun's command) and the distributed_training.* overrides.

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
    d2v_init_launch_args
    while [[ $# -gt 0 ]]; do
        d2v_launch_option "$@"
        if [[ $D2V_SHIFT -gt 0 ]]; then shift "$D2V_SHIFT"; continue; fi
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
    d2v_check_launch_args
}

# ---- launchers: one process, torchrun (one machine or many) or Slurm --------------------

# d2v_init_launch_args: the launcher options' defaults (D2V_NODES etc. empty: see d2v_setup_launch).
d2v_init_launch_args() {
    D2V_NODES=""
    D2V_NODE_RANK=""
    D2V_MASTER_ADDR=""
    D2V_MASTER_PORT=""
    D2V_LAUNCHER=""
    D2V_DRY_RUN=0
    LAUNCH=()
    WORLD_SIZE_ARG=1
}

# d2v_launch_option ARG...: when $1 is a launcher option, store it and set D2V_SHIFT to the
# number of arguments it takes (else D2V_SHIFT=0). The options (shown in every script's --help):
#   --nodes N          machines (default 1; under Slurm: SLURM_NNODES)
#   --node-rank R      this machine's index, 0..N-1 (torchrun; default: $NODE_RANK, else 0)
#   --master-addr HOST the machine of node rank 0 (torchrun; default: $MASTER_ADDR; needed with N > 1)
#   --master-port P    its rendezvous port (default: $MASTER_PORT, else 29500)
#   --launcher L       torchrun, slurm or none (default: slurm inside a Slurm job step of several
#                      tasks, torchrun when more than one process trains, else none)
#   --dry-run          print the command and exit without running it
d2v_launch_option() {
    D2V_SHIFT=0
    case "$1" in
        --nodes) d2v_need_value "$@"; D2V_NODES="$2"; D2V_SHIFT=2 ;;
        --node-rank) d2v_need_value "$@"; D2V_NODE_RANK="$2"; D2V_SHIFT=2 ;;
        --master-addr) d2v_need_value "$@"; D2V_MASTER_ADDR="$2"; D2V_SHIFT=2 ;;
        --master-port) d2v_need_value "$@"; D2V_MASTER_PORT="$2"; D2V_SHIFT=2 ;;
        --launcher) d2v_need_value "$@"; D2V_LAUNCHER="$2"; D2V_SHIFT=2 ;;
        --dry-run) D2V_DRY_RUN=1; D2V_SHIFT=1 ;;
    esac
}

# d2v_launch_help: print the launcher options' lines for a script's --help.
d2v_launch_help() {
    cat <<'HELP'
  --nodes N          machines to train on (default 1; under Slurm: SLURM_NNODES); the world size
                     is N x the processes per machine (--gpus), and the default update_freq
                     keeps the recipe's batch for that world size
  --node-rank R      this machine's index 0..N-1 (torchrun; default: $NODE_RANK, else 0)
  --master-addr HOST machine of node rank 0, reachable from all (torchrun; default: $MASTER_ADDR;
                     needed with --nodes > 1)
  --master-port P    rendezvous port (torchrun; Slurm: fairseq's distributed_port)
                     (default: $MASTER_PORT, else 29500)
  --launcher L       torchrun | slurm | none (default: slurm inside a Slurm step of several
                     tasks, torchrun when more than one process trains, else none)
  --dry-run          print the command that would run, and exit
HELP
}

# d2v_check_launch_args: die on a malformed launcher option.
d2v_check_launch_args() {
    [[ -z "$D2V_NODES" || "$D2V_NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$D2V_NODES'"
    [[ -z "$D2V_NODE_RANK" || "$D2V_NODE_RANK" =~ ^[0-9]+$ ]] || die "--node-rank must be a non-negative integer, got '$D2V_NODE_RANK'"
    [[ -z "$D2V_MASTER_PORT" || "$D2V_MASTER_PORT" =~ ^[1-9][0-9]*$ ]] || die "--master-port must be a port number, got '$D2V_MASTER_PORT'"
    case "$D2V_LAUNCHER" in
        ""|torchrun|slurm|none) ;;
        *) die "--launcher must be torchrun, slurm or none, got '$D2V_LAUNCHER'" ;;
    esac
}

# d2v_setup_launch ARRAY PROCS_PER_NODE CPU: pick the launcher, set LAUNCH (the command prefix:
# empty, or torchrun's) and WORLD_SIZE_ARG (nodes x PROCS_PER_NODE, for d2v_add_cpu_args /
# d2v_add_gpu_args), and append to the array named ARRAY the other distributed_training.*
# overrides of that launch. CPU=1: the processes train on
# the CPU (gloo, and legacy_ddp: fairseq's c10d wrapper needs a GPU).
d2v_setup_launch() {
    local -n d2v_launch_out="$1"
    local procs="$2" cpu="$3"
    local launcher="$D2V_LAUNCHER"
    if [[ -z "$launcher" ]]; then
        if [[ -n "${SLURM_PROCID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
            launcher=slurm
        elif [[ $(( ${D2V_NODES:-1} * procs )) -gt 1 ]]; then
            launcher=torchrun
        else
            launcher=none
        fi
    fi
    local nodes="${D2V_NODES:-1}"
    if [[ "$launcher" == slurm ]]; then
        nodes="${D2V_NODES:-${SLURM_NNODES:-1}}"
    fi
    WORLD_SIZE_ARG=$(( nodes * procs ))
    local port="${D2V_MASTER_PORT:-${MASTER_PORT:-29500}}"
    LAUNCH=()
    case "$launcher" in
        torchrun)
            local addr="${D2V_MASTER_ADDR:-${MASTER_ADDR:-}}" rank="${D2V_NODE_RANK:-${NODE_RANK:-0}}"
            if [[ -z "$addr" ]]; then
                [[ $nodes -eq 1 ]] || die "--nodes $nodes needs --master-addr HOST (or MASTER_ADDR): the machine of node rank 0, reachable from every node"
                addr=localhost
            fi
            [[ $rank -lt $nodes ]] || die "--node-rank $rank is out of range for --nodes $nodes (0..$(( nodes - 1 )))"
            LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$nodes" --nproc-per-node "$procs"
                    --node-rank "$rank" --master-addr "$addr" --master-port "$port")
            # torchrun sets RANK / LOCAL_RANK per process; fairseq reads them through the config
            d2v_launch_out+=("distributed_training.distributed_init_method=env://" "distributed_training.distributed_no_spawn=true"
                             'distributed_training.distributed_rank=${oc.env:RANK}' 'distributed_training.device_id=${oc.env:LOCAL_RANK}')
            log "launching $WORLD_SIZE_ARG processes with torchrun: $nodes node(s) x $procs, this node's rank $rank, rendezvous at $addr:$port"
            ;;
        slurm)
            # fairseq reads SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_PROCID, SLURM_LOCALID (one task per
            # GPU), or spawns one process per GPU under one task per node
            d2v_launch_out+=("distributed_training.distributed_port=$port")
            log "launching under Slurm: $WORLD_SIZE_ARG processes ($nodes node(s) x $procs), port $port (fairseq reads Slurm's environment)"
            ;;
        none)
            [[ $nodes -eq 1 ]] || die "--nodes $nodes needs a launcher: --launcher torchrun or --launcher slurm"
            ;;
    esac
    if [[ $cpu -eq 1 && $WORLD_SIZE_ARG -gt 1 ]]; then
        d2v_launch_out+=(distributed_training.distributed_backend=gloo distributed_training.ddp_backend=legacy_ddp)
    fi
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

# d2v_add_cpu_args ARRAY UPDATE_FREQ [WORLD_SIZE]: append to the array named ARRAY the hydra
# overrides of a CPU run of WORLD_SIZE processes (default 1; more: see d2v_setup_launch), and
# optimization.update_freq when UPDATE_FREQ is not empty.
d2v_add_cpu_args() {
    local -n d2v_cpu_args_out="$1"
    d2v_cpu_args_out+=(common.cpu=true common.fp16=false "distributed_training.distributed_world_size=${3:-1}")
    if [[ -n "$2" ]]; then
        d2v_cpu_args_out+=("optimization.update_freq=[$2]")
    fi
}

# d2v_add_gpu_args ARRAY GPUS UPDATE_FREQ: append to the array named ARRAY the hydra overrides of
# a run on GPUS GPUs in all (the world size) with UPDATE_FREQ gradient accumulation steps.
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

# d2v_hydra_train TRAIN CONFIG_DIR CONFIG_NAME [OVERRIDE ...]: print, then run (under the
# launcher prefix LAUNCH of d2v_setup_launch, if any) the fairseq-hydra-train program TRAIN on
# CONFIG_DIR/CONFIG_NAME.yaml with the given hydra overrides; with --dry-run print and exit 0.
d2v_hydra_train() {
    local train="$1" config_dir="$2" config_name="$3"
    shift 3
    local cmd=(${LAUNCH[@]+"${LAUNCH[@]}"} "$train" --config-dir "$config_dir" --config-name "$config_name" "$@")
    echo "+ $(printf '%q ' "${cmd[@]}")"
    if [[ "${D2V_DRY_RUN:-0}" -eq 1 ]]; then
        exit 0
    fi
    "${cmd[@]}"
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
        d2v_setup_launch "$array" "${GPUS:-1}" 1
        d2v_add_cpu_args "$array" "$UPDATE_FREQ" "$WORLD_SIZE_ARG"
        log "training $CONFIG on the CPU ($WORLD_SIZE_ARG process(es))"
    else
        d2v_setup_launch "$array" "$GPUS" 0
        UPDATE_FREQ="${UPDATE_FREQ:-$(d2v_default_update_freq "$recipe_gpus" "$WORLD_SIZE_ARG")}"
        local -n d2v_device_args_out="$array"
        d2v_device_args_out+=(common.cpu=false)
        d2v_add_gpu_args "$array" "$WORLD_SIZE_ARG" "$UPDATE_FREQ"
        log "training $CONFIG on $WORLD_SIZE_ARG GPU(s), update_freq $UPDATE_FREQ"
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

# ---- after a quick start -------------------------------------------------------------

# d2v_quick_start_checks LOG_FUNCTION SAVE_DIR PROBE_ARG...: after a quick start, draw the
# training curves of SAVE_DIR into SAVE_DIR/training.png (d2v-plot; its summary says whether
# target_var / pred_var fell below the collapse thresholds) and run the linear probe of the
# pretrained encoder against the same encoder randomly initialised ($PYTHON -m d2v_plugin.probe
# SAVE_DIR/checkpoint_last.pt PROBE_ARG...). Training is done by then: a failure here is
# reported with LOG_FUNCTION, not fatal. Skipped when D2V_QUICK_START_CHECKS=0, or when there
# is no checkpoint_last.pt.
d2v_quick_start_checks() {
    local say="$1" save_dir="$2"
    shift 2
    local py="${PYTHON:-python}"
    if [[ "${D2V_QUICK_START_CHECKS:-1}" == "0" || ! -f "$save_dir/checkpoint_last.pt" ]]; then
        "$say" "draw the training curves with: d2v-plot $save_dir --out report.png"
        return 0
    fi
    "$say" "training curves: $py -m d2v_plugin.monitor.plot $save_dir --out $save_dir/training.png"
    if "$py" -m d2v_plugin.monitor.plot "$save_dir" --out "$save_dir/training.png"; then
        "$say" "plot: $save_dir/training.png (any time, also during training: d2v-plot $save_dir --out report.png --html report.html)"
    else
        "$say" "could not draw the training curves (see above)"
    fi
    "$say" "probe on held-out data: $py -m d2v_plugin.probe $save_dir/checkpoint_last.pt $*"
    "$py" -m d2v_plugin.probe "$save_dir/checkpoint_last.pt" "$@" || "$say" "the probe failed (see above)"
}
