"""Rank-0 visibility: JSON lines, TensorBoard, a progress bar, and throughput / MFU / memory."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import psutil
import torch

# Dense bf16 peak of the cards we run on (TFLOP/s), for MFU. Matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def model_flops_per_token(arch, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x (non-embedding parameters + output
    layer) + causal attention 6 x layers x hidden x seq (the score and value matmuls, half the
    square masked). The count docs/performance.md states and its targets were set with."""
    h, f, n = arch.hidden_size, arch.intermediate_size, arch.num_layers
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    params = n * per_layer + h + arch.vocab_size * h  # + final norm + output layer
    return 6 * params + 6 * n * q * seq_len


def peak_tflops(cuda: bool) -> float | None:
    """Dense bf16 datasheet peak of the card, for MFU (None for a run on the CPU or an unknown card)."""
    if not cuda:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def memory_gib(cuda: bool) -> dict[str, float]:
    """The GPU allocator's peak for a run on the GPU, else the process's resident size."""
    if cuda:
        return {"mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"rss_gib": psutil.Process().memory_info().rss / 2**30}


class MetricsLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events; draws the progress bar. Rank 0 only:
    on other ranks every method is a no-op."""

    def __init__(self, output_dir: str | Path, rank: int, total_steps: int, start_step: int,
                 tensorboard: bool, progress_bar: bool):
        self.active = rank == 0
        self.total = total_steps
        self._bar = None
        self._tb = None
        self._file = None
        if not self.active:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._file = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="simpo", file=sys.stderr,
                             dynamic_ncols=True, disable=not sys.stderr.isatty() and "SIMPO_PROGRESS" not in os.environ)

    def log(self, step: int, record: dict) -> None:
        if not self.active:
            return
        # Scalar tensors (megatron returns the gradient norm as one on a GPU) become Python numbers.
        record = {"step": step, "time": round(time.time(), 3),
                  **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}}
        self._file.write(json.dumps(_finite_or_str(record)) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def progress(self, step: int, record: dict) -> None:
        if not self.active or self._bar is None:
            return
        self._bar.n = step
        computed = record.get("tokens_computed") or float("nan")
        self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                              acc=f"{record.get('rewards/accuracies', float('nan')):.2f}",
                              tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                              real=f"{record.get('tokens_real', float('nan')) / computed:.2f}",  # not padding
                              refresh=False)
        self._bar.refresh()

    def print(self, text: str) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def _finite_or_str(record: dict) -> dict:
    """JSON has no NaN/inf: write them as strings so a non-finite step stays visible."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
