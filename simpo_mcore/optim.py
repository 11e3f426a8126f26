"""megatron-core's DDP, (distributed) AdamW optimizer and LR scheduler, configured from ours."""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from simpo_mcore.config import OptimConfig


def wrap_ddp(chunks: list, distributed_optimizer: bool, cpu: bool) -> list[DistributedDataParallel]:
    """Wrap each model chunk in megatron's DDP (contiguous grad buffers, fp32 grad reduction).

    fp32 reduction keeps bf16 gradient sums exact enough for the parity tests and is what
    Megatron-LM does for bf16; on gloo it also avoids mixed-dtype coalesced all-reduces. ``cpu``: the
    run's layout is on the CPU (gloo: one bucket).
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,  # we detect and skip non-finite steps ourselves
        bucket_size=10**8 if cpu else None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's buckets overlap with the backward of the others.
            disable_bucketing=i > 0,
        ))
    for w in wrapped:
        w.broadcast_params()  # identical starting weights on every DP replica
    return wrapped


def build_optimizer(ddp_chunks: list, cfg: OptimConfig, precision: str, distributed_optimizer: bool, cpu: bool):
    """AdamW (decoupled weight decay) over fp32 main parameters, with megatron's grad clipping.
    ``cpu``: the run's layout is on the CPU (gloo groups for the distributed optimizer)."""
    bf16 = precision in ("bf16", "fp8")
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks, use_gloo_process_groups=cpu)
    config = ddp_chunks[0].module.config
    # What megatron's schedules call after the last backward of a step.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warm-up over ``warmup_ratio * total_steps`` then ``cfg.scheduler`` decay to min_lr."""
    warmup = int(cfg.warmup_ratio * total_steps)
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[cfg.scheduler]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
