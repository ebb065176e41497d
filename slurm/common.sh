# Shared by slurm/*.sbatch (sourced, not run). See slurm/README.md.
#
# Each sbatch script can be used two ways:
#   sbatch [sbatch options] slurm/X.sbatch --config FILE [key=value ...]
#   NODES=2 GPUS_PER_NODE=4 slurm/X.sbatch --config FILE [key=value ...]   (submits itself, see below)

EXIT_PREEMPTED=75   # promptkd/training/signals.py: checkpoint written, resume with output.resume=auto

# Outside a job: submit the calling script with its size taken from the environment.
#   NODES (1), GPUS_PER_NODE (8; 0 = CPU-only tasks), TASKS_PER_NODE (GPUS_PER_NODE, or 1 without GPUs).
# Every other sbatch option comes from the usual SBATCH_* variables (SBATCH_PARTITION, SBATCH_TIMELIMIT, ...).
promptkd_submit_self() {
  local script=$1; shift
  local gpus=${GPUS_PER_NODE:-8}
  local tasks=${TASKS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
  export PROMPTKD_ROOT
  exec sbatch --nodes="${NODES:-1}" --ntasks-per-node="$tasks" --gpus-per-node="$gpus" "$script" "$@"
}

promptkd_banner() {
  echo "[promptkd] $(date '+%F %T') job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}:" \
       "${SLURM_NTASKS:-?} task(s) on ${SLURM_JOB_NODELIST:-?}: $*"
}

# `srun python launcher/main.py ARGS` as one step, one task per GPU (the launcher reads SLURM_* itself).
# The step runs in the background so that the batch shell can take signals while it waits:
#   USR1 (sbatch --signal=B:USR1@T, or `scancel --signal=USR1 --batch`) is forwarded to srun, which
#   passes it to every task: they checkpoint at the next step boundary and exit with EXIT_PREEMPTED.
#   TERM (scancel, time limit, preemption) is not forwarded: SLURM signals the tasks itself, and a
#   second signal would make them exit without a checkpoint.
# Sets STEP_RC to the step's exit code and STEP_TERMINATED=1 if the batch shell got TERM.
promptkd_step() {
  STEP_RC= STEP_TERMINATED= _STEP_SIGNALLED=
  promptkd_banner "$PYTHON launcher/main.py $*"
  srun --kill-on-bad-exit=1 "$PYTHON" "$PROMPTKD_ROOT/launcher/main.py" "$@" &
  _STEP_PID=$!
  trap '_STEP_SIGNALLED=1; echo "[promptkd] $(date +%T) got USR1: asking the step to checkpoint and stop"; kill -USR1 "$_STEP_PID" 2>/dev/null' USR1
  trap '_STEP_SIGNALLED=1 STEP_TERMINATED=1; echo "[promptkd] $(date +%T) got TERM"' TERM
  while :; do
    wait "$_STEP_PID"; STEP_RC=$?
    # a trapped signal interrupts `wait` with 128+N while the step still runs: wait again
    if [ "$STEP_RC" -gt 128 ] && [ -n "$_STEP_SIGNALLED" ]; then _STEP_SIGNALLED=; continue; fi
    break
  done
  trap - USR1 TERM
  echo "[promptkd] $(date '+%F %T') step exited with code $STEP_RC"
}

# A training step that is always resumable: output.resume=auto is added unless the caller set
# output.resume; a requeued job therefore continues from the latest complete checkpoint.
# On EXIT_PREEMPTED the job requeues itself (unless it is being cancelled); exits with the step's code.
promptkd_train() {
  local arg resume=output.resume=auto
  for arg in "$@"; do case $arg in output.resume=*) resume= ;; esac; done
  promptkd_step "$@" ${resume:+"$resume"}
  if [ "$STEP_RC" -eq "$EXIT_PREEMPTED" ] && [ -z "$STEP_TERMINATED" ]; then
    echo "[promptkd] preempted with a checkpoint: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || echo "[promptkd] requeue failed; resubmit with the same arguments to resume" >&2
  fi
  exit "$STEP_RC"
}

: "${PYTHON:=$( [ -x "$PROMPTKD_ROOT/.venv/bin/python" ] && echo "$PROMPTKD_ROOT/.venv/bin/python" || echo python3 )}"
# One OpenMP pool per task, of the size SLURM gave it (--cpus-per-task); otherwise the launcher decides.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}; fi
export PYTHONUNBUFFERED=1
