#!/usr/bin/env bash
# simpo-train (or simpo-eval) over several machines: run this once on EVERY node, with the same
# CONFIG and overrides; each starts one rank per local GPU and they meet at MASTER_ADDR:MASTER_PORT.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#       tools/launch/torchrun_multinode.sh CONFIG.yaml [dotted.key=value ...]
#
# Required environment:
#   NNODES        number of nodes
#   NODE_RANK     this node's index, 0 .. NNODES-1 (node 0 hosts the rendezvous)
#   MASTER_ADDR   address of node 0, reachable from every node
#   MASTER_PORT   a free TCP port on node 0
# Optional: NPROC_PER_NODE (default: every visible GPU), SIMPO_JOB (simpo-train | simpo-eval),
# PYTHON (default: python), SHUTDOWN_TIMEOUT (seconds to save and exit after SIGTERM/SIGUSR1, 240).
# World = NNODES x NPROC_PER_NODE; DP = world / (parallel.tp x parallel.pp). See docs/launch.md;
# under SLURM use tools/launch/slurm_multinode.sbatch instead.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

missing=()
for name in NNODES NODE_RANK MASTER_ADDR MASTER_PORT; do
    [[ -n ${!name:-} ]] || missing+=("$name")
done
[[ ${#missing[@]} -eq 0 ]] || die "missing environment variable(s) ${missing[*]}. On every node set the" \
    "same NNODES, MASTER_ADDR (node 0's address) and MASTER_PORT, and NODE_RANK = 0 .. NNODES-1"
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
[[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] \
    || die "NODE_RANK must be an integer in [0, NNODES=$NNODES), got '$NODE_RANK'"
[[ $MASTER_PORT =~ ^[0-9]+$ && $MASTER_PORT -ge 1 && $MASTER_PORT -le 65535 ]] \
    || die "MASTER_PORT must be a TCP port number, got '$MASTER_PORT'"

check_job $# "${1:-}" " on $(hostname)"
CONFIG=$1
shift
resolve_nproc "no GPU is visible on $(hostname); set NPROC_PER_NODE"
export_rank_env

set -x
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --nproc-per-node="$NPROC_PER_NODE" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}" \
    -m simpo_mcore.cli "$SIMPO_JOB" "$CONFIG" "$@"
