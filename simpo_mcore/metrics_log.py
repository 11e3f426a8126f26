"""Rank-0 visibility of a training run: ``metrics.jsonl``, TensorBoard, Weights & Biases, the console (a
progress bar on a terminal, a step line every ``train.log_interval`` steps elsewhere), the run summary, and
the throughput / MFU / memory numbers they show."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from simpo_mcore.config import ConfigError, WandbConfig
from simpo_mcore.console import Progress, command_started, format_count, format_duration
from simpo_mcore.model.flops import PEAK_BF16_TFLOPS, model_flops_per_token

WANDB_ID_FILE = "wandb_run_id"
"""In ``output_dir``: the W&B run id, so that a resumed run continues the same W&B run."""


def peak_tflops(cuda: bool) -> float | None:
    """Dense bf16 datasheet peak of the card, for MFU (None for a run on the CPU or an unknown card)."""
    if not cuda:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def memory_gib(cuda: bool) -> dict[str, float]:
    """The GPU allocator's peak for a run on the GPU, else the process's resident size."""
    if cuda:
        return {"mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"rss_gib": psutil.Process().memory_info().rss / 2**30}


@dataclass(frozen=True)
class Throughput:
    """What a step's speed and memory numbers need besides its metrics and its wall time."""

    flops_per_token: float
    """Training FLOPs per computed token (:func:`model_flops_per_token`)."""
    peak_tflops: float | None
    """The card's dense bf16 peak (None: no MFU, as on the CPU)."""
    world_size: int
    cuda: bool

    @classmethod
    def for_run(cls, arch, seq_len: int, cuda: bool, world_size: int) -> Throughput:
        return cls(model_flops_per_token(arch, seq_len), peak_tflops(cuda), world_size, cuda)


def step_record(metrics: dict[str, float], *, lr: float, grad_norm: float, step_time_s: float, consumed_pairs: int,
                skipped_steps: int, throughput: Throughput) -> dict[str, float]:
    """One optimizer step's record (metrics.jsonl, TensorBoard, W&B, the console): the objective's reduced
    ``metrics``, the update's lr and gradient norm, then tokens/s, real tokens/s, the counters, memory and MFU."""
    record = dict(metrics)
    record.update(lr=lr, grad_norm=grad_norm, step_time_s=step_time_s,
                  tokens_per_s=metrics["tokens_computed"] / step_time_s,
                  real_tokens_per_s=metrics["tokens_real"] / step_time_s,
                  consumed_pairs=consumed_pairs, skipped_steps=skipped_steps, **memory_gib(throughput.cuda))
    if throughput.peak_tflops:
        record["mfu"] = (metrics["tokens_computed"] * throughput.flops_per_token / step_time_s
                         / (throughput.peak_tflops * 1e12 * throughput.world_size))
    return record


def check_wandb(cfg: WandbConfig) -> None:
    """Before anything slow: W&B asked for but not installed is a config error."""
    if cfg.project is not None and cfg.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb.project is set but wandb is not installed: pip install -e '.[wandb]' "
                          "(or leave logging.wandb.project unset)")


# ----------------------------------------------------------------------------------------------- console


def tokens_per_s(record: dict) -> tuple[float, float | None]:
    """(tokens/s, real / computed tokens or None). Real (non-padding) tokens when the step reports them
    (``tokens_real`` / ``tokens_computed``), else every token the model computed."""
    dt = record.get("step_time_s") or float("nan")
    if "tokens_real" in record and record.get("tokens_computed"):
        return record["tokens_real"] / dt, record["tokens_real"] / record["tokens_computed"]
    return record.get("tokens_per_s", record.get("tokens", float("nan")) / dt), None


