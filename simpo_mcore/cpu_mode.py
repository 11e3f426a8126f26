"""Run megatron-core on a CPU (gloo) by redirecting, for a scope, the CUDA entry points it assumes.

megatron-core allocates buffers with ``device=torch.cuda.current_device()``, forks the CUDA RNG in
every tensor-parallel region, waits on CUDA streams around gradient reduction and asserts on
``tensor.type() == 'torch.cuda.FloatTensor'`` in gradient clipping and its optimizers. None of that
needs a GPU to be *correct*; it only needs somewhere to run. Inside :func:`redirect` each of those
entry points points at the CPU, so the very same code path (schedules, DDP, distributed optimizer,
dist_checkpointing) runs on gloo; leaving the scope restores every patched attribute and exits the
function mode.

Who opens the scope: :func:`simpo_mcore.parallel.init_distributed` when the run's layout device is
the CPU (``parallel.device: cpu``, or ``auto`` without a GPU), closed again by
:func:`simpo_mcore.parallel.shutdown`; and the converters around ``dist_checkpointing`` when no GPU is
visible. A layout on a GPU never opens it. ``parallel.device: cpu`` on a machine that has a GPU does
open it, so for that run ``torch.cuda`` answers as the CPU in this process (the GPU is unused).

Each redirection below was needed (see ``docs/cpu_mode.md``):

1. a ``TorchFunctionMode`` that rewrites ``device='cuda'`` arguments to the CPU, makes
   ``Tensor.cuda()`` a no-op, rewrites ``Tensor.to('cuda')``, makes the no-argument
   ``Tensor.type()`` answer ``'torch.cuda.*'``, and drops ``pin_memory=True`` (megatron's RoPE under
   context parallelism makes its chunk index that way; pinning needs a GPU driver);
2. ``torch.cuda.current_device`` -> ``'cpu'`` (gradient buffers);
3. ``torch.cuda.{get,set}_rng_state`` / ``manual_seed`` -> the CPU generator (a no-op seed leaves
   CPU-initialised weights unseeded, and TP=1 / TP=2 would then disagree);
4. megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` (the RNG tracker forks per forward);
5. ``torch.cuda.synchronize`` -> no-op (checkpoint save);
6. ``torch.cuda.current_stream`` / ``default_stream`` / ``Stream`` / ``Event`` -> no-op objects
   (DDP gradient sync waits on streams);
7. megatron's ``maybe_move_tensor_to_cpu`` (MoE all-to-all dispatcher): it converts only CUDA tensors, so on
   a CPU the split sizes reach ``all_to_all_single`` as tensors, which it refuses; here a CPU tensor asked for
   ``as_numpy`` becomes the NumPy array megatron hands over on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from megatron.core.tensor_parallel import random as mpu_random
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_device(device):
    return torch.device("cpu") if _is_cuda(device) or isinstance(device, int) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch function call while it is entered."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or isinstance(kwargs["device"], int)):
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):
            # Page-locked host memory needs a GPU driver; it only speeds up copies to a device there is not.
            kwargs["pin_memory"] = False
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


def _cpu_manual_seed(seed) -> None:
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    torch.default_generator.manual_seed(int(seed))


def _host_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` for tensors already on the CPU: the NumPy array when asked."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _replacements() -> list[tuple[object, str, object]]:
    """``(owner, attribute, CPU stand-in)`` for every entry point redirected."""
    cuda = torch.cuda
    get_state = lambda device="cuda": torch.get_rng_state()
    set_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    return [
        (cuda, "current_device", lambda: "cpu"),
        (cuda, "get_rng_state", get_state),
        (cuda, "set_rng_state", set_state),
        (cuda.random, "get_rng_state", get_state),
        (cuda.random, "set_rng_state", set_state),
        (cuda, "manual_seed", _cpu_manual_seed),
        (cuda, "manual_seed_all", _cpu_manual_seed),
        (cuda, "synchronize", lambda device=None: None),
        (cuda, "current_stream", lambda device=None: _NoOpStream()),
        (cuda, "default_stream", lambda device=None: _NoOpStream()),
        (cuda, "Stream", _NoOpStream),
        (cuda, "Event", _NoOpEvent),
        (cuda, "stream", lambda stream=None: contextlib.nullcontext()),
        (cuda, "empty_cache", lambda: None),
        (cuda, "memory_allocated", lambda device=None: 0),
        (cuda, "max_memory_allocated", lambda device=None: 0),
        (mpu_random, "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False:
            torch.get_rng_state()),
        (mpu_random, "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False:
            torch.set_rng_state(new_state)),
        (moe_utils, "maybe_move_tensor_to_cpu", _host_split_sizes),
        (token_dispatcher, "maybe_move_tensor_to_cpu", _host_split_sizes),  # imported by name there
    ]


class _Scope:
    """The patched attributes' originals and the entered function mode, for one (outermost) scope."""

    def __init__(self):
        self.saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _replacements()]
        for owner, name, stand_in in _replacements():
            setattr(owner, name, stand_in)
        self.mode = _CudaToCpuMode()
        self.mode.__enter__()

    def close(self) -> None:
        self.mode.__exit__(None, None, None)
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


_depth = 0
_scope: _Scope | None = None


def active() -> bool:
    """Whether this process is inside a :func:`redirect` scope now."""
    return _scope is not None


def enter() -> None:
    """Open a redirection scope (re-entrant: only the outermost one patches). Pair with :func:`exit`;
    prefer ``with redirect():`` where the scope is one block of code."""
    global _depth, _scope
    if _depth == 0:
        _scope = _Scope()
    _depth += 1


def exit() -> None:  # noqa: A001 - the counterpart of enter()
    """Close one scope; the outermost restores every patched attribute and leaves the function mode."""
    global _depth, _scope
    if _depth == 0:
        return
    _depth -= 1
    if _depth == 0 and _scope is not None:
        _scope.close()
        _scope = None


@contextlib.contextmanager
def redirect(enabled: bool = True) -> Iterator[None]:
    """Within the block, megatron-core's CUDA entry points run on the CPU (no-op when not ``enabled``)."""
    if not enabled:
        yield
        return
    enter()
    try:
        yield
    finally:
        exit()


def without_gpu(func: Callable) -> Callable:
    """Run ``func`` inside :func:`redirect` when this process sees no GPU (file tools that call
    ``dist_checkpointing``, which calls ``torch.cuda.synchronize`` and more unconditionally)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with redirect(not torch.cuda.is_available()):
            return func(*args, **kwargs)

    return wrapper
