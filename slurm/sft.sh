#!/usr/bin/env bash
# Keel supervised fine-tuning on a Slurm allocation: a Ray cluster over the job's nodes, then
# `keel train cluster=slurm` with this script's arguments as Hydra overrides.
#
#   sbatch slurm/sft.sh model=llama3 mix.T=2
#   sbatch --nodes=4 --gpus-per-node=8 --partition=gpu --time=48:00:00 slurm/sft.sh model=llama3
#
# Options given to sbatch override the defaults below. Each node gets 8 GPUs (--gpus-per-node=8;
# `sbatch --gpus-per-node=4 ...` for other nodes). Sites whose Slurm only takes GRES requests (no
# --gpus-per-node, e.g. select/cons_res) change that line to `#SBATCH --gres=gpu:8`. A CPU-only job
# (`sbatch --gpus-per-node=0 ...`) runs one CPU worker per node, and `keel train` then refuses any
# model but tiny unless cluster.use_gpu=false is given. The partition is site-specific: pass
# --partition. Site setup (modules, venv/conda, NCCL, caches) lives in slurm/env.sh. Everything the run writes goes to
# outputs/slurm-<jobid>/ under the submit directory, logs in its logs/ (sft.log: this script
# and the driver; ray-<node>.log: each Ray node). Slurm's own keel-sft-<jobid>.out only
# catches what fails before that directory exists (Slurm cannot create directories).
#
# Preemption: Slurm sends USR1 120 s before the time limit (or `scancel --signal=USR1 --batch`);
# the script forwards it to the driver, which checkpoints after the current step and exits 75;
# the script then requeues the job, and the requeued job resumes from that checkpoint.
#
#SBATCH --job-name=keel-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=keel-sft-%j.out
set -euo pipefail

EXIT_PREEMPTED=75  # keel.launch.signals.EXIT_PREEMPTED

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/sft.sh: submit it with sbatch, e.g. sbatch slurm/sft.sh model=llama3 mix.T=2" >&2
    exit 2
fi
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
cd "$SUBMIT_DIR"
# sbatch runs a spool copy of this script; its helpers lie beside the submitted original.
SCRIPT=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p' | head -n 1)
SLURM_DIR=${KEEL_SLURM_DIR:-$(cd "$(dirname "${SCRIPT%% *}")" && pwd)}

RUN_DIR="$SUBMIT_DIR/outputs/slurm-$SLURM_JOB_ID"
mkdir -p "$RUN_DIR/logs"
echo "slurm/sft.sh: logs in $RUN_DIR/logs"
exec >>"$RUN_DIR/logs/sft.log" 2>&1
echo "slurm/sft.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run dir $RUN_DIR"

# shellcheck disable=SC1090
source "${KEEL_ENV_FILE:-$SLURM_DIR/env.sh}"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
export KEEL_RAY_PORT=${KEEL_RAY_PORT:-$((20000 + (SLURM_JOB_ID % 4000) * 10))}
export KEEL_RAY_TMPDIR=${KEEL_RAY_TMPDIR:-/tmp/ray-$SLURM_JOB_ID}
export KEEL_RUN_DIR=$RUN_DIR
KEEL_RAY_HEAD_IP=$("$SLURM_DIR/ray_node.sh" ip "$HEAD")
export KEEL_RAY_HEAD_IP
export RAY_ADDRESS="$KEEL_RAY_HEAD_IP:$KEEL_RAY_PORT"
# Token auth with a fresh secret per job, handed to every node through the environment
# (a stale ~/.ray/auth_token cannot get in the way).
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}
export RAY_AUTH_TOKEN

STEPS=()
teardown() {
    trap - EXIT
    echo "slurm/sft.sh: stopping Ray on ${#NODES[@]} node(s)"
    for pid in "${STEPS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 10); do
        alive=0
        for pid in "${STEPS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 1
    done
    # srun waits KillWait for its tasks; Slurm reaps whatever is left when the job ends.
    for pid in "${STEPS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$KEEL_RAY_TMPDIR"
}
trap teardown EXIT

wait_for_head() {
    for _ in $(seq 1 "${KEEL_RAY_HEAD_TIMEOUT_S:-180}"); do
        if (exec 3<>"/dev/tcp/$KEEL_RAY_HEAD_IP/$KEEL_RAY_PORT") 2>/dev/null; then return 0; fi
        sleep 1
    done
    echo "slurm/sft.sh: the Ray head did not come up, see $RUN_DIR/logs/ray-$HEAD.log" >&2
    return 1
}

srun --nodes=1 --ntasks=1 --nodelist="$HEAD" --overlap --kill-on-bad-exit=0 "$SLURM_DIR/ray_node.sh" head &
STEPS+=($!)
wait_for_head
if [ "${#NODES[@]}" -gt 1 ]; then
    srun --nodes=$((${#NODES[@]} - 1)) --ntasks=$((${#NODES[@]} - 1)) --ntasks-per-node=1 --exclude="$HEAD" \
        --overlap --kill-on-bad-exit=0 "$SLURM_DIR/ray_node.sh" worker &
    STEPS+=($!)
fi

# Resume from the run's newest checkpoint unless the command line decides otherwise.
OVERRIDES=("$@")
case " $* " in
    *" trainer.resume="*) ;;
    *) OVERRIDES=(trainer.resume=auto "${OVERRIDES[@]}") ;;
esac
# The driver waits until all nodes' Ray workers joined (cluster.num_nodes, from the job).
keel train cluster=slurm "hydra.run.dir=$RUN_DIR" "${OVERRIDES[@]}" &
DRIVER=$!
forward() {
    echo "slurm/sft.sh: $1 received, forwarding it to the driver (pid $DRIVER)"
    kill -s "$1" "$DRIVER" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

set +e
wait "$DRIVER"
rc=$?
while kill -0 "$DRIVER" 2>/dev/null; do  # a trapped signal interrupts wait: wait again
    wait "$DRIVER"
    rc=$?
done
set -e
echo "slurm/sft.sh: driver exited with $rc"
if [ "$rc" = "$EXIT_PREEMPTED" ]; then
    echo "slurm/sft.sh: preempted after a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || echo "slurm/sft.sh: requeue refused (submitted with --no-requeue?)" >&2
fi
exit "$rc"
