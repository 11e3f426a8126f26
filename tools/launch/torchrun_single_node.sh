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

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "missing CONFIG. Usage: $0 CONFIG.yaml [dotted.key=value ...]"
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config file '$CONFIG' does not exist (relative paths are taken from $(pwd))"
SIMPO_JOB=${SIMPO_JOB:-simpo-train}
[[ $SIMPO_JOB == simpo-train || $SIMPO_JOB == simpo-eval ]] \
    || die "SIMPO_JOB must be simpo-train or simpo-eval, got '$SIMPO_JOB'"
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || die "PYTHON='$PYTHON' is not an executable (activate the venv first)"

if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    [[ $NPROC_PER_NODE -ge 1 ]] \
        || die "no GPU is visible; set NPROC_PER_NODE, or on a CPU run 'simpo-train $CONFIG' directly"
fi
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"

# Megatron's tensor/sequence-parallel communication overlap relies on one CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# A failed or hung NCCL collective aborts the job instead of hanging until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# CPU threads per rank (tokenisation uses separate processes, see data.num_proc).
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}
export PYTHONUNBUFFERED=1

set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC_PER_NODE" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}" \
    -m simpo_mcore.cli "$SIMPO_JOB" "$CONFIG" "$@"
