"""Helpers for tests: tiny HF models and a multi-rank launcher (torchrun, gloo, CPU)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
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


def launch_ranks(script: str | Path, nproc: int, *args: str, timeout: float = 600,
                 env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``script`` on ``nproc`` CPU ranks started here, one process each (no torchrun), so that every
    rank's own exit code and output can be checked. Does not raise when they fail."""
    script = Path(script)
    if not script.is_absolute():
        script = SCRIPTS / script
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
            "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), **(env or {})}
    # Files, not pipes: a rank blocked on a full pipe would hold up the other in a collective.
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(nproc)]
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=out, stderr=err)
             for r, (out, err) in enumerate(files)]
    results = []
    try:
        deadline = time.monotonic() + timeout
        for proc, (out, err) in zip(procs, files):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
    finally:
        for proc, (out, err) in zip(procs, files):
            if proc.poll() is None:
                proc.kill()
            out.close(), err.close()
    return results


def token_pairs(shapes, vocab: int, seed: int) -> list[dict]:
    """Tokenised preference pairs of random ids (3 .. vocab - 1) as the data pipeline gives them, one per
    ``(prompt, chosen, rejected)`` length: ``{chosen,rejected}_{input_ids,labels}``, the prompt's labels -100."""
    import random

    rng = random.Random(seed)
    out = []
    for prompt, chosen, rejected in shapes:
        pair = {}
        for side, n in (("chosen", chosen), ("rejected", rejected)):
            ids = [rng.randrange(3, vocab) for _ in range(prompt + n)]
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, [-100] * prompt + ids[prompt:]
        out.append(pair)
    return out


def pair_columns(pairs: list[dict]) -> dict[str, list]:
    """The pipeline's column layout of ``pairs`` (column -> one value per pair), as the collation takes it."""
    return {name: [p[name] for p in pairs] for name in pairs[0]}


def error_lines(text: str) -> list[str]:
    """The ``error:`` lines of a command's output."""
    return [line for line in text.splitlines() if "error:" in line]


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


WINDOW = 16
"""The tiny models' sliding window: the parity sequences (64-100 tokens) reach well past it."""

FAMILY_MODELS = {
    "mistral": dict(family="mistral", sliding_window=WINDOW),
    # Layers 1-3 slide (max_window_layers=1), layer 0 attends fully; tied embeddings.
    "qwen2": dict(family="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie=True),
    "qwen3": dict(family="qwen3", head_dim=32),
    # Caps small enough, and weights large enough (init_std 0.1: logits up to about 2.6), that each of them,
    # the window and query_pre_attn_scalar move the logits by 0.3 to 3.4 (measured with the caps removed).
    "gemma2": dict(family="gemma2", head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, init_std=0.1, tie=True),
}
"""``make_tiny_hf_model`` arguments of one tiny model per family beyond Llama, the same in every test."""

FAMILY_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "gemma2": "Gemma2Config"}


def make_tiny_hf_model(out_dir: str | Path, *, family: str = "llama", vocab_size: int = 250, hidden_size: int = 64,
                       intermediate_size: int = 160, num_layers: int = 4, heads: int = 4, kv_heads: int = 2,
                       tie: bool = False, rope_scaling: dict | None = None, head_dim: int | None = None,
                       seed: int = 0, dtype: str = "float32", max_position_embeddings: int = 512,
                       init_std: float = 0.02, **family_kw):
    """A random-weight HF model of ``family`` saved with safetensors; returns it (eval mode; see
    :func:`hf_attention` for its attention implementation).

    ``family_kw`` go to the family's config class as they are (``sliding_window``, ``use_sliding_window``,
    ``max_window_layers``, ``query_pre_attn_scalar``, the soft-capping values, ...). Norm weights and biases are
    random (HF initialises them to 1 or 0 and 0), so that a wrong mapping of any of them shows.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=init_std, **family_kw)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = getattr(transformers, FAMILY_CONFIGS[family])(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=hf_attention(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # (1 + w) norms (Gemma) get weights around 0, the others around 1.
                p.uniform_(-0.5, 0.5) if family == "gemma2" else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def make_tiny_hf_llama(out_dir: str | Path, *, model_type: str = "llama", **kwargs):
    """A random-weight HF Llama (or Mistral) saved with safetensors; see :func:`make_tiny_hf_model`."""
    return make_tiny_hf_model(out_dir, family=model_type, **kwargs)


def hf_attention(family: str) -> str:
    """HF's attention implementation for references: ``eager`` for Gemma-2 (the one that soft-caps the
    scores), transformers' default ``sdpa`` (a banded mask where a window applies) for the others."""
    return "eager" if family == "gemma2" else "sdpa"


def load_hf_model(hf_dir: str | Path, dtype=None):
    """An HF model directory loaded for comparisons: fp32 unless told, attention as :func:`hf_attention`."""
    import torch
    from transformers import AutoModelForCausalLM

    family = json.loads((Path(hf_dir) / "config.json").read_text())["model_type"]
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype or torch.float32,
                                                attn_implementation=hf_attention(family)).eval()


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
