#!/usr/bin/env bash
# simpo-train (or simpo-eval) on the GPUs of one machine: one torchrun, one rank per GPU.
#
#   tools/launch/torchrun_single_node.sh CONFIG.yaml [dotted.key=value ...]
#
# Run it from the directory that the config's relative paths (model.checkpoint, output_dir) are
# relative to: the repository root for configs/. Environment (all optional):
#   NPROC_PER_NODE  ranks to start (default: every visible GPU)
#   SIMPO_JOB       simpo-train (default) or simpo-eval
#   PYTHON          the interpreter with simpo_mcore installed (default: python)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks to save and exit after SIGTERM/SIGUSR1 (240)
# DP = NPROC_PER_NODE / (parallel.tp x parallel.pp); train.global_batch_pairs must be a multiple
# of train.micro_batch_pairs x DP. See docs/launch.md.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

check_job $# "${1:-}" ""
CONFIG=$1
shift
resolve_nproc "no GPU is visible; set NPROC_PER_NODE, or on a CPU run 'simpo-train $CONFIG' directly"
export_rank_env

set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC_PER_NODE" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}" \
    -m simpo_mcore.cli "$SIMPO_JOB" "$CONFIG" "$@"
