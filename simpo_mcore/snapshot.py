"""A checkpoint's state taken at its step and completed while training goes on (asynchronous saves).

megatron's fully-reshardable format of the distributed optimizer (``checkpoint.OPTIM_SHARDING``: per-parameter
tensors that reload at any layout) needs every data-parallel rank's optimizer shard on every rank:
``DistributedOptimizer.get_parameter_state_dp_zero`` copies this rank's shards, all-gathers them and assembles
the whole state, synchronously, before the sharded state dict exists. On a CPU that was half the time of a
1 GB synchronous save, and all of an asynchronous one's blocking time (docs/operations.md).

:func:`take`, at the step, instead: copies this rank's optimizer shards (memory copies, as megatron does first),
builds the sharded state dict with megatron's own code around the gathered tensors still to be filled, copies
everything else it holds to host memory (the weights, a plain optimizer's state, the common state), and leaves
the all-gather and the assembly to a thread, over gloo groups of the same data-parallel ranks made for it
(:func:`gather_groups`), so that its collectives never interleave with training's. The state dict is complete
once :meth:`Snapshot.ready` holds on every rank; training meanwhile changes only the live tensors.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def distributed_optimizers(optimizer) -> list[DistributedOptimizer]:
    """The distributed optimizers inside ``optimizer`` (megatron chains one per kind of parameter)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in inner if isinstance(opt, DistributedOptimizer)]


def _ranks(opt: DistributedOptimizer) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(opt.data_parallel_group))


def gather_groups(optimizer) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """A gloo group per data-parallel group of ``optimizer``'s distributed optimizers, for the background gathers
    (collective: every rank creates every group, in the same order)."""
    mine = sorted({_ranks(opt) for opt in distributed_optimizers(optimizer)})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    groups = {}
    for ranks in sorted({r for rank_groups in everyone for r in rank_groups}):
        group = dist.new_group(list(ranks), backend="gloo")
        if ranks in mine:
            groups[ranks] = group
    return groups


class _ShardGather:
    """One distributed optimizer's ``get_parameter_state_dp_zero(return_on_all_ranks=True)``, split in two: the
    copy of this rank's shards (in the constructor, at the step) and the all-gather and assembly (:meth:`run`,
    in a thread). :attr:`state` is what megatron's function returns; its tensors are filled by :meth:`run`."""

    def __init__(self, opt: DistributedOptimizer, group):
        self.group, self.size = group, dist.get_world_size(group)
        keys = ("param", *opt.optimizer_state_keys)
        self.state: dict = {"buckets_coalesced": True}
        self.buckets: list[tuple[dict, int, int, dict]] = []
        """``(world tensors, offset in them, unpadded numel, this rank's shard of each key)`` per bucket."""
        for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
            assert len(gbuf_range_maps) == 1, "single dtype supported, for now."  # as megatron's
            buffer = opt.buffers[gbuf_idx]
            for dtype, range_maps in gbuf_range_maps.items():
                # Filled by run() bucket by bucket (not zeroed first: a third of the copy's time).
                world: dict = {key: torch.empty((buffer.numel_unpadded,), dtype=torch.float32) for key in keys}
                world["numel_unpadded"] = buffer.numel_unpadded
                offset = 0
                for bucket_idx, range_map in enumerate(range_maps):
                    bucket = buffer.buckets[bucket_idx]
                    # Only the parameters' ranges are ever read back (the rest is padding): no need to zero it.
                    local = {key: torch.empty((bucket.grad_data.numel() // self.size,), dtype=torch.float32)
                             for key in keys}
                    for model_param, param_range in range_map["param_map"].items():
                        tensors = opt._get_main_param_and_optimizer_states(model_param)
                        start, end = param_range["gbuf_local"].start, param_range["gbuf_local"].end
                        for key in keys:
                            local[key][start:end].copy_(tensors[key].detach())
                    self.buckets.append((world, offset, bucket.numel_unpadded, local))
                    offset += bucket.numel_unpadded
                for key in keys:
                    world[key][offset:].zero_()  # past the buckets (none normally): zeros, as megatron's
                self.state[gbuf_idx] = {dtype: world}

    def run(self) -> None:
        for world, offset, unpadded, local in self.buckets:
            for key, shard in local.items():
                gathered = torch.empty(self.size * shard.numel(), dtype=shard.dtype)  # [bucket numel]
                dist.all_gather(list(gathered.chunk(self.size)), shard, group=self.group)
                world[key][offset:offset + unpadded].copy_(gathered[:unpadded])
            local.clear()

    def storages(self) -> set[int]:
        """The data pointers of the tensors :meth:`run` fills (the sharded state dict's views into them)."""
        return {t.untyped_storage().data_ptr() for world, _, _, _ in self.buckets for t in world.values()
                if isinstance(t, torch.Tensor)}


class Snapshot:
    """A checkpoint's sharded state dict at one step; :attr:`state` is complete once :meth:`ready` (all ranks)."""

    def __init__(self, state: dict, gathers: list[_ShardGather]):
        self.state = state
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._gather, args=(gathers,), name="checkpoint-gather", daemon=True)
        self.thread.start()

    def _gather(self, gathers: list[_ShardGather]) -> None:
        try:
            for gather in gathers:
                gather.run()
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread by wait()
            self.error = exc

    def ready(self) -> bool:
        """Whether this rank's gathers are done (local)."""
        return not self.thread.is_alive()

    def wait(self) -> dict:
        """The complete state dict, once this rank's gathers are done."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.state


def take(optimizer, build_state: Callable[[], dict], groups: dict) -> Snapshot:
    """The state dict ``build_state()`` makes (the checkpoint's, with ``optimizer`` in it), as of now: this rank's
    optimizer shards copied and gathered in the background, every other tensor copied to host memory."""
    gathers = {opt: _ShardGather(opt, groups[_ranks(opt)]) for opt in distributed_optimizers(optimizer)}
    with _gathered(gathers):
        state = build_state()
    filled = set().union(*(g.storages() for g in gathers.values()))
    _copy_in_place(state, filled)
    return Snapshot(state, list(gathers.values()))


@contextlib.contextmanager
def _gathered(gathers: dict[DistributedOptimizer, _ShardGather]) -> Iterator[None]:
    """Each optimizer's ``get_parameter_state_dp_zero`` answers with its gather's (still empty) state."""
    for opt, gather in gathers.items():
        opt.get_parameter_state_dp_zero = lambda *args, _state=gather.state, **kwargs: _state
    try:
        yield
    finally:
        for opt in gathers:
            del opt.get_parameter_state_dp_zero


def _copy_in_place(node, filled: set[int]) -> None:
    """Every tensor of the sharded state dict ``node`` that training may change, replaced by a host copy: the data
    of sharded tensors (not those :class:`_ShardGather` fills), sharded objects, plain tensors of the common
    state."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            if isinstance(value.data, torch.Tensor) and value.data.untyped_storage().data_ptr() not in filled:
                value.data = value.data.detach().to("cpu", copy=True)
        elif isinstance(value, ShardedObject):
            value.data = copy.deepcopy(value.data)
        elif isinstance(value, torch.Tensor):
            node[key] = value.detach().to("cpu", copy=True)
        elif isinstance(value, (dict, list)):
            _copy_in_place(value, filled)
