"""``simpo-train``: the :class:`Trainer` (every component of a run, built once) and its loop.

    run_training(cfg)                       the job: process groups -> Trainer.build -> train()
    Trainer.build(cfg, layout)              resume checks, runtime (model, tokenizer, head), data, DDP,
                                            optimizer, LR schedule, resume, logger
    Trainer.train()                         evaluate at step 0, then per step: should_stop,
                                            train_step, maybe_evaluate, maybe_save; finish
    Trainer.train_step()                    one optimizer step: micro-batches -> forward_backward ->
                                            finiteness check -> lr from the schedule, optimizer step ->
                                            progress, log

The step's arithmetic (loss scaling, metric reduction) is :mod:`simpo_mcore.step`; the data order
:mod:`simpo_mcore.data.sampler`; checkpoints :mod:`simpo_mcore.checkpoint`; what a resumed run may change
:mod:`simpo_mcore.resume`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from simpo_mcore import checkpoint as ckpt
from simpo_mcore import console
from simpo_mcore.config import ConfigError, RunConfig, UserError
from simpo_mcore.convert.hf_io import owned_export
from simpo_mcore.convert.tool import run_in_fresh_process
from simpo_mcore.data.pipeline import TokenizedSplit, TrainBatches, check_data_paths, load_split
from simpo_mcore.evaluate import evaluate
from simpo_mcore.metrics_log import (
    MetricsLogger,
    RunTotals,
    WandbRun,
    check_wandb,
    memory_gib,
    model_flops_per_token,
    peak_tflops,
    run_summary,
)
from simpo_mcore.optim import LRSchedule, apply_optim_config, build_optimizer, wrap_ddp, zero_grad
from simpo_mcore.output_dir import claim_output_dir
from simpo_mcore.parallel import Layout, agreed, distributed
from simpo_mcore.reference import attach_reference_logps
from simpo_mcore.resume import check_resume_config, check_resume_data, log_resume_changes, rebase_progress
from simpo_mcore.runtime import Runtime, build_runtime
from simpo_mcore.step import LossScale, make_forward_step, reduce_reports, run_schedule

log = logging.getLogger("simpo_mcore")


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint and restored on resume."""

    step: int = 0
    consumed_pairs: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    consumed_tokens: int = 0
    """Tokens the model computed, padding included (the steps' ``tokens_computed``)."""
    consumed_real_tokens: int | None = None
    """Tokens of the pairs themselves, when the steps report ``tokens_real``."""


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) ask for a checkpoint and a clean exit. The flag is
    all-reduced every step so all ranks stop at the same step."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def total_steps(cfg: RunConfig, num_pairs: int) -> int:
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = num_pairs // t.global_batch_pairs
    if per_epoch == 0:
        raise ConfigError(f"train.global_batch_pairs ({t.global_batch_pairs}) exceeds the {num_pairs} "
                          "training pairs: not one step fits in an epoch")
    return max(1, math.floor(per_epoch * t.epochs))


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
    """Every rank's gradient buffers finite (all-reduced, so all ranks agree)."""
    bad = torch.zeros(1, device=device)
    for chunk in ddp_chunks:
        for buffer in chunk.buffers:
            if not torch.isfinite(buffer.grad_data).all():
                bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def run_training(cfg: RunConfig) -> dict[str, float] | None:
    """Train; returns the final held-out metrics, or None when the run has no held-out data or stopped
    before its last step (a signal, ``train.exit_interval``)."""
    started = time.monotonic()
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
            return trainer.final_eval if trainer.progress.step >= trainer.total_steps else None


def open_wandb(cfg: RunConfig, rank: int) -> WandbRun | None:
    """Rank 0's W&B run (``logging.wandb``), continuing this output_dir's when the job resumes; else None."""
    w = cfg.logging.wandb
    if rank != 0 or w.project is None or w.mode == "disabled":
        return None
    out = Path(cfg.output_dir)
    resume = cfg.checkpoint.resume and ckpt.latest_checkpoint(out / "checkpoints") is not None
    out.mkdir(parents=True, exist_ok=True)
    return WandbRun(w, out, asdict(cfg), resume)


