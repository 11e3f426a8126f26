"""Entry points: ``simpo-train CONFIG.yaml [dotted.key=value ...]``, ``simpo-eval``, ``simpo-data``
(a preview of the data as it will be trained on) and ``simpo-plan`` (layouts, memory and time on paper),
all of that form.

Under ``torchrun`` each rank runs the job. Run as one plain process with a config whose layout
needs several ranks (``parallel.tp x parallel.pp x parallel.cp`` > 1, or expert parallelism) and no GPU, the
command re-launches itself under ``torch.distributed.run`` on the CPU with that many ranks, so the laptop demo is
one command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from simpo_mcore import console, preflight
from simpo_mcore.config import USER_ERRORS, ConfigError, importer, load_config

USER_ERROR_EXIT = 2
"""The exit code of a user error, from every rank and from the launcher."""
LAUNCHER_PID = "SIMPO_LAUNCHER_PID"
"""Set by the CPU re-launch for its ranks: the process they must not outlive."""
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Pre-emption signals the CPU re-launch passes to its ranks itself (each rank saves and exits 0)."""

OVERRIDES_HELP = """overrides:
  Any config field as dotted.key=value after the config file; they win over the file (and its _base_
  files). Numbers, true/false, lists and null are read as YAML; a string field (paths, output_dir,
  data.chat_template, choices) takes the text as it is, and null (or nothing) unsets an optional one:
    train.max_steps=200  optim.lr=5e-7  output_dir=runs/try2  data.max_pairs=null
    logging.wandb.project=simpo  logging.wandb.mode=offline  model.tokenizer=null
  Every field, with its meaning, is in simpo_mcore/config/schema.py; unknown keys (each with a
  suggestion) and wrong types are errors naming the key."""

TRAIN_HELP = ("""Train a model with SimPO (or a DPO baseline) from a YAML run config.

Run one process per rank: under torchrun on GPUs; on a CPU a config that needs several ranks
(parallel.tp x parallel.pp x parallel.cp, or more for parallel.ep) re-launches itself on that many (or --nproc).
Writes checkpoints, metrics.jsonl, TensorBoard and (with logging.wandb.project) a W&B run into output_dir, and
resumes from output_dir/checkpoints/latest when it exists. Rank 0 prints one line every train.log_interval
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


def error_line(text: str) -> None:
    """``text`` and its newline on stderr in one write: ranks started by torchrun run unbuffered (``python
    -u``), where ``print`` writes the newline separately and two ranks' lines could run into one another."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


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
                        help="CPU only, outside torchrun: ranks to launch (default: tp x pp x cp, or pp x lcm(tp x cp, "
                             "ep x etp) with experts); more adds data-parallel ranks, DP = nproc / (tp x pp x cp), "
                             "which must divide evenly")
    return _parse_quietly(parser, argv)


def launch_ranks(cfg, nproc: int | None) -> int:
    """The ranks a command outside torchrun starts on a CPU: ``--nproc``, else the layout's fewest
    (``ParallelConfig.min_world_size``: ``tp x pp x cp`` for a dense model)."""
    return nproc or cfg.parallel.min_world_size()


def _relaunch_if_needed(prog: str, cfg, args) -> int | None:
    """Outside torchrun on a CPU, start :func:`launch_ranks` ranks of this same command."""
    import torch

    if "RANK" in os.environ or (torch.cuda.is_available() and cfg.parallel.device != "cpu"):
        return None
    nproc = launch_ranks(cfg, args.nproc)
    if nproc == 1:
        return None
    from torch.distributed.run import main as torchrun

    # torchrun leaves SIGTERM / SIGUSR1 to us (see _forward_signals); it still handles SIGINT and friends.
    cmd = [f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={preflight.free_port()}",
           "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", "-m", "simpo_mcore.cli", prog, args.config, *args.overrides]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHER_PID] = str(os.getpid())
    os.environ[console.COMMAND_STARTED_ENV] = repr(console.command_started())  # the ranks' times count from it
    console.announce(f"launching {nproc} CPU ranks: torchrun {' '.join(cmd)}")
    _forward_signals()
    # The launcher reports a failed rank itself (_launch_failure): torchrun's own log lines about it
    # ("closing signal SIGTERM", "failed (exitcode: 2)") would follow every user error.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun(cmd)
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - torchrun raises ChildFailedError naming the failed ranks
        return _launch_failure(prog, exc)
    return 0


