"""``simpo-train``: the :class:`Trainer` (every component of a run, built once) and its loop.

    run_training(cfg)                       the job: process groups -> claim_output_dir -> Trainer.build -> train()
    Trainer.build(cfg, layout)              each component from a function of its own: the resume point
                                            (resume.find_resume_point), runtime (model, tokenizer, log-prob head),
                                            data (load_splits, build_data; a resume with no step left is refused
                                            here, resume.check_steps_left), DDP + optimizer + LR schedule
                                            (build_optimization),
                                            checkpoints and the restored state (build_checkpointer), the logger
                                            (build_logger)
    Trainer.train()                         evaluate at step 0, then per step: should_stop, train_step,
                                            maybe_evaluate, checkpointer.save; finish
    Trainer.train_step()                    one optimizer step: the step's micro-batches and normalisers
                                            (TrainBatches.step_batches) -> forward_backward -> optimizer_step ->
                                            state, the step's record (metrics_log.step_record), log

The objective (forward_step / loss_func, metric reduction) is :mod:`simpo_mcore.objective`; the micro-batch it
receives :mod:`simpo_mcore.microbatch`; the data order :mod:`simpo_mcore.data.sampler`; checkpoints
:class:`simpo_mcore.checkpoint.CheckpointManager`; what a resumed run may change :mod:`simpo_mcore.resume`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from simpo_mcore import console
from simpo_mcore.checkpoint import CheckpointManager
from simpo_mcore.checkpoint_info import checkpoint_root, latest_checkpoint
from simpo_mcore.config import CheckpointConfig, ConfigError, RunConfig, UserError
from simpo_mcore.convert.hf_io import owned_export
from simpo_mcore.convert.tool import run_in_fresh_process
from simpo_mcore.data.pipeline import TokenizedSplit, TrainBatches, check_data_paths, load_split
from simpo_mcore.evaluate import evaluate
from simpo_mcore.metrics_log import (
    MetricsLogger,
    RunTotals,
    Throughput,
    WandbRun,
    check_wandb,
    run_summary,
    step_record,
)
from simpo_mcore.microbatch import StepBatches
from simpo_mcore.objective import make_forward_step, reduce_moe_stats, reduce_reports, run_schedule
from simpo_mcore.optim import apply_optim_config, build_optimizer, wrap_ddp, zero_grad
from simpo_mcore.output_dir import OutputDirLock, check_writable, start_fresh
from simpo_mcore.parallel import Layout, agreed, distributed
from simpo_mcore.reference import attach_reference_logps
from simpo_mcore.resume import (
    Change,
    check_resume_data,
    check_steps_left,
    find_resume_point,
    log_resume_changes,
    rebase_progress,
)
from simpo_mcore.runtime import Runtime, build_runtime
from simpo_mcore.schedule import LRSchedule, total_steps

log = logging.getLogger("simpo_mcore")


@dataclass
class TrainState:
    """The trainer's counters: where training stands. Saved with every checkpoint and restored on resume."""

    step: int = 0
    consumed_pairs: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    consumed_tokens: int = 0
    """Tokens the model computed, padding included (the steps' ``tokens_computed``)."""
    consumed_real_tokens: int | None = None
    """Tokens of the pairs themselves (the steps' ``tokens_real``); None before the first step."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        loaded = TrainState(**state)  # an unknown counter fails here
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))

    def count_step(self, global_batch_pairs: int, metrics: dict[str, float]) -> None:
        """One optimizer step taken (or skipped) over ``global_batch_pairs`` pairs with these reduced metrics."""
        self.step += 1
        self.consumed_pairs += global_batch_pairs
        self.consumed_tokens += int(metrics["tokens_computed"])
        self.consumed_real_tokens = (self.consumed_real_tokens or 0) + int(metrics["tokens_real"])


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) ask for a checkpoint and a clean exit. The flag is
    all-reduced every step so all ranks stop at the same step; one received before the first step (while the
    run starts) stops it before that step, saving nothing."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name


def on_any_rank(device, *flags: bool) -> list[bool]:
    """Each of this rank's ``flags`` OR-ed over every rank, in one all-reduce."""
    values = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def check_batch_sizes(cfg: RunConfig, dp: int) -> int | None:
    """Micro-batches per rank per step (``None`` with ``data.packing``: as many rows as the step's pairs
    fill); explains a global batch that micro x accumulation x DP cannot make."""
    t, p = cfg.train, cfg.parallel
    if cfg.data.packing:
        if t.global_batch_pairs % dp:
            raise ConfigError(
                f"train.global_batch_pairs ({t.global_batch_pairs}) must be a multiple of the data-parallel size "
                f"({dp}). Try global_batch_pairs = {max(1, t.global_batch_pairs // dp) * dp}")
        if p.vpp and t.global_batch_pairs // dp < p.pp:
            raise ConfigError(
                f"the interleaved pipeline (parallel.vpp={p.vpp}) needs at least parallel.pp={p.pp} micro-batches "
                f"per step, each with a pair, but train.global_batch_pairs ({t.global_batch_pairs}) / DP {dp} = "
                f"{t.global_batch_pairs // dp} pairs per rank")
        return None
    per_rank = t.micro_batch_pairs * dp
    if t.global_batch_pairs % per_rank:
        raise ConfigError(
            f"train.global_batch_pairs ({t.global_batch_pairs}) must equal train.micro_batch_pairs "
            f"({t.micro_batch_pairs}) x accumulation steps x data-parallel size ({dp}); it is not a "
            f"multiple of {per_rank}. Try global_batch_pairs = {max(1, t.global_batch_pairs // per_rank) * per_rank}")
    num_micro = t.global_batch_pairs // per_rank
    if p.vpp and num_micro < p.pp:
        raise ConfigError(
            f"the interleaved pipeline (parallel.vpp={p.vpp}) needs at least parallel.pp={p.pp} micro-batches "
            f"per step, but train.global_batch_pairs ({t.global_batch_pairs}) / (train.micro_batch_pairs "
            f"({t.micro_batch_pairs}) x DP {dp}) = {num_micro}")
    return num_micro


