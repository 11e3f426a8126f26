"""Process groups, device choice and seeds.

One code path for GPUs (NCCL) and CPUs (gloo + :mod:`simpo_mcore.cpu_mode`). Launch under
``torchrun`` for several ranks; a plain ``python`` process becomes a world of one.
:func:`init_distributed` / :func:`shutdown` bracket a job (``with distributed(...)`` does both): on a
CPU layout the first opens :mod:`simpo_mcore.cpu_mode`'s redirection scope and the second closes it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from simpo_mcore import cpu_mode
from simpo_mcore.config import USER_ERRORS, ConfigError, ParallelConfig, UserError
from simpo_mcore.preflight import free_port

_cpu_scope_opened = False
"""Whether :func:`init_distributed` opened the CPU-mode scope that :func:`shutdown` must close."""


@dataclass(frozen=True)
class Layout:
    """Where this rank sits; everything the rest of the code asks of the process groups."""

    device: torch.device
    """``cpu`` (gloo, inside :mod:`simpo_mcore.cpu_mode`'s scope) or this rank's ``cuda`` device."""
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    """Data-parallel replicas (context-parallel ranks of one replica read the same micro-batches)."""
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp: int = 1
    """Context-parallel size: the ranks of a replica that share each sequence."""
    cp_rank: int = 0
    ep: int = 1
    """Expert-parallel size: an MoE layer's experts are split over ``ep`` ranks that are data-parallel
    replicas of the rest of the model (megatron's expert-model-parallel group)."""
    ep_rank: int = 0
    """This rank's place in its expert-parallel group: it holds global experts ``ep_rank x E / ep + i``."""
    etp: int = 1
    """Expert tensor-parallel size (``tp`` unless ``parallel.etp`` says otherwise)."""
    edp: int = 1
    """Expert data-parallel size (``world / (etp x ep x pp)``): the replicas of each expert, over which
    megatron's DDP reduces the expert gradients."""


def use_cuda(device: str) -> bool:
    """Resolve ``parallel.device``: CUDA when asked for (and present) or when auto finds a GPU."""
    if device == "cpu":
        return False
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.device is 'cuda' but no CUDA device is visible")
        return True
    return torch.cuda.is_available()


def ensure_process_group() -> None:
    """A world of one (gloo) for single-process tools that call dist_checkpointing."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend="gloo", **world_of_one())


def init_distributed(cfg: ParallelConfig, seed: int) -> Layout:
    """Create the default process group and megatron's model-parallel groups; seed every RNG.

    On a CPU layout this opens :mod:`simpo_mcore.cpu_mode`'s scope; :func:`shutdown` closes it.
    Safe to call twice in one process with the same layout (tests, eval after train).
    """
    cuda = use_cuda(cfg.device)
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
            **({} if "RANK" in os.environ else world_of_one()),
        )
    elif cuda != (dist.get_backend() == "nccl"):
        raise RuntimeError(f"a {dist.get_backend()} process group exists but device={'cuda' if cuda else 'cpu'}")
    world = dist.get_world_size()
    if world % (cfg.tp * cfg.pp * cfg.cp):
        raise ConfigError(f"world size {world} is not divisible by parallel.tp x parallel.pp x parallel.cp = "
                          f"{cfg.tp} x {cfg.pp} x {cfg.cp}")
    etp = cfg.etp or cfg.tp
    if world % (etp * cfg.ep * cfg.pp):
        raise ConfigError(
            f"parallel.ep x parallel.etp = {cfg.ep} x {etp} must divide the {world // cfg.pp} ranks of a pipeline "
            f"stage (world size {world} / parallel.pp {cfg.pp}): experts are split inside the data-parallel group")
    global _cpu_scope_opened
    if not cuda and not _cpu_scope_opened:
        cpu_mode.enter()
        _cpu_scope_opened = True
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        context_parallel_size=cfg.cp,
        hierarchical_context_parallel_sizes=cp_hierarchy(cfg.cp, cfg.cp_comm_type, cfg.cp_a2a_size),
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=etp,
        distributed_timeout_minutes=cfg.timeout_minutes,
        create_gloo_process_groups=not cuda,
    )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return current_layout(device, cfg.vpp)


@contextlib.contextmanager
def distributed(cfg: ParallelConfig, seed: int) -> Iterator[Layout]:
    """``init_distributed`` for the block, then :func:`shutdown` however it ends.

    A rank of a torchrun job that leaves the block with an error ignores SIGTERM from then on: every rank
    raises the same error (:func:`agreed`) and exits with it, but torchrun sends SIGTERM to the others as
    soon as the first one exits, which would cut their ``error:`` line and exit code short."""
    try:
        yield init_distributed(cfg, seed)
    except BaseException:
        if "TORCHELASTIC_RUN_ID" in os.environ and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    finally:
        shutdown()


class PeerFailed(RuntimeError):
    """Another rank failed with an error that is not the user's; its traceback is in its own output."""


def agreed[T](fn: Callable[[], T], run: bool = True) -> T | None:
    """Call ``fn`` where ``run`` is true, then make every rank of the job agree on how it went.

    A rank that fails alone would otherwise leave the others waiting in their next collective until its
    exit tears the group down ("Connection closed by peer", and the launcher blames a healthy rank). Here
    a failing rank re-raises its own exception and every other rank raises the same user error
    (:class:`UserError` with the same message: each prints the same ``error:`` line and exits 2), or
    :class:`PeerFailed` naming the failed rank when the error was not the user's. Use it wherever one rank
    (usually rank 0) does work the others then depend on. Returns ``fn()`` where it ran, else ``None``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn() if run else None
    result, error, outcome = None, None, None
    if run:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - told to every rank, then re-raised below
            error = exc
            outcome = (isinstance(exc, USER_ERRORS), type(exc).__name__, str(exc))
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if error is not None:
        raise error
    for rank, found in enumerate(outcomes):
        if found is not None:
            user, name, message = found
            if user:
                raise UserError(message)
            raise PeerFailed(f"rank {rank} failed ({name}: {message}); its output has the traceback")
    return result


def cp_hierarchy(cp: int, comm_type: str, a2a_size: int | None) -> list[int] | None:
    """megatron's ``hierarchical_context_parallel_sizes`` (inner all-to-all groups, then the p2p ring between
    them) for Transformer Engine's ``a2a+p2p`` exchange; ``None`` for the others."""
    if cp == 1 or comm_type != "a2a+p2p":
        return None
    return [a2a_size, cp // a2a_size]


def current_layout(device: torch.device, vpp: int | None = None) -> Layout:
    """This rank's place in megatron's groups (which must exist), running on ``device``."""
    ps = parallel_state
    return Layout(
        device=device,
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        vpp=vpp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        edp=ps.get_expert_data_parallel_world_size(),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Tear the groups down (megatron-core 0.19 aborts at exit otherwise) and leave CPU mode."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    global _cpu_scope_opened
    if _cpu_scope_opened:
        cpu_mode.exit()
        _cpu_scope_opened = False


def world_of_one() -> dict:
    """``init_process_group`` arguments for a plain process (no torchrun): rank 0 of 1 on a free local
    port. Passed explicitly rather than through os.environ, so child processes never inherit a rank
    or a port in use."""
    return {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}