def _forward_signals() -> None:
    """In the CPU re-launch: SIGTERM / SIGUSR1 go on to every rank, as they would from a scheduler.

    torchrun's own handling of SIGTERM stops waiting for the ranks and exits 1 ("signal 15") even when
    they save a checkpoint and exit 0; here the launcher only passes the signal on and keeps waiting, so
    a pre-emption save ends in exit 0. Each rank leads a process group of its own (torchrun starts it
    in a new session), as torchrun signals it."""
    import psutil

    def forward(signum, frame):
        ranks = psutil.Process().children()
        if not ranks:  # none started yet: stop here (any that start now die with this process)
            os._exit(128 + signum)
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rank.pid, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)


def _launch_failure(prog: str, exc: Exception) -> int:
    """The re-launch's exit code once a rank failed: 2 when the ranks reported a user error (each
    printed its ``error:`` line), else 1 with one line naming the rank."""
    failures = getattr(exc, "failures", None) or {}
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    if codes and all(code == USER_ERROR_EXIT for code in codes.values()):
        return USER_ERROR_EXIT
    detail = ", ".join(f"rank {rank} exit code {code}" for rank, code in sorted(codes.items())) or str(exc)
    error_line(f"{prog}: error: {detail} (its output above says why)")
    return 1


def _die_with_launcher() -> None:
    """A rank started by torchrun is killed when its launcher dies, even by ``kill -9`` (which the
    launcher cannot pass on): otherwise the ranks run on as orphans and race the relaunch for the
    output_dir. Linux ``PR_SET_PDEATHSIG``; elsewhere nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    launcher = int(os.environ.get(LAUNCHER_PID, "0"))
    if os.getppid() == 1 or (launcher and os.getppid() != launcher):
        os._exit(1)  # the launcher died before the line above took effect


def _main(prog: str, job, check, argv: list[str] | None) -> int:
    """Parse, load the config, run ``check`` (:mod:`simpo_mcore.preflight`) once per command, then re-launch on
    CPU ranks or run ``job`` here."""
    _die_with_launcher()
    args = _parse(prog, argv)
    try:
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        cfg = load_config(args.config, args.overrides)
        _preflight(prog, args, cfg, check)
    except USER_ERRORS as exc:
        error_line(f"{prog}: error: {exc}")
        return USER_ERROR_EXIT
    code = _relaunch_if_needed(prog, cfg, args)
    if code is not None:
        return code
    return _run_job(prog, job, cfg)


def _preflight(prog: str, args, cfg, check) -> None:
    """The checks that need no rank, once per command, before torch is imported: in the process the user started
    (before the CPU re-launch, or a one-process run) or, under a plain torchrun, on rank 0 before the process
    groups (its exit takes the other ranks down). Then the command's first line says what is starting. The ranks
    of the CPU re-launch skip them (their launcher ran them) and rank 0 says they started."""
    rank = os.environ.get("RANK")
    if rank is not None and LAUNCHER_PID in os.environ:
        console.announce(f"{os.environ.get('WORLD_SIZE', '?')} ranks started; importing torch and megatron-core")
        return
    if rank not in (None, "0"):
        return
    what = check(cfg)
    console.announce(f"{prog} {args.config}: {_ranks_text(cfg, args.nproc)}, output {cfg.output_dir}, {what}; "
                     "importing torch")


def _ranks_text(cfg, nproc: int | None) -> str:
    """``2 CPU ranks (TP 2)``, ``1 process``, under torchrun ``rank 0 of 8 (TP 2, DP 4)``."""
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "0")) or launch_ranks(cfg, nproc)
    sizes = {"TP": p.tp, "PP": p.pp, "VPP": p.vpp or 1, "CP": p.cp, "DP": world // (p.tp * p.pp * p.cp), "EP": p.ep}
    layout = ", ".join(f"{name} {size}" for name, size in sizes.items() if size > 1)
    if "RANK" in os.environ:
        return f"rank 0 of {world}" + (f" ({layout})" if layout else "")
    if world == 1:
        return "1 process"
    return f"{world} {'CPU ' if p.device == 'cpu' else ''}ranks" + (f" ({layout})" if layout else "")


def _run_job(prog: str, job, cfg) -> int:
    """``job(cfg)`` on this rank; a user error (every rank raises the same one: ``parallel.agreed``)
    becomes one ``error:`` line and exit code 2, a failure on another rank one line and exit code 1."""
    from simpo_mcore.parallel import PeerFailed

    try:
        job(cfg)
    except USER_ERRORS as exc:
        error_line(f"{prog}: error: {exc}")
        return USER_ERROR_EXIT
    except PeerFailed as exc:
        error_line(f"{prog}: error: {exc}")
        return 1
    return 0


def train_main(argv: list[str] | None = None) -> int:
    def job(cfg):
        from simpo_mcore.train import run_training

        held_out = run_training(cfg)  # None without held-out data or when stopped early
        if int(os.environ.get("RANK", "0")) == 0 and held_out:
            print(f"[simpo_mcore] final held-out reward accuracy: {held_out['rewards/accuracies']:.3f}", flush=True)

    return _main("simpo-train", job, preflight.check_train, argv)


def eval_main(argv: list[str] | None = None) -> int:
    def job(cfg):
        from simpo_mcore.evaluate import run_eval

        run_eval(cfg)

    return _main("simpo-eval", job, preflight.check_eval, argv)


def data_main(argv: list[str] | None = None) -> int:
    """``simpo-data CONFIG.yaml [overrides]``: the run's data as it will be trained on (one process,
    no process group); builds the tokenised cache the run then reads."""
    parser = _parser("simpo-data", DATA_HELP)
    parser.add_argument("--split", choices=["train", "eval"], default="train",
                        help="which split to show: train (data.train_path, the default) or eval (data.eval_path)")
    parser.add_argument("--samples", type=int, default=3, help="rendered pairs to show (default 3)")
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel size of the launch, for the padding efficiency (default 1)")
    args = _parse_quietly(parser, argv)
    try:
        if args.dp < 1 or args.samples < 0:
            raise ValueError(f"--dp must be >= 1 and --samples >= 0 (got {args.dp}, {args.samples})")
        cfg = load_config(args.config, args.overrides)
        console.set_progress_interval(cfg.logging.progress_interval_s)
        from simpo_mcore.data.preview import BatchShape, run_preview
        from simpo_mcore.runtime import data_tokenizer, max_length_warning

        tokenizer, max_positions = data_tokenizer(cfg)
        batch = BatchShape.for_run(cfg, args.dp)
        warning = max_positions is not None and max_length_warning(cfg.data.max_length, max_positions)
        print(run_preview(cfg.data, tokenizer, args.split, Path(cfg.output_dir) / "data_cache", batch,
                          samples=args.samples, color=sys.stdout.isatty(), warnings=[warning] if warning else []))
    except USER_ERRORS as exc:
        error_line(f"simpo-data: error: {exc}")
        return USER_ERROR_EXIT
    return 0


PLAN_HELP = ("""Plan a run before launching it: every layout of the config's model on N GPUs (TP, PP, VPP, DP,
CP, EP; recomputation none / selective / full; distributed optimizer on / off) with its per-GPU memory
(weights, DDP gradient buffers, optimizer state, activations, pipeline micro-batches in flight, the
log-prob head, buffers), whether it fits, its predicted step time (model FLOPs at the MFU measured on
an H200, the pipeline bubble, communication at datasheet bandwidths) and its communication volume,
ranked best first with the overrides that select it. No GPU, no weights: the architecture comes from
--hf-config, else the converted checkpoint, else configs/hf/ (docs/planning.md).""", """examples:
  simpo-plan configs/simpo/llama3_8b_base_8gpu.yaml --gpus 8
  simpo-plan configs/simpo/llama3_8b_base_multinode.yaml --gpus 32 --top 5
  simpo-plan configs/simpo/llama3_8b_base_multinode.yaml --gpus 64 \\
      --hf-config configs/hf/meta-llama__Meta-Llama-3-70B/config.json
  simpo-plan configs/dpo/qwen25_7b_instruct_beta0.01_8gpu.yaml --gpus 8 --json > plan.json""")


def plan_main(argv: list[str] | None = None) -> int:
    """``simpo-plan CONFIG --gpus N [--gpu-memory-gib 80] [--hf-config FILE] [--json] [--top K]``."""
    parser = _parser("simpo-plan", PLAN_HELP)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the launch")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="kept free for the CUDA context, NCCL and the allocator (default 4)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--hf-config", default=None, help="a Hugging Face config.json (or its directory) "
                        "for the architecture, instead of the checkpoint's or configs/hf/'s")
    parser.add_argument("--cp", default=None, help="context-parallel sizes to consider, e.g. 1,2,4")
    parser.add_argument("--ep", default=None, help="expert-parallel sizes to consider (MoE models)")
    parser.add_argument("--json", action="store_true", help="print the layouts as a JSON list")
    parser.add_argument("--top", type=int, default=None, help="layouts to show (default: 10 in the table, all "
                        "in JSON)")
    args = _parse_quietly(parser, argv)
    try:
        sizes = {name: _sizes(getattr(args, name), f"--{name}") for name in ("cp", "ep")}
        if args.top is not None and args.top < 1:
            raise ConfigError(f"--top must be >= 1, got {args.top}")
        if args.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
        cfg = load_config(args.config, args.overrides)
        from simpo_mcore.plan.planner import plan_run
        from simpo_mcore.plan.report import plan_json, plan_table

        plan = plan_run(cfg, args.gpus, config_path=args.config, hf_config=args.hf_config,
                        gpu_memory_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib,
                        gpus_per_node=args.gpus_per_node, cp_sizes=sizes["cp"], ep_sizes=sizes["ep"])
    except USER_ERRORS as exc:
        error_line(f"simpo-plan: error: {exc}")
        return USER_ERROR_EXIT
    if args.json:
        print(json.dumps(plan_json(plan, args.top), indent=1))
    else:
        print(plan_table(plan, args.config, args.top or 10))
    return 0


def _sizes(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes sizes separated by commas, e.g. 1,2,4; got {text!r}") from None
    if any(x < 1 for x in sizes):
        raise ConfigError(f"{flag} sizes must be >= 1, got {text!r}")
    return sizes


IMPORT_HELP = ("""Convert a SimPO-repo or TRL (CPOTrainer / DPOTrainer) training YAML into a simpo_mcore run config:
every key mapped with its conversion (docs/migrating.md), a key the file leaves out taking the source
trainer's default, and every key with no equivalent named in one error. The result is checked by the
project's config loader before it is written.""", """examples:
  simpo-import-config llama-3-8b-base-simpo.yaml --world-size 4 -o configs/mine.yaml
  simpo-import-config cpo_simpo.yaml --world-size 8 --trainer cpo""")


def import_config_main(argv: list[str] | None = None) -> int:
    """``simpo-import-config FILE --world-size N [-o OUT]``: a SimPO-repo / TRL YAML -> a project YAML."""
    description, examples = IMPORT_HELP
    parser = argparse.ArgumentParser(prog="simpo-import-config", description=description, epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the SimPO-repo / TRL YAML (training_configs/*.yaml, a CPOConfig / DPOConfig)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs the source ran on: its global batch is per_device_train_batch_size x "
                             "gradient_accumulation_steps x this (required)")
    parser.add_argument("-o", "--out", default=None, help="YAML to write (must not exist; default: stdout)")
    parser.add_argument("--trainer", choices=importer.TRAINERS, default=None,
                        help="the source trainer when its keys do not say: simpo (the SimPO repo), cpo, dpo (TRL)")
    parser.add_argument("--checkpoint", default=None,
                        help="model.checkpoint: the converted model (default checkpoints/<model name>-mcore)")
    args = parser.parse_args(argv)
    try:
        if args.world_size is not None and args.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
        text = importer.import_file(args.file, args.world_size, args.trainer, args.checkpoint)
        if args.out is None:
            sys.stdout.write(text)
            return 0
        if Path(args.out).exists():
            raise ConfigError(f"{args.out} exists: remove it or pick another name (nothing is replaced)")
        Path(args.out).write_text(text, encoding="utf-8")
    except USER_ERRORS as exc:
        error_line(f"simpo-import-config: error: {exc}")
        return USER_ERROR_EXIT
    print(f"[simpo_mcore] wrote {args.out}")
    return 0


COMMANDS = {"simpo-train": train_main, "simpo-eval": eval_main, "simpo-data": data_main, "simpo-plan": plan_main,
            "simpo-import-config": import_config_main}


def module_main(argv: list[str]) -> int:
    """``python -m simpo_mcore.cli simpo-train CONFIG ...`` (what torchrun and the CPU re-launch run)."""
    if not argv or argv[0] not in COMMANDS:
        out = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        print(f"usage: python -m simpo_mcore.cli {{{','.join(COMMANDS)}}} CONFIG [overrides] [--help]", file=out)
        return 0 if out is sys.stdout else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(module_main(sys.argv[1:]))
