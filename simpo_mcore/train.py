"""``simpo-train``: the training loop. Setup lives in runtime.py / optim.py, the step in step.py."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from simpo_mcore import checkpoint as ckpt
from simpo_mcore.config import ConfigError, RunConfig
from simpo_mcore.evaluate import evaluate, run_schedule
from simpo_mcore.metrics_log import MetricsLogger, memory_gib, model_flops_per_token, peak_tflops
from simpo_mcore.optim import build_optimizer, build_scheduler, wrap_ddp
from simpo_mcore.step import LossScale, make_forward_step, reduce_reports

log = logging.getLogger("simpo_mcore")


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint and restored on resume."""

    step: int = 0
    consumed_pairs: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0


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


def check_batch_sizes(cfg: RunConfig, dp: int) -> int:
    """Micro-batches per step; explains a global batch that micro x accumulation x DP cannot make."""
    t = cfg.train
    per_rank = t.micro_batch_pairs * dp
    if t.global_batch_pairs % per_rank:
        raise ConfigError(
            f"train.global_batch_pairs ({t.global_batch_pairs}) must equal train.micro_batch_pairs "
            f"({t.micro_batch_pairs}) x accumulation steps x data-parallel size ({dp}); it is not a "
            f"multiple of {per_rank}. Try global_batch_pairs = {max(1, t.global_batch_pairs // per_rank) * per_rank}")
    num_micro = t.global_batch_pairs // per_rank
    p = cfg.parallel
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


def _inject_nonfinite_for_test(step: int, ddp_chunks: list) -> None:
    """Testing hook: ``SIMPO_MCORE_NAN_AT_STEPS=3,4`` puts a NaN into one gradient of global rank 0
    at those steps (as one rank blowing up would), before the finiteness check."""
    if str(step) in os.environ.get("SIMPO_MCORE_NAN_AT_STEPS", "").split(",") and dist.get_rank() == 0:
        ddp_chunks[0].buffers[0].grad_data[0] = float("nan")


