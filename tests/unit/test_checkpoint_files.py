"""What is on disk in a checkpoint, checked before anything reads it: every file against integrity.json
(a truncated, deleted or bit-flipped file is refused by name), and every pickle against what a checkpoint
holds (a crafted one is refused and runs nothing); RNG states are tensors; the checkpoint manager saves on its
interval and at the last step, and keep_last never deletes the checkpoint just written."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.validation import verify_integrity_manifest
from torch.distributed.checkpoint import FileSystemReader

from simpo_mcore import checkpoint as ckpt
from simpo_mcore.config import CheckpointConfig
from simpo_mcore.convert import integrity
from simpo_mcore.convert.checkpoint_meta import META_FILE, CheckpointMeta
from simpo_mcore.convert.hf_io import CheckpointError
from simpo_mcore.convert.integrity import MANIFEST, checkpoint_files, share, verify_manifest, write_manifest
from simpo_mcore.convert.mcore_io import save_sharded, save_strategy, verify_checkpoint
from simpo_mcore.convert.safe_pickle import RefusedPickle, check_checkpoint_pickles, check_extra_state, read_metadata
from simpo_mcore.convert.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("world_of_one")


class Payload:
    """Unpickling it creates ``marker``: what a crafted checkpoint would do instead (run any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted tiny model (written by the converter, so with its integrity.json)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2)


