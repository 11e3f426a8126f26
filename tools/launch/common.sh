# Sourced by torchrun_single_node.sh and torchrun_multinode.sh (not run by itself): the checks of the
# command line and the environment every rank gets, written once.
# shellcheck shell=bash

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# check_job NARGS CONFIG WHERE: a CONFIG was given and exists (WHERE names the host in the message, or
# is empty), SIMPO_JOB is simpo-train or simpo-eval, PYTHON runs. Sets SIMPO_JOB and PYTHON.
check_job() {
    local nargs=$1 config=${2:-} where=${3:-}
    [[ $nargs -ge 1 ]] || die "missing CONFIG. Usage: $0 CONFIG.yaml [dotted.key=value ...]"
    [[ -f $config ]] || die "config file '$config' does not exist$where (relative paths are taken from $(pwd))"
    SIMPO_JOB=${SIMPO_JOB:-simpo-train}
    [[ $SIMPO_JOB == simpo-train || $SIMPO_JOB == simpo-eval ]] \
        || die "SIMPO_JOB must be simpo-train or simpo-eval, got '$SIMPO_JOB'"
    PYTHON=${PYTHON:-python}
    command -v "$PYTHON" >/dev/null || die "PYTHON='$PYTHON' is not an executable (activate the venv first)"
}

# resolve_nproc NO_GPU_MESSAGE: NPROC_PER_NODE as given, else every visible GPU; a positive integer.
resolve_nproc() {
    if [[ -z ${NPROC_PER_NODE:-} ]]; then
        NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
        [[ $NPROC_PER_NODE -ge 1 ]] || die "$1"
    fi
    [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] \
        || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
}

# export_rank_env: what every rank needs (after resolve_nproc).
export_rank_env() {
    # Megatron's tensor/sequence-parallel communication overlap relies on one CUDA work queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # A failed or hung NCCL collective aborts the job instead of hanging until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # CPU threads per rank (tokenisation uses separate processes, see data.num_proc).
    local cores
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))}
    export PYTHONUNBUFFERED=1
}
