"""Run megatron-core on a CPU (gloo) by redirecting the CUDA entry points it assumes.

megatron-core allocates buffers with ``device=torch.cuda.current_device()``, forks the CUDA RNG in
every tensor-parallel region, waits on CUDA streams around gradient reduction and asserts on
``tensor.type() == 'torch.cuda.FloatTensor'`` in gradient clipping and its optimizers. None of that
needs a GPU to be *correct*; it only needs somewhere to run. ``enable()`` points each of those
entry points at the CPU so the very same code path (schedules, DDP, distributed optimizer,
dist_checkpointing) runs on gloo. It is switched on by :func:`simpo_mcore.parallel.init_distributed`
only when no GPU is used, and never touches a process that has one.

Each redirection below was needed (see ``docs/cpu_mode.md``):

1. a ``TorchFunctionMode`` that rewrites ``device='cuda'`` arguments to the CPU, makes
   ``Tensor.cuda()`` a no-op, rewrites ``Tensor.to('cuda')``, and makes the no-argument
   ``Tensor.type()`` answer ``'torch.cuda.*'``;
2. ``torch.cuda.current_device`` -> ``'cpu'`` (gradient buffers);
3. ``torch.cuda.{get,set}_rng_state`` / ``manual_seed`` -> the CPU generator (a no-op seed leaves
   CPU-initialised weights unseeded, and TP=1 / TP=2 would then disagree);
4. megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` (the RNG tracker forks per forward);
5. ``torch.cuda.synchronize`` -> no-op (checkpoint save);
6. ``torch.cuda.current_stream`` / ``default_stream`` / ``Stream`` / ``Event`` -> no-op objects
   (DDP gradient sync waits on streams).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_device(device):
    return torch.device("cpu") if _is_cuda(device) or isinstance(device, int) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch function call in the process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or isinstance(kwargs["device"], int)):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu_device(a) if _is_cuda(a) else a for a in args)
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asserts ``param.type() == 'torch.cuda.FloatTensor'`` (clip_grads, optimizers).
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream``: everything on a CPU runs in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def enabled() -> bool:
    """Whether this process runs megatron-core in CPU mode."""
    return _ENABLED


def enable() -> None:
    """Redirect megatron-core's CUDA entry points to the CPU. Idempotent."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _NoOpStream()
    cuda.default_stream = lambda device=None: _NoOpStream()
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0

    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = _get_cpu_rng_state
    mpu_random._set_cuda_rng_state = _set_cpu_rng_state

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
