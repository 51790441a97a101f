#!/usr/bin/env bash
# One rank of a job step: `rank.sh CMD...` runs CMD with every line of its output prefixed by the node
# and the global rank, `[node17 r3] ...`, stdout to stdout and stderr to stderr. CMD replaces this
# shell (exec), so it is the process srun or torchrun started and that Slurm signals; the prefixers
# ignore the signals meant for it, so they keep the last lines of a rank that is saving.
set -euo pipefail
prefix="[$(hostname -s) r${RANK:-${SLURM_PROCID:-0}}] "
exec > >(trap '' TERM USR1 INT; exec sed -u "s/^/$prefix/") 2> >(trap '' TERM USR1 INT; exec sed -u "s/^/$prefix/" >&2)
exec "$@"
