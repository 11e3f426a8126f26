"""Loading a checkpoint never runs code: every pickle in it is read by a restricted unpickler first.

A megatron ``torch_dist`` checkpoint holds three kinds of pickles, and the libraries read each with an
unpickler that runs whatever the file names:

- ``.metadata``: torch's ``FileSystemReader.read_metadata`` calls ``pickle.load``;
- each non-tensor item (a ``ShardedObject``: megatron's common state with the optimizer's param groups,
  Transformer Engine's ``_extra_state``): torch's ``DefaultLoadPlanner``
  calls ``torch.load(weights_only=False)``;
- inside a Transformer Engine ``_extra_state`` tensor: TE's ``set_extra_state`` calls ``pickle.loads``
  (megatron reads its grouped layers' with a restricted unpickler, but not the others').

Before megatron reads a checkpoint, :func:`check_checkpoint_pickles` reads ``.metadata`` with an
unpickler that admits only the classes torch's checkpoint metadata is made of, and every non-tensor item
with torch's own ``weights_only`` unpickler (tensors, numbers, strings, containers; plus numpy arrays,
as generator states pickle them); :func:`check_extra_state` reads TE's payload with megatron's
``SafeUnpickler`` before ``load_state_dict`` hands it to TE. Anything else is refused, naming the file
and the class. A file that passes can only build those objects, so the unrestricted reads that follow
build nothing else.
(The check and the load read the same bytes; a file rewritten between the two by someone with write
access to the checkpoint is outside what this protects against.)
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from megatron.core.safe_globals import SafeUnpickler
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from simpo_mcore.convert.hf_io import CheckpointError

METADATA_FILE = ".metadata"
LEGACY_COMMON_FILE = "common.pt"

METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    # _StoragePrefix: a run's saves after its first reuse megatron's cached local plans, whose storage prefix
    # (a file-name stem) goes into .metadata's all_local_plans.
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType"},
    "torch.serialization": {"_get_layout"},  # a layout by name, e.g. "torch.strided"
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "bytearray"},
}
"""What a ``.metadata`` written by torch's distributed checkpoint (as megatron uses it) is made of:
plain dataclasses, enums, ``torch.Size`` and dtypes (also admitted: any ``torch.<dtype>``)."""

NUMPY_ARRAYS = [np.ndarray, np.dtype, np.ndarray.__reduce__(np.empty(0))[0],  # numpy's _reconstruct (1.x and 2.x)
                *(type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64))]
"""A numeric array rebuilt from its bytes (numpy's own pickling, as torch's documentation allowlists it):
numpy's generator state holds one (uint32)."""


class RefusedPickle(CheckpointError):
    """A pickle in a checkpoint names a class or function that loading must not run."""


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _Restricted(pickle.Unpickler):
    """Admits ``allowed[module]`` names (and ``torch.<dtype>``); refuses every other global."""

    def __init__(self, file, allowed: dict[str, set[str]], where: str):
        super().__init__(file)
        self.allowed = allowed
        self.where = where

    def find_class(self, module: str, name: str):
        if name in self.allowed.get(module, ()) or _is_dtype(module, name):
            return super().find_class(module, name)
        raise RefusedPickle(_refusal(self.where, f"{module}.{name}"))

    def persistent_load(self, pid):
        raise RefusedPickle(f"{self.where}: refusing to load: unexpected persistent reference {pid!r}")


def _refusal(where: str, names: str) -> str:
    return (f"{where}: refusing to load: it names {names or 'a class'}, which this kind of file never holds "
            f"and which could run code on load. The checkpoint was not written by simpo_mcore / megatron as it "
            f"is, or has been tampered with")


def read_metadata(ckpt_dir: str | Path) -> Metadata:
    """The checkpoint's ``.metadata``, read with the restricted unpickler."""
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {METADATA_FILE} is missing")
    try:
        with open(path, "rb") as f:
            metadata = _Restricted(f, METADATA_CLASSES, str(path)).load()
    except RefusedPickle:
        raise
    except Exception as exc:  # noqa: BLE001 - any damage: say which file and how
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {METADATA_FILE} cannot be read "
                              f"({type(exc).__name__}: {exc}); the file is truncated or overwritten") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not torch checkpoint metadata")
    return metadata


def _check_item(data: bytes, where: str) -> None:
    """One non-tensor item (``torch.save`` bytes) under torch's weights_only unpickler."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS):
            torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(data) or re.findall(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(exc))
        names = [n if isinstance(n, str) else "".join(n) for n in names]
        raise RefusedPickle(_refusal(where, ", ".join(names))) from None
    except Exception as exc:  # noqa: BLE001 - any damage: say which file and how
        raise CheckpointError(f"{where} cannot be read ({type(exc).__name__}: {exc}); the file is damaged") from None


def _unsafe_globals(data: bytes) -> list[str]:
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS):
            return torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except (RuntimeError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError):
        return []


def check_checkpoint_pickles(ckpt_dir: str | Path) -> Metadata:
    """Refuse a checkpoint any of whose pickles names something beyond plain data (see the module
    docstring); returns its metadata. Reads ``.metadata`` and the non-tensor items only (small)."""
    ckpt_dir = Path(ckpt_dir)
    metadata = read_metadata(ckpt_dir)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"{ckpt_dir / info.relative_path} (item {index.fqn})"
        if getattr(info, "transform_descriptors", None):
            raise RefusedPickle(f"{where}: stored with transforms {info.transform_descriptors}, which "
                                f"simpo_mcore does not write and cannot check")
        try:
            with open(ckpt_dir / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {info.relative_path} cannot be read "
                                  f"({exc.strerror or exc})") from None
        if len(data) != info.length:
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {info.relative_path} ends before item "
                                  f"{index.fqn} (truncated)")
        _check_item(data, where)
    legacy = ckpt_dir / LEGACY_COMMON_FILE
    if legacy.is_file():
        _check_item(legacy.read_bytes(), str(legacy))
    return metadata


def check_extra_state(key: str, state) -> None:
    """A Transformer Engine ``_extra_state`` value about to reach ``set_extra_state``, which unpickles a
    non-empty byte tensor with ``pickle.loads``: refused unless megatron's ``SafeUnpickler`` (the allowlist
    megatron applies to its grouped TE layers: containers, numbers, CPU tensors, TE's FP8 recipes) reads it."""
    if not isinstance(state, torch.Tensor) or state.numel() == 0 or state.dtype != torch.uint8:
        return
    where = f"checkpoint item {key}"
    try:
        SafeUnpickler(io.BytesIO(state.detach().cpu().numpy().tobytes())).load()
    except pickle.UnpicklingError as exc:
        names = re.findall(r"disallowed class '([^']+)'", str(exc))
        raise RefusedPickle(_refusal(where, ", ".join(names))) from None
    except Exception as exc:  # noqa: BLE001 - a damaged payload is refused like a crafted one
        raise CheckpointError(f"{where} cannot be read ({type(exc).__name__}: {exc})") from None
