#!/usr/bin/env bash
# Print the bootstrap file of the current Slurm allocation, for one deca-peer per task:
# peer $SLURM_PROCID listens on tcp://<its node>:(BASE_PORT + $SLURM_LOCALID).
#
#   examples/slurm/make_bootstrap.sh TOPOLOGY [BASE_PORT] > bootstrap.json     (inside sbatch or salloc)
#
# The nodes come from `scontrol show hostnames $SLURM_JOB_NODELIST`, the tasks per node from
# $SLURM_TASKS_PER_NODE (e.g. "2(x3),1"). Task ids are assumed block-wise, as `srun --distribution=block`
# (Slurm's default) numbers them: the first node runs tasks 0..n0-1, the next n0..n0+n1-1, and so on; the
# topology's node ids must be 0..N-1 with N the number of tasks. $DECA_PEER is the deca-peer command (default
# `deca-peer`; split on spaces, e.g. "python -m deca_p2p.cli").
set -euo pipefail

topology=${1:?usage: make_bootstrap.sh TOPOLOGY [BASE_PORT] > bootstrap.json}
base_port=${2:-29500}
read -ra deca_peer <<< "${DECA_PEER:-deca-peer}"
nodelist=${SLURM_JOB_NODELIST:?not inside a Slurm allocation (no SLURM_JOB_NODELIST)}
tasks_per_node=${SLURM_TASKS_PER_NODE:?not inside a Slurm allocation (no SLURM_TASKS_PER_NODE)}

hostnames=$(scontrol show hostnames "$nodelist")   # fails (set -e) outside a Slurm installation
mapfile -t nodes <<< "$hostnames"
counts=()
IFS=, read -ra parts <<< "$tasks_per_node"
for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
        for ((r = 0; r < BASH_REMATCH[2]; r++)); do counts+=("${BASH_REMATCH[1]}"); done
    elif [[ $part =~ ^[0-9]+$ ]]; then
        counts+=("$part")
    else
        echo "make_bootstrap.sh: cannot read SLURM_TASKS_PER_NODE=$tasks_per_node" >&2
        exit 2
    fi
done
if [[ ${#counts[@]} -ne ${#nodes[@]} ]]; then
    echo "make_bootstrap.sh: ${#nodes[@]} nodes in $nodelist but ${#counts[@]} in SLURM_TASKS_PER_NODE=$tasks_per_node" >&2
    exit 2
fi

# one host entry per task, in task order: `deca-peer bootstrap` gives the k-th peer the k-th entry, and peers
# sharing a host consecutive ports from BASE_PORT, i.e. BASE_PORT + SLURM_LOCALID
hosts=()
for k in "${!nodes[@]}"; do
    for ((t = 0; t < counts[k]; t++)); do hosts+=("${nodes[k]}"); done
done
n_peers=$("${deca_peer[@]}" topology show "$topology" | sed -n '1s/^topology .*: \([0-9]*\) nodes.*/\1/p')
if [[ "$n_peers" != "${#hosts[@]}" ]]; then
    echo "make_bootstrap.sh: $topology has ${n_peers:-?} peers but the allocation runs ${#hosts[@]} tasks" \
         "(give sbatch --ntasks=${n_peers:-N})" >&2
    exit 2
fi
exec "${deca_peer[@]}" bootstrap --topology "$topology" --hosts "$(IFS=,; echo "${hosts[*]}")" --base-port "$base_port"
