"""Entry points: ``simpo-train CONFIG.yaml [dotted.key=value ...]``, ``simpo-eval`` and ``simpo-data``
(a preview of the data as it will be trained on), all of that form.

Under ``torchrun`` each rank runs the job. Run as one plain process with a config whose layout
needs several ranks (``parallel.tp x parallel.pp`` > 1) and no GPU, the command re-launches
itself under ``torch.distributed.run`` on the CPU with that many ranks, so the laptop demo is one
command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from simpo_mcore.config import ConfigError, load_config


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10")
    return parser


def _parse(prog: str, argv: list[str] | None):
    parser = _parser(prog, __doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=None,
                        help="CPU only, outside torchrun: ranks to launch (default: tp x pp)")
    return parser.parse_args(argv)


def _relaunch_if_needed(prog: str, cfg, args) -> int | None:
    """Outside torchrun on a CPU, start ``tp x pp`` (or --nproc) ranks of this same command."""
    import torch

    if "RANK" in os.environ or (torch.cuda.is_available() and cfg.parallel.device != "cpu"):
        return None
    nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp
    if nproc == 1:
        return None
    from torch.distributed.run import main as torchrun

    from simpo_mcore.parallel import free_port

    cmd = [f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "simpo_mcore.cli", prog, args.config, *args.overrides]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"[simpo_mcore] launching {nproc} CPU ranks: torchrun {' '.join(cmd)}", flush=True)
    try:
        torchrun(cmd)
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - torchrun raises ChildFailedError with the rank's log
        print(f"[simpo_mcore] {prog} failed: {exc}", file=sys.stderr)
        return 1
    return 0


QUIET_WARNINGS = (
    "Apex is not installed", "Transformer Engine and Apex are not installed", "MimoModelConfig is experimental",
    "torch.distributed is disabled", "MCore's async save is deprecated", "No CUDA runtime is found",
    "is not a leaf Tensor is being accessed", "reduce_scatter_tensor` is deprecated",
    "all_gather_into_tensor` is deprecated", "CUDA_DEVICE_MAX_CONNECTIONS",
)
"""Warnings megatron / torch print on every CPU rank that say nothing about this run."""


def _quiet() -> None:
    import logging
    import warnings

    for text in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _main(prog: str, job, argv: list[str] | None) -> int:
    _quiet()
    args = _parse(prog, argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return 2
    code = _relaunch_if_needed(prog, cfg, args)
    if code is not None:
        return code
    try:
        job(cfg)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def train_main(argv: list[str] | None = None) -> int:
    from simpo_mcore.train import run_training

    def job(cfg):
        metrics = run_training(cfg)
        if int(os.environ.get("RANK", "0")) == 0 and metrics:
            acc = metrics.get("rewards/accuracies")
            if acc is not None:
                print(f"[simpo_mcore] final held-out reward accuracy: {acc:.3f}", flush=True)

    return _main("simpo-train", job, argv)


def eval_main(argv: list[str] | None = None) -> int:
    from simpo_mcore.evaluate import run_eval

    return _main("simpo-eval", run_eval, argv)


def data_main(argv: list[str] | None = None) -> int:
    """``simpo-data CONFIG.yaml [overrides]``: the run's data as it will be trained on (one process,
    no process group); builds the tokenised cache the run then reads."""
    _quiet()
    parser = _parser("simpo-data", "Show a run's preference data as it will be trained on.")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--samples", type=int, default=3, help="rendered pairs to show (default 3)")
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel size of the launch, for the padding efficiency (default 1)")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    try:
        if args.dp < 1 or args.samples < 0:
            raise ValueError(f"--dp must be >= 1 and --samples >= 0 (got {args.dp}, {args.samples})")
        cfg = load_config(args.config, args.overrides)
        from simpo_mcore.data.preview import BatchShape, run_preview
        from simpo_mcore.runtime import data_tokenizer, max_length_warning

        tokenizer, max_positions = data_tokenizer(cfg)
        batch = BatchShape.for_run(cfg, args.dp)
        warning = max_positions is not None and max_length_warning(cfg.data.max_length, max_positions)
        print(run_preview(cfg.data, tokenizer, args.split, Path(cfg.output_dir) / "data_cache", batch,
                          samples=args.samples, color=sys.stdout.isatty(), warnings=[warning] if warning else []))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"simpo-data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # `python -m simpo_mcore.cli simpo-train CONFIG ...` (what the CPU re-launch runs).
    prog, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"simpo-train": train_main, "simpo-eval": eval_main, "simpo-data": data_main}[prog](rest))