def grads_are_finite(ddp_chunks: list, device) -> bool:
    """Every rank's gradient buffers finite, the experts' included (all-reduced, so all ranks agree)."""
    bad = torch.zeros(1, device=device)
    for chunk in ddp_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if not torch.isfinite(buffer.grad_data).all():
                bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def run_training(cfg: RunConfig) -> dict[str, float] | None:
    """Train; returns the final held-out metrics, or None when the run has no held-out data or stopped
    before its last step (a signal, ``train.exit_interval``)."""
    started = console.command_started()
    check_wandb(cfg.logging.wandb)
    console.set_progress_interval(cfg.logging.progress_interval_s)
    with distributed(cfg.parallel, cfg.train.seed) as layout:
        check_batch_sizes(cfg, layout.dp)  # before anything slow
        with claim_output_dir(cfg.output_dir, cfg.checkpoint, layout.rank):
            # Also before anything slow: a W&B that cannot start fails now, on every rank (agreed).
            wandb = agreed(lambda: open_wandb(cfg, layout.rank), run=layout.rank == 0)
            trainer, finished = None, False
            try:
                trainer = Trainer.build(cfg, layout, started, wandb)
                trainer.train()
                finished = True
            finally:
                if trainer is not None:
                    trainer.close(failed=not finished)
                elif wandb is not None:
                    wandb.close(failed=True)
            return trainer.final_eval if trainer.state.step >= trainer.total_steps else None


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, cfg: CheckpointConfig, rank: int) -> Iterator[None]:
    """Every rank: output_dir checked, locked by rank 0 for the block, and (without ``cfg.resume``) free of a
    previous run's outputs (:mod:`simpo_mcore.output_dir`); all ranks raise the same error when any of it fails."""
    lock = OutputDirLock(output_dir)

    def claim() -> None:
        check_writable(output_dir)
        lock.acquire()
        try:
            if not cfg.resume:
                start_fresh(output_dir, cfg.overwrite)
        except BaseException:
            lock.release()
            raise

    agreed(claim, run=rank == 0)
    try:
        yield
    finally:
        if rank == 0:
            lock.release()


