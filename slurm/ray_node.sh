#!/usr/bin/env bash
# One Ray node of a Keel Slurm job, started by slurm/sft.sh on each node through srun.
#
#   ray_node.sh head     # the Ray head (GCS, dashboard on 127.0.0.1) on the job's first node
#   ray_node.sh worker   # a Ray worker node joining $KEEL_RAY_HEAD_IP:$KEEL_RAY_PORT
#   ray_node.sh ip NODE  # the IPv4 address of a Slurm node (its NodeAddr, resolved)
#
# Ports derive from KEEL_RAY_PORT (set by sft.sh or slurm/env.sh): GCS = port, dashboard =
# port+1, Ray client = port+2, dashboard agent = port+5+<node index in the job> (distinct when
# several Slurm nodes share one host, as in tests/cluster). Output goes to
# $KEEL_RUN_DIR/logs/ray-<node>.log. `ray start --block` stops Ray on SIGTERM.
set -euo pipefail

node_ip() {
    local addr ip
    addr=$(scontrol show node "$1" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
    addr=${addr:-$1}
    ip=$(getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}')
    echo "${ip:-$addr}"
}

node_index() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" | grep -nx "$1" | cut -d: -f1
}

start() {
    local role=$1 port=${KEEL_RAY_PORT:?set by slurm/sft.sh} node=${SLURMD_NODENAME:?run under srun}
    exec >>"${KEEL_RUN_DIR:?set by slurm/sft.sh}/logs/ray-$node.log" 2>&1
    local args=(--block --disable-usage-stats
        --node-ip-address="$(node_ip "$node")"
        --temp-dir="${KEEL_RAY_TMPDIR:?set by slurm/sft.sh}"
        --num-cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
        --num-gpus="${SLURM_GPUS_ON_NODE:-0}"
        --dashboard-agent-listen-port=$((port + 4 + $(node_index "$node"))))
    if [ -n "${KEEL_RAY_OBJECT_STORE_MB:-}" ]; then
        args+=(--object-store-memory=$((KEEL_RAY_OBJECT_STORE_MB * 1024 * 1024)))
    fi
    echo "ray_node.sh: $role on $node (${args[*]})"
    if [ "$role" = head ]; then
        exec ray start --head --port="$port" --include-dashboard=true --dashboard-host=127.0.0.1 \
            --dashboard-port=$((port + 1)) --ray-client-server-port=$((port + 2)) "${args[@]}"
    fi
    exec ray start --address="${KEEL_RAY_HEAD_IP:?set by slurm/sft.sh}:$port" "${args[@]}"
}

case "${1:-}" in
    head | worker) start "$1" ;;
    ip) node_ip "${2:?usage: ray_node.sh ip NODE}" ;;
    *) echo "usage: $0 head|worker|ip NODE" >&2; exit 2 ;;
esac
