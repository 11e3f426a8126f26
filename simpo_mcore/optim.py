"""megatron-core's DDP and (distributed) AdamW optimizer, configured from ours (the learning rate of each update:
:mod:`simpo_mcore.schedule`)."""

from __future__ import annotations

import warnings

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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


NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


def zero_grad(ddp_chunks: list, optimizer) -> None:
    """Zero the DDP gradient buffers and the optimizer's gradients. megatron's optimizer reads ``.grad`` of
    parameter views there, which torch warns about on every rank (the console filters that warning by
    megatron's module, but on a CPU it is attributed to cpu_mode's redirection): silenced for this call only,
    so the same warning from anywhere else still shows."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NON_LEAF_GRAD)
        optimizer.zero_grad()


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


def apply_optim_config(optimizer, cfg: OptimConfig, lr: float) -> None:
    """Set every parameter group's hyper-parameters for the next update from the config: ``lr``, AdamW's betas
    and eps, and the weight decay (times megatron's per-group ``wd_mult``: 0 for norms and biases, as the HF
    Trainer exempts them). A checkpoint's optimizer state carries its own copies of these; setting them before
    every update makes the config the one source of truth, on resume too."""
    for group in optimizer.param_groups:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"] = cfg.adam_eps
