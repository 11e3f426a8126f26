"""What a training checkpoint costs the training loop: synchronous against asynchronous saves, and the
fully-parallel save and load against megatron's default, side by side in one run.

    python benchmarks/bench_checkpoint.py [--hidden 1024 --ffn 2816 --layers 5] [--rounds 3] [--out DIR]

Builds a random Llama of the given shape (over the built-in synthetic tokenizer: the vocabulary is tiny, so the
parameters are the layers'), converts it, then launches itself on 2 CPU ranks (gloo, DP 2, the distributed
optimizer, fp32: weights + fp32 main weights + two Adam moments, about 16 bytes a parameter, 1 GB at the default
shape). Each rank builds the run's :class:`~simpo_mcore.train.Trainer` and trains, saving once per round of
``--steps`` steps, the rounds alternating synchronous and asynchronous saves:

- *blocked*: the seconds the training loop spends inside the checkpointer per save (``save`` + the ``poll``
  that publishes an asynchronous save: state dict, planning, fork or write, manifest, rename, pruning);
- *steps*: the median step time of the round (the steps of an asynchronous round share the CPU with the
  writer).

Then synchronous saves with megatron's default strategy against the fully-parallel one, and loads (the resume
path, ``load_train_checkpoint``) likewise, alternating. Rank 0 prints every measurement, the load average and
the command.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest

from simpo_mcore import checkpoint
from simpo_mcore.checkpoint import CheckpointManager, load_train_checkpoint
from simpo_mcore.config import load_config
from simpo_mcore.convert import mcore_io
from simpo_mcore.convert.integrity import checkpoint_files
from simpo_mcore.convert.mcore_io import AsyncShardWriter, save_strategy
from simpo_mcore.convert.tiny import make_tiny_checkpoint
from simpo_mcore.parallel import distributed
from simpo_mcore.train import Trainer

RANKS = 2


def write_config(root: Path, model: Path, steps: int) -> Path:
    config = {
        "model": {"checkpoint": str(model), "logprob_chunk_tokens": 64},
        "data": {"train_path": "synthetic", "max_length": 48, "max_prompt_length": 30, "synthetic_pairs": 512,
                 "cache_dir": str(root / "cache")},
        "loss": {"type": "simpo"},
        "parallel": {"device": "cpu", "distributed_optimizer": True},
        "optim": {"lr": 1e-4},
        "train": {"micro_batch_pairs": 1, "global_batch_pairs": 2, "max_steps": 10_000, "precision": "fp32",
                  "progress_bar": False, "tensorboard": False, "log_interval": 10_000},
        "checkpoint": {"save_interval": steps, "keep_last": 2},
        "output_dir": str(root / "run"),
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Timed:
    """Seconds spent in a function or method, per call: ``Timed(owner, name)`` replaces ``owner.name``."""

    def __init__(self, owner, name: str):
        self.calls: list[float] = []
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append(time.perf_counter() - start)

        setattr(owner, name, timed)


PARTS = {  # where a save's blocking time goes, in the order a save runs them
    "write_shards": (CheckpointManager, "write_shards"),  # all of the save's first phase
    "state dict": (checkpoint, "train_state_dict"),  # model + optimizer sharded state dicts
    "snapshot": (checkpoint, "take"),  # asynchronous: the state dict + copies, the gather started
    "plan": (mcore_io, "start_save"),  # dist_checkpointing.save's planning (collective)
    "write": (AsyncRequest, "execute_sync"),  # synchronous: the shards + megatron's finalize
    "fork": (AsyncCallsQueue, "schedule_async_request"),  # asynchronous: the writer started
    "wait": (AsyncShardWriter, "finish"),  # asynchronous: writers joined + megatron's finalize
    "publish": (CheckpointManager, "finalize"),  # barrier, meta, integrity.json, rename, latest, prune
}


def save_rounds(trainer: Trainer, rounds: int, steps: int) -> dict[str, list]:
    """``rounds`` x (a synchronous round, an asynchronous round), ``steps`` steps each, saving at the first step
    of each round (``checkpoint.save_interval`` = ``steps``): the steps after it are the time an asynchronous
    save has to finish, as ``save_interval`` steps are in a run."""
    while (trainer.state.step + 1) % steps:
        trainer.train_step()
    ckpt = trainer.checkpointer
    save, poll = Timed(ckpt, "save"), Timed(ckpt, "poll")
    parts = {name: Timed(*where) for name, where in PARTS.items()}
    writer = AsyncShardWriter()
    out: dict[str, list] = {"sync": [], "async": []}
    for _ in range(rounds):
        for mode in ("sync", "async"):
            ckpt.writer = writer if mode == "async" else None
            for timer in (save, poll, *parts.values()):
                timer.calls.clear()
            step_times = []
            for _ in range(steps):
                trainer.should_stop()
                start = time.perf_counter()
                trainer.train_step()
                step_times.append(time.perf_counter() - start)
                trainer.save_checkpoint()
            start = time.perf_counter()
            trainer._saved(ckpt.wait())  # published before the next round: a write still going on costs here
            waited = time.perf_counter() - start
            out[mode].append({"blocked_s": sum(save.calls) + sum(poll.calls) + waited,
                              "parts": {name: sum(t.calls) for name, t in parts.items() if t.calls},
                              "step_s": statistics.median(step_times), "saved": ckpt.last_path.name})
    ckpt.writer = None
    return out


def strategy_rounds(trainer: Trainer, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Synchronous saves and loads, megatron's default strategy against the fully-parallel one, alternating."""
    ckpt = trainer.checkpointer
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)  # what the run's saves spread over
    strategies = {"default": save_strategy(None), "fully parallel": save_strategy(dp_group)}
    out = {name: {"save_s": [], "load_s": []} for name in strategies}
    for _ in range(rounds):
        for name, strategy in strategies.items():
            ckpt.strategy, ckpt.writer = strategy, None
            trainer.train_step()
            start = time.perf_counter()
            trainer._saved(ckpt.save(trainer.state.step, last_step=True))
            out[name]["save_s"].append(time.perf_counter() - start)
        for name, group in (("default", None), ("fully parallel", dp_group)):
            torch.distributed.barrier()
            start = time.perf_counter()
            load_train_checkpoint(ckpt.last_path, trainer.model, trainer.optimizer, trainer.layout, True, group)
            out[name]["load_s"].append(time.perf_counter() - start)
    return out


