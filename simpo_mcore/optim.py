"""megatron-core's DDP and (distributed) AdamW optimizer, configured from ours (the learning rate of each update:
:mod:`simpo_mcore.schedule`)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

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


# ------------------------------------------------------------------------------------- loading optimizer state


def load_optimizer_state(optimizer, saved: dict) -> None:
    """A checkpoint's optimizer state (as ``dist_checkpointing.load`` returns it) into megatron's ``optimizer``,
    whose state exists (:func:`materialize_optimizer_state`); the saved groups take the live learning rates."""
    _match_group_learning_rates(saved, optimizer)
    with _megatron_019_adam_step_fix(optimizer):
        optimizer.load_state_dict(saved)


def _match_group_learning_rates(saved, optimizer) -> None:
    """megatron pairs saved and live parameter groups by their settings, ``max_lr`` / ``min_lr`` (the config's
    lr) among them, so a run resumed with another ``optim.lr`` found no group (a ``KeyError``). The lr is the
    schedule's, which follows the config: the saved groups take the live groups' values of these two keys
    (when every live group has the same, as ours do; per-group learning rates are left to megatron)."""
    live = {(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups}
    if len(live) != 1:
        return
    max_lr, min_lr = live.pop()
    pending = [saved]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list):
                for group in groups:
                    if isinstance(group, dict) and "max_lr" in group:
                        group["max_lr"], group["min_lr"] = max_lr, min_lr
            pending.extend(v for k, v in node.items() if k != "param_groups")
        elif isinstance(node, (list, tuple)):
            pending.extend(node)


def materialize_optimizer_state(ddp_chunks: list, optimizer) -> None:
    """Allocate Adam's state with one step that changes nothing (zero gradients, learning rate 0):
    megatron's optimizers can only load state into tensors that exist (an empty state fails
    ``DistributedOptimizer.state_dict``'s step assertion). The step counters it sets are
    overwritten by the load."""
    zero_grad(ddp_chunks, optimizer)
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr


@contextlib.contextmanager
def _megatron_019_adam_step_fix(optimizer):
    """Work around two megatron-core 0.19 defects when the distributed optimizer loads a
    ``fully_reshardable`` checkpoint into torch's Adam (no Apex / TE FusedAdam, e.g. on CPU):

    1. ``_set_main_param_and_optimizer_states`` copies every tensor of the live state, including
       torch Adam's per-parameter ``step``, from the loaded tensors, which (by design) hold no
       ``step``: ``KeyError: 'step'``. Keys the loaded state lacks are skipped instead.
    2. ``load_state_dict`` restores the step from the param groups as ONE tensor shared by every
       parameter; Adam increments each parameter's step in place, so the shared counter would
       advance once per parameter per update and the bias correction would drift. Each parameter
       gets its own copy afterwards.
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    patched = [o for o in inner if isinstance(o, DistributedOptimizer)]
    for opt in patched:
        original = opt._set_main_param_and_optimizer_states

        def tolerant(model_param, tensors, _original=original, _opt=opt):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            state = _opt.optimizer.state[main_param]
            missing = {k: state.pop(k) for k in list(state) if k not in tensors and k != "param"}
            try:
                _original(model_param, tensors)
            finally:
                state.update(missing)

        opt._set_main_param_and_optimizer_states = tolerant
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
        for opt in inner:
            for state in getattr(opt, "optimizer", opt).state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
