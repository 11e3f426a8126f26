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

from simpo_mcore import console
from simpo_mcore.config import ConfigError, load_config

OVERRIDES_HELP = """overrides:
  Any config field as dotted.key=value after the config file, the value read as YAML; they win over
  the file (and its _base_ files):
    train.max_steps=200  optim.lr=5e-7  output_dir=runs/try2  data.max_pairs=null
    logging.wandb.project=simpo  logging.wandb.mode=offline
  Every field, with its meaning, is in simpo_mcore/config.py; unknown keys and wrong types are errors
  naming the key."""

TRAIN_HELP = ("""Train a model with SimPO (or a DPO baseline) from a YAML run config.

Run one process per rank: under torchrun on GPUs; on a CPU a config that needs several ranks
(parallel.tp x parallel.pp) re-launches itself on that many (or --nproc). Writes checkpoints,
metrics.jsonl, TensorBoard and (with logging.wandb.project) a W&B run into output_dir, and resumes
from output_dir/checkpoints/latest when it exists. Rank 0 prints one line every train.log_interval
steps (a progress bar on a terminal) and a summary at the end.""", """examples:
  simpo-train configs/tiny_cpu.yaml                                  # the CPU demo, 2 ranks
  simpo-train configs/tiny_cpu.yaml train.max_steps=20 output_dir=runs/short
  torchrun --nproc-per-node 8 -m simpo_mcore.cli simpo-train configs/simpo/llama3_8b_base_8gpu.yaml
  sbatch tools/launch/slurm_multinode.sbatch configs/simpo/llama3_8b_base_multinode.yaml
  (docs/launch.md: torchrun, several nodes, SLURM, pre-emption)""")

EVAL_HELP = ("""Evaluate a checkpoint on a preference split (data.eval_path): loss, rewards, reward accuracy and
margins, log-probs, written to output_dir/eval_metrics.json.

Same config and launch as simpo-train; model.checkpoint names the converted or trained checkpoint.""",
             """examples:
  simpo-eval configs/tiny_cpu.yaml model.checkpoint=runs/tiny_cpu/checkpoints/step_0000150 output_dir=runs/eval150
  torchrun --nproc-per-node 8 -m simpo_mcore.cli simpo-eval configs/simpo/llama3_8b_base_8gpu.yaml \\
      model.checkpoint=runs/simpo_llama3_8b_base_8gpu/checkpoints/step_0000400 output_dir=runs/eval400""")

DATA_HELP = ("""Show a run's preference data as it will be trained on: the detected format, rendered pairs with
the trained tokens marked, length distributions, truncation and padding efficiency. One process, no
GPU; builds the tokenised cache the run then reads.""", """examples:
  simpo-data configs/tiny_cpu.yaml
  simpo-data configs/simpo/llama3_8b_base_8gpu.yaml --dp 8 --samples 5
  simpo-data configs/simpo/llama3_8b_base.yaml --split eval data.max_eval_pairs=200""")


def _parser(prog: str, help_text: tuple[str, str]) -> argparse.ArgumentParser:
    description, examples = help_text
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=f"{OVERRIDES_HELP}\n\n{examples}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (below)")
    parser.add_argument("--verbose", action="store_true",
                        help=f"show every library warning and every rank's log ({console.VERBOSE_ENV}=1)")
    return parser


def _parse_quietly(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse (``--help`` answers here, before any heavy import), then quiet the libraries before the job
    imports them."""
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    if args.verbose:
        console.set_verbose()  # in the environment: ranks launched from here inherit it
    console.quiet_third_party()
    return args


def _parse(prog: str, argv: list[str] | None):
    parser = _parser(prog, TRAIN_HELP if prog == "simpo-train" else EVAL_HELP)
    parser.add_argument("--nproc", type=int, default=None,
                        help="CPU only, outside torchrun: ranks to launch (default: tp x pp)")
    return _parse_quietly(parser, argv)


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


def _main(prog: str, job, argv: list[str] | None) -> int:
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
    def job(cfg):
        from simpo_mcore.train import run_training

        metrics = run_training(cfg)
        if int(os.environ.get("RANK", "0")) == 0 and metrics:
            acc = metrics.get("rewards/accuracies")
            if acc is not None:
                print(f"[simpo_mcore] final held-out reward accuracy: {acc:.3f}", flush=True)

    return _main("simpo-train", job, argv)


def eval_main(argv: list[str] | None = None) -> int:
    def job(cfg):
        from simpo_mcore.evaluate import run_eval

        run_eval(cfg)

    return _main("simpo-eval", job, argv)


def data_main(argv: list[str] | None = None) -> int:
    """``simpo-data CONFIG.yaml [overrides]``: the run's data as it will be trained on (one process,
    no process group); builds the tokenised cache the run then reads."""
    parser = _parser("simpo-data", DATA_HELP)
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--samples", type=int, default=3, help="rendered pairs to show (default 3)")
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel size of the launch, for the padding efficiency (default 1)")
    args = _parse_quietly(parser, argv)
    try:
        if args.dp < 1 or args.samples < 0:
            raise ValueError(f"--dp must be >= 1 and --samples >= 0 (got {args.dp}, {args.samples})")
        cfg = load_config(args.config, args.overrides)
        console.set_progress_interval(cfg.logging.progress_interval_s)
        from simpo_mcore.data.pipeline import pad_multiple
        from simpo_mcore.data.preview import BatchShape, run_preview
        from simpo_mcore.runtime import data_tokenizer, max_length_warning

        tokenizer, max_positions = data_tokenizer(cfg)
        t = cfg.train
        multiple = pad_multiple(cfg.parallel.tp, cfg.parallel.sequence_parallel)
        batch = BatchShape(t.micro_batch_pairs, t.global_batch_pairs, args.dp, multiple, t.seed)
        warning = max_positions is not None and max_length_warning(cfg.data.max_length, max_positions)
        print(run_preview(cfg.data, tokenizer, args.split, Path(cfg.output_dir) / "data_cache", batch,
                          samples=args.samples, color=sys.stdout.isatty(), warnings=[warning] if warning else []))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"simpo-data: error: {exc}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"simpo-train": train_main, "simpo-eval": eval_main, "simpo-data": data_main}


def module_main(argv: list[str]) -> int:
    """``python -m simpo_mcore.cli simpo-train CONFIG ...`` (what torchrun and the CPU re-launch run)."""
    if not argv or argv[0] not in COMMANDS:
        out = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        print(f"usage: python -m simpo_mcore.cli {{{','.join(COMMANDS)}}} CONFIG [overrides] [--help]", file=out)
        return 0 if out is sys.stdout else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(module_main(sys.argv[1:]))
