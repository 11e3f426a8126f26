"""Shapes, FLOP counts, timing and memory accounting for :mod:`bench_step`.

Nothing here knows about models: a workload is a ``step()`` callable, and :func:`measure` times it
(CUDA events on a GPU, the host clock on a CPU), reads the peak of the CUDA caching allocator, and
turns a failure (out of memory included) into a result instead of an abort, so one broken variant
does not cost the other variants of a GPU call.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from simpo_mcore.model.flops import model_flops_per_token
from simpo_mcore.model.hf_config import ModelArch

GIB = 2**30

# Llama-3.2-1B with an untied output layer, the Llama-3-8B layer at 4 layers, a CPU smoke shape; and the 1b
# and smoke shapes as Gemma-2 models (every Gemma-2 feature: windows of 4096 on alternate layers, soft-capping,
# sandwich norms, GeGLU, tied embeddings).
SHAPES = {
    "1b": dict(num_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "gemma2-1b": dict(family="gemma2", num_layers=16, hidden_size=2048, intermediate_size=8192,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "gemma2-tiny": dict(family="gemma2", num_layers=2, hidden_size=64, intermediate_size=160,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
    "8b4": dict(num_layers=4, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(num_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}
# (seq, pairs) when the command line names neither: the 2 pairs x 2048 tokens, or a CPU size.
DEFAULT_BATCH = {"1b": (2048, 2), "gemma2-1b": (2048, 2), "8b4": (2048, 2), "tiny": (64, 1), "gemma2-tiny": (64, 1)}

FLOPS_FORMULA = (
    "model FLOPs per step = tokens x [6 x (non-embedding parameters + output-layer parameters) "
    "+ 6 x layers x (heads x head_dim) x seq], tokens = sequences x seq: every weight does one multiply-add "
    "per token forward and two backward; causal attention does half of the s x s score and value matmuls. "
    "The same count for every variant and precision (simpo_mcore.model.flops.model_flops_per_token, "
    "the HF baseline script the targets were set with); recomputation and the fused head's extra GEMM are not counted. "
    "Head alone: 6 x tokens x vocab x hidden. TFLOP/s = model FLOPs / median step time; "
    "MFU = TFLOP/s / dense bf16 peak of the card (989 for H100/H200 SXM)."
)


def make_arch(shape: str, max_seq: int) -> ModelArch:
    """A random-weight model of the named shape (no download: only the shape matters here)."""
    s = dict(SHAPES[shape])
    family = s.pop("family", "llama")
    arch = ModelArch(
        head_dim=s["hidden_size"] // s["num_attention_heads"], rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=max(8192, max_seq), tie_word_embeddings=False, **s)
    if family == "gemma2":  # gemma-2-9b's settings on this shape
        arch = replace(arch, model_type="gemma2", hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                       norm_zero_centered=True, sandwich_norms=True, scale_embeddings=True,
                       query_pre_attn_scalar=arch.head_dim, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, sliding_window=4096,
                       layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(arch.num_layers)))
    return arch


def param_count(arch: ModelArch) -> int:
    """Embedding + layers + final norm + untied output layer."""
    h, f, q, kv = arch.hidden_size, arch.intermediate_size, arch.num_attention_heads * arch.head_dim, \
        arch.num_key_value_heads * arch.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    return arch.num_layers * per_layer + h + 2 * arch.vocab_size * h


def step_flops(arch: ModelArch, seq: int, seqs: int) -> float:
    return model_flops_per_token(arch, seq) * seq * seqs


def head_flops(tokens: int, vocab: int, hidden: int) -> float:
    return 6.0 * tokens * vocab * hidden


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Workload:
    """What a variant builder returns: the timed step and anything to report once after timing."""

    step: Callable[[], torch.Tensor | None]
    """One forward + backward; returns the (detached) loss, or None where there is none."""
    report: Callable[[], dict] = dict
    """Extra fields for the result (e.g. FP8 modules engaged), called after the timed steps."""


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def time_steps(step: Callable[[], torch.Tensor | None], steps: int, warmup: int,
               cuda: bool, host_times: list[float] | None = None) -> tuple[list[float], float | None]:
    """Per-step seconds of ``steps`` timed steps after ``warmup`` untimed ones, and the first step's loss.

    On a GPU each step sits between two CUDA events (the work is asynchronous; a host clock would
    time the launches), read after one synchronize at the end. ``host_times``, if given, receives the
    host clock of each timed step's call: the time to launch it, plus any wait for the device inside
    it. Where it is close to the device time the step is bound by the host, not by the GPU.
    """
    first_loss = None
    for i in range(warmup):
        loss = step()
        if i == 0 and loss is not None:
            first_loss = float(loss)
    host = host_times if host_times is not None else []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            t0 = time.perf_counter()
            loss = step()
            host.append(time.perf_counter() - t0)
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
        host.extend(times)
    if warmup == 0 and loss is not None:
        first_loss = float(loss)
    return times, first_loss


# Host calls that wait for the device (CUDA runtime API names, as the profiler records them).
# cudaStreamWaitEvent is not one: it orders two streams on the device and returns at once.
HOST_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_step(step: Callable[[], torch.Tensor | None], cuda: bool, top: int = 12) -> dict:
    """One more step under ``torch.profiler``, summarised by :func:`summarize_profile` (the trace itself is
    not kept: it is tens of MB for a 1b step). The profiler slows the host, so the idle share it shows is
    an upper bound of the idle share of an unprofiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter_ns()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_ns = time.perf_counter_ns() - t0
    events = [(e.name(), str(e.device_type()).rsplit(".", 1)[-1], e.start_ns(), e.duration_ns())
              for e in prof.profiler.kineto_results.events()]
    return summarize_profile(events, wall_ns, top)