def format_step_line(step: int, total: int, record: dict, elapsed_s: float, eta_s: float) -> str:
    """``step 12/150 (8%) | loss 0.6712 | acc 0.625 | margin 0.153 | lr 9.80e-04 | grad 1.02 | 2.1k tok/s |
    MFU 41.2% | mem 1.23 GiB | 0:15 elapsed | ETA 2:58``: what a SLURM log shows every log_interval steps. A
    mixture of experts adds ``moe imb 1.87`` (the worst layer's max / mean tokens per expert) and, with the
    load-balancing loss on, `` aux 1.02e-02`` after ``grad``."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)",
             f"loss {record.get('loss', float('nan')):.4f}",
             f"acc {record.get('rewards/accuracies', float('nan')):.3f}",
             f"margin {record.get('rewards/margins', float('nan')):.3f}",
             f"lr {record.get('lr', float('nan')):.2e}",
             f"grad {record.get('grad_norm', float('nan')):.3g}"]
    if "moe/load_imbalance_max" in record:
        aux = f" aux {record['moe/aux_loss']:.2e}" if "moe/aux_loss" in record else ""
        parts.append(f"moe imb {record['moe/load_imbalance_max']:.2f}{aux}")
    rate, real = tokens_per_s(record)
    parts.append(f"{format_count(rate)} tok/s" + (f" (real {100 * real:.0f}%)" if real is not None else ""))
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    mem = record.get("mem_peak_gib", record.get("rss_gib"))
    if mem is not None:
        parts.append(f"mem {mem:.2f} GiB" + ("" if "mem_peak_gib" in record else " RSS"))
    parts += [f"{format_duration(elapsed_s)} elapsed", f"ETA {format_duration(eta_s)}"]
    return " | ".join(parts)


class StepConsole:
    """Rank 0's console during training: a bar on a terminal (``bar``), else a step line every
    ``log_interval`` steps and at the last. Elapsed: since ``job_started`` (``time.time()``; default: when the
    command started, :func:`simpo_mcore.console.command_started`).
    ETA: wall time per step since this process's first step began (later evaluations and saves included; the
    build and the step-0 evaluation not) x steps left."""

    def __init__(self, total_steps: int, start_step: int, log_interval: int, bar: bool | None,
                 job_started: float | None = None):
        self.total = total_steps
        self.start_step = start_step
        self.log_interval = log_interval
        self.job_started = command_started() if job_started is None else job_started
        self._loop_started: float | None = None
        self._progress = Progress(total_steps, "train", "steps", bar=bar, interval_s=math.inf, leave=True)
        self._progress.set(start_step)

    def step(self, step: int, record: dict) -> None:
        now = time.monotonic()
        if self._loop_started is None:
            self._loop_started = now - record.get("step_time_s", 0.0)
        done = step - self.start_step
        eta = (now - self._loop_started) / done * (self.total - step) if done > 0 else float("nan")
        if self._progress.drawing_bar:
            rate, _ = tokens_per_s(record)
            self._progress.set(step, postfix=(
                f"loss={record.get('loss', float('nan')):.4f}, acc={record.get('rewards/accuracies', float('nan')):.2f}"
                f", margin={record.get('rewards/margins', float('nan')):.3f}, {format_count(rate)} tok/s"))
        elif step % self.log_interval == 0 or step == self.total:
            elapsed = time.time() - self.job_started
            self._progress.write(format_step_line(step, self.total, record, elapsed, eta))

    def print(self, text: str) -> None:
        self._progress.write(text)

    def close(self) -> None:
        self._progress.close()


# ----------------------------------------------------------------------------------------------- sinks


class WandbRun:
    """One W&B run for the training run in ``output_dir``: the resolved config, then every metrics record.
    Its id is kept in ``output_dir/wandb_run_id``; a resumed run reuses it, so W&B shows one run."""

    def __init__(self, cfg: WandbConfig, output_dir: Path, run_config: dict, resume: bool):
        import wandb  # the optional extra; check_wandb said it is there

        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.resumed = run_id is not None  # else W&B picks a new id
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or output_dir.resolve().name, mode=cfg.mode,
                dir=str(output_dir), id=run_id, resume="allow", config=run_config,
                # Our console is the run's log (SLURM keeps it); W&B should neither echo nor capture it.
                settings=wandb.Settings(silent=True, console="off"))
        except wandb.Error as exc:
            raise ValueError(f"logging.wandb: W&B could not start a run in project {cfg.project!r} "
                             f"({type(exc).__name__}: {exc}); logging.wandb.mode: offline needs no network") from exc
        self.id = self.run.id
        id_file.write_text(self.id + "\n")
        self.mode = cfg.mode
        self.dir = Path(self.run.dir).parent if cfg.mode == "offline" else None
        self.url = getattr(self.run, "url", None) if cfg.mode == "online" else None

    def update_config(self, values: dict) -> None:
        """Add to the run's config what is known only once the job is built (world size, steps, data)."""
        self.run.config.update(values, allow_val_change=True)

    def describe(self) -> str:
        where = self.url or (f"offline in {self.dir}; upload with `wandb sync {self.dir}`" if self.dir else self.mode)
        return f"W&B run {self.id}{' (resumed)' if self.resumed else ''}: {where}"

    def log(self, step: int, record: dict) -> None:
        # NaN / inf stay numbers here (W&B shows them as gaps); metrics.jsonl writes them as text.
        self.run.log({k: v for k, v in record.items() if k not in ("step", "time") and _is_number(v)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@dataclass
class EvalRecord:
    step: int
    metrics: dict[str, float]
    """``eval/...`` keys, as in metrics.jsonl."""


class MetricsLogger:
    """Writes ``metrics.jsonl``, TensorBoard events and (``wandb``, started by the job) a W&B run; draws the
    console. Rank 0 only: on other ranks every method is a no-op.

    Keeps the run's evaluations (``evals``): on a resume those of ``metrics.jsonl`` up to ``start_step``,
    then each one logged, for the run summary's best and final evaluation."""

    def __init__(self, output_dir: str | Path, rank: int, total_steps: int, start_step: int, tensorboard: bool,
                 progress_bar: bool, log_interval: int = 1, wandb: WandbRun | None = None,
                 run_info: dict | None = None, resumed: bool = False, job_started: float | None = None):
        self.active = rank == 0
        self.total = total_steps
        self.log_interval = log_interval
        self.output_dir = Path(output_dir)
        self.evals: list[EvalRecord] = []
        self._tb = None
        self._file = None
        self._console = None
        self.wandb = wandb if self.active else None
        if not self.active:
            return
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        if resumed:
            self.evals = read_evals(out / "metrics.jsonl", up_to_step=start_step)
        self._file = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        if self.wandb is not None and run_info:
            self.wandb.update_config({"run": run_info})
        self._console = StepConsole(total_steps, start_step, log_interval, bar=None if progress_bar else False,
                                    job_started=job_started)
        if self.wandb is not None:
            self.print(self.wandb.describe())

    def log(self, step: int, record: dict) -> None:
        if not self.active:
            return
        # Scalar tensors (megatron returns the gradient norm as one on a GPU) become Python numbers.
        record = {"step": step, "time": round(time.time(), 3),
                  **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}}
        self._file.write(json.dumps(_finite_or_str(record)) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and _is_number(value) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, record)
        evals = {k: v for k, v in record.items() if k.startswith("eval/")}
        if evals:
            self.evals.append(EvalRecord(step, evals))

    def log_step(self, step: int, record: dict) -> None:
        """Step ``step``'s record: to the sinks every ``log_interval`` steps and at the last; the console (the bar,
        or a step line every ``log_interval`` steps) after every step."""
        if step % self.log_interval == 0 or step == self.total:
            self.log(step, record)
        if self.active:
            self._console.step(step, record)

    def print(self, text: str) -> None:
        if self.active:
            self._console.print(text)

    def end_progress(self) -> None:
        """The training bar is done (what is printed next goes below it, as plain lines)."""
        if self.active:
            self._console.close()

    def close(self, failed: bool = False) -> None:
        if not self.active:
            return
        self._console.close()
        if self._tb is not None:
            self._tb.close()
        if self.wandb is not None:
            self.wandb.close(failed)
        self._file.close()
        self.active = False


def read_evals(path: Path, up_to_step: int) -> list[EvalRecord]:
    """The evaluations of ``metrics.jsonl`` at steps up to ``up_to_step`` (a step logged twice, as after an
    interrupted run, counts once: its last record)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the rest of the file is still good
        step = record.get("step")
        evals = {k: v for k, v in record.items() if k.startswith("eval/") and _is_number(v)}
        if isinstance(step, int) and step <= up_to_step and evals:
            by_step[step] = evals
    return [EvalRecord(s, m) for s, m in sorted(by_step.items())]


# ----------------------------------------------------------------------------------------------- summary


@dataclass
class RunTotals:
    """What a finished (or stopped) training run did, for :func:`run_summary`."""

    step: int
    total_steps: int
    steps_this_process: int
    pairs: int
    tokens: int
    """Tokens the model computed (padding included)."""
    real_tokens: int | None
    """Tokens of the pairs themselves, when the steps report them."""
    skipped_steps: int
    wall_s: float
    stopped_by: str | None = None


SUMMARY_METRICS = (("eval/loss", "loss"), ("eval/rewards/accuracies", "reward accuracy"),
                   ("eval/rewards/margins", "margin"))


def run_summary(totals: RunTotals, evals: list[EvalRecord], checkpoint: Path | None, hf_export: Path | None,
                output_dir: Path, wandb: str | None = None) -> str:
    """The lines rank 0 prints when ``simpo-train`` ends."""
    t = totals
    state = f"stopped by {t.stopped_by}" if t.stopped_by else "done"
    tokens = f"{format_count(t.tokens)} tokens computed"
    if t.real_tokens is not None:
        tokens = f"{format_count(t.real_tokens)} real tokens ({tokens})"
    lines = [f"run summary ({state}): step {t.step} of {t.total_steps} ({t.steps_this_process} in this process"
             f"{f', {t.skipped_steps} skipped' if t.skipped_steps else ''}), {t.pairs} pairs, {tokens}, "
             f"wall {format_duration(t.wall_s)}"]
    if evals:
        final = evals[-1]
        lines.append(f"  final eval (step {final.step}): " + _metrics_text(final.metrics))
        best_acc = max(evals, key=lambda e: (e.metrics.get("eval/rewards/accuracies", -math.inf),
                                             -e.metrics.get("eval/loss", math.inf)))
        best_loss = min(evals, key=lambda e: e.metrics.get("eval/loss", math.inf))
        lines.append(f"  best eval: reward accuracy {best_acc.metrics.get('eval/rewards/accuracies', math.nan):.4f} "
                     f"at step {best_acc.step}, loss {best_loss.metrics.get('eval/loss', math.nan):.4f} at step "
                     f"{best_loss.step}")
    else:
        lines.append("  no evaluation (data.eval_path is not set)")
    if checkpoint is not None:
        lines.append(f"  checkpoint: {checkpoint} (named in {checkpoint.parent / 'latest'})")
    if hf_export is not None:
        lines.append(f"  Hugging Face export: {hf_export}")
    lines.append(f"  metrics: {output_dir / 'metrics.jsonl'}" + (f"; {wandb}" if wandb else ""))
    return "\n".join(lines)


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {metrics[key]:.4f}" for key, name in SUMMARY_METRICS if key in metrics)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_or_str(record: dict) -> dict:
    """JSON has no NaN/inf: write them as strings so a non-finite step stays visible."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