@pytest.fixture
def copy(converted, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(converted, out)
    return out


def distcp(path):
    return sorted(path.glob("*.distcp"))[0]


def test_manifest_lists_every_file_and_megatron_accepts_it(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    assert set(manifest["files"]) == set(manifest["sizes"]) == set(checkpoint_files(copy))
    assert {".metadata", "simpo_mcore.json", "metadata.json", "tokenizer/tokenizer.json"} <= set(manifest["files"])
    assert manifest["sizes"][distcp(copy).name] == distcp(copy).stat().st_size
    assert verify_manifest(copy) is True
    verify_integrity_manifest(str(copy))  # megatron's own check reads the same file


@pytest.mark.parametrize("damage", ["truncate shard", "delete shard", "flip a bit", "truncate .metadata"])
def test_damaged_files_are_refused_by_name(copy, damage):
    """Each named by file: unchecked, a truncated shard fails as a bare EOFError and a flipped bit loads silently."""
    shard = distcp(copy)
    if damage == "truncate shard":
        size = shard.stat().st_size
        shard.write_bytes(shard.read_bytes()[: size // 2])
        found = rf"{shard.name} has {size // 2} bytes, {size} were written \(truncated or replaced\)"
    elif damage == "delete shard":
        shard.unlink()
        found = rf"{shard.name} is missing"
    elif damage == "flip a bit":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        found = rf"{shard.name} has changed since it was written \(its SHA-256 differs\)"
    else:
        meta = copy / ".metadata"
        meta.write_bytes(meta.read_bytes()[:100])
        found = r"\.metadata has 100 bytes"
    with pytest.raises(CheckpointError, match=rf"^checkpoint {copy} is damaged: {found}"):
        verify_checkpoint(copy)


def test_checkpoint_without_a_readable_manifest_is_refused(copy):
    """Every checkpoint simpo_mcore writes has its integrity.json: without one (or with one that is not JSON)
    nothing in it can be checked, and nothing is read."""
    (copy / MANIFEST).unlink()
    assert verify_manifest(copy) is False
    with pytest.raises(CheckpointError, match=rf"checkpoint {copy} is damaged: its {MANIFEST} is missing"):
        verify_checkpoint(copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"checkpoint {copy} is damaged: its {MANIFEST} cannot be read"):
        verify_checkpoint(copy)


def add_entry(ckpt, name: str, size: int | None, digest: str = "0" * 64) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = digest
    if size is not None:
        manifest["sizes"][name] = size
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("entry, why", [
    ("../../../../../../../../etc/hostname", "is not a plain name inside the checkpoint"),
    ("/etc/hostname", "is not a plain name inside the checkpoint"),
    ("tokenizer/../../outside.txt", "is not a plain name inside the checkpoint"),
    ("link_out", "is a link that points out of the checkpoint"),
    ("fifo", "is not a regular file"),
    ("../../../../../../../../proc/self/pagemap", "is not a plain name inside the checkpoint"),
])
def test_manifest_entries_outside_the_checkpoint_are_refused_unread(copy, tmp_path, monkeypatch, entry, why):
    """integrity.json named ``../../../../etc/hostname`` and verification read and hashed it; an entry for
    ``/proc/self/pagemap`` (size 0, endless to read) ran until killed, and a FIFO blocks the reader."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not the checkpoint's")
    (copy / "link_out").symlink_to(outside)
    os.mkfifo(copy / "fifo")
    add_entry(copy, entry, 0)
    opened = []
    real_hash = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path, size=None: opened.append(path) or real_hash(path, size))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {copy} is damaged: {re.escape(entry)} {why}"):
        verify_checkpoint(copy)
    assert opened and all(path.resolve().is_relative_to(copy.resolve()) for path in opened)
    assert not any(path.name in (entry.rsplit("/", 1)[-1], "outside.txt") for path in opened)


def test_a_file_longer_than_recorded_is_read_no_further(copy, monkeypatch):
    """Sizes are compared before hashing; a file that holds more than its size when read (as /proc files do,
    which report 0 bytes) is still read only that far."""
    data = b"x" * (3 * integrity.READ_BYTES)
    path = copy / "grows.bin"
    path.write_bytes(data)
    assert integrity.sha256_file(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError, match=r"it holds more than the 10 bytes recorded"):
        integrity.sha256_file(path, 10)
    add_entry(copy, "grows.bin", None, hashlib.sha256(data).hexdigest())  # no size recorded (megatron's own form)
    assert verify_manifest(copy) is True


def test_hashing_is_shared_over_ranks():
    """Every file hashed once; each rank takes the shards it wrote, the rest balance by size."""
    sizes = {"__0_0.distcp": 100, "__0_1.distcp": 100, "__1_0.distcp": 50, "__1_1.distcp": 60, ".metadata": 30,
             "common.pt": 5, "simpo_mcore.json": 1, "__7_0.distcp": 80}
    shares = [share(sizes, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes)
    assert {"__0_0.distcp", "__0_1.distcp"} <= set(shares[0]) and {"__1_0.distcp", "__1_1.distcp"} <= set(shares[1])
    assert "__7_0.distcp" in shares[1]  # no rank 7 here: rank 1 (110 so far) is less loaded than rank 0 (200)
    assert sorted(share(sizes, 0, 1)) == sorted(sizes)


def test_crafted_metadata_is_refused_and_runs_nothing(copy, tmp_path):
    """torch's reader unpickles .metadata with pickle.load: this file would have created the marker."""
    marker = tmp_path / "pwned"
    (copy / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(copy)  # whoever crafted it can write a matching manifest
    with pytest.raises(RefusedPickle, match=rf"{copy}/\.metadata: refusing to load: it names builtins\.exec"):
        verify_checkpoint(copy)
    assert not marker.exists()
    with pytest.raises(AttributeError):  # torch's own reader, which megatron's load calls, runs it
        FileSystemReader(str(copy)).read_metadata()
    assert marker.exists()


def saved(path, objects: dict) -> None:
    """A checkpoint of one tensor and ``objects`` (key -> ShardedObject data), as megatron writes it."""
    path.mkdir()
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0).reshape(2, 3), replica_id=0)}
    for key, data in objects.items():
        state[key] = ShardedObject(key, data, (1, 1, 1), (0, 0, 0), replica_id=0)
    save_sharded(state, path)


def test_crafted_rng_object_is_refused_and_runs_nothing(converted, tmp_path):
    """A training checkpoint whose rng_state is a pickled object that runs code: the training loader refuses
    it before reading anything (torch's planner unpickles such items with weights_only=False)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "step_0000004"
    saved(path, {"rng_state": Payload(marker)})
    CheckpointMeta(arch=CheckpointMeta.read(converted).arch, kind="train", info={"step": 4}).write(path)
    write_manifest(path)
    with pytest.raises(RefusedPickle, match=r"__0_0\.distcp \(item rng_state/shard_0\.0\.0_1\.1\.1\): refusing "
                                            r"to load: it names builtins\.exec"):
        ckpt.load_train_checkpoint(path, ddp_chunks=[], optimizer=None, layout=None)
    assert not marker.exists()


def test_pickled_numpy_arrays_and_numbers_are_admitted(tmp_path):
    """Generator states pickled with numpy arrays, tuples and numbers are data: admitted by torch's weights_only
    unpickler once numpy's array rebuild is allowed."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "cuda": None, "tracker": {"model-parallel-rng": torch.get_rng_state()}}
    saved(tmp_path / "old", {"rng_state": states, "optimizer_groups": {"lr": 1e-3, "betas": (0.9, 0.999)}})
    metadata = check_checkpoint_pickles(tmp_path / "old")
    assert "rng_state/shard_0.0.0_1.1.1" in metadata.state_dict_metadata


def test_metadata_reader_admits_what_torch_writes(converted):
    metadata = read_metadata(converted)
    assert "decoder.layers.mlp.linear_fc1.weight" in metadata.state_dict_metadata


def test_a_runs_later_saves_are_admitted(tmp_path):
    """A training run saves with megatron's cached plans (``save_strategy(repeated=True)``): from its second save
    on, ``.metadata`` holds the plans of the previous one, storage prefixes included; admitted, and the tensor
    reads back."""
    strategy = save_strategy(repeated=True)
    for step in (1, 2, 3):
        path = tmp_path / f"step_{step}"
        path.mkdir()
        tensor = torch.arange(6.0).reshape(2, 3) * step
        save_sharded({"w": ShardedTensor.from_rank_offsets("w", tensor, replica_id=0)}, path, strategy,
                     validate=step == 1)
        check_checkpoint_pickles(path)
        loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(2, 3),
                                                                                replica_id=0)}, str(path))
        assert torch.equal(loaded["w"], tensor), step


