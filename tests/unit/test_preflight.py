"""The checks a launch makes before any rank starts: each refusal is one ``error:`` line from the command the user
ran, within seconds, before torch is imported and before any rank starts (no torchrun line, no rank's line), with
nothing written; one refusal names every flag it takes to go on; the first line comes before torch is imported.

The output_dirs here hold what the launcher reads of a run (``checkpoints/latest``, a checkpoint's
``simpo_mcore.json`` and ``run_config.yaml``, written by the package's own writers, and ``metrics.jsonl``): the
tensors are the ranks' business (``tests/e2e/test_launch.py`` refuses a relaunch of a real run)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from pathlib import Path

import pytest
from helpers import ROOT, CommandRun

from simpo_mcore import preflight
from simpo_mcore.checkpoint_info import FORMAT_VERSION, META_FILE, write_run_config
from simpo_mcore.config import ConfigError, load_config
from simpo_mcore.output_dir import OutputDirLock
from simpo_mcore.resume import find_resume_point, known_total_steps

CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
PREFLIGHT_LIMIT_S = 3.0
"""A refusal's time from the command's start (asked: under 3 s; measured 0.3-1.1 s on the shared 2-core machine at
a load average of 9)."""
NEW_RUN = ("to start a new run instead, use another output_dir=... or add checkpoint.resume=false "
           "checkpoint.overwrite=true (which deletes this run's checkpoints and metrics)")


def previous_run(out: Path, step: int = 100, *overrides: str) -> Path:
    """``out`` as a run of configs/tiny_cpu.yaml (``overrides``) that saved step ``step`` leaves it; returns the
    checkpoint."""
    cfg = load_config(CONFIG, [f"output_dir={out}", *overrides])
    ckpt = out / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    progress = {"step": step, "consumed_pairs": step * cfg.train.global_batch_pairs, "skipped_steps": 0,
                "nonfinite_in_a_row": 0, "consumed_tokens": 1000 * step, "consumed_real_tokens": 990 * step}
    info = {**progress, "progress": progress, "total_steps": cfg.train.max_steps,
            "train_data": {"pairs": cfg.data.synthetic_pairs, "sha256": "0" * 64}}
    (ckpt / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "train", "arch": {},
                                              "tokenizer": None, "info": info}))
    write_run_config(ckpt, dataclasses.asdict(cfg))
    (out / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                               for s in range(1, step + 1)))
    return ckpt


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


REFUSALS = {  # name: (overrides, the error after "simpo-train: error: ")
    "no step left": (["train.max_steps=100"],
                     "{ckpt} is at step 100 and train.max_steps is 100: no step is left to train. To train further, "
                     "set train.max_steps above 100; " + NEW_RUN),
    "fewer steps": (["train.max_steps=6"],
                    "{ckpt} is at step 100 and train.max_steps is 6: no step is left to train. To train further, set "
                    "train.max_steps above 100; " + NEW_RUN),
    # 2048 synthetic pairs, 16 a step: 128 steps an epoch
    "fewer epochs": (["train.max_steps=null", "train.epochs=0.5"],
                     "{ckpt} is at step 100 and train.epochs=0.5 makes 64 steps: no step is left to train. To train "
                     "further, set train.max_steps above 100 (or more train.epochs); " + NEW_RUN),
    "what is optimised": (["train.max_steps=200", "loss.beta=3"],
                          "resuming {ckpt} with a config that changes what is optimised: loss.beta: 2.5 -> 3.0 (the "
                          "checkpoint's config: {ckpt}/run_config.yaml). To continue with the new values, add "
                          "checkpoint.allow_changes=[loss.beta]; " + NEW_RUN),
    "a fresh run over it": (["checkpoint.resume=false"],
                            "output_dir {out} holds a previous run (checkpoints, metrics.jsonl) and checkpoint.resume "
                            "is false: a new run there would mix its checkpoints and metrics with the old ones. "
                            "Resume it (checkpoint.resume=true), choose another output_dir, or add "
                            "checkpoint.overwrite=true to delete them and start over"),
    "in use": (["train.max_steps=200"],
               "output_dir {out} is in use by another run (host {host}, pid {pid}, since {since}; lock file "
               "{out}/.simpo_mcore.lock): two runs there would resume and delete each other's checkpoints. Wait for it "
               "or stop it, or use another output_dir; if that process no longer exists (it ran on another "
               "machine), delete the lock file"),
    "no data": (["train.max_steps=200", "data.train_path=missing/train.jsonl"],
                f"data.train_path missing/train.jsonl does not exist (relative paths start at {ROOT})"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_the_launcher_refuses_before_any_rank_starts(tmp_path, case):
    """The CPU re-launch (``--nproc 2``) refuses before torch is imported: the error is the only line written (no
    first line, no torchrun line, no rank's line), exit 2, within PREFLIGHT_LIMIT_S, nothing in output_dir touched."""
    overrides, expected = REFUSALS[case]
    out = tmp_path / "run"
    ckpt = previous_run(out)
    lock = OutputDirLock(out)
    if case == "in use":
        lock.acquire()
    before = snapshot(out)
    try:
        run = CommandRun(["simpo-train", CONFIG, f"output_dir={out}", *overrides, "--nproc", "2"], timeout=120)
        holder = json.loads((out / ".simpo_mcore.lock").read_text()) if case == "in use" else {}
    finally:
        lock.release()
    expected = expected.format(ckpt=ckpt, out=out, host=socket.gethostname(), pid=os.getpid(),
                               since=holder.get("since"))
    assert (run.returncode, [line for _, line in run.lines]) == (2, [f"simpo-train: error: {expected}"]), run.text
    assert run.imported_before("torch") is None, run.imports[-5:]
    assert run.wall_s < PREFLIGHT_LIMIT_S, run.wall_s
    before.pop(".simpo_mcore.lock", None)  # the holder's, released since
    assert snapshot(out) == before


def test_simpo_eval_refuses_before_any_rank_starts(tmp_path):
    for overrides, error in ((["data.eval_path=null"], "data.eval_path is required for simpo-eval"),
                             (["data.eval_path=/nowhere/eval.jsonl"],
                              f"data.eval_path /nowhere/eval.jsonl does not exist (relative paths start at {ROOT})")):
        run = CommandRun(["simpo-eval", CONFIG, f"output_dir={tmp_path / 'eval'}", *overrides, "--nproc", "2"],
                         timeout=120)
        assert (run.returncode, [line for _, line in run.lines]) == (2, [f"simpo-eval: error: {error}"]), run.text
        assert run.imported_before("torch") is None and run.wall_s < PREFLIGHT_LIMIT_S, run.wall_s


def test_one_refusal_names_every_flag_it_takes(tmp_path):
    """Each way out a resume refusal names passes every check when followed as written (``checkpoint.resume=false``
    alone met a second refusal asking for ``checkpoint.overwrite``)."""
    out = tmp_path / "run"
    previous_run(out)
    base = [f"output_dir={out}", "train.max_steps=200"]
    for change in (["loss.beta=3"], ["train.max_steps=50"]):
        with pytest.raises(ConfigError) as refused:
            preflight.check_train(load_config(CONFIG, base + change))
        message = str(refused.value)
        ways = re.findall(r"add ((?:checkpoint\.[a-z_]+=[^\s;]+ ?)+)", message)
        assert ways and ways[-1].split() == ["checkpoint.resume=false", "checkpoint.overwrite=true"], message
        for way in ways:
            cfg = load_config(CONFIG, base + change + way.split())
            assert preflight.check_train(cfg).startswith(("a new run, deleting", "resuming step_0000100")), way
        assert "another output_dir=" in message
        assert preflight.check_train(load_config(CONFIG, [*base, *change, f"output_dir={tmp_path / 'new'}"])) \
            == "a new run"


def test_what_the_launcher_knows_of_the_run_length(tmp_path):
    """``train.max_steps``; else the epochs over the checkpoint's pairs, unless other pairs may come (a data setting
    changed and allowed, or ``checkpoint.allow_changes`` naming data): then only the ranks, which count them, know."""
    out = tmp_path / "run"
    ckpt = previous_run(out)
    cases = {("train.max_steps=300",): 300,
             ("train.max_steps=null", "train.epochs=2"): 256,
             ("train.max_steps=null", "train.epochs=2", "checkpoint.allow_changes=[data]"): None,
             ("train.max_steps=null", "train.epochs=2", "data.synthetic_pairs=4096",
              "checkpoint.allow_changes=[data.synthetic_pairs]"): None}
    for overrides, total in cases.items():
        cfg = load_config(CONFIG, [f"output_dir={out}", *overrides])
        _, changes = find_resume_point(cfg)
        assert known_total_steps(cfg, ckpt, changes) == total, overrides
    cfg = load_config(CONFIG, [f"output_dir={out}", "train.max_steps=null", "train.epochs=2"])
    assert preflight.check_train(cfg) == "resuming step_0000100 at step 100 of 256"
    cfg = load_config(CONFIG, [f"output_dir={out}", "train.max_steps=null", "train.epochs=0.5",
                               "checkpoint.allow_changes=[data]"])
    assert preflight.check_train(cfg) == "resuming step_0000100"  # the ranks refuse it (tests/e2e/test_launch.py)


def test_the_first_line_comes_before_torch(tmp_path):
    """Within 3 s of the command's start, before torch is imported: what is starting, on how many ranks, where."""
    out = tmp_path / "run"
    run = CommandRun(["simpo-train", CONFIG, f"output_dir={out}"], timeout=120, until="[simpo_mcore] launching")
    (first_s, first), *_ = run.lines
    assert first == (f"[simpo_mcore] simpo-train {CONFIG}: 2 CPU ranks (TP 2), output {out}, a new run; "
                     "importing torch"), run.text
    assert run.imported_before("torch") >= 1, run.imports[:3]  # torch came after the first line
    assert first_s < PREFLIGHT_LIMIT_S, first_s
    previous_run(out)
    run = CommandRun(["simpo-train", CONFIG, f"output_dir={out}", "train.max_steps=300", "--nproc", "4"],
                     timeout=120, until="[simpo_mcore] launching")
    assert run.lines[0][1] == (f"[simpo_mcore] simpo-train {CONFIG}: 4 CPU ranks (TP 2, DP 2), output {out}, "
                               "resuming step_0000100 at step 100 of 300; importing torch"), run.text
    cp_out = tmp_path / "cp"  # the context-parallel ranks share each sequence: TP x CP ranks, no DP
    run = CommandRun(["simpo-train", CONFIG, f"output_dir={cp_out}", "parallel.cp=2"], timeout=120,
                     until="[simpo_mcore] launching")
    assert run.lines[0][1] == (f"[simpo_mcore] simpo-train {CONFIG}: 4 CPU ranks (TP 2, CP 2), output {cp_out}, "
                               "a new run; importing torch"), run.text


def test_a_latest_that_names_no_training_checkpoint_is_one_error(tmp_path):
    out = tmp_path / "run"
    ckpt = previous_run(out)
    meta = json.loads((ckpt / META_FILE).read_text())
    (ckpt / META_FILE).write_text(json.dumps({**meta, "kind": "converted", "info": {"source": "hf"}}))
    with pytest.raises(ValueError, match=rf"^{ckpt} records no training progress: it is not a training checkpoint"):
        preflight.check_train(load_config(CONFIG, [f"output_dir={out}", "train.max_steps=200"]))
