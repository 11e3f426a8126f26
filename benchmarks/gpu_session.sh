#!/usr/bin/env bash
# Everything simpo_mcore checks on a GPU, in one call of a bounded length (the device tool lends a GPU for
# minutes, not hours). Run from the repository root on an H100 / H200 whose image has torch and
# transformers but neither megatron-core nor Transformer Engine; their wheels (megatron-core, TE, plus
# datasets, dill and multiprocess for simpo-train) are in the git-ignored .whl/:
#
#     mkdir -p .whl && cp /path/to/wheels/*.whl .whl/ && pip download ... datasets dill multiprocess -d .whl
#     (device call, carry [".whl"])  bash benchmarks/gpu_session.sh
#
# Phases, each under its own time limit and all within BUDGET seconds; results go to $OUT (the device tool returns
# at most 8 files: phases 1-3 write 8 with moe.json, so the optional phase 4 needs a session of its own):
#   1. benchmarks/bench_step.py: HF vs simpo_mcore steps (head logits recomputed and kept, one profiled step
#      each), the head alone, a sequence-length sweep (bench.json); benchmarks/plan_gpu_check.py: simpo-plan's
#      predicted memory against the allocator's peak and the bytes autograd saves, 1b and 8b4 shapes
#      (plan_check.json); benchmarks/bench_packing.py: real-length
#      pairs, TE packed rows vs HF padded micro-batches (packing.json)
#      benchmarks/bench_moe.py: a mixture-of-experts step (Qwen3-30B-A3B layers, 4 of them, 128 experts, top-8),
#      HF against simpo_mcore, TE grouped GEMM against SequentialMLP (moe.json; not yet measured on a GPU)
#   2. simpo-train on the embedded tiny job, TE bf16 and TE FP8 (metrics_*.jsonl): a short run per precision
#   3. tests/gpu: logits of the TE / SDPA specs in fp32, bf16 and FP8 against HF; Triton head kernels vs torch;
#      host syncs in a training step; the context-parallel code path at CP 1 against the plain one (one GPU) and
#      TE's CP attention at CP 2 against CP 1 (on a machine with 2 GPUs or more; skipped on one)
#   4. an external HF baseline script (if carried as .whl/gpu_baseline.py and time is left): the HF baseline
#      the targets were set with, on this same card
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-480}
ONLY=${ONLY:-}  # phase names to run, space-separated (e.g. ONLY=gpu-tests on a 2-GPU machine for the CP check)
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
phase() {  # phase NAME MAX_SECONDS COMMAND...: run with min(MAX, time left) seconds, never fail the script
    local name=$1 max=$2; shift 2
    if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then echo "=== $name: not in ONLY"; return 1; fi
    local limit; limit=$(left); (( limit > max )) && limit=$max
    if (( limit < 20 )); then echo "=== $name: skipped, ${limit}s left"; return 1; fi
    echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - START ))s"
    return $rc
}

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformer_engine, megatron.core as m; print('torch', torch.__version__, 'te', \
transformer_engine.__version__, 'mcore', m.__version__, torch.cuda.get_device_name())"

HEAD_KERNEL=${HEAD_KERNEL:-auto}  # tests/gpu (phase 4) checks the Triton head kernels against torch

# Each simpo_mcore variant with the head's logits recomputed (the default) and kept (model.logprob_recompute:
# false), and one profiled step per variant (device idle share, host syncs, longest kernels).
phase bench 270 python3 benchmarks/bench_step.py --shape 1b,8b4 --sweep-seq "${SWEEP:-1024,2048,4096}" --steps 8 \
    --warmup 3 --head-kernel "$HEAD_KERNEL" --head-logits recompute,keep --profile --out "$OUT/bench.json"
phase plot 30 python3 benchmarks/plot_scaling.py "$OUT/bench.json" --out "$OUT/scaling.png"

# simpo-plan's memory model against this GPU's allocator (docs/planning.md): short, so before the long phases.
phase plan-check 90 python3 benchmarks/plan_gpu_check.py --out "$OUT/plan_check.json"

# Real-length pairs (docs/packing.md; synthetic lengths with the UltraFeedback sample's median / p90 / max unless
# ../shared/data is there): one rank's step of the shipped 8-GPU layout (32 pairs), 1b shape, TE bf16 packed rows
# (THD fused attention) against HF with padded micro-batches of 2 pairs (the reference's trainer), same call.
phase packing 150 python3 benchmarks/bench_packing.py --device cuda --shape 1b --out "$OUT/packing.json"

# A mixture-of-experts step (docs/moe.md): Qwen3-30B-A3B's layer at 4 layers, 2 pairs x 2048 tokens, EP 1;
# HF's default and eager experts, simpo_mcore SDPA + SequentialMLP, TE + SequentialMLP, TE + grouped GEMM.
phase moe 120 python3 benchmarks/bench_moe.py --out "$OUT/moe.json"

for precision in bf16 fp8; do
    rm -rf "/tmp/tiny_$precision"
    phase "train-$precision" 60 python3 -c 'import sys; from simpo_mcore.cli import train_main; sys.exit(train_main())' \
        configs/tiny_cpu.yaml parallel.tp=1 parallel.device=cuda model.spec=te train.precision=$precision \
        train.max_steps=100 output_dir=/tmp/tiny_$precision
    cp "/tmp/tiny_$precision/metrics.jsonl" "$OUT/metrics_$precision.jsonl" 2>/dev/null
done

SIMPO_MCORE_GPU_REPORT=$OUT/gpu_checks.json phase gpu-tests 160 \
    python3 -m pytest -q -p no:cacheprovider -rA tests/gpu

if [[ -f .whl/gpu_baseline.py ]]; then
    phase shared-baseline 60 python3 .whl/gpu_baseline.py --out "$OUT"
fi
echo "=== done after $(( $(date +%s) - START ))s"
