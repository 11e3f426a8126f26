"""``simpo-plan``: whether a layout fits and how fast it runs, on paper (docs/planning.md).

From Python::

    from simpo_mcore.config import load_config
    from simpo_mcore.plan import plan_run, plan_table

    plan = plan_run(load_config("configs/simpo/llama3_8b_base_8gpu.yaml"), gpus=8)
    best = plan.layouts[0]          # LayoutPlan: layout, memory (RankMemory), fits, time, comm, overrides
    print(plan_table(plan, "llama3_8b_base_8gpu.yaml"))

The pieces take their own inputs: :func:`rank_memory` gives the bytes of one rank of a :class:`Layout` for a
:class:`Setup` (a :class:`ModelShape`, its :class:`Implementation` and :class:`Numerics`) and a
:class:`MicroBatchShape`; :mod:`simpo_mcore.plan.timing` the step time and communication.
"""

from simpo_mcore.plan.activations import Implementation, MicroBatchShape, Parallel
from simpo_mcore.plan.inputs import PlanError, Workload, cached_lengths, find_architecture
from simpo_mcore.plan.layouts import LayoutPlan
from simpo_mcore.plan.memory import Layout, Numerics, RankMemory, Setup, rank_memory
from simpo_mcore.plan.planner import Plan, plan_run
from simpo_mcore.plan.report import plan_json, plan_table
from simpo_mcore.plan.shape import ModelShape

__all__ = ["Implementation", "Layout", "LayoutPlan", "MicroBatchShape", "ModelShape", "Numerics", "Parallel", "Plan",
           "PlanError", "RankMemory", "Setup", "Workload", "cached_lengths", "find_architecture", "plan_json",
           "plan_run", "plan_table", "rank_memory"]
