# --- kompakt job prelude (slurm/templates/prelude.sh): strict mode, environment, signals, requeue ---
set -euo pipefail
export PYTHONUNBUFFERED=1
# A job submitted from a shell inside another launcher must not inherit its ranks: srun's SLURM_PROCID
# (or this job's torchrun) decides them.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK TORCHELASTIC_RUN_ID MASTER_ADDR MASTER_PORT
{{ENVIRONMENT}}
# The training stages exit with 75 after saving when told to stop (and, under torchrun, rank 0 also
# leaves this marker, since torchrun reports its own status): the job then requeues itself.
export KOMPAKT_REQUEUE_MARKER="{{LOG_DIR}}/.requeue-${SLURM_JOB_ID}"  # an array task has a job id of its own
rm -f "$KOMPAKT_REQUEUE_MARKER"
max_requeues={{MAX_REQUEUES}}
step_pid=""
terminated=0

# Slurm's warning (--signal=B:USR1@T) reaches this shell only: forward it to the job step, whose
# processes save at the next step boundary. SIGTERM (scancel, scontrol requeue, preemption, the time
# limit itself) goes to the step too; Slurm decides what happens to the job then.
forward() {
  [[ $1 == TERM ]] && terminated=1
  echo "[batch $(hostname -s)] SIG$1: forwarding to the job step" >&2
  if [[ -n $step_pid ]]; then kill "-$1" "$step_pid" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# run_step CMD...: the job step in the background, so that the traps run while it works; sets step_rc.
run_step() {
  "$@" &
  step_pid=$!
  set +e
  wait "$step_pid"; step_rc=$?
  while (( step_rc > 128 )) && kill -0 "$step_pid" 2>/dev/null; do  # a trap interrupted the wait
    wait "$step_pid"; step_rc=$?
  done
  set -e
}

# finish: requeue after a save (exit 75 or the marker), otherwise end with the step's status. A job
# that failed for any other reason is not requeued; neither is one past max_requeues restarts.
finish() {
  if [[ $step_rc == 75 || -e $KOMPAKT_REQUEUE_MARKER ]]; then
    rm -f "$KOMPAKT_REQUEUE_MARKER"
    if (( terminated )); then
      echo "[batch] saved after SIGTERM; not requeueing here (Slurm requeues or cancels the job)" >&2
      exit 75
    fi
    restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts >= max_requeues )); then
      echo "[batch] saved, but already requeued $restarts times (max $max_requeues); not again" >&2
      exit 75
    fi
    echo "[batch] saved; requeueing job ${SLURM_JOB_ID} (restart $((restarts + 1)))" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$step_rc"
}
# --- end of prelude ---
