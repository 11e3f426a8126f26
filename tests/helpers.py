"""Helpers for tests: tiny HF models and a multi-rank launcher (torchrun, gloo, CPU)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

from simpo_mcore import parallel

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "distributed" / "scripts"


QUIET = dict(log=None)
"""Keyword arguments that silence the converters' progress lines."""

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
"""Llama-3.1 rope scaling with a small original context, so that sequences of ~100 tokens reach it."""


def free_port() -> int:
    """A free local TCP port (the package's own helper)."""
    return parallel.free_port()


def run_ranks(script: str | Path, nproc: int, *args: str, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` CPU ranks with torchrun; raise with the output if any rank fails.

    Each rank gets one intra-op thread so several ranks share 2 cores without oversubscription.
    """
    script = Path(script)
    if not script.is_absolute():
        script = SCRIPTS / script
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
                "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed with {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-12000:]}")
    return proc


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def make_tiny_hf_llama(out_dir: str | Path, *, vocab_size: int = 250, hidden_size: int = 64,
                       intermediate_size: int = 160, num_layers: int = 4, heads: int = 4,
                       kv_heads: int = 2, tie: bool = False, rope_scaling: dict | None = None,
                       head_dim: int | None = None, seed: int = 0, dtype: str = "float32",
                       model_type: str = "llama", max_position_embeddings: int = 512):
    """A random-weight HF Llama saved with safetensors; returns the model (eval mode, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = LlamaConfig(**kwargs)
    model = LlamaForCausalLM(config)
    # HF initialises norms to 1; random norms make a wrong norm mapping visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


WARNING_LINE = re.compile(r"Warning\b|warnings\.warn\(|^[WE]\d{4} \d\d:\d\d:\d\d")
"""A line of a library warning: ``...: UserWarning: ...``, its ``warnings.warn(`` source line, or torch's
glog-style ``W1130 11:19:46.5 ...`` log lines."""


def warning_lines(text: str) -> list[str]:
    """The library-warning lines of a console output."""
    return [line for line in text.splitlines() if WARNING_LINE.search(line)]


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: a LevelDB-style log (7-byte file header, then 32 KiB blocks of
    records each with a 7-byte header: CRC, length, type full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending, payloads = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        else:
            payloads.append(pending + payload)
    return [pb.Record.FromString(p) for p in payloads]


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)