def rank_main(config: Path, rounds: int, steps: int, result: Path) -> None:
    cfg = load_config(config)
    with distributed(cfg.parallel, cfg.train.seed) as layout:
        trainer = Trainer.build(cfg, layout)
        try:
            saves = save_rounds(trainer, rounds, steps)
            strategies = strategy_rounds(trainer, rounds)
            size = sum(checkpoint_files(trainer.checkpointer.last_path).values())
        finally:
            trainer.close()
        if layout.rank == 0:
            result.write_text(json.dumps({"saves": saves, "strategies": strategies, "bytes": size}))


def report(result: dict, args, load: tuple[float, float, float]) -> str:
    lines = [f"checkpoint {result['bytes'] / 1e9:.2f} GB (hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, "
             f"fp32 + distributed Adam), {RANKS} CPU ranks, {os.cpu_count()} CPUs, load average before "
             f"{load[0]:.1f} / after {os.getloadavg()[0]:.1f}"]
    for mode in ("sync", "async"):
        rows = result["saves"][mode]
        blocked = [r["blocked_s"] for r in rows]
        lines.append(f"  {mode:5s} save: blocked {', '.join(f'{b:.2f}' for b in blocked)} s "
                     f"(median {statistics.median(blocked):.2f}); median step "
                     f"{', '.join(f'{r['step_s']:.2f}' for r in rows)} s")
        for row in rows:
            lines.append("        " + ", ".join(f"{name} {t:.2f}" for name, t in row["parts"].items()))
    sync = statistics.median(r["blocked_s"] for r in result["saves"]["sync"])
    asyn = statistics.median(r["blocked_s"] for r in result["saves"]["async"])
    lines.append(f"  blocking time per save, sync / async: {sync / asyn:.1f}x")
    for name, times in result["strategies"].items():
        lines.append(f"  {name:14s} synchronous save {', '.join(f'{t:.2f}' for t in times['save_s'])} s, "
                     f"load {', '.join(f'{t:.2f}' for t in times['load_s'])} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="save rounds per mode (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per round (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="where to work (default: a temporary folder)")
    parser.add_argument("--rank-config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_config is not None:
        rank_main(args.rank_config, args.rounds, args.steps, args.rank_result)
        return
    root = Path(tempfile.mkdtemp(dir=args.out, prefix="bench-checkpoint-"))
    try:
        model = make_tiny_checkpoint(root / "model", hidden_size=args.hidden, intermediate_size=args.ffn,
                                     num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                     num_key_value_heads=args.hidden // 64)
        config = write_config(root, model, args.steps)
        load = os.getloadavg()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}",
                        "--standalone", __file__, "--rank-config", str(config), "--rank-result",
                        str(root / "result.json"), "--rounds", str(args.rounds), "--steps", str(args.steps)],
                       env=env, check=True)
        print(report(json.loads((root / "result.json").read_text()), args, load))
        print("command: python benchmarks/bench_checkpoint.py " + " ".join(sys.argv[1:]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