def summarize_profile(events: list[tuple[str, str, int, int]], wall_ns: int, top: int = 12) -> dict:
    """``events``: (name, device type ``CPU`` / ``CUDA``, start ns, duration ns). Returns the step's wall
    time, the time the device was busy (the union of its kernel, copy and set intervals), the idle share,
    the number of device events, the host calls that wait for the device, and the kernels that took most
    device time (by name, summed)."""
    device = sorted((start, start + dur, name) for name, kind, start, dur in events if kind == "CUDA")
    busy, end = 0, None
    for start, stop, _ in device:
        if end is None or start >= end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    per_name: dict[str, int] = {}
    for start, stop, name in device:
        per_name[name] = per_name.get(name, 0) + stop - start
    syncs: dict[str, int] = {}
    for name, kind, _, _ in events:
        if kind == "CPU" and name in HOST_SYNC_CALLS:
            syncs[name] = syncs.get(name, 0) + 1
    return {
        "wall_ms": wall_ns / 1e6,
        "device_busy_ms": busy / 1e6 if device else None,
        "device_idle_fraction": 1 - busy / wall_ns if device and wall_ns > 0 else None,
        "device_events": len(device),
        "host_ops": sum(1 for _, kind, _, _ in events if kind == "CPU"),
        "host_syncs": syncs,
        "top_kernels_ms": [[name[:120], t / 1e6] for name, t in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]],
    }


def measure(build: Callable[[], Workload], *, flop: float, steps: int, warmup: int, cuda: bool,
            profile: bool = False) -> dict:
    """Build a workload, time it, read its peak memory, free it. Never raises.

    ``host_s_per_step`` is the median host time of a timed step's call (see :func:`time_steps`);
    ``profile`` adds one profiled step's summary (:func:`profile_step`) after the timed ones.

    The peak counter is reset after the build, so a builder's transients (an fp32 copy cast to
    bf16, say) are not counted, while the weights, which stay allocated, are: ``static_gib`` is
    what was allocated at the reset, ``peak_gib`` the high-water mark of the steps.
    """
    free_memory(cuda)
    result: dict = {"status": "ok"}
    workload = None
    try:
        workload = build()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result["static_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
        host_times: list[float] = []
        times, loss = time_steps(workload.step, steps, warmup, cuda, host_times)
        s = statistics.median(times)
        result.update(
            s_per_step=s,
            host_s_per_step=statistics.median(host_times),
            times_s=[round(t, 6) for t in times],
            spread=round((max(times) - min(times)) / s, 4),
            tflops=flop / s / 1e12,
            peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
            loss=loss,
        )
        result.update(workload.report())
        if profile:
            result["profile"] = profile_step(workload.step, cuda)
    except torch.cuda.OutOfMemoryError:
        result = {"status": "oom", "error": traceback.format_exc(limit=1).strip().splitlines()[-1]}
    except Exception:  # noqa: BLE001 - recorded in the JSON; the other variants still run
        result = {"status": "error", "error": traceback.format_exc(limit=-4)}
        print(result["error"], flush=True)
    finally:
        workload = None  # the model and its activations go before the next variant is built
    free_memory(cuda)
    if cuda:  # anything still allocated here leaked from this variant into the next one's peak
        result["leftover_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    return result


def device_ceilings(cuda: bool) -> dict | None:
    """The bf16 matmul rate and the device-to-device copy bandwidth of this card, on random data."""
    if not cuda:
        return None
    result = {"bf16_matmul_tflops": round(_matmul_tflops(8192), 1), "copy_tbps": round(_copy_tbps(2**30), 2)}
    free_memory(True)
    return result


def _matmul_tflops(n: int) -> float:
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(x)
    times, _ = time_steps(lambda: _none(torch.mm(x, y, out=out)), steps=10, warmup=3, cuda=True)
    return 2 * n**3 / statistics.median(times) / 1e12


def _copy_tbps(numel: int) -> float:
    """Bytes read plus bytes written per second, fp32."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    times, _ = time_steps(lambda: _none(dst.copy_(src)), steps=10, warmup=3, cuda=True)
    return 2 * numel * 4 / statistics.median(times) / 1e12


def _none(_) -> None:
    """A step with no loss (the ceilings)."""
    return None
