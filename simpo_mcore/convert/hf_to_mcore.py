"""HF model directory (any family of :mod:`simpo_mcore.model.hf_config`) -> megatron ``dist_checkpointing``
directory that loads at any TP / PP.

Every tensor is read lazily from safetensors, checked against the shape the config implies,
packed (QKV, gate/up) and handed to ``dist_checkpointing.save`` as one layer slice of the stacked
global tensor, so peak memory is about one copy of the weights (only QKV and FC1 are new
allocations; the rest are views of memory-mapped files).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from simpo_mcore import cpu_mode
from simpo_mcore.console import Progress
from simpo_mcore.convert import keymap
from simpo_mcore.convert.checkpoint_meta import TOKENIZER_DIR, CheckpointMeta
from simpo_mcore.convert.hf_io import CheckpointError, SafetensorsReader, copy_tokenizer_files, staged_output
from simpo_mcore.convert.integrity import write_manifest
from simpo_mcore.convert.mcore_io import save_sharded
from simpo_mcore.model.hf_config import ModelArch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def uses_fused_experts(reader: SafetensorsReader, arch: ModelArch) -> bool:
    """Whether the checkpoint holds each MoE layer's experts in transformers 5's fused tensors
    (``mlp.experts.gate_up_proj``) rather than the hub's per-expert ones."""
    first = next((i for i in range(arch.num_layers) if arch.is_moe_layer(i)), None)
    return first is not None and keymap.hf_layer_key(first, "mlp.experts.gate_up_proj") in reader.names()


def check_hf_tensors(reader: SafetensorsReader, arch: ModelArch) -> None:
    """Refuse missing, unexpected or wrongly shaped tensors, naming the first one."""
    expected = keymap.expected_hf_shapes(arch, fused=uses_fused_experts(reader, arch))
    present = reader.names()
    if arch.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"{reader.dir}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{reader.dir}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all); "
            "the config does not describe this checkpoint")
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != shape:
            raise CheckpointError(
                f"{reader.dir}: tensor {name} has shape {list(got)}, the config implies {list(shape)}")


@cpu_mode.without_gpu
def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                        log: Callable[[str], None] | None = print) -> CheckpointMeta:
    """Write ``out_dir`` (must not exist or be empty). Needs a (one-process) torch.distributed group.
    ``log``: where progress goes (a bar instead on a terminal); ``None``: silent."""
    progress_to, log = log, log or (lambda _: None)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    start = time.time()
    arch = ModelArch.from_hf_dir(hf_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(reader, arch)
    cast = DTYPES[dtype] if dtype else None
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    # Written under a temporary name and renamed at the end: a failed run leaves no half checkpoint.
    with staged_output(out_dir) as tmp_dir:
        def load(name: str) -> torch.Tensor:
            t = reader.get(name)
            return t.to(cast) if cast is not None and t.dtype != cast else t

        state: dict[str, ShardedTensor] = {}
        for mkey, hkey in keymap.global_tensors(arch):
            state[mkey] = ShardedTensor.from_rank_offsets(mkey, load(hkey), replica_id=0)
        n, fused = arch.num_layers, uses_fused_experts(reader, arch)
        with Progress(n, "[convert] reading", "layers", write=progress_to, interval_s=0) as progress:
            for i in range(n):
                for t in keymap.layer_tensors(arch, i):
                    data = _layer_tensor(load, arch, t, i, fused)
                    key = keymap.layer_key(t.mcore, arch, i)
                    if keymap.stacked(arch):
                        state[f"{key}.{i}"] = ShardedTensor.from_rank_offsets(
                            key, data, (0, i, n), replica_id=0, prepend_axis_num=1)
                    else:
                        state[key] = ShardedTensor.from_rank_offsets(key, data, replica_id=0)
                progress.update()
        log(f"[convert] writing {out_dir}")
        save_sharded(state, tmp_dir)
        del state

        meta = CheckpointMeta(arch=arch if cast is None else _with_dtype(arch, dtype), kind="converted",
                              info={"source": str(hf_dir.resolve())})
        if copy_tokenizer_files(hf_dir, tmp_dir / TOKENIZER_DIR):
            meta.tokenizer = TOKENIZER_DIR
        meta.write(tmp_dir)
        write_manifest(tmp_dir)
    log(f"[convert] done in {time.time() - start:.1f} s: {n} layers, vocab {arch.vocab_size}")
    return meta


def _layer_tensor(load: Callable[[str], torch.Tensor], arch: ModelArch, t: keymap.LayerTensor, i: int,
                  fused: bool) -> torch.Tensor:
    """Layer ``i``'s megatron tensor of entry ``t``: packed from its HF parts; a routed expert tensor with
    the experts stacked first (``[E, ...]``), read from the fused tensor when the checkpoint has one."""
    if fused and t.fused:
        return load(keymap.hf_layer_key(i, t.fused))
    packed = [keymap.pack([load(keymap.hf_layer_key(i, name)) for name in names], t.packing, arch)
              for names in keymap.hf_names(t, arch)]
    return torch.stack(packed) if t.experts else packed[0]  # [E, rows, cols] for experts


def _with_dtype(arch: ModelArch, dtype: str) -> ModelArch:
    return dataclasses.replace(arch, torch_dtype=dtype)
