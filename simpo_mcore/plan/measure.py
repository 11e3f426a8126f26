"""What a built run holds, measured the way the planner counts it: the checks of its predictions
(``tests/distributed/scripts/plan_bytes.py`` on CPU ranks, ``benchmarks/plan_gpu_check.py`` on a GPU) use these.

* weights: the parameters' storages (with the distributed optimizer, DDP's contiguous parameter buffer);
* grads: DDP's gradient buffers;
* optimizer: every storage the optimizer holds (its parameters and their state) that is neither a parameter nor
  a DDP buffer: fp32 master copies, Adam's moments, torch AdamW's ``step`` tensors;
* activations: the storages autograd saves during a forward (:class:`SavedBytes`), each once, parameters and DDP
  buffers excluded.
"""

from __future__ import annotations

import torch


def storage_bytes(tensors) -> dict[int, int]:
    """``{storage address: its bytes}`` of ``tensors`` (a storage shared by several counts once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def ddp_buffers(ddp_chunks: list) -> list:
    """megatron's ``_ParamAndGradBuffer`` objects of DDP-wrapped chunks (dense and expert-parallel)."""
    return [b for c in ddp_chunks for b in (*c.buffers, *c.expert_parallel_buffers)]


def model_storages(ddp_chunks: list) -> set[int]:
    """Addresses of the parameters' and the DDP buffers' storages (what is not an activation)."""
    buffers = ddp_buffers(ddp_chunks)
    tensors = [p for c in ddp_chunks for p in c.parameters()] + [b.grad_data for b in buffers] + \
        [b.param_data for b in buffers if b.param_data is not None]
    return set(storage_bytes(tensors))


def held_bytes(ddp_chunks: list, optimizer, distributed_optimizer: bool) -> dict[str, int]:
    """``{weights, grads, optimizer}`` bytes a rank holds (after an optimizer step, so that its state exists)."""
    buffers = ddp_buffers(ddp_chunks)
    params = storage_bytes(p for c in ddp_chunks for p in c.parameters())
    param_buffers = storage_bytes(b.param_data for b in buffers if b.param_data is not None)
    grads = storage_bytes(b.grad_data for b in buffers)
    inner = optimizer.optimizer  # megatron's wrapper around the torch / TE optimizer
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    held = storage_bytes([p for g in inner.param_groups for p in g["params"]] + state)
    model = set(params) | set(param_buffers) | set(grads)
    return {"weights": sum(param_buffers.values()) if distributed_optimizer else sum(params.values()),
            "grads": sum(grads.values()),
            "optimizer": sum(n for k, n in held.items() if k not in model)}


class SavedBytes:
    """A ``torch.autograd.graph.saved_tensors_hooks`` pack hook recording each saved storage once, attributed to
    the micro-batch ``active`` names (nothing is recorded while it is ``None``: the backward's recomputation)."""

    def __init__(self, excluded: set[int]):
        self.excluded = excluded
        self.seen: dict[int, tuple[int, int]] = {}
        self.active: int | None = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if self.active is not None and key not in self.excluded and key not in self.seen:
            self.seen[key] = (self.active, storage.nbytes())
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def of(self, micro_batch: int) -> int:
        """Bytes saved during micro-batch ``micro_batch``'s forward."""
        return sum(n for m, n in self.seen.values() if m == micro_batch)

    def forward_step(self, forward_step, micro_batches: list):
        """``forward_step`` (megatron's contract) recording what the forward and the loss of each micro-batch save,
        each attributed to its place in ``micro_batches`` (the list the schedule runs: a micro-batch is known by
        its identity, so every pipeline chunk's iterator finds the same number for it)."""
        number = {id(batch): i for i, batch in enumerate(micro_batches)}

        def hooked(data_iterator, model):
            batch = next(data_iterator)
            self.active = number[id(batch)]
            output, loss_func = forward_step(iter([batch]), model)
            self.active = None

            def loss(out):
                self.active = number[id(batch)]
                try:
                    return loss_func(out)
                finally:
                    self.active = None

            return output, loss

        return hooked
