"""Exact resume: 20 steps straight == 10 steps, stop, resume to 20 (model, optimizer state, schedule position,
data position and RNG restored), with the distributed optimizer, across layouts (TP, and the context-parallel
size both ways: checkpoints hold no trace of CP) and with an interleaved pipeline; and an interrupted save never
costs the previous checkpoint."""

from __future__ import annotations

import json

import pytest
from helpers import run_ranks
from train_utils import assert_grad_norm_tracks, read_metrics, relative_deviation, write_config

FIELDS = ("loss", "grad_norm", "lr", "rewards/chosen", "rewards/rejected", "rewards/margins",
          "rewards/accuracies", "logps/chosen", "logps/rejected", "sft_loss", "consumed_pairs")


def train(tmp_path, tiny, name, nproc, out, parallel, env=None, **sections):
    cfg = write_config(tmp_path / f"{name}.yaml", *tiny, output_dir=str(out),
                       parallel={"device": "cpu", **parallel}, **sections)
    return run_ranks("train_entry.py", nproc, cfg, env=env)


def assert_identical(a: dict, b: dict, steps, rel: float = 0.0, fields=FIELDS):
    """Bit-identical when ``rel`` is 0; else within ``rel`` relative (1e-6 absolute near zero)."""
    for step in steps:
        for field in fields:
            x, y = a[step][field], b[step][field]
            assert abs(x - y) <= rel * abs(x) + (1e-6 if rel else 0.0), f"step {step} {field}: {x} vs {y}"


