"""megatron checkpoint (converted or written by simpo-train) -> HF ``config.json`` + safetensors.

Reads one layer at a time from the distributed checkpoint (whatever TP / PP wrote it), unpacks
QKV and gate/up, strips padded vocabulary rows and streams the tensors into safetensors shards of
at most ``max_shard_bytes``: peak memory is about one shard plus one layer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from simpo_mcore import cpu_mode
from simpo_mcore.console import Progress
from simpo_mcore.convert import keymap
from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
from simpo_mcore.convert.hf_io import (
    CheckpointError,
    ShardedSafetensorsWriter,
    copy_tokenizer_files,
    staged_output,
)
from simpo_mcore.convert.hf_to_mcore import DTYPES
from simpo_mcore.convert.mcore_io import verify_checkpoint


def check_mcore_tensors(metadata: dict, arch, ckpt_dir: Path) -> None:
    """Every model tensor present with the global shape ``arch`` implies (vocab may be padded)."""
    expected = keymap.expected_mcore_shapes(arch)
    for key, shape in expected.items():
        if key not in metadata:
            raise CheckpointError(f"{ckpt_dir}: tensor {key} is missing")
        got = tuple(metadata[key].global_shape)
        if key in keymap.VOCAB_KEYS:
            if got[1:] != shape[1:] or got[0] < shape[0]:
                raise CheckpointError(
                    f"{ckpt_dir}: tensor {key} has shape {list(got)}, expected [>= {shape[0]}, {shape[1]}]")
        elif got != shape:
            raise CheckpointError(f"{ckpt_dir}: tensor {key} has shape {list(got)}, expected {list(shape)}")
    model_keys = {k for k in metadata if k.startswith(("embedding.", "decoder.", "output_layer."))}
    unexpected = sorted(model_keys - set(expected))
    if arch.tie_word_embeddings:
        unexpected = [k for k in unexpected if k != keymap.OUTPUT_LAYER[0]]
    if unexpected:
        raise CheckpointError(f"{ckpt_dir}: unexpected model tensor {unexpected[0]} for this architecture")


def _read(ckpt_dir: Path, requests: dict[str, tuple[str, tuple[int, ...], torch.dtype, int | None, int]]):
    """Load ``{name: (key, local_shape, dtype, layer or None, num_layers)}`` slices in one call."""
    sharded = {}
    for name, (key, shape, dtype, layer, n) in requests.items():
        if layer is None:
            sharded[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
        else:
            # One layer as a [1, ...] slice of the stacked [n, ...] tensor. Not ``prepend_axis_num``:
            # that legacy form builds a torch ShardedTensor that, in a world of one, places all n
            # layer fragments on this rank and then fails on holding only one of them.
            buf = torch.empty((1, *shape), dtype=dtype)  # [1, ...]
            sharded[name] = ShardedTensor.from_rank_offsets(key, buf, (0, layer, n), replica_id=0)
    # A slice of the checkpoint (one layer) on purpose: megatron's access-integrity check wants
    # every shard of every requested tensor covered and refuses a partial read.
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir), validate_access_integrity=False)
    return {name: loaded[name][0] if requests[name][3] is not None else loaded[name] for name in requests}


@cpu_mode.without_gpu
def convert_mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 10**9,
                        dtype: str | None = None, tokenizer_dir: str | Path | None = None,
                        log: Callable[[str], None] | None = print) -> Path:
    """Write an HF model directory. Needs a (one-process) torch.distributed group. ``log``: where progress
    goes (a bar instead on a terminal); ``None``: silent."""
    progress_to, log = log, log or (lambda _: None)
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    start = time.time()
    meta = CheckpointMeta.read(ckpt_dir)
    arch = meta.arch
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES[dtype or arch.torch_dtype] if (dtype or arch.torch_dtype) in DTYPES else None
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    verify_checkpoint(ckpt_dir)
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    check_mcore_tensors(metadata, arch, ckpt_dir)
    with staged_output(out_dir) as tmp_dir:
        writer = ShardedSafetensorsWriter(tmp_dir, max_shard_bytes)

        def emit(name: str, tensor: torch.Tensor) -> None:
            writer.add(name, tensor.to(out_dtype) if out_dtype is not None else tensor)

        def global_request(key: str):
            md = metadata[key]
            return (key, tuple(md.global_shape), md.dtype, None, 0)

        first = _read(ckpt_dir, {hkey: global_request(mkey) for mkey, hkey in keymap.global_tensors(arch)})
        emit(keymap.EMBEDDING[1], first[keymap.EMBEDDING[1]][: arch.vocab_size])  # strip padded rows
        n, stacked = arch.num_layers, keymap.stacked(arch)
        with Progress(n, "[export] writing", "layers", write=progress_to, interval_s=0) as progress:
            for i in range(n):
                requests = {}
                for t in keymap.layer_tensors(arch, i):
                    key = keymap.layer_key(t.mcore, arch, i)
                    md = metadata[key]
                    shape = tuple(md.global_shape[1:] if stacked else md.global_shape)
                    requests[t.mcore] = (key, shape, md.dtype, i if stacked else None, n)
                loaded = _read(ckpt_dir, requests)
                for t in keymap.layer_tensors(arch, i):
                    tensors = loaded[t.mcore] if t.experts else [loaded[t.mcore]]  # [E, ...]: one per expert
                    for names, tensor in zip(keymap.hf_names(t, arch), tensors):
                        for hf_name, part in zip(names, keymap.unpack(tensor, t.packing, arch)):
                            emit(keymap.hf_layer_key(i, hf_name), part)
                progress.update()
        emit(keymap.FINAL_NORM[1], first[keymap.FINAL_NORM[1]])
        if not arch.tie_word_embeddings:
            emit(keymap.OUTPUT_LAYER[1], first[keymap.OUTPUT_LAYER[1]][: arch.vocab_size])
        del first
        files = writer.finish()

        hf_config = arch.to_hf_dict()
        if out_dtype is not None:
            hf_config["torch_dtype"] = str(out_dtype).replace("torch.", "")
        (tmp_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tok_src = Path(tokenizer_dir) if tokenizer_dir else None
        if tok_src is None and meta.tokenizer_path(ckpt_dir) and Path(meta.tokenizer_path(ckpt_dir)).is_dir():
            tok_src = Path(meta.tokenizer_path(ckpt_dir))
        copied = copy_tokenizer_files(tok_src, tmp_dir) if tok_src else []
    log(f"[export] done in {time.time() - start:.1f} s: {len(files)} safetensors file(s), "
        f"{writer.total_bytes / 2**30:.2f} GiB, tokenizer files: {', '.join(copied) or 'none'}")
    return out_dir
