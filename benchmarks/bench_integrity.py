"""What checkpoint integrity costs: hashing a checkpoint into integrity.json at save, verifying it before load.

    python benchmarks/bench_integrity.py [--shape 1b] [--dtype bfloat16] [--out DIR]

Writes the model tensors of a Llama shape (random, bf16 by default: the size of a converted checkpoint)
with megatron's ``dist_checkpointing`` in a world of one, then times ``write_manifest`` and
``verify_manifest`` (which also re-reads every byte) with one hashing thread and with the default
(``integrity.HASH_THREADS``), and prints GB/s beside the rate of SHA-256 on data already in memory. In a
job each rank hashes its share (``integrity.share``), so the time per rank is about size / (ranks x the
per-process rate printed here).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_common import SHAPES, make_arch, param_count
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from simpo_mcore.convert import integrity
from simpo_mcore.convert.mcore_io import save_sharded
from simpo_mcore.parallel import ensure_process_group


def write_checkpoint(out: Path, shape: str, dtype: torch.dtype) -> int:
    """One random tensor per weight matrix of ``shape`` (stacked over layers as a converted checkpoint is)."""
    arch = make_arch(shape, 2048)
    h, f, n, v = arch.hidden_size, arch.intermediate_size, arch.num_layers, arch.vocab_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    shapes = {"embedding": (v, h), "output_layer": (v, h), "qkv": (n, q + 2 * kv, h), "proj": (n, h, q),
              "fc1": (n, 2 * f, h), "fc2": (n, h, f)}
    state = {k: ShardedTensor.from_rank_offsets(k, torch.randn(s).to(dtype), replica_id=0) for k, s in shapes.items()}
    save_sharded(state, out)
    return param_count(arch)


def timed(fn) -> float:
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="where to write it (default: a temporary folder)")
    args = parser.parse_args()
    ensure_process_group()
    root = Path(tempfile.mkdtemp(dir=args.out))
    try:
        ckpt = root / "ckpt"
        ckpt.mkdir()
        params = write_checkpoint(ckpt, args.shape, getattr(torch, args.dtype))
        size = sum(integrity.checkpoint_files(ckpt).values())
        print(f"{args.shape} ({params / 1e9:.2f} B parameters, {args.dtype}): {size / 1e9:.2f} GB in "
              f"{len(integrity.checkpoint_files(ckpt))} files, {os.cpu_count()} CPUs")
        buffer = os.urandom(1 << 30)
        seconds = timed(lambda: hashlib.sha256(buffer).hexdigest())
        print(f"  sha256 of 1 GiB in memory: {seconds:.2f} s ({2**30 / seconds / 1e9:.2f} GB/s, one thread)")
        for threads in sorted({1, integrity.HASH_THREADS}):
            integrity.HASH_THREADS = threads
            write = timed(lambda: integrity.write_manifest(ckpt))
            verify = timed(lambda: integrity.verify_manifest(ckpt))
            print(f"  {threads} thread(s): write_manifest {write:.2f} s ({size / write / 1e9:.2f} GB/s), "
                  f"verify_manifest {verify:.2f} s ({size / verify / 1e9:.2f} GB/s)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