CASES = {
    # name: (straight run = first half's layout, ranks, first half, ranks, second half, tolerance)
    "dp2_distopt": ("dp2", 2, {}, 2, {}, 0.0),
    "tp1_to_tp2": ("tp1", 1, {}, 2, {"tp": 2}, 1e-5),
    "pp2_vpp2": ("pp2vpp2", 2, {"pp": 2, "vpp": 2}, 2, {"pp": 2, "vpp": 2}, 0.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_exact_resume(tmp_path, tiny, straight, name):
    ref, n1, layout1, n2, layout2, rel = CASES[name]
    out = tmp_path / "run"
    train(tmp_path, tiny, "first", n1, out, layout1, train={"exit_interval": 10})
    first = read_metrics(out)
    assert sorted(first) == list(range(1, 11))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    assert_identical(straight(ref), first, range(1, 11))
    train(tmp_path, tiny, "second", n2, out, layout2)
    resumed = read_metrics(out)
    assert sorted(resumed) == list(range(1, 21))
    assert_identical(straight(ref), resumed, range(11, 21), rel)


@pytest.mark.slow
def test_resume_across_context_parallel_sizes(tmp_path, tiny, straight):
    """7 steps at CP 1, resumed at CP 2 to step 14, resumed at CP 1 to step 20 (a checkpoint written at each CP
    size, read at the other; the distributed optimizer's state sharded over both CP ranks at CP 2): the first 7
    steps identical to the straight CP 1 run, then every field within the resharding tolerance (1e-5, as TP 1 ->
    2), the gradient norm as ``assert_grad_norm_tracks`` bounds it (DP 2 is 1.1e-5 from DP 1 at step 12)."""
    out = tmp_path / "run"
    stops = {"exit_interval": 7}
    for name, nproc, parallel, last in (("cp1", 1, {}, 7), ("cp2", 2, {"cp": 2}, 14), ("back", 1, {}, 20)):
        train(tmp_path, tiny, name, nproc, out, parallel, train=stops)
        assert sorted(read_metrics(out)) == list(range(1, last + 1)), name
    resumed, base = read_metrics(out), straight("tp1")
    assert_identical(base, resumed, range(1, 8))
    assert_identical(base, resumed, range(8, 21), 1e-5, fields=[f for f in FIELDS if f != "grad_norm"])
    grad = assert_grad_norm_tracks(base, resumed, straight("dp2"), range(8, 21))
    loss = relative_deviation(base, resumed, "loss")
    print(f"[cp] resumed CP 1 -> 2 -> 1: largest relative deviation from CP 1: loss {max(loss.values()):.1e}, "
          f"grad norm {max(grad.values()):.1e} (steps {[s for s in grad if grad[s] > 1e-5]} over 1e-5)")


@pytest.mark.slow
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, tiny, straight):
    """A crash between writing the tensors and publishing them leaves `latest` on the previous
    checkpoint, which loads and resumes to the straight run's numbers."""
    out = tmp_path / "run"
    saving = {"save_interval": 3, "keep_last": 2}
    with pytest.raises(AssertionError, match="failed with"):
        train(tmp_path, tiny, "crash", 1, out, {}, env={"TEST_CRASH_IN_SAVE_AT": "6"}, checkpoint=saving)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000003"
    assert (ckpts / "step_0000006.incomplete").is_dir() and not (ckpts / "step_0000006").exists()
    train(tmp_path, tiny, "resume", 1, out, {}, checkpoint=saving)
    assert_identical(straight("tp1"), read_metrics(out), range(4, 21))
    assert not (ckpts / "step_0000006.incomplete").exists()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000018", "step_0000020"]


def pairs_of(ckpt_dir) -> int:
    return json.loads((ckpt_dir / "simpo_mcore.json").read_text())["info"]["consumed_pairs"]


@pytest.mark.slow
def test_a_batch_change_keeps_the_earlier_checkpoints(tmp_path, tiny):
    """4 steps of 16 pairs (step_1..4, 16..64 pairs), resumed with 32-pair steps (allowed): the step count restarts
    at 64 / 32 = 2, and steps 3 and 4 of the new batch are saved beside, not over, the old run's step_3 and step_4
    (whose files are unchanged); the log says so, and ``latest`` names the newest."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    keep = {"save_interval": 1, "keep_last": 10}
    train(tmp_path, tiny, "b16", 1, out, {}, train={"global_batch_pairs": 16, "max_steps": 4}, checkpoint=keep)
    before = {p.name: (p / "integrity.json").read_bytes() for p in ckpts.glob("step_*")}
    assert sorted(before) == [f"step_000000{s}" for s in range(1, 5)]
    proc = train(tmp_path, tiny, "b32", 1, out, {}, train={"global_batch_pairs": 32, "max_steps": 6},
                 checkpoint={**keep, "allow_changes": ["train.global_batch_pairs"]})
    for name, manifest in before.items():
        assert (ckpts / name / "integrity.json").read_bytes() == manifest, name
    assert {p.name: pairs_of(p) for p in ckpts.glob("step_*")} == {
        "step_0000001": 16, "step_0000002": 32, "step_0000003": 48, "step_0000004": 64,
        "step_0000003-2": 96, "step_0000004-2": 128, "step_0000005": 160, "step_0000006": 192}
    assert (ckpts / "latest").read_text().strip() == "step_0000006"
    log = proc.stdout + proc.stderr
    assert "checkpoint step_0000003 already exists (48 pairs consumed); it is kept, and this one (96 pairs " \
           "consumed) is step_0000003-2" in log, log[-3000:]


@pytest.mark.slow
def test_pruning_keeps_the_checkpoint_latest_was_pointed_back_to(tmp_path, tiny):
    """step_3 is damaged; as the error advises, ``latest`` is pointed back at step_2 and the run relaunched
    (keep_last 2, a save every 2 steps). Its save at step 4 must not prune step_2 for the damaged step_3: step_3
    is past the point the run resumed from, another line, never counted nor deleted by pruning."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    train(tmp_path, tiny, "first", 1, out, {}, train={"max_steps": 3}, checkpoint={"save_interval": 1})
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000003"]
    shard = sorted((ckpts / "step_0000003").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])  # damaged: a relaunch would refuse it by name
    (ckpts / "latest").write_text("step_0000002\n")
    train(tmp_path, tiny, "second", 1, out, {}, train={"max_steps": 4}, checkpoint={"save_interval": 2})
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000003", "step_0000004"]
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    assert pairs_of(ckpts / "step_0000004") == 32


@pytest.mark.slow
def test_an_asynchronous_checkpoint_holds_the_state_of_its_step(tmp_path, tiny):
    """2 ranks, the distributed optimizer, a save every 3 steps: an asynchronous save takes the state at its step
    and gathers the optimizer shards while training goes on (steps 4 and 5 change every tensor meanwhile), yet its
    shards are byte for byte those of a synchronous save of the same step (``.metadata`` names the directory)."""
    digests = {}
    for mode in (False, True):
        out = tmp_path / f"async_{mode}"
        train(tmp_path, tiny, f"async_{mode}", 2, out, {}, train={"max_steps": 6},
              checkpoint={"save_interval": 3, "async_save": mode})
        for step in ("step_0000003", "step_0000006"):
            files = json.loads((out / "checkpoints" / step / "integrity.json").read_text())["files"]
            digests[mode, step] = {n: d for n, d in files.items() if n.endswith(".distcp")}
    for step in ("step_0000003", "step_0000006"):
        assert len(digests[True, step]) == 2 and digests[True, step] == digests[False, step], step