def test_transformer_engine_extra_state(tmp_path):
    """TE unpickles a non-empty ``_extra_state`` byte tensor in set_extra_state: its FP8 state (CPU tensors,
    plain values) passes, anything that runs code is refused first."""
    def as_tensor(obj):
        return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)

    fp8 = {"forward": {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(16, 3),
                       "extra_fp8_variables": {"num_gemms": 1, "fp8_max_fwd": 448.0}}}
    check_extra_state("decoder.layers.0.mlp.linear_fc1._extra_state", as_tensor(fp8))
    check_extra_state("x._extra_state", torch.empty(0, dtype=torch.uint8))  # no FP8: nothing to read
    marker = tmp_path / "pwned"
    with pytest.raises(RefusedPickle, match=r"checkpoint item x\._extra_state: refusing to load: it names "
                                            r"builtins\.exec"):
        check_extra_state("x._extra_state", as_tensor({"recipe": Payload(marker)}))
    assert not marker.exists()


def test_rng_states_round_trip_as_tensors():
    """Python's, numpy's and torch's generators continue exactly where they were saved."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached Gaussian is part of the state too
    state = ckpt._rng_tensors()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    want = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt._restore_rng_tensors(state)
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(2))
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


def pruned() -> None:
    """Wait for publish's background deletion of what it pruned."""
    for thread in threading.enumerate():
        if thread.name == "checkpoint-prune":
            thread.join()