def open_wandb(cfg: RunConfig, rank: int) -> WandbRun | None:
    """Rank 0's W&B run (``logging.wandb``), continuing this output_dir's when the job resumes; else None."""
    w = cfg.logging.wandb
    if rank != 0 or w.project is None or w.mode == "disabled":
        return None
    out = Path(cfg.output_dir)
    resume = cfg.checkpoint.resume and latest_checkpoint(checkpoint_root(cfg.output_dir)) is not None
    out.mkdir(parents=True, exist_ok=True)
    return WandbRun(w, out, asdict(cfg), resume)


# ------------------------------------------------------------------------------------- components


@dataclass(frozen=True)
class TrainData:
    """The run's data: the splits, this rank's batches of every step, and the run's length."""

    train: TokenizedSplit
    eval: TokenizedSplit | None
    batches: TrainBatches
    total_steps: int
    fingerprint: dict
    """The training pairs' ``content_fingerprint``: saved with each checkpoint for the resume checks."""


def load_splits(cfg: RunConfig, rt: Runtime) -> tuple[TokenizedSplit, TokenizedSplit | None]:
    """The tokenised splits; DPO's with the reference log-probs, computed once with the starting weights, before
    any update: no second model later."""
    rank = rt.layout.rank
    train_split = load_split(cfg.data, rt.tokenizer, "train", rank, cfg.output_dir)
    eval_split = load_split(cfg.data, rt.tokenizer, "eval", rank, cfg.output_dir) if cfg.data.eval_path else None
    if cfg.loss.type == "dpo":
        train_split = attach_reference_logps(rt, train_split, "train")
        if eval_split is not None:
            eval_split = attach_reference_logps(rt, eval_split, "eval")
    return train_split, eval_split


def build_data(cfg: RunConfig, rt: Runtime, train_split: TokenizedSplit, eval_split: TokenizedSplit | None,
               fingerprint: dict) -> TrainData:
    """This rank's batches of every step over ``train_split``, and the run's length."""
    check_batch_sizes(cfg, rt.layout.dp)
    batches = TrainBatches(cfg.train, train_split, rt.batch_layout, rt.layout.dp_rank, rt.layout.dp)
    return TrainData(train_split, eval_split, batches, total_steps(cfg.train, len(train_split)), fingerprint)


def build_optimization(cfg: RunConfig, rt: Runtime, steps: int) -> tuple[list, object, LRSchedule]:
    """The DDP-wrapped model chunks, megatron's optimizer over them and the learning-rate schedule."""
    cpu = rt.layout.device.type == "cpu"
    ddp_chunks = wrap_ddp(rt.chunks, cfg.parallel.distributed_optimizer, cpu)
    optimizer = build_optimizer(ddp_chunks, cfg.optim, cfg.train.precision, cfg.parallel.distributed_optimizer, cpu)
    return ddp_chunks, optimizer, LRSchedule.from_config(cfg.optim, steps)


def build_checkpointer(cfg: RunConfig, rt: Runtime, data: TrainData, model: list, optimizer, state: TrainState,
                       resume_from: Path | None, changes: list[Change], schedule: LRSchedule) -> CheckpointManager:
    """The run's checkpoints; ``state`` (and the model and optimizer) restored from ``resume_from`` when given."""
    checkpointer = CheckpointManager(
        checkpoint_root(cfg.output_dir), cfg.checkpoint, model=model, optimizer=optimizer, train_state=state,
        layout=rt.layout, meta=rt.meta, tokenizer=rt.tokenizer_source, run_config=asdict(cfg),
        data_fingerprint=data.fingerprint, total_steps=data.total_steps)
    if removed := checkpointer.remove_interrupted():
        log.warning("removed what interrupted checkpoint saves (or their pruning) left: %s", ", ".join(removed))
    if resume_from is not None:
        checkpointer.restore(resume_from, adapt=lambda progress: rebase_progress(progress, changes))
        log.info("resumed from %s at step %d (%d pairs consumed)", resume_from, state.step, state.consumed_pairs)
        log_resume_changes(changes, resume_from, schedule, state.step - state.skipped_steps)
    return checkpointer