class Trainer:
    """One training run. Every component is an attribute, built once by :meth:`build`; each method
    does one job, so a test can build a trainer and drive it a step at a time."""

    def __init__(self, cfg: RunConfig, rt: Runtime, train_split: TokenizedSplit,
                 eval_split: TokenizedSplit | None, batches: TrainBatches, ddp_chunks: list, optimizer,
                 schedule: LRSchedule, total_steps: int, progress: Progress,
                 resumed_from: Path | None, logger: MetricsLogger, stop: StopSignal, train_data: dict,
                 started: float):
        self.cfg = cfg
        self.rt = rt
        self.layout: Layout = rt.layout
        self.device: torch.device = rt.layout.device
        self.train_split = train_split
        self.eval_split = eval_split
        self.batches = batches
        self.ddp_chunks = ddp_chunks
        self.optimizer = optimizer
        self.schedule = schedule
        self.train_data = train_data
        """The training pairs' ``content_fingerprint``, saved with each checkpoint for the resume checks."""
        self.total_steps = total_steps
        self.progress = progress
        self.logger = logger
        self.stop = stop
        self.ckpt_root = Path(cfg.output_dir) / "checkpoints"
        self.last_saved = progress.step if resumed_from is not None else -1
        """The step of the newest checkpoint of this run (-1: none yet)."""
        self.steps_run = 0
        """Optimizer steps taken by this process (a resumed run starts at 0)."""
        self.last_metrics: dict[str, float] = {}
        self.final_eval: dict[str, float] | None = None
        self.flops_per_token = model_flops_per_token(rt.meta.arch, cfg.data.max_length)
        self.peak_tflops = peak_tflops(self.device.type == "cuda")
        self.started = started
        """``time.monotonic()`` when the job started (the summary's wall time)."""
        self.hf_export: Path | None = None

    # ------------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, cfg: RunConfig, layout: Layout, started: float | None = None,
              wandb: WandbRun | None = None) -> Trainer:
        started = time.monotonic() if started is None else started
        stop = StopSignal()
        check_data_paths(cfg.data, ("train", "eval"), layout.rank)  # before the model loads
        ckpt_root = Path(cfg.output_dir) / "checkpoints"
        resume_from = ckpt.latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
        changes = check_resume_config(cfg, resume_from) if resume_from is not None else []
        # A SimPO resume overwrites every weight: skip reading the starting checkpoint. DPO needs the
        # starting weights whenever its reference log-probs have to be computed.
        rt = build_runtime(cfg, layout, load_weights=resume_from is None or cfg.loss.type == "dpo")
        train_split, eval_split = cls._load_data(cfg, rt)
        train_data = train_split.content_fingerprint()
        if resume_from is not None:
            check_resume_data(cfg, resume_from, changes, train_data)
        check_batch_sizes(cfg, layout.dp)
        steps = total_steps(cfg, len(train_split))
        batches = TrainBatches(cfg.train, train_split, rt.batch_layout, layout.dp_rank, layout.dp)

        cpu = layout.device.type == "cpu"
        ddp_chunks = wrap_ddp(rt.chunks, cfg.parallel.distributed_optimizer, cpu)
        optimizer = build_optimizer(ddp_chunks, cfg.optim, cfg.train.precision, cfg.parallel.distributed_optimizer,
                                    cpu)
        schedule = LRSchedule.from_config(cfg.optim, steps)

        progress = Progress()
        if layout.rank == 0 and (removed := ckpt.remove_incomplete(ckpt_root)):
            log.warning("removed interrupted checkpoint save(s): %s", ", ".join(removed))
        if resume_from is not None:
            progress = Progress(**rebase_progress(ckpt.load_train_checkpoint(
                resume_from, ddp_chunks, optimizer, layout, cfg.checkpoint.save_optimizer), changes))
            log.info("resumed from %s at step %d (%d pairs consumed)", resume_from, progress.step,
                     progress.consumed_pairs)
            log_resume_changes(changes, resume_from, schedule, progress.step - progress.skipped_steps)
        run_info = {"world_size": layout.world_size, "dp": layout.dp, "total_steps": steps,
                    "train_pairs": len(train_split), "eval_pairs": len(eval_split) if eval_split is not None else 0}
        # Rank 0 opens files (metrics.jsonl, TensorBoard): its failure is every rank's error.
        logger = agreed(lambda: MetricsLogger(
            cfg.output_dir, layout.rank, steps, progress.step, cfg.train.tensorboard, cfg.train.progress_bar,
            cfg.train.log_interval, wandb, run_info, resumed=resume_from is not None, job_started=started))
        return cls(cfg, rt, train_split, eval_split, batches, ddp_chunks, optimizer, schedule, steps,
                   progress, resume_from, logger, stop, train_data, started)

    @staticmethod
    def _load_data(cfg: RunConfig, rt: Runtime) -> tuple[TokenizedSplit, TokenizedSplit | None]:
        rank = rt.layout.rank
        train_split = load_split(cfg.data, rt.tokenizer, "train", rank, cfg.output_dir)
        eval_split = load_split(cfg.data, rt.tokenizer, "eval", rank, cfg.output_dir) if cfg.data.eval_path else None
        if cfg.loss.type == "dpo":
            # Computed once with the starting weights, before any update: no second model later.
            train_split = attach_reference_logps(rt, train_split, "train")
            if eval_split is not None:
                eval_split = attach_reference_logps(rt, eval_split, "eval")
        return train_split, eval_split

    # ------------------------------------------------------------------------------------- the loop

    def train(self) -> dict[str, float]:
        """Run to ``total_steps`` (or a stop); returns the final evaluation metrics, else the last step's."""
        if self.eval_split is not None and self.progress.step == 0:
            self.final_eval = self.evaluate()
        stopped_by = None
        while self.progress.step < self.total_steps:
            if (stopped_by := self.should_stop()) is not None:
                break
            self.train_step()
            self.maybe_evaluate()
            self.maybe_save()
        return self.finish(stopped_by)

    def should_stop(self) -> str | None:
        """Why to stop before the next step (a signal on any rank, or the exit interval), else None."""
        if self.stop.agreed(self.device):
            return self.stop.received or "signal on another rank"
        interval = self.cfg.train.exit_interval
        if interval and self.steps_run and self.progress.step % interval == 0:
            return f"train.exit_interval={interval}"
        return None

    def forward_backward(self, micro_batches: list[dict], scale: LossScale) -> dict[str, float]:
        """Gradients of the global-batch loss into the DDP buffers; the step's metrics (every rank)."""
        zero_grad(self.ddp_chunks, self.optimizer)
        forward_step = make_forward_step(self.cfg.loss, self.rt.head, self.device, scale)
        reports = run_schedule(self.ddp_chunks, forward_step, micro_batches, forward_only=False)
        return reduce_reports(reports, self.cfg.loss.sft_weight, self.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (skipped, and counted, when the loss or a gradient is not finite); logs and
        returns the step's record."""
        cfg, progress = self.cfg, self.progress
        t0 = time.perf_counter()
        micro_batches, local_chosen_tokens = self.batches.step(progress.consumed_pairs)
        local_pairs = sum(len(b["row_index"]) for b in micro_batches)
        totals = torch.tensor([float(local_chosen_tokens), float(local_pairs)], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        # This rank's micro-batch count: what the schedule divides by (step.py's docstring).
        scale = LossScale(num_microbatches=len(micro_batches), dp=self.layout.dp,
                          global_pairs=int(totals[1].item()), global_chosen_tokens=int(totals[0].item()))
        metrics = self.forward_backward(micro_batches, scale)

        finite = math.isfinite(metrics["loss"]) and grads_are_finite(self.ddp_chunks, self.device)
        grad_norm = float("nan")
        # Skipped updates do not advance the schedule (as the HF Trainer's skipped fp16 steps do not).
        lr = self.schedule.lr_at(progress.step - progress.skipped_steps)
        if finite:
            apply_optim_config(self.optimizer, cfg.optim, lr)
            ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")  # a tensor on GPUs
            finite = bool(ok) and math.isfinite(grad_norm)
        progress.step += 1
        progress.consumed_pairs += cfg.train.global_batch_pairs
        progress.consumed_tokens += int(metrics["tokens_computed"])
        if "tokens_real" in metrics:
            progress.consumed_real_tokens = (progress.consumed_real_tokens or 0) + int(metrics["tokens_real"])
        self.steps_run += 1
        if finite:
            progress.nonfinite_in_a_row = 0
        else:
            self._skipped(metrics["loss"], grad_norm)

        dt = time.perf_counter() - t0
        record = dict(metrics)
        record.update(lr=lr, grad_norm=grad_norm, step_time_s=dt,
                      tokens_per_s=metrics["tokens_computed"] / dt, real_tokens_per_s=metrics["tokens_real"] / dt,
                      consumed_pairs=progress.consumed_pairs, skipped_steps=progress.skipped_steps,
                      **memory_gib(self.device.type == "cuda"))
        if self.peak_tflops:
            record["mfu"] = (metrics["tokens_computed"] * self.flops_per_token / dt
                             / (self.peak_tflops * 1e12 * self.layout.world_size))
        self.last_metrics = record
        if progress.step % cfg.train.log_interval == 0 or progress.step == self.total_steps:
            self.logger.log(progress.step, record)
        self.logger.progress(progress.step, record)
        return record

    def _skipped(self, loss: float, grad_norm: float) -> None:
        progress, limit = self.progress, self.cfg.train.max_nonfinite_steps
        progress.skipped_steps += 1
        progress.nonfinite_in_a_row += 1
        self.logger.print(f"step {progress.step}: non-finite loss or gradient (loss={loss}, grad_norm={grad_norm}); "
                          f"update skipped ({progress.nonfinite_in_a_row} in a row, {progress.skipped_steps} in all)")
        if progress.nonfinite_in_a_row >= limit:
            last = (f"the last checkpoint is {self.ckpt_root / ckpt.step_dir_name(self.last_saved)}"
                    if self.last_saved >= 0 else "no checkpoint was saved")
            # Every rank gets here at the same step (the finiteness check is all-reduced): one error line each.
            raise UserError(
                f"{progress.nonfinite_in_a_row} consecutive non-finite steps (last: step {progress.step}); "
                f"aborting (train.max_nonfinite_steps={limit}); {last}. Lower optim.lr, check the data, or "
                f"raise train.max_nonfinite_steps")

    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out split now; logged and printed."""
        groups = self.rt.eval_groups(self.eval_split, progress=f"eval step {self.progress.step}")
        metrics = evaluate(self.ddp_chunks, groups, self.cfg.loss, self.rt.head, self.device)
        record = {f"eval/{k}": v for k, v in metrics.items()}
        self.logger.log(self.progress.step, record)
        self.logger.print(f"eval step {self.progress.step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in record.items() if not k.endswith(("num_pairs", "tokens", "_real", "_computed"))))
        return metrics

    def maybe_evaluate(self) -> dict[str, float] | None:
        """Evaluate every ``train.eval_interval`` steps before the last (the last step's comes in finish)."""
        interval, step = self.cfg.train.eval_interval, self.progress.step
        if self.eval_split is None or not interval or step % interval or step >= self.total_steps:
            return None
        return self.evaluate()

    def save(self) -> None:
        step = self.progress.step
        ckpt.save_train_checkpoint(
            self.ckpt_root, step, self.ddp_chunks, self.optimizer, asdict(self.progress),
            self.rt.meta, self.layout, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.save_optimizer,
            tokenizer=self.rt.tokenizer_source, run_config=asdict(self.cfg),
            run_info={"train_data": self.train_data, "total_steps": self.total_steps})
        self.last_saved = step
        self.logger.print(f"checkpoint saved: {self.ckpt_root / ckpt.step_dir_name(step)}")

    def maybe_save(self) -> None:
        """Save every ``checkpoint.save_interval`` steps."""
        interval = self.cfg.checkpoint.save_interval
        if interval and self.progress.step % interval == 0:
            self.save()

    def finish(self, stopped_by: str | None = None) -> dict[str, float]:
        """Save what is unsaved; a completed run then evaluates and exports. Returns the final evaluation
        metrics, else the last step's."""
        if self.last_saved != self.progress.step:
            self.save()
        if stopped_by is not None:
            self.logger.end_progress()
            self.logger.print(f"stopped by {stopped_by} at step {self.progress.step}; resume with the same command")
            self.logger.print(self.summary(stopped_by))
            return self.last_metrics
        if self.eval_split is not None:
            self.final_eval = self.evaluate()
        if self.cfg.checkpoint.export_hf:
            self.export_hf()
        self.logger.end_progress()
        self.logger.print(self.summary())
        return self.final_eval if self.final_eval is not None else self.last_metrics

    def summary(self, stopped_by: str | None = None) -> str:
        """What the run did and where its outputs are (printed by rank 0 at the end)."""
        p = self.progress
        totals = RunTotals(step=p.step, total_steps=self.total_steps, steps_this_process=self.steps_run,
                           pairs=p.consumed_pairs, tokens=p.consumed_tokens, real_tokens=p.consumed_real_tokens,
                           skipped_steps=p.skipped_steps, wall_s=time.monotonic() - self.started,
                           stopped_by=stopped_by)
        saved = self.ckpt_root / ckpt.step_dir_name(self.last_saved) if self.last_saved >= 0 else None
        wandb = self.logger.wandb.describe() if self.logger.wandb is not None else None
        return run_summary(totals, self.logger.evals, saved, self.hf_export, Path(self.cfg.output_dir), wandb)

    def export_hf(self) -> None:
        """The newest checkpoint as a Hugging Face model in ``<output_dir>/hf``, a directory the export owns:
        it replaces an earlier export there, and refuses to touch anything else found in it."""
        out = Path(self.cfg.output_dir) / "hf"
        checkpoint = self.ckpt_root / ckpt.step_dir_name(self.progress.step)

        def export():
            with owned_export(out, f"checkpoint.export_hf (the trained checkpoint is {checkpoint})") as staged:
                # A process of its own: the converter runs in a world of one while this job's ranks wait.
                run_in_fresh_process("mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(staged))
            self.logger.print(f"exported Hugging Face model: {out}")

        agreed(export, run=self.layout.rank == 0)
        self.hf_export = out

    def close(self, failed: bool = False) -> None:
        """Close the metrics sinks (a W&B run is marked failed when the run raised)."""
        self.logger.close(failed)
