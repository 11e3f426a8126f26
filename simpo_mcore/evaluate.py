"""Forward-only evaluation on a preference split, and the ``simpo-eval`` job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from simpo_mcore.config import RunConfig
from simpo_mcore.step import make_forward_step, reduce_reports

log = logging.getLogger("simpo_mcore")


def run_schedule(chunks: list, forward_step, micro_batches: list[dict], forward_only: bool) -> list[dict]:
    """One pass of megatron's schedule over ``micro_batches`` (all padded to the same length)."""
    if not micro_batches:
        return []
    tokens = micro_batches[0]["tokens"]
    many = len(chunks) > 1
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks] if many else iter(micro_batches),
        model=chunks if many else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


@torch.no_grad()
def evaluate(chunks: list, batch_groups, loss_cfg, head, device) -> dict[str, float]:
    """Metrics over every pair of ``batch_groups`` (an iterable of lists of equal-length
    micro-batches for this data-parallel rank), reduced over ranks weighted by pairs."""
    for c in chunks:
        c.eval()
    forward_step = make_forward_step(loss_cfg, head, device, scale=None)
    reports: list[dict] = []
    for group in batch_groups:
        real = sum(not b.get("padding", False) for b in group)  # padding (VPP) comes last
        reports.extend(run_schedule(chunks, forward_step, group, forward_only=True)[:real])
    for c in chunks:
        c.train()
    return reduce_reports(reports, loss_cfg.sft_weight)


def run_eval(cfg: RunConfig) -> dict[str, float]:
    """``simpo-eval``: metrics of ``model.checkpoint`` on ``data.eval_path`` -> eval_metrics.json."""
    from simpo_mcore.data.pipeline import eval_batch_groups, load_split
    from simpo_mcore.parallel import shutdown
    from simpo_mcore.reference import attach_reference_logps
    from simpo_mcore.runtime import build_runtime

    if cfg.data.eval_path is None:
        raise ValueError("data.eval_path is required for simpo-eval")
    rt = build_runtime(cfg)
    try:
        dataset = load_split(cfg, rt.tokenizer, rt.tokenizer_source, "eval", rt.layout)
        if cfg.loss.type == "dpo":
            # A checkpoint is its own reference at evaluation unless one was trained from it.
            dataset = attach_reference_logps(rt, dataset, "eval")
        groups = eval_batch_groups(cfg, dataset, rt.tokenizer, rt.layout)
        metrics = evaluate(rt.chunks, groups, cfg.loss, rt.head, rt.layout.device)
        metrics = {"num_pairs": int(metrics.pop("num_pairs")), **metrics}
        if rt.layout.rank == 0:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            log.info("eval on %d pairs: %s", metrics["num_pairs"],
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "num_pairs"))
        return metrics
    finally:
        shutdown()
