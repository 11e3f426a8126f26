"""Forward-only evaluation on a preference split, and the ``simpo-eval`` job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from simpo_mcore import console
from simpo_mcore.config import LossConfig, RunConfig
from simpo_mcore.data.pipeline import check_data_paths, load_split
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.objective import make_forward_step, reduce_reports, run_schedule
from simpo_mcore.output_dir import check_writable
from simpo_mcore.parallel import agreed, distributed
from simpo_mcore.preflight import require_eval_path
from simpo_mcore.reference import attach_reference_logps
from simpo_mcore.runtime import build_runtime

log = logging.getLogger("simpo_mcore")


@torch.no_grad()
def evaluate(chunks: list, batch_groups, loss_cfg: LossConfig, logps_context: TokenLogpsContext,
             device: torch.device) -> dict[str, float]:
    """Metrics over every pair of ``batch_groups`` (an iterable of lists of micro-batches for this
    data-parallel rank, one schedule call each: packed rows or padded pairs, of one shape under pipeline
    parallelism), reduced over ranks weighted by pairs."""
    for c in chunks:
        c.eval()
    forward_step = make_forward_step(loss_cfg, logps_context, device, scale=None)
    reports: list[dict] = []
    for group in batch_groups:
        real = sum(not b.filler for b in group)  # fillers (VPP, expert groups across replicas) come last
        reports.extend(run_schedule(chunks, forward_step, group, forward_only=True)[:real])
    for c in chunks:
        c.train()
    return reduce_reports(reports, loss_cfg.sft_weight, device)


def run_eval(cfg: RunConfig) -> dict[str, float]:
    """``simpo-eval``: metrics of ``model.checkpoint`` on ``data.eval_path`` -> eval_metrics.json."""
    require_eval_path(cfg.data)
    console.set_progress_interval(cfg.logging.progress_interval_s)
    with distributed(cfg.parallel, cfg.train.seed) as layout:
        out = Path(cfg.output_dir)
        agreed(lambda: check_writable(out), run=layout.rank == 0)  # before the model loads, not after the pass
        check_data_paths(cfg.data, ("eval",), layout.rank)
        rt = build_runtime(cfg, layout)
        split = load_split(cfg.data, rt.tokenizer, "eval", layout.rank, cfg.output_dir)
        if cfg.loss.type == "dpo":
            # A checkpoint is its own reference at evaluation unless one was trained from it.
            split = attach_reference_logps(rt, split, "eval")
        metrics = evaluate(rt.chunks, rt.eval_groups(split, progress="eval"), cfg.loss, rt.logps_context,
                           layout.device)
        metrics = {"num_pairs": int(metrics.pop("num_pairs")), **metrics}

        def write():
            (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            log.info("eval on %d pairs: %s", metrics["num_pairs"],
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "num_pairs"))

        agreed(write, run=layout.rank == 0)
        return metrics