def build_logger(cfg: RunConfig, layout: Layout, data: TrainData, state: TrainState, wandb: WandbRun | None,
                 resumed: bool, started: float) -> MetricsLogger:
    """The metrics sinks and the console, opened by rank 0 (its failure is every rank's error)."""
    run_info = {"world_size": layout.world_size, "dp": layout.dp, "cp": layout.cp, "total_steps": data.total_steps,
                "train_pairs": len(data.train), "eval_pairs": len(data.eval) if data.eval is not None else 0}
    return agreed(lambda: MetricsLogger(
        cfg.output_dir, layout.rank, data.total_steps, state.step, cfg.train.tensorboard, cfg.train.progress_bar,
        cfg.train.log_interval, wandb, run_info, resumed=resumed, job_started=started))


# ------------------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run. Every component is an attribute, built once by :meth:`build` (each in a function of its
    own); each method does one job, so a test can build a trainer and drive it a step at a time."""

    def __init__(self, *, cfg: RunConfig, runtime: Runtime, data: TrainData, model: list, optimizer,
                 schedule: LRSchedule, state: TrainState, checkpointer: CheckpointManager, logger: MetricsLogger,
                 stop: StopSignal, started: float):
        self.cfg = cfg
        self.rt = runtime
        self.layout: Layout = runtime.layout
        self.device: torch.device = runtime.layout.device
        self.data = data
        self.total_steps = data.total_steps
        self.model = model
        """The DDP-wrapped model chunks (one per virtual pipeline stage)."""
        self.optimizer = optimizer
        self.schedule = schedule
        self.state = state
        self.checkpointer = checkpointer
        self.logger = logger
        self.stop = stop
        self.throughput = Throughput.for_run(runtime.meta.arch, cfg.data.max_length, self.device.type == "cuda",
                                             self.layout.world_size)
        self.started = started
        """When the command started (``time.time()``: :func:`simpo_mcore.console.command_started`): the summary's
        wall time counts from it."""
        self.steps_run = 0
        """Optimizer steps taken by this process (a resumed run starts at 0)."""
        self.last_metrics: dict[str, float] = {}
        self.final_eval: dict[str, float] | None = None
        self.hf_export: Path | None = None

    @classmethod
    def build(cls, cfg: RunConfig, layout: Layout, started: float | None = None,
              wandb: WandbRun | None = None) -> Trainer:
        started = console.command_started() if started is None else started
        stop = StopSignal()
        check_data_paths(cfg.data, ("train", "eval"), layout.rank)  # before the model loads
        resume_from, changes = find_resume_point(cfg)
        # A SimPO resume overwrites every weight: skip reading the starting checkpoint. DPO needs the
        # starting weights whenever its reference log-probs have to be computed.
        rt = build_runtime(cfg, layout, load_weights=resume_from is None or cfg.loss.type == "dpo")
        train_split, eval_split = load_splits(cfg, rt)
        fingerprint = train_split.content_fingerprint()
        if resume_from is not None:
            check_resume_data(cfg, resume_from, changes, fingerprint)
        data = build_data(cfg, rt, train_split, eval_split, fingerprint)
        if resume_from is not None:  # before anything is written: a run with no step left trains nothing
            check_steps_left(cfg, resume_from, data.total_steps, changes)
        model, optimizer, schedule = build_optimization(cfg, rt, data.total_steps)
        state = TrainState()
        checkpointer = build_checkpointer(cfg, rt, data, model, optimizer, state, resume_from, changes, schedule)
        logger = build_logger(cfg, layout, data, state, wandb, resume_from is not None, started)
        return cls(cfg=cfg, runtime=rt, data=data, model=model, optimizer=optimizer, schedule=schedule, state=state,
                   checkpointer=checkpointer, logger=logger, stop=stop, started=started)

    # ------------------------------------------------------------------------------------- the loop

    def train(self) -> dict[str, float]:
        """Run to ``total_steps`` (or a stop); returns the final evaluation metrics, else the last step's."""
        stopped_by = None
        if self.data.eval is not None and self.state.step == 0 and (stopped_by := self.should_stop()) is None:
            self.final_eval = self.evaluate()
        while stopped_by is None and self.state.step < self.total_steps:
            if (stopped_by := self.should_stop()) is not None:
                break
            self.train_step()
            self.maybe_evaluate()
            self.save_checkpoint()
        return self.finish(stopped_by)

    def should_stop(self) -> str | None:
        """Why to stop before the next step (a signal on any rank, or the exit interval), else None. The same
        all-reduce tells whether every rank's asynchronous checkpoint writer is done: then that checkpoint is
        published here."""
        signalled, writing = on_any_rank(self.device, self.stop.received is not None, self.checkpointer.writing())
        self._saved(self.checkpointer.poll(all_done=not writing))
        if signalled:
            return self.stop.received or "signal on another rank"
        interval = self.cfg.train.exit_interval
        if interval and self.steps_run and self.state.step % interval == 0:
            return f"train.exit_interval={interval}"
        return None

    def forward_backward(self, step: StepBatches) -> dict[str, float]:
        """Gradients of the global-batch loss (and of a mixture of experts' load-balancing term) into the DDP
        buffers; the step's metrics (every rank)."""
        zero_grad(self.model, self.optimizer)
        forward_step = make_forward_step(self.cfg.loss, self.rt.logps_context, self.device, step.scale)
        reports = run_schedule(self.model, forward_step, step.micro_batches, forward_only=False)
        metrics = reduce_reports(reports, self.cfg.loss.sft_weight, self.device)
        return metrics | reduce_moe_stats(self.model, step.scale, self.device)

    def optimizer_step(self, loss: float) -> tuple[float, float, bool]:
        """``(lr, grad_norm, finite)`` of this update: skipped (and not finite) when the loss or a gradient is
        not finite. Skipped updates do not advance the schedule (as the HF Trainer's skipped fp16 steps do not)."""
        finite = math.isfinite(loss) and grads_are_finite(self.model, self.device)
        grad_norm = float("nan")
        lr = self.schedule.lr_at(self.state.step - self.state.skipped_steps)
        if finite:
            apply_optim_config(self.optimizer, self.cfg.optim, lr)
            ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")  # a tensor on GPUs
            finite = bool(ok) and math.isfinite(grad_norm)
        return lr, grad_norm, finite

    def train_step(self) -> dict[str, float]:
        """One optimizer step (skipped, and counted, when the loss or a gradient is not finite); logs and
        returns the step's record."""
        state = self.state
        t0 = time.perf_counter()
        metrics = self.forward_backward(self.data.batches.step_batches(state.consumed_pairs))
        lr, grad_norm, finite = self.optimizer_step(metrics["loss"])
        state.count_step(self.cfg.train.global_batch_pairs, metrics)
        self.steps_run += 1
        if finite:
            state.nonfinite_in_a_row = 0
        else:
            self._skipped(metrics["loss"], grad_norm)
        record = step_record(metrics, lr=lr, grad_norm=grad_norm, step_time_s=time.perf_counter() - t0,
                             consumed_pairs=state.consumed_pairs, skipped_steps=state.skipped_steps,
                             throughput=self.throughput)
        self.last_metrics = record
        self.logger.log_step(state.step, record)
        return record

    def _skipped(self, loss: float, grad_norm: float) -> None:
        state, limit = self.state, self.cfg.train.max_nonfinite_steps
        state.skipped_steps += 1
        state.nonfinite_in_a_row += 1
        self.logger.print(f"step {state.step}: non-finite loss or gradient (loss={loss}, grad_norm={grad_norm}); "
                          f"update skipped ({state.nonfinite_in_a_row} in a row, {state.skipped_steps} in all)")
        if state.nonfinite_in_a_row >= limit:
            self._saved(self.checkpointer.wait())  # every rank is here: the save in flight is published
            saved = self.checkpointer.last_path
            last = f"the last checkpoint is {saved}" if saved is not None else "no checkpoint was saved"
            # Every rank gets here at the same step (the finiteness check is all-reduced): one error line each.
            raise UserError(
                f"{state.nonfinite_in_a_row} consecutive non-finite steps (last: step {state.step}); "
                f"aborting (train.max_nonfinite_steps={limit}); {last}. Lower optim.lr, check the data, or "
                f"raise train.max_nonfinite_steps")

    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out split now; logged and printed."""
        groups = self.rt.eval_groups(self.data.eval, progress=f"eval step {self.state.step}")
        metrics = evaluate(self.model, groups, self.cfg.loss, self.rt.logps_context, self.device)
        record = {f"eval/{k}": v for k, v in metrics.items()}
        self.logger.log(self.state.step, record)
        self.logger.print(f"eval step {self.state.step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in record.items() if not k.endswith(("num_pairs", "tokens", "_real", "_computed"))))
        return metrics

    def maybe_evaluate(self) -> dict[str, float] | None:
        """Evaluate every ``train.eval_interval`` steps before the last (the last step's comes in finish)."""
        interval, step = self.cfg.train.eval_interval, self.state.step
        if self.data.eval is None or not interval or step % interval or step >= self.total_steps:
            return None
        return self.evaluate()

    def save_checkpoint(self, last_step: bool = False) -> None:
        """A checkpoint of this step when the checkpointer finds one due (``last_step``: the run ends here, so
        whatever is being written is waited for)."""
        self._saved(self.checkpointer.save(self.state.step, last_step))

    def _saved(self, published: list[Path]) -> None:
        for path in published:
            self.logger.print(f"checkpoint saved: {path}")

    def finish(self, stopped_by: str | None = None) -> dict[str, float]:
        """Save what is unsaved; a completed run then evaluates and exports. Returns the final evaluation
        metrics, else the last step's."""
        self.save_checkpoint(last_step=True)
        if stopped_by is not None:
            self.logger.end_progress()
            self.logger.print(f"stopped by {stopped_by} at step {self.state.step}; resume with the same command")
            self.logger.print(self.summary(stopped_by))
            return self.last_metrics
        if self.data.eval is not None:
            self.final_eval = self.evaluate()
        if self.cfg.checkpoint.export_hf:
            self.export_hf()
        self.logger.end_progress()
        self.logger.print(self.summary())
        return self.final_eval if self.final_eval is not None else self.last_metrics

    def summary(self, stopped_by: str | None = None) -> str:
        """What the run did and where its outputs are (printed by rank 0 at the end)."""
        s = self.state
        totals = RunTotals(step=s.step, total_steps=self.total_steps, steps_this_process=self.steps_run,
                           pairs=s.consumed_pairs, tokens=s.consumed_tokens, real_tokens=s.consumed_real_tokens,
                           skipped_steps=s.skipped_steps, wall_s=time.time() - self.started,
                           stopped_by=stopped_by)
        wandb = self.logger.wandb.describe() if self.logger.wandb is not None else None
        return run_summary(totals, self.logger.evals, self.checkpointer.last_path, self.hf_export,
                           Path(self.cfg.output_dir), wandb)

    def export_hf(self) -> None:
        """The newest checkpoint as a Hugging Face model in ``<output_dir>/hf``, a directory the export owns:
        it replaces an earlier export there, and refuses to touch anything else found in it."""
        out = Path(self.cfg.output_dir) / "hf"
        checkpoint = self.checkpointer.last_path

        def export():
            with owned_export(out, f"checkpoint.export_hf (the trained checkpoint is {checkpoint})") as staged:
                # A process of its own: the converter runs in a world of one while this job's ranks wait.
                run_in_fresh_process("mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(staged))
            self.logger.print(f"exported Hugging Face model: {out}")

        agreed(export, run=self.layout.rank == 0)
        self.hf_export = out

    def close(self, failed: bool = False) -> None:
        """Close the metrics sinks (a W&B run is marked failed when the run raised); a failed run's checkpoint
        writer is stopped, its save left unpublished (``latest`` names the last complete checkpoint)."""
        if failed:
            self.checkpointer.abort()
        self.logger.close(failed)
