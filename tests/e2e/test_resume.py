"""Exact resume: 10 steps straight == 5 steps, stop, resume to 10 (model, optimizer, scheduler,
data position and RNG restored), also across layouts and with an interleaved pipeline."""

from __future__ import annotations

import shutil

import pytest
from helpers import run_ranks
from train_utils import make_tiny, read_metrics, write_config

FIELDS = ("loss", "grad_norm", "lr", "rewards/chosen", "rewards/rejected", "rewards/margins",
          "rewards/accuracies", "logps/chosen", "logps/rejected", "sft_loss", "consumed_pairs")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny(root / "model"), root / "cache"


def train(tmp_path, tiny, name, nproc, out=None, **sections):
    ckpt, cache = tiny
    out = out or tmp_path / name
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": 10, **sections["train"]}
    cfg = write_config(tmp_path / f"{name}.yaml", ckpt, cache, output_dir=str(out), **sections)
    run_ranks("train_entry.py", nproc, cfg)
    return out


def assert_identical(a: dict, b: dict, steps, rel: float = 0.0):
    for step in steps:
        for field in FIELDS:
            x, y = a[step][field], b[step][field]
            assert abs(x - y) <= rel * abs(x), f"step {step} {field}: {x} vs {y}"


LAYOUTS = {
    # name: (nproc first half, layout first half, nproc resume, layout resume, tolerance)
    "dp2_distopt": (2, {}, 2, {}, 0.0),
    "tp1_to_tp2": (2, {}, 2, {"tp": 2}, 1e-5),
    "pp2_vpp2": (2, {"pp": 2, "vpp": 2}, 2, {"pp": 2, "vpp": 2}, 0.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exact_resume(tmp_path, tiny, name):
    n1, layout1, n2, layout2, rel = LAYOUTS[name]
    par1 = {"device": "cpu", "distributed_optimizer": True, **layout1}
    par2 = {"device": "cpu", "distributed_optimizer": True, **layout2}
    straight = read_metrics(train(tmp_path, tiny, "straight", n1, parallel=par1))
    assert sorted(straight) == list(range(1, 11))

    out = train(tmp_path, tiny, "first", n1, parallel=par1, train={"exit_interval": 5})
    first = read_metrics(out)
    assert sorted(first) == [1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000005"
    assert_identical(straight, first, range(1, 6))
    train(tmp_path, tiny, "second", n2, out=out, parallel=par2)
    resumed = read_metrics(out)
    assert sorted(resumed) == list(range(1, 11))
    assert_identical(straight, resumed, range(6, 11), rel)


@pytest.mark.slow
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, tiny):
    """A crash between writing the tensors and publishing them leaves `latest` on the previous
    checkpoint, which loads and resumes to the same losses as a straight run."""
    par = {"device": "cpu"}
    out = train(tmp_path, tiny, "run", 1, parallel=par, checkpoint={"save_interval": 3, "keep_last": 2})
    straight = read_metrics(out)
    shutil.rmtree(out)
    with pytest.raises(AssertionError, match="failed with"):
        run_ranks("train_entry.py", 1, write_config(
            tmp_path / "crash.yaml", *tiny, output_dir=str(out), parallel=par,
            train={"max_steps": 10, "exit_interval": None},
            checkpoint={"save_interval": 3, "keep_last": 2}), env={"SIMPO_MCORE_CRASH_IN_SAVE_AT": "6"})
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000003"
    assert (ckpts / "step_0000006.incomplete").is_dir() and not (ckpts / "step_0000006").exists()
    train(tmp_path, tiny, "resume", 1, out=out, parallel=par, checkpoint={"save_interval": 3, "keep_last": 2})
    resumed = read_metrics(out)
    assert_identical(straight, resumed, range(4, 11))
    assert not (ckpts / "step_0000006.incomplete").exists()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000009", "step_0000010"]