def run_training(cfg: RunConfig) -> dict[str, float]:
    """Train; returns the final evaluation metrics (or the last step's metrics without eval data)."""
    from simpo_mcore.data.pipeline import TrainBatches, eval_batch_groups, load_split
    from simpo_mcore.parallel import shutdown
    from simpo_mcore.reference import attach_reference_logps
    from simpo_mcore.runtime import build_runtime

    stop = StopSignal()
    ckpt_root = Path(cfg.output_dir) / "checkpoints"
    resume_from = ckpt.latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    # A SimPO resume overwrites every weight: skip reading the starting checkpoint. DPO needs the
    # starting weights whenever its reference log-probs have to be computed.
    rt = build_runtime(cfg, load_weights=resume_from is None or cfg.loss.type == "dpo",
                       check=lambda layout: check_batch_sizes(cfg, layout.dp))
    try:
        layout, device = rt.layout, rt.layout.device
        train_set = load_split(cfg, rt.tokenizer, rt.tokenizer_source, "train", layout)
        eval_set = load_split(cfg, rt.tokenizer, rt.tokenizer_source, "eval", layout) if cfg.data.eval_path else None
        if cfg.loss.type == "dpo":
            # Computed once with the starting weights, before any update: no second model later.
            train_set = attach_reference_logps(rt, train_set, "train")
            if eval_set is not None:
                eval_set = attach_reference_logps(rt, eval_set, "eval")
        num_micro = check_batch_sizes(cfg, layout.dp)
        steps = total_steps(cfg, len(train_set))
        batches = TrainBatches(cfg, train_set, rt.tokenizer, layout)

        ddp_chunks = wrap_ddp(rt.chunks, rt.chunks[0].config, cfg.parallel.distributed_optimizer)
        optimizer = build_optimizer(ddp_chunks, cfg.optim, cfg.train.precision, cfg.parallel.distributed_optimizer)
        scheduler = build_scheduler(optimizer, cfg.optim, steps)

        progress = Progress()
        if layout.rank == 0 and (removed := ckpt.remove_incomplete(ckpt_root)):
            log.warning("removed interrupted checkpoint save(s): %s", ", ".join(removed))
        if resume_from is not None:
            progress = Progress(**ckpt.load_train_checkpoint(
                resume_from, ddp_chunks, optimizer, scheduler, layout, cfg.checkpoint.save_optimizer))
            log.info("resumed from %s at step %d (%d pairs consumed)", resume_from, progress.step,
                     progress.consumed_pairs)

        logger = MetricsLogger(cfg.output_dir, layout.rank, steps, progress.step,
                               cfg.train.tensorboard, cfg.train.progress_bar)
        flops_per_token = model_flops_per_token(rt.meta.arch, cfg.data.max_length)
        peak = peak_tflops(device.type == "cuda")

        def run_eval(step: int) -> dict[str, float]:
            metrics = evaluate(ddp_chunks, eval_batch_groups(cfg, eval_set, rt.tokenizer, layout),
                               cfg.loss, rt.head, device)
            record = {f"eval/{k}": v for k, v in metrics.items()}
            logger.log(step, record)
            logger.print(f"eval step {step}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in record.items() if not k.endswith(("num_pairs", "tokens"))))
            return metrics

        def save(step: int) -> None:
            ckpt.save_train_checkpoint(
                ckpt_root, step, ddp_chunks, optimizer, scheduler, asdict(progress), rt.meta, layout,
                cfg.checkpoint.keep_last, cfg.checkpoint.save_optimizer, tokenizer=rt.tokenizer_source)
            logger.print(f"checkpoint saved: {ckpt_root / ckpt.step_dir_name(step)}")

        final_eval = None
        if eval_set is not None and progress.step == 0:
            final_eval = run_eval(0)
        last_metrics: dict[str, float] = {}
        last_saved = progress.step if resume_from is not None else -1
        stopped_by = None
        while progress.step < steps:
            if stop.agreed(device):
                stopped_by = stop.received or "signal on another rank"
                break
            t0 = time.perf_counter()
            micro_batches, local_chosen_tokens = batches.step(progress.consumed_pairs)
            totals = torch.tensor([float(local_chosen_tokens), float(len(micro_batches) * cfg.train.micro_batch_pairs)],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(totals, group=_dp_group())
            scale = LossScale(num_microbatches=num_micro, dp=layout.dp, global_pairs=int(totals[1].item()),
                              global_chosen_tokens=int(totals[0].item()))
            for c in ddp_chunks:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            forward_step = make_forward_step(cfg.loss, rt.head, device, scale)
            reports = run_schedule(ddp_chunks, forward_step, micro_batches, forward_only=False)
            metrics = reduce_reports(reports, cfg.loss.sft_weight)
            _inject_nonfinite_for_test(progress.step + 1, ddp_chunks)

            finite = math.isfinite(metrics["loss"]) and grads_are_finite(ddp_chunks, device)
            grad_norm = float("nan")
            if finite:
                ok, grad_norm, _ = optimizer.step()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")  # a tensor on GPUs
                finite = bool(ok) and math.isfinite(grad_norm)
                if finite:
                    scheduler.step(increment=1)
            progress.step += 1
            progress.consumed_pairs += cfg.train.global_batch_pairs
            if finite:
                progress.nonfinite_in_a_row = 0
            else:
                progress.skipped_steps += 1
                progress.nonfinite_in_a_row += 1
                logger.print(f"step {progress.step}: non-finite loss or gradient (loss={metrics['loss']}, "
                             f"grad_norm={grad_norm}); update skipped ({progress.nonfinite_in_a_row} in a row, "
                             f"{progress.skipped_steps} in all)")
                if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{progress.nonfinite_in_a_row} consecutive non-finite steps (last: step {progress.step}); "
                        f"aborting (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps})")

            dt = time.perf_counter() - t0
            record = dict(metrics)
            record.update(lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, step_time_s=dt,
                          tokens_per_s=metrics["tokens"] / dt, consumed_pairs=progress.consumed_pairs,
                          skipped_steps=progress.skipped_steps, **memory_gib(device.type == "cuda"))
            if peak:
                record["mfu"] = metrics["tokens"] * flops_per_token / dt / (peak * 1e12 * layout.world_size)
            last_metrics = record
            if progress.step % cfg.train.log_interval == 0 or progress.step == steps:
                logger.log(progress.step, record)
            logger.progress(progress.step, record)

            if eval_set is not None and cfg.train.eval_interval and progress.step % cfg.train.eval_interval == 0 \
                    and progress.step < steps:
                run_eval(progress.step)
            if cfg.checkpoint.save_interval and progress.step % cfg.checkpoint.save_interval == 0:
                save(progress.step)
                last_saved = progress.step
            if cfg.train.exit_interval and progress.step % cfg.train.exit_interval == 0 and progress.step < steps:
                stopped_by = f"train.exit_interval={cfg.train.exit_interval}"
                break

        if stopped_by is not None:
            if last_saved != progress.step:
                save(progress.step)
            logger.print(f"stopped by {stopped_by} at step {progress.step}; resume with the same command")
            logger.close()
            return last_metrics
        if last_saved != progress.step:
            save(progress.step)
        if eval_set is not None:
            final_eval = run_eval(progress.step)
        if cfg.checkpoint.export_hf:
            _export_hf(cfg, ckpt_root / ckpt.step_dir_name(progress.step), layout, logger)
        logger.close()
        return final_eval if final_eval is not None else last_metrics
    finally:
        shutdown()


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _export_hf(cfg: RunConfig, step_dir: Path, layout, logger: MetricsLogger) -> None:
    from simpo_mcore.runtime import run_python

    out = Path(cfg.output_dir) / "hf"
    if layout.rank == 0:
        if out.exists():
            import shutil

            shutil.rmtree(out)
        run_python("from simpo_mcore.convert.mcore_to_hf import convert_mcore_to_hf; "
                   "from simpo_mcore.parallel import ensure_process_group; ensure_process_group(); "
                   f"convert_mcore_to_hf({str(step_dir)!r}, {str(out)!r}, log=lambda _: None)")
        logger.print(f"exported Hugging Face model: {out}")
    dist.barrier()