def fake_checkpoint(root, name: str, pairs: int):
    """A complete checkpoint directory as pruning sees it: a name and the pairs consumed."""
    path = root / name
    path.mkdir(parents=True)
    (path / META_FILE).write_text(json.dumps({"info": {"consumed_pairs": pairs}}))
    return path


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    """An older run's higher steps beside a new run's: the newest K by step number alone would delete the new
    run's own checkpoint (and leave `latest` naming a deleted directory)."""
    for step in (3, 5, 6):
        fake_checkpoint(tmp_path, ckpt.step_dir_name(step), step * 8)
    for step in (30, 40):  # another run's, there before this one started: not this run's line
        fake_checkpoint(tmp_path, ckpt.step_dir_name(step), step * 8)
    (tmp_path / "step_0000007.incomplete").mkdir()
    not_ours = ckpt.beyond(tmp_path, 0)
    assert not_ours == {"step_0000003", "step_0000005", "step_0000006", "step_0000030", "step_0000040"}
    not_ours -= {"step_0000003", "step_0000005", "step_0000006"}  # as if this run had written them
    newest = tmp_path / "step_0000006"
    assert ckpt.prune_checkpoints(tmp_path, 2, newest, not_ours) == ["step_0000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000005", "step_0000006", "step_0000007.incomplete", "step_0000030", "step_0000040"]
    assert ckpt.prune_checkpoints(tmp_path, 1, newest, not_ours) == ["step_0000005"]
    assert ckpt.prune_checkpoints(tmp_path, 1, newest, not_ours) == []


def test_names_never_repeat_and_pruning_follows_the_line_latest_names(tmp_path):
    """``latest`` pointed back from a damaged step_3 to step_2 (as the damage error advises), the run resumed
    there: step_3 is past the point the run started from, so it is neither replaced nor counted by keep_last,
    and the good step_2 survives the save of step 4 (keep_last 2). A step the run writes again gets a name of
    its own; the run's progress, not its step numbers, orders what is kept (a global batch changed on resume
    restarts the step count)."""
    fake_checkpoint(tmp_path, "step_0000001", 8)
    fake_checkpoint(tmp_path, "step_0000002", 16)
    damaged = fake_checkpoint(tmp_path, "step_0000003", 24)
    (damaged / "__0_0.distcp").write_bytes(b"damaged")
    (tmp_path / "latest").write_text("step_0000002\n")
    not_ours = ckpt.beyond(tmp_path, 16)  # what CheckpointManager.restore notes, resuming step_2
    assert not_ours == {"step_0000003"}

    staged = fake_checkpoint(tmp_path, "step_0000004.incomplete", 32)
    assert ckpt.publish(tmp_path, staged, 4, 2, not_ours) == "step_0000004"
    pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000002", "step_0000003", "step_0000004"]
    assert (tmp_path / "latest").read_text() == "step_0000004\n"

    # The same run (its line) writes step 3 again after a global batch change halved the step count.
    staged = fake_checkpoint(tmp_path, "step_0000003.incomplete", 48)
    assert ckpt.publish(tmp_path, staged, 3, 2, not_ours) == "step_0000003-2"
    assert (damaged / "__0_0.distcp").read_bytes() == b"damaged"  # not replaced
    assert ckpt.pairs_consumed(tmp_path / "step_0000003-2") == 48
    assert (tmp_path / "latest").read_text() == "step_0000003-2\n"
    pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000003", "step_0000003-2",
                                                          "step_0000004"]


def test_the_manager_saves_on_its_interval_and_once_at_the_last_step(tmp_path):
    """``save(step, last_step)``: due every ``save_interval`` steps; at the last step whatever the interval, unless
    that step is saved already (written or resumed from); never twice at one step."""
    def manager(interval):
        return ckpt.CheckpointManager(tmp_path, CheckpointConfig(save_interval=interval), model=[], optimizer=None,
                                      train_state=None, layout=None, meta=None, tokenizer="t", run_config={},
                                      data_fingerprint={}, total_steps=10)

    every3 = manager(3)
    assert [s for s in range(1, 11) if every3.due(s)] == [3, 6, 9]
    assert every3.due(10, last_step=True) and every3.due(7, last_step=True)
    every3.last_step = 9  # saved at 9 (or resumed there)
    assert not every3.due(9) and not every3.due(9, last_step=True)
    never = manager(0)
    assert not any(never.due(s) for s in range(1, 11)) and never.due(10, last_step=True)
