# shellcheck shell=bash
# Shared body of the Slurm launchers (launch/*.sh source this file and call mimae_launch).
#
# One rank per GPU, started by `srun`; each rank reads its rank, local rank and world size from
# SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and meets the others at MASTER_ADDR:MASTER_PORT.
#
# Preemption and time limits: the launchers ask for `--signal=B:USR2@120`, so Slurm signals this
# batch shell 120 s before the end. The trap forwards USR2 to the ranks (through srun), which finish
# their step, write a checkpoint and exit 75; then this script runs `scontrol requeue` and the job
# comes back with the same id and run directory and resumes from the newest complete checkpoint.
# Exit 0 (schedule done) never requeues, nor does a failure without USR2 (bad config 2, non-finite
# loss 3, crash 1), nor a full disk (74, even after USR2). Any other exit after USR2 requeues: the
# newest complete checkpoint is intact, and only a new USR2 can requeue again. SIGTERM (scancel, or
# the end of a grace period) also makes the ranks checkpoint, but never requeues: a requeue would undo
# a user's scancel (resubmit the same script to resume). Before srun, the configuration is validated
# for the real world size (exit 2, no ranks).
#
# Site settings, all optional (defaults in brackets). Resources are ordinary sbatch options:
#   sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G [--partition=P] [--account=A]
#          [--time=T] [--cpus-per-task=C] launch/<script>.sh [key.sub=value ...]
# or SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_TIMELIMIT in the environment. Arguments after the
# script are config overrides for mimae_scale/train.py (they win over everything below).
#   MIMAE_REPO             checkout holding mimae_scale/ and launch/ [the submitted script's ../]
#   MIMAE_ENV_SETUP        shell code run before training, e.g. "module load cuda; source ~/venv/bin/activate"
#                          [source $MIMAE_REPO/.venv/bin/activate when it exists]
#   MIMAE_PYTHON           interpreter the ranks run [python]
#   MIMAE_SRUN_ARGS        extra srun options, split on spaces, e.g. "--container-image=IMG" [none]
#   MIMAE_CONFIG           config name or YAML path [the launcher's]
#   MIMAE_DATA             training shards (data.train_shards) [the config's]
#   MIMAE_VAL_DATA         held-out shards (data.val_shards) [the config's]
#   MIMAE_INIT             pretrained encoder of a fine-tuning or probing run (finetune.init) [the config's]
#   MIMAE_OUTPUT_ROOT      where run directories go [$MIMAE_REPO/runs]
#   MIMAE_RUN_DIR          this run's directory; keep it to resume [$MIMAE_OUTPUT_ROOT/<launcher's name>]
#   MIMAE_GLOBAL_BATCH     images per optimiser step over all ranks [the launcher's, 4096]
#   MIMAE_MAX_MICRO_BATCH  most images per GPU per forward; accumulation makes up the rest [the launcher's]
#   MIMAE_MASTER_PORT      rendezvous port [20000 + derived from the job id and restart count]
#   MIMAE_METRICS_BIND     address the per-rank Prometheus exporters bind to [0.0.0.0]
#   MIMAE_METRICS_PORT     exporter port of local rank 0; rank r uses +r [9410; 9400 is DCGM's]
#   MIMAE_TARGETS_DIR      Prometheus file_sd directory for this job's targets [$MIMAE_RUN_DIR/prometheus]
#   MIMAE_DRY_RUN          1: print the plan and the srun command, run nothing [0]
# Thread and NCCL defaults (each kept when already set): OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK (or 1),
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 and NCCL_ASYNC_ERROR_HANDLING=1 (a dead rank aborts the others
# instead of hanging them), NCCL_DEBUG=WARN, PYTHONUNBUFFERED=1, PYTHONFAULTHANDLER=1.

# The trainer's exit statuses this script acts on (docs/CLUSTER.md, "Exit codes"): the values of
# mimae_scale/exit_codes.py's EXIT_OK, EXIT_ERROR, EXIT_REQUEUE, EXIT_CONFIG and EXIT_DISK_FULL, which a
# test holds them to.
readonly MIMAE_EXIT_OK=0
readonly MIMAE_EXIT_ERROR=1
readonly MIMAE_EXIT_REQUEUE=75
readonly MIMAE_EXIT_CONFIG=2
readonly MIMAE_EXIT_DISK_FULL=74

mimae_log() {
  printf '[mimae-launch %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

mimae_die() {
  local code=$1
  shift
  mimae_log "error: $*"
  exit "$code"
}

mimae_require_count() {
  local name=$1 value=$2
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || mimae_die "$MIMAE_EXIT_CONFIG" "$name=$value: expected a positive integer"
}

# Largest micro-batch <= MAX that divides the per-rank batch PER_RANK (printed).
mimae_micro_batch() {
  local per_rank=$1 max=$2 micro
  for ((micro = max < per_rank ? max : per_rank; micro >= 1; micro--)); do
    if ((per_rank % micro == 0)); then
      echo "$micro"
      return 0
    fi
  done
  return 1
}

# Signal handling: remember what arrived and pass it on to the ranks through srun.
MIMAE_SRUN_PID=""
MIMAE_GOT_USR2=0
MIMAE_GOT_TERM=0
MIMAE_INTERRUPTED=0

mimae_forward() {
  local sig=$1
  MIMAE_INTERRUPTED=1
  if [[ "$sig" == USR2 ]]; then MIMAE_GOT_USR2=1; else MIMAE_GOT_TERM=1; fi
  mimae_log "received SIG$sig: asking the ranks to checkpoint and stop"
  # srun passes the signal on to every task of the step.
  if [[ -n "$MIMAE_SRUN_PID" ]]; then
    kill -s "$sig" "$MIMAE_SRUN_PID" 2>/dev/null || true
  fi
}

# mimae_launch CONFIG RUN_NAME GLOBAL_BATCH MAX_MICRO_BATCH [override ...]
mimae_launch() {
  local config=${MIMAE_CONFIG:-$1} run_name=$2
  local global=${MIMAE_GLOBAL_BATCH:-$3} max_micro=${MIMAE_MAX_MICRO_BATCH:-$4}
  shift 4
  local repo=${MIMAE_REPO:?MIMAE_REPO must be set before sourcing common.sh}
  mimae_require_count MIMAE_GLOBAL_BATCH "$global"
  mimae_require_count MIMAE_MAX_MICRO_BATCH "$max_micro"
  [[ -n "${SLURM_JOB_ID:-}" ]] || mimae_die "$MIMAE_EXIT_CONFIG" \
    "not inside a Slurm job: submit with sbatch (or use the deepspeed launcher on one machine, see README)"

  # -- geometry: one task per GPU -------------------------------------------------------------
  # SLURM_JOB_NUM_NODES is this run's allocation, but SLURM_NTASKS is the submission's: a job
  # requeued onto another node count (`scontrol update JobId=.. NumNodes=..` while it is pending,
  # or --nodes=MIN-MAX) still carries the old task count. The world is nodes x tasks per node.
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local world per_node=${SLURM_NTASKS_PER_NODE:-}
  if [[ -n "$per_node" ]]; then
    mimae_require_count SLURM_NTASKS_PER_NODE "$per_node"
    world=$((nodes * per_node))
  else
    world=${SLURM_NTASKS:-}
    [[ -n "$world" ]] || mimae_die "$MIMAE_EXIT_CONFIG" "SLURM_NTASKS is unset: submit with --ntasks-per-node"
    per_node=$((world / nodes))
    ((per_node * nodes == world)) || mimae_die "$MIMAE_EXIT_CONFIG" \
      "$world tasks do not spread evenly over $nodes nodes: use --ntasks-per-node"
  fi
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]] && ((SLURM_GPUS_ON_NODE != per_node)); then
    mimae_die "$MIMAE_EXIT_CONFIG" "one task per GPU: --ntasks-per-node=$per_node but $SLURM_GPUS_ON_NODE GPUs per node"
  fi
  ((global % world == 0)) || mimae_die "$MIMAE_EXIT_CONFIG" \
    "global batch $global does not split over $world ranks (MIMAE_GLOBAL_BATCH)"
  local per_rank=$((global / world)) micro accum
  micro=$(mimae_micro_batch "$per_rank" "$max_micro")
  accum=$((per_rank / micro))

  # -- rendezvous, paths, environment ---------------------------------------------------------
  local restart=${SLURM_RESTART_COUNT:-0}
  local master_addr
  master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  [[ -n "$master_addr" ]] || mimae_die "$MIMAE_EXIT_ERROR" "cannot read the node list $SLURM_JOB_NODELIST"
  export MASTER_ADDR=$master_addr
  # sbatch exports the submitting shell's environment. Rank variables left there by torchrun or an
  # earlier job would win over Slurm's in the trainer (RANK is how torchrun announces ranks), and
  # every task would believe it is rank 0 of a world of 1: each rank takes its place from srun only.
  unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK
  # A fresh port per job and per restart: no clash with a previous incarnation's lingering socket.
  export MASTER_PORT=${MIMAE_MASTER_PORT:-$((20000 + (SLURM_JOB_ID % 5000) * 8 + restart % 8))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1

  local run_dir=${MIMAE_RUN_DIR:-${MIMAE_OUTPUT_ROOT:-$repo/runs}/$run_name}
  local port_base=${MIMAE_METRICS_PORT:-9410}
  local targets_dir=${MIMAE_TARGETS_DIR:-$run_dir/prometheus}
  local -a overrides=(
    "run_dir=$run_dir"
    "train.global_batch=$global"
    "train.micro_batch=$micro"
    "metrics.bind_address=${MIMAE_METRICS_BIND:-0.0.0.0}"
    "metrics.port_base=$port_base"
  )
  if [[ -n "${MIMAE_DATA:-}" ]]; then overrides+=("data.train_shards=$MIMAE_DATA"); fi
  if [[ -n "${MIMAE_VAL_DATA:-}" ]]; then overrides+=("data.val_shards=$MIMAE_VAL_DATA"); fi
  if [[ -n "${MIMAE_INIT:-}" ]]; then overrides+=("finetune.init=$MIMAE_INIT"); fi
  overrides+=("$@") # the user's own overrides come last and win

  local -a srun_args=(--ntasks="$world" --ntasks-per-node="$per_node" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
  local -a site_srun_args=()
  read -r -a site_srun_args <<<"${MIMAE_SRUN_ARGS:-}"
  srun_args+=("${site_srun_args[@]}")
  local -a cmd=("${MIMAE_PYTHON:-python}" "$repo/mimae_scale/train.py" --config "$config" "${overrides[@]}")

  mimae_log "job $SLURM_JOB_ID restart $restart: config $config, $nodes node(s) x $per_node rank(s) = $world"
  mimae_log "batch: global $global = micro $micro x $world ranks x accumulation $accum"
  mimae_log "rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $run_dir"
  if [[ "${MIMAE_DRY_RUN:-0}" == 1 ]]; then
    printf 'MASTER_ADDR=%q MASTER_PORT=%q srun' "$MASTER_ADDR" "$MASTER_PORT"
    printf ' %q' "${srun_args[@]}" "${cmd[@]}"
    printf '\n'
    return 0
  fi

  trap 'mimae_forward USR2' USR2
  trap 'mimae_forward TERM' TERM
  mimae_activate "$repo"
  mimae_preflight "$world" "${cmd[@]}"
  mkdir -p "$run_dir"
  mimae_write_targets "$repo" "$targets_dir" "$port_base" "$per_node"
  # A stop signal before the ranks exist: nothing new to save, the run dir's checkpoint stands.
  if ((MIMAE_GOT_USR2 || MIMAE_GOT_TERM)); then mimae_after_ranks "$MIMAE_EXIT_REQUEUE"; fi

  srun "${srun_args[@]}" "${cmd[@]}" &
  MIMAE_SRUN_PID=$!
  # A signal between `srun &` and the line above found no PID to forward to: forward it now.
  if ((MIMAE_GOT_USR2)); then kill -s USR2 "$MIMAE_SRUN_PID" 2>/dev/null || true; fi
  if ((MIMAE_GOT_TERM)); then kill -s TERM "$MIMAE_SRUN_PID" 2>/dev/null || true; fi

  # `wait` returns early (status > 128) when a trapped signal arrives: wait again for the ranks.
  local rc
  while :; do
    MIMAE_INTERRUPTED=0
    rc=0
    wait "$MIMAE_SRUN_PID" || rc=$?
    if ((MIMAE_INTERRUPTED && rc > 128)); then continue; fi
    break
  done
  mimae_log "ranks exited with status $rc"
  mimae_remove_targets
  mimae_after_ranks "$rc"
}

mimae_activate() {
  local repo=$1
  # Activation scripts and `module load` read unset variables: relax `set -u` while they run.
  set +u
  if [[ -n "${MIMAE_ENV_SETUP:-}" ]]; then
    eval "$MIMAE_ENV_SETUP"
  elif [[ -f "$repo/.venv/bin/activate" ]]; then
    # shellcheck source=/dev/null
    source "$repo/.venv/bin/activate"
  fi
  set -u
}

# Check the configuration here, for the real world size, before any rank starts: a bad override
# costs a second instead of a whole allocation's start-up. Only the config module is imported (no
# torch); where the batch host has no Python environment (a container run), the ranks check it.
# mimae_preflight WORLD PYTHON TRAIN_PY --config CONFIG OVERRIDE...
mimae_preflight() {
  local world=$1 python=$2 config=$5
  shift 5
  if ! command -v "$python" >/dev/null; then
    mimae_log "no $python on this host: the ranks will check the configuration"
    return 0
  fi
  local rc=0
  "$python" - "$config" "$world" "$@" <<'PY' || rc=$?
import sys

try:
    from mimae_scale.config import ConfigError, load_config, validate
    from mimae_scale.exit_codes import EXIT_CONFIG
except ImportError as exc:
    print(f"[mimae-launch] config not checked before srun ({exc}); the ranks will check it", file=sys.stderr)
    sys.exit(0)
try:
    validate(load_config(sys.argv[1], sys.argv[3:]), int(sys.argv[2]))
except ConfigError as exc:
    print(f"ConfigError: {exc}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)
PY
  # A stop signal also reaches this foreground check; the caller handles the signal itself.
  if ((rc == 0 || MIMAE_GOT_USR2 || MIMAE_GOT_TERM)); then return 0; fi
  if ((rc == MIMAE_EXIT_CONFIG)); then mimae_die "$rc" "bad configuration: nothing started, not requeueing"; fi
  mimae_die "$rc" "the configuration check failed (status $rc): nothing started, not requeueing"
}

# Decide what the job does once the ranks are gone.
mimae_after_ranks() {
  local rc=$1
  if ((rc == MIMAE_EXIT_OK)); then
    mimae_log "training finished: not requeueing"
    exit "$MIMAE_EXIT_OK"
  fi
  # 74: the disk filled during a checkpoint (the previous one is intact). Never requeued, not even
  # after USR2: the requeued job would meet the same full disk and lose its queue time again.
  if ((rc == MIMAE_EXIT_DISK_FULL)); then
    mimae_log "disk full (status $rc, see train.log): not requeueing; free space, then resubmit the same script to resume"
    exit "$rc"
  fi
  # 75: every rank wrote its part of a checkpoint. Any other failure after our USR2 (a rank that
  # the signal caught before its handler was installed, say) also requeues: the newest complete
  # checkpoint is intact, and a requeue needs a new USR2 to repeat, so a crash cannot loop.
  if ((rc == MIMAE_EXIT_REQUEUE || MIMAE_GOT_USR2)); then
    if ((MIMAE_GOT_TERM)); then
      mimae_log "stopped by SIGTERM (ranks: status $rc): not requeueing; resubmit the same script to resume"
      exit "$rc"
    fi
    mimae_log "requeueing job $SLURM_JOB_ID: it resumes from the newest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || mimae_die "$rc" "scontrol requeue failed; resubmit to resume"
    exit "$MIMAE_EXIT_OK"
  fi
  mimae_log "training failed (status $rc): not requeueing; see the run directory's train.log"
  exit "$rc"
}

# Prometheus file_sd targets for every rank of this job (launch/monitoring/write_targets.sh, when
# present; it writes TARGETS_DIR/JOB_NAME.json). Monitoring is optional: a failure here is reported
# and training goes on. The file is removed when the ranks are gone (a requeue writes it again).
MIMAE_TARGETS_FILE=""

mimae_write_targets() {
  local repo=$1 targets_dir=$2 port_base=$3 per_node=$4
  local writer="$repo/launch/monitoring/write_targets.sh" job=${SLURM_JOB_NAME:-mimae}
  if [[ ! -f "$writer" ]]; then
    mimae_log "no $writer: Prometheus targets not written"
    return 0
  fi
  if bash "$writer" "$targets_dir" "$job" "$port_base" "$per_node"; then
    MIMAE_TARGETS_FILE="$targets_dir/$job.json"
    mimae_log "Prometheus targets: $MIMAE_TARGETS_FILE"
  else
    mimae_log "warning: $writer failed; training continues without Prometheus targets"
  fi
}

mimae_remove_targets() {
  if [[ -n "$MIMAE_TARGETS_FILE" ]]; then rm -f "$MIMAE_TARGETS_FILE"; fi
}
