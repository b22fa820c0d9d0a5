# Environment setup for every Keel process of a Slurm job: the one place for site settings.
#
# slurm/sft.sh sources this file on the first node before anything starts; the Ray head, the
# Ray workers (srun steps) and the driver inherit what it exports. Edit it for your site, or
# point KEEL_ENV_FILE at your own copy (sbatch --export=ALL,KEEL_ENV_FILE=/path/env.sh ...).

# 1. Modules (HPC sites): uncomment what your cluster needs.
# module purge
# module load cuda/12.4 nccl

# 2. Python environment: a venv (KEEL_VENV), a conda env (KEEL_CONDA_ENV), or whatever
#    `keel` is already on PATH when you call sbatch (the default: sbatch exports your PATH).
if [ -n "${KEEL_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$KEEL_VENV/bin/activate"
elif [ -n "${KEEL_CONDA_ENV:-}" ]; then
    eval "$(conda shell.bash hook)"
    conda activate "$KEEL_CONDA_ENV"
fi

# 3. NCCL (GPU clusters): defaults that help on most InfiniBand/RoCE fabrics; adjust per site.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
# export NCCL_SOCKET_IFNAME=ib0        # the interface that reaches the other nodes
# export NCCL_IB_HCA=mlx5              # restrict to these HCAs

# 4. Caches on a shared or node-local disk (model weights, the tiny model, HF datasets).
# export HF_HOME=/shared/cache/huggingface
# export KEEL_CACHE_DIR=/shared/cache/keel

# 5. Ray: ports and the temporary directory default to values derived from the job id
#    (see slurm/sft.sh); override them here when your site reserves port ranges.
# export KEEL_RAY_PORT=26379
# export KEEL_RAY_TMPDIR=/tmp/ray-$SLURM_JOB_ID
# export KEEL_RAY_OBJECT_STORE_MB=32768
