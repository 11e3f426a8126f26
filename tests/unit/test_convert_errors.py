"""Bad input to either converter fails early with an error naming the field, tensor or file.

Library-level here (fast, single process); ``test_convert_cli.py`` checks that the CLIs turn the
same errors into one ``error:`` line and exit code 2. A failed conversion must leave nothing
behind (no output directory, no ``.incomplete-*`` staging directory), and a conversion deletes nothing it did
not create.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUIET, make_tiny_hf_llama, make_tiny_hf_model
from helpers import resave_checkpoint as resave
from safetensors.torch import load_file, save_file

from simpo_mcore.convert.checkpoint_meta import META_FILE, CheckpointMeta
from simpo_mcore.convert.hf_io import CheckpointError
from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
from simpo_mcore.convert.mcore_to_hf import convert_mcore_to_hf
from simpo_mcore.model.hf_config import UnsupportedConfigError

pytestmark = pytest.mark.usefixtures("world_of_one")


def staging_left(out: Path) -> list[Path]:
    """Staging directories of a conversion into ``out`` left behind."""
    return list(out.parent.glob(f"{out.name}.incomplete-*"))


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    make_tiny_hf_llama(tmp_path / "hf", num_layers=2)
    return tmp_path / "hf"


def edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def edit_tensors(hf_dir: Path, drop=(), put=None) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    for name in drop:
        del tensors[name]
    tensors.update(put or {})
    save_file(tensors, path, metadata={"format": "pt"})


def refuse_import(hf_dir: Path, out: Path, error, *fragments: str) -> None:
    with pytest.raises(error) as info:
        convert_hf_to_mcore(hf_dir, out, **QUIET)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not out.exists() or not any(out.iterdir())
    assert not staging_left(out)


# ------------------------------------------------------------------------------- HF -> megatron

@pytest.mark.parametrize("changes, fragments", [
    (dict(sliding_window=4096), ("sliding_window=4096",)),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), ("'yarn'",)),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), ("'dynamic'",)),
    (dict(intermediate_size=...), ("'intermediate_size'",)),
    (dict(model_type="gemma"), ("'gemma'",)),
], ids=["sliding_window", "yarn", "dynamic", "missing_field", "model_type"])
def test_unsupported_config(hf_dir, tmp_path, changes, fragments):
    edit_config(hf_dir, **changes)
    refuse_import(hf_dir, tmp_path / "ckpt", UnsupportedConfigError, "config.json", *fragments)


def test_missing_tensor(hf_dir, tmp_path):
    edit_tensors(hf_dir, drop=["model.layers.1.mlp.up_proj.weight"])
    refuse_import(hf_dir, tmp_path / "ckpt", CheckpointError, "model.layers.1.mlp.up_proj.weight", "missing")


def test_missing_lm_head_of_untied_model(hf_dir, tmp_path):
    edit_tensors(hf_dir, drop=["lm_head.weight"])
    refuse_import(hf_dir, tmp_path / "ckpt", CheckpointError, "lm_head.weight", "missing")


def test_wrong_shape(hf_dir, tmp_path):
    edit_tensors(hf_dir, put={"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    refuse_import(hf_dir, tmp_path / "ckpt", CheckpointError,
                  "model.layers.0.self_attn.k_proj.weight", "[64, 64]", "[32, 64]")


@pytest.mark.parametrize("family, drop, put, fragments", [
    ("qwen2", ["model.layers.1.self_attn.k_proj.bias"], {}, ("model.layers.1.self_attn.k_proj.bias", "missing")),
    ("qwen3", ["model.layers.0.self_attn.q_norm.weight"], {}, ("model.layers.0.self_attn.q_norm.weight", "missing")),
    ("gemma2", ["model.layers.1.post_feedforward_layernorm.weight"], {},
     ("model.layers.1.post_feedforward_layernorm.weight", "missing")),
    # A Llama checkpoint with biases the config does not declare: refused, never dropped.
    ("llama", [], {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
     ("unexpected", "model.layers.0.self_attn.q_proj.bias")),
    ("qwen2", [], {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
     ("model.layers.0.self_attn.q_proj.bias", "[32]", "[64]")),
], ids=["qwen2_bias", "qwen3_qk_norm", "gemma2_post_norm", "llama_with_bias", "qwen2_bias_shape"])
def test_family_tensors_are_checked(tmp_path, family, drop, put, fragments):
    """Each family's own tensors are required with their shapes, and another family's are refused."""
    make_tiny_hf_model(tmp_path / "hf", family=family, num_layers=2)
    edit_tensors(tmp_path / "hf", drop=drop, put=put)
    refuse_import(tmp_path / "hf", tmp_path / "ckpt", CheckpointError, *fragments)


def test_unexpected_tensor(hf_dir, tmp_path):
    """A third layer the config does not mention (num_hidden_layers=2)."""
    edit_tensors(hf_dir, put={"model.layers.2.mlp.up_proj.weight": torch.zeros(160, 64)})
    refuse_import(hf_dir, tmp_path / "ckpt", CheckpointError, "unexpected", "model.layers.2.mlp.up_proj.weight")


def test_bin_only_checkpoint_is_refused_without_unpickling(hf_dir, tmp_path):
    state = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    torch.save(state, hf_dir / "pytorch_model.bin")
    refuse_import(hf_dir, tmp_path / "ckpt", CheckpointError, "pytorch_model.bin", "pickle")


def test_index_naming_a_missing_file(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    save_file(tensors, hf_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    refuse_import(hf_dir, tmp_path / "ckpt", CheckpointError, "model-00002-of-00002.safetensors", "model.norm.weight")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_file(hf_dir, tmp_path, damage):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000] if damage == "truncated" else b"\x07" * 64)
    refuse_import(hf_dir, tmp_path / "ckpt", CheckpointError, str(path),
                  "truncated" if damage == "truncated" else "not a readable safetensors file")


def test_output_dir_not_empty(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_hf_to_mcore(hf_dir, out, **QUIET)
    assert (out / "keep.txt").read_text() == "mine"


def test_empty_output_dir_is_fine(hf_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    convert_hf_to_mcore(hf_dir, tmp_path / "ckpt", **QUIET)
    assert (tmp_path / "ckpt" / META_FILE).is_file()


def test_bad_dtype(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="float64"):
        convert_hf_to_mcore(hf_dir, tmp_path / "ckpt", dtype="float64", **QUIET)


# ------------------------------------------------------------------------------- megatron -> HF

@pytest.fixture
def ckpt(hf_dir, tmp_path) -> Path:
    convert_hf_to_mcore(hf_dir, tmp_path / "ckpt", **QUIET)
    return tmp_path / "ckpt"


def refuse_export(ckpt: Path, out: Path, error, *fragments: str) -> None:
    with pytest.raises(error) as info:
        convert_mcore_to_hf(ckpt, out, **QUIET)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not out.exists() and not staging_left(out)


def test_export_missing_tensor(ckpt, tmp_path):
    bad = resave(ckpt, tmp_path / "bad", drop=["decoder.final_layernorm.weight"])
    refuse_export(bad, tmp_path / "out", CheckpointError, "decoder.final_layernorm.weight", "missing")


def test_export_wrong_shape(ckpt, tmp_path):
    bad = resave(ckpt, tmp_path / "bad", put={"decoder.layers.mlp.linear_fc1.weight": torch.zeros(2, 100, 64)})
    refuse_export(bad, tmp_path / "out", CheckpointError, "decoder.layers.mlp.linear_fc1.weight",
                  "[2, 100, 64]", "[2, 320, 64]")


def test_export_vocab_smaller_than_config(ckpt, tmp_path):
    bad = resave(ckpt, tmp_path / "bad", put={"embedding.word_embeddings.weight": torch.zeros(200, 64)})
    refuse_export(bad, tmp_path / "out", CheckpointError, "embedding.word_embeddings.weight", "[200, 64]")


def test_export_unexpected_tensor(ckpt, tmp_path):
    bad = resave(ckpt, tmp_path / "bad", put={"decoder.layers.self_attention.linear_qkv.bias": torch.zeros(2, 128)})
    refuse_export(bad, tmp_path / "out", CheckpointError, "unexpected", "decoder.layers.self_attention.linear_qkv.bias")


def test_export_untied_without_output_layer(ckpt, tmp_path):
    """An untied model whose output layer is absent is refused, never exported without lm_head."""
    assert not CheckpointMeta.read(ckpt).arch.tie_word_embeddings
    bad = resave(ckpt, tmp_path / "bad", drop=["output_layer.weight"])
    refuse_export(bad, tmp_path / "out", CheckpointError, "output_layer.weight", "missing")


def test_export_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    refuse_export(tmp_path / "empty", tmp_path / "out", FileNotFoundError, META_FILE)


@pytest.mark.parametrize("damage, fragments", [
    (lambda text: text[: len(text) // 2], ["not valid JSON"]),
    (lambda text: "[1, 2]", ["expected a JSON object"]),
    (lambda text: json.dumps({**json.loads(text), "arch": None}), ["field 'arch'"]),
    (lambda text: json.dumps({**json.loads(text), "arch": {**json.loads(text)["arch"], "hidden": 64}}),
     ["field 'arch'", "unknown keys ['hidden']"]),
    (lambda text: json.dumps({**json.loads(text), "arch": {k: v for k, v in json.loads(text)["arch"].items()
                                                           if k != "num_layers"}}),
     ["field 'arch'", "lacks required keys ['num_layers']"]),
])
def test_damaged_checkpoint_metadata(ckpt, tmp_path, damage, fragments):
    """A damaged simpo_mcore.json is refused naming the file and the field, by the exporter and by every
    reader (training, evaluation), never with a bare KeyError or a TypeError from a dataclass."""
    meta = ckpt / META_FILE
    meta.write_text(damage(meta.read_text()))
    with pytest.raises(ValueError) as info:
        CheckpointMeta.read(ckpt)
    for fragment in (str(meta), *fragments):
        assert fragment in str(info.value), (fragment, str(info.value))
    refuse_export(ckpt, tmp_path / "out", ValueError, str(meta), *fragments)


def test_export_output_dir_not_empty(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_mcore_to_hf(ckpt, out, **QUIET)
    assert (out / "config.json").read_text() == "{}"


def test_export_bad_dtype(ckpt, tmp_path):
    with pytest.raises(ValueError, match="int8"):
        convert_mcore_to_hf(ckpt, tmp_path / "out", dtype="int8", **QUIET)


# ------------------------------------------------------------------------- failures mid-write

def test_failure_mid_import_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from simpo_mcore.convert import keymap

    def fail(*_):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(keymap, "pack", fail)
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated"):
        convert_hf_to_mcore(hf_dir, out, **QUIET)
    assert not out.exists() and not staging_left(out)


def test_failure_mid_export_leaves_nothing(ckpt, tmp_path, monkeypatch):
    from simpo_mcore.convert import keymap

    def fail(*_):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(keymap, "unpack", fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        convert_mcore_to_hf(ckpt, out, max_shard_bytes=10_000, **QUIET)
    assert not out.exists() and not staging_left(out)


# ------------------------------------------------------------------------- what staging may delete

def test_staging_deletes_nothing_it_did_not_create(hf_dir, ckpt, tmp_path):
    """The converters staged in ``<out>.incomplete`` and deleted it first: a user's directory of that name,
    and a checkpoint named ``model.incomplete`` exported to ``model`` (which then failed), were lost."""
    for out in (tmp_path / "exported", tmp_path / "imported"):
        mine = out.with_name(out.name + ".incomplete")
        mine.mkdir()
        (mine / "keep.txt").write_text("the user's")
    convert_mcore_to_hf(ckpt, tmp_path / "exported", **QUIET)
    convert_hf_to_mcore(hf_dir, tmp_path / "imported", **QUIET)
    for out in (tmp_path / "exported", tmp_path / "imported"):
        assert (out.with_name(out.name + ".incomplete") / "keep.txt").read_text() == "the user's"
        assert not staging_left(out)
    assert (tmp_path / "exported" / "config.json").is_file() and (tmp_path / "imported" / "metadata.json").is_file()

    named = tmp_path / "models" / "model.incomplete"
    named.parent.mkdir()
    ckpt.rename(named)
    convert_mcore_to_hf(named, tmp_path / "models" / "model", **QUIET)
    assert (named / "metadata.json").is_file() and (tmp_path / "models" / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model", "model.incomplete"]


def test_checkpoint_export_hf_owns_the_directory_it_writes(ckpt, tmp_path, monkeypatch):
    """checkpoint.export_hf deleted <output_dir>/hf whatever it held; it now replaces only an earlier
    export (recorded in its marker) and refuses, by name, anything else found there."""
    from types import SimpleNamespace

    from simpo_mcore import train
    from simpo_mcore.checkpoint import step_dir_name
    from simpo_mcore.convert.hf_io import EXPORT_MARKER

    monkeypatch.setattr(train, "run_in_fresh_process",  # the converter in this process (a world of one here)
                        lambda command, _ckpt, src, _out, dst: convert_mcore_to_hf(src, dst, **QUIET))
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    ckpt.rename(root / step_dir_name(3))
    printed = []
    trainer = SimpleNamespace(  # what export_hf reads of a Trainer (the newest checkpoint named both ways)
        cfg=SimpleNamespace(output_dir=str(tmp_path / "run")), ckpt_root=root, progress=SimpleNamespace(step=3),
        checkpointer=SimpleNamespace(last_path=root / step_dir_name(3)), layout=SimpleNamespace(rank=0),
        logger=SimpleNamespace(print=printed.append))
    hf = tmp_path / "run" / "hf"
    hf.mkdir()
    (hf / "notes.txt").write_text("the user's")
    with pytest.raises(FileExistsError, match=rf"^checkpoint.export_hf \(the trained checkpoint is "
                                              rf"{root / step_dir_name(3)}\): {hf} holds notes.txt, which no "
                                              r"export wrote; move it away"):
        train.Trainer.export_hf(trainer)
    assert sorted(p.name for p in hf.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in hf.parent.iterdir()) == ["checkpoints", "hf"]

    (hf / "notes.txt").unlink()
    for _ in range(2):  # into the empty directory, then over its own export
        train.Trainer.export_hf(trainer)
        entries = json.loads((hf / EXPORT_MARKER).read_text())["entries"]
        assert {p.name for p in hf.iterdir()} == {*entries, EXPORT_MARKER}
        assert {"config.json", "model.safetensors"} <= set(entries)
        assert sorted(p.name for p in hf.parent.iterdir()) == ["checkpoints", "hf"]
    assert printed == [f"exported Hugging Face model: {hf}"] * 2 and trainer.hf_export == hf
    (hf / "README.md").write_text("the user's, added to the export")
    with pytest.raises(FileExistsError, match=r"holds README.md, which no export wrote"):
        train.Trainer.export_hf(trainer)
    assert (hf / "README.md").is_file() and (hf / "model.safetensors").is_file()
