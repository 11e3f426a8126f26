"""A plan as a table for a terminal, or as JSON (a list of layouts, best first)."""

from __future__ import annotations

from simpo_mcore.plan.layouts import GIB, LayoutPlan
from simpo_mcore.plan.planner import Plan
from simpo_mcore.plan.timing import NETWORK_BYTES_S, NVLINK_BYTES_S

MEMORY_PARTS = ("weights", "grads", "optimizer", "activations", "pipeline_in_flight", "head", "buffers")
COMM_PARTS = ("dp", "tp", "pp", "cp", "ep")


def layout_json(plan: Plan, p: LayoutPlan) -> dict:
    lay, mem = p.layout, p.memory
    memory = {name: round(getattr(mem, name) / GIB, 3) for name in MEMORY_PARTS}
    memory["total"] = round(mem.total / GIB, 3)
    return {
        "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp, "cp": lay.cp, "ep": lay.ep,
        "sequence_parallel": lay.sequence_parallel, "recompute": lay.recompute,
        "distributed_optimizer": lay.distributed_optimizer, "fits": p.fits, "memory_gib": memory,
        "peak_stage": p.peak_stage, "microbatches": p.microbatches, "in_flight_microbatches": mem.in_flight,
        "step_time_s": round(p.time.total, 4),
        "step_time_parts_s": {"compute": round(p.time.compute_s, 4), "bubble": round(p.time.bubble_s, 4),
                              "communication": round(p.time.comm_s, 4)},
        "comm_gib": {name: round(getattr(p.comm, name) / GIB, 3) for name in COMM_PARTS},
        "reference_pass_s": None if p.reference_pass_s is None else round(p.reference_pass_s, 1),
        "overrides": list(p.overrides), "configured": p.configured,
        "mfu": plan.mfu.mfu,
    }


def plan_json(plan: Plan, top: int | None = None) -> list[dict]:
    return [layout_json(plan, p) for p in plan.layouts[:top]]


def header(plan: Plan, config: str) -> list[str]:
    s, o, w = plan.shape, plan.options, plan.workload
    impl = plan.setup.impl
    batch = (f"packed rows of at most {w.pack_tokens} tokens" if w.packed
             else f"micro-batches of {w.micro_batch_pairs} pairs padded to at most {w.max_length} tokens")
    fits = sum(p.fits for p in plan.layouts)
    lines = [
        f"simpo-plan {config} on {plan.gpus} GPUs of {o.gpu_memory_gib:g} GiB ({o.reserve_gib:g} GiB kept free for "
        f"the CUDA context, NCCL and the allocator), {o.gpus_per_node} per node",
        f"model: {s.parameters() / 1e9:.2f}B parameters, {s.num_layers} layers, hidden {s.hidden_size}, "
        f"{s.num_attention_heads}/{s.num_query_groups} heads, vocab {s.vocab_size} ({plan.model_source})",
        f"run: {impl.spec.upper() if impl.spec == 'te' else impl.spec} spec on GPUs, "
        f"{'fp32' if impl.act_bytes == 4 else 'fp8' if impl.fp8 else 'bf16'}, {w.global_pairs} pairs per step, "
        f"{batch}{', DPO' if w.dpo else ''}",
        f"data: {plan.data_note}",
        f"time: model FLOPs at the {plan.mfu.name}{' (' + plan.mfu_note + ')' if plan.mfu_note else ''}, "
        f"x recomputation, + pipeline bubble, + communication at {NVLINK_BYTES_S / 1e9:.0f} GB/s in a node and "
        f"{NETWORK_BYTES_S / 1e9:.0f} GB/s across nodes (datasheet)",
        f"{len(plan.layouts)} layouts ({plan.skipped} refused by the config's rules), {fits} fit; best first "
        f"(* = the config's own layout; memory in GiB of the rank that peaks):",
    ]
    return lines


COLUMNS = (f"{'#':>3} {'TP':>2} {'PP':>2} {'VPP':>3} {'DP':>3} {'CP':>2} {'EP':>2} {'SP':>2} {'recomp':>9} "
           f"{'dopt':>4} | {'wgt':>5} {'grad':>5} {'opt':>5} {'act':>5} {'pipe':>5} {'head':>4} {'buf':>4} "
           f"{'total':>5} {'fits':>4} | {'step s':>6} {'bubble':>6} {'comm':>5} | comm GiB dp/tp/pp | overrides")


def row(rank: int, p: LayoutPlan) -> str:
    lay, m, t, c = p.layout, p.memory, p.time, p.comm
    gib = [getattr(m, name) / GIB for name in MEMORY_PARTS]
    mark = "*" if p.configured else " "
    sp, dopt = "y" if lay.sequence_parallel else "n", "on" if lay.distributed_optimizer else "off"
    return (f"{rank:>2}{mark} {lay.tp:>2} {lay.pp:>2} {lay.vpp or '-':>3} {lay.dp:>3} {lay.cp:>2} {lay.ep:>2} "
            f"{sp:>2} {lay.recompute:>9} {dopt:>4}"
            f" | {gib[0]:5.1f} {gib[1]:5.1f} {gib[2]:5.1f} {gib[3]:5.1f} {gib[4]:5.1f} {gib[5]:4.1f} {gib[6]:4.1f} "
            f"{m.total / GIB:5.1f} {'yes' if p.fits else 'NO':>4} | {t.total:6.2f} {t.bubble_s:6.2f} {t.comm_s:5.2f} | "
            f"{c.dp / GIB:5.1f}/{c.tp / GIB:5.1f}/{c.pp / GIB:4.1f}  | {' '.join(p.overrides) or '(as configured)'}")


def plan_table(plan: Plan, config: str, top: int = 10) -> str:
    lines = header(plan, config)
    lines.append(COLUMNS)
    shown = list(enumerate(plan.layouts[:top], 1))
    configured = [(i, p) for i, p in enumerate(plan.layouts, 1) if p.configured and i > top]
    if configured:
        shown += [(0, None), *configured]
    for i, p in shown:
        lines.append("  ..." if p is None else row(i, p))
    if any(p.reference_pass_s is not None for p in plan.layouts[:1]):
        lines.append(f"DPO's reference pass (once, before training) on the best layout: "
                     f"{plan.layouts[0].reference_pass_s:.0f} s")
    return "\n".join(lines)
