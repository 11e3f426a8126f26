"""The planner for a run config: every layout of the run on N GPUs, evaluated and ranked (``simpo-plan``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from simpo_mcore.config import ConfigError, RunConfig, validate
from simpo_mcore.plan.activations import Implementation
from simpo_mcore.plan.inputs import PlanError, Workload, cached_lengths, find_architecture
from simpo_mcore.plan.layouts import LayoutPlan, Options, candidate_layouts, evaluate, ranked
from simpo_mcore.plan.memory import Layout, Numerics, Setup
from simpo_mcore.plan.shape import ModelShape
from simpo_mcore.plan.timing import MeasuredMFU, measured_mfu

LAYOUT_KEYS = {"tp": "parallel.tp", "pp": "parallel.pp", "vpp": "parallel.vpp",
               "sequence_parallel": "parallel.sequence_parallel",
               "distributed_optimizer": "parallel.distributed_optimizer", "recompute": "model.recompute",
               "cp": "parallel.cp", "ep": "parallel.ep"}
"""``Layout`` field -> the config key that sets it (data parallelism is what the GPUs leave: no key)."""


@dataclass(frozen=True)
class Plan:
    """The answer for one config on ``gpus`` GPUs."""

    gpus: int
    shape: ModelShape
    setup: Setup
    model_source: str
    mfu: MeasuredMFU
    mfu_note: str
    data_note: str
    options: Options
    workload: Workload
    layouts: list[LayoutPlan]
    """Best first."""
    skipped: int
    """Candidate layouts the config refuses (a batch that does not divide, ...)."""


def configured_layout(cfg: RunConfig, gpus: int) -> Layout:
    p = cfg.parallel
    cp, ep = getattr(p, "cp", 1), getattr(p, "ep", 1)
    return Layout(tp=p.tp, pp=p.pp, vpp=p.vpp, dp=max(1, gpus // (p.tp * p.pp * cp)), cp=cp, ep=ep,
                  sequence_parallel=p.sequence_parallel, distributed_optimizer=p.distributed_optimizer,
                  recompute=cfg.model.recompute, recompute_layers=cfg.model.recompute_num_layers)


def layout_overrides(cfg: RunConfig, layout: Layout) -> tuple[str, ...]:
    """The ``key=value`` overrides that set ``layout`` in ``cfg`` (the keys whose value differs)."""
    now = configured_layout(cfg, layout.gpus)
    out = []
    for field, key in LAYOUT_KEYS.items():
        value = getattr(layout, field)
        if value != getattr(now, field):
            out.append(f"{key}={_yaml(value)}")
    return tuple(out)


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def accepted(cfg: RunConfig, layout: Layout) -> bool:
    """Whether the config's own validation accepts ``layout`` (every rule is checked there, once)."""
    parallel = {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "sequence_parallel": layout.sequence_parallel,
                "distributed_optimizer": layout.distributed_optimizer}
    names = {f.name for f in dataclasses.fields(cfg.parallel)}
    parallel.update({k: getattr(layout, k) for k in ("cp", "ep") if k in names})
    try:
        validate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel),
                                     model=dataclasses.replace(cfg.model, recompute=layout.recompute)))
    except ConfigError:
        return False
    return True


def setup_for(cfg: RunConfig, shape: ModelShape) -> Setup:
    """The run as it would be launched on GPUs: ``model.spec`` ``auto`` is Transformer Engine there (``local``
    is counted as ``sdpa``); without TE megatron falls back to torch's AdamW."""
    spec = "sdpa" if cfg.model.spec in ("sdpa", "local") else "te"
    precision = cfg.train.precision
    impl = Implementation(spec=spec, cuda=True, act_bytes=4 if precision == "fp32" else 2, fp8=precision == "fp8")
    return Setup(shape=shape, impl=impl, numerics=Numerics.for_precision(precision, torch_adam=spec != "te"),
                 vocab_divisor=cfg.model.make_vocab_size_divisible_by, chunk_tokens=cfg.model.logprob_chunk_tokens,
                 keep_logits=not cfg.model.logprob_recompute)


def plan_run(cfg: RunConfig, gpus: int, *, config_path: str | Path | None = None, hf_config: str | Path | None = None,
             gpu_memory_gib: float = 80.0, reserve_gib: float = 4.0, gpus_per_node: int = 8,
             cp_sizes: tuple[int, ...] | None = None, ep_sizes: tuple[int, ...] | None = None) -> Plan:
    """Every layout of ``cfg`` on ``gpus`` GPUs, best first. ``cp_sizes`` / ``ep_sizes``: the context- and
    expert-parallel sizes to consider (default: 1, and the config's own)."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if gpu_memory_gib <= 0 or reserve_gib < 0:
        raise PlanError(f"--gpu-memory-gib must be > 0 and the reserve >= 0 (got {gpu_memory_gib}, {reserve_gib})")
    arch = find_architecture(cfg.model, config_path, hf_config)
    shape = ModelShape.from_arch(arch.arch)
    setup = setup_for(cfg, shape)
    lengths, data_note = cached_lengths(cfg.data, cfg.output_dir)
    work = Workload.from_config(cfg.train, cfg.data, cfg.loss.type, lengths)
    mfu, mfu_note = measured_mfu(setup.impl.spec, cfg.train.precision, shape.hidden_size)
    dpo = None
    if work.dpo and lengths is not None:
        dpo = (float(lengths.pair_tokens.sum()), float((lengths.chosen ** 2 + lengths.rejected ** 2).sum()))
    options = Options(gpu_memory_gib=gpu_memory_gib, reserve_gib=reserve_gib, gpus_per_node=gpus_per_node,
                      mfu=mfu.mfu, dpo_tokens=dpo)
    configured = configured_layout(cfg, gpus)
    cps = tuple(sorted({1, configured.cp, *(cp_sizes or ())}))
    eps = tuple(sorted({1, configured.ep, *(ep_sizes or ())}))
    plans, skipped = [], 0
    for layout in candidate_layouts(setup, gpus, configured, cps, eps):
        plan = evaluate(setup, work, layout, options, configured, lambda x: layout_overrides(cfg, x)) \
            if accepted(cfg, layout) else None
        if plan is None:
            skipped += 1
        else:
            plans.append(plan)
    if not plans:
        raise PlanError(f"no layout of {gpus} GPUs suits this model and batch ({skipped} refused: the heads, layers "
                        f"or train.global_batch_pairs ({cfg.train.global_batch_pairs}) do not divide)")
    return Plan(gpus, shape, setup, arch.source, mfu, mfu_note, data_note, options, work, ranked(plans), skipped)
