#!/bin/bash
# A smifdb runner for one SLURM allocation: it claims jobs from the shared queue until the
# queue is empty (or the allocation nears its end), then drains and exits.
#
#   sbatch examples/deploy/slurm-runner.sh            # one runner
#   sbatch --array=1-8 examples/deploy/slurm-runner.sh  # eight at once (one per array element)
#
# SLURM sends SIGTERM to the batch shell (B:) 120 s before the time limit, and only to it: the
# runner (exec'd below, so it *is* the batch shell) stops claiming, gives running jobs --grace
# seconds, then stops the rest and hands them back to the queue (status ready, attempt not
# counted) for other runners. 120 s covers --grace 60, 5 s for job processes to die, and the
# final writes. Without B:, SLURM would signal the job processes too and they would die at once.
#SBATCH --job-name=smifdb-runner
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem-per-cpu=2G
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --output=smifdb-runner-%j.out
set -euo pipefail

# Every node reaches the same PostgreSQL (the embedded default listens on a local socket only).
export SMIFDB_DSN="${SMIFDB_DSN:?set SMIFDB_DSN, e.g. postgresql://smifdb@db.example.org/smifdb}"
# Job logs on the shared filesystem, so they can be read from anywhere.
LOG_DIR="${SMIFDB_LOG_DIR:-$HOME/smifdb/logs}"
# Array elements get their own job id, so names are unique among live runners either way.
NAME="slurm-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}-${SLURM_ARRAY_TASK_ID:-0}"

# Optional: activate the environment smifdb (and the models) are installed in.
# source "$HOME/smifdb/.venv/bin/activate"

# exec: the runner replaces this shell, so SLURM's signal reaches it.
# --exit-when-idle: exit 0 once no workflow anywhere is unfinished, returning the allocation.
exec smifdb runner run \
    --name "$NAME" \
    --slots "$SLURM_CPUS_PER_TASK" \
    --grace 60 \
    --log-dir "$LOG_DIR" \
    --exit-when-idle \
    --log-format json
