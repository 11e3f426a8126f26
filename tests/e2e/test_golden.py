"""The golden trajectory: ``simpo-train`` against a training loop with the HF Trainer's semantics, written plainly
here on the HF model; and runs resumed with a changed config (longer, another lr, another beta).

The loop is what the SimPO reference runs (``transformers.Trainer``): ``torch.optim.AdamW`` with the Trainer's
parameter groups (no weight decay on norms and biases), ``get_cosine_schedule_with_warmup`` with
``TrainingArguments.get_warmup_steps`` warm-up steps, per micro-batch SimPO's loss (``-logsigmoid(beta x
(avg_c - avg_r - gamma_beta_ratio))``, mean over the micro-batch's pairs) divided by the accumulation steps and
backpropagated, ``clip_grad_norm_`` (whose pre-clip norm the Trainer logs), the lr of each update, and the loss
logged as the mean of the micro-batch losses. It reads the pairs simpo-train tokenised (the run's data cache) in the
order of simpo_mcore's sampler, which is written out here too: epoch e visits ``permutation(N)`` of numpy's
``default_rng([seed, e])``, step g takes pairs ``[g*G, (g+1)*G)`` of it, in micro-batches of k consecutive pairs.
The SFT term is off: the reference normalises it per micro-batch, simpo_mcore over the global batch (on purpose,
``objective.py``), so only there do the two definitions differ.

Extending a run is what the HF Trainer does when resumed with a longer run: the same AdamW state, a schedule
rebuilt for the new total and continued at the updates done. A changed lr (or beta) applies from the resumed step.

Launches (all fp32, 8 pairs a step in 4 micro-batches of 2, clipping at 1.0 active):
    TP 1: 4 steps (``train.epochs`` 0.125), then resumed with epochs 0.25 (8 steps)
    TP 2: 4 steps (``train.max_steps`` 4), resumed with max_steps 8 and loss.beta 4 (refused), then with
          max_steps 8, optim.lr 1e-3, loss.beta 4 and ``checkpoint.allow_changes: [loss.beta]``
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks
from train_utils import TINY_TRAIN, read_metrics, write_config

from simpo_mcore.config import ConfigError, load_config
from simpo_mcore.parallel import distributed
from simpo_mcore.resume import check_resume_config, check_resume_data
from simpo_mcore.train import Trainer

G, K = 8, 2
LR, WARMUP, WD, CLIP = 2.0e-3, 0.1, 0.01, 1.0
BETA, RATIO = 2.5, 0.5
TOLERANCE = 1e-5
SEED = TINY_TRAIN["train"]["seed"]


def hf_trajectory(hf_dir, pairs: list[dict], phases: list[dict]) -> list[dict]:
    """Per update ``{"loss", "grad_norm", "lr"}`` of the HF Trainer's loop over ``phases`` run in order, each
    ``{"total": steps of the run, "until": steps done at its end, "lr": ..., "beta": ...}``; a phase after the
    first is a resume: the same model and AdamW state, the schedule rebuilt for its total at the steps done."""
    from transformers import LlamaForCausalLM, TrainingArguments, get_cosine_schedule_with_warmup

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()  # dropout is 0 in these configs: nothing random
    # Trainer.get_decay_parameter_names: no weight decay on biases and norms.
    no_decay = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if not no_decay.search(n)], "weight_decay": WD},
         {"params": [p for n, p in named if no_decay.search(n)], "weight_decay": 0.0}],
        lr=phases[0]["lr"], betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = len(pairs) // G
    done, out = 0, []
    for phase in phases:
        for group in optimizer.param_groups:
            group["lr"] = phase["lr"]
            group.pop("initial_lr", None)
        warmup = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=WARMUP), phase["total"])
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, phase["total"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping the schedule without an update: the resumed position
            for _ in range(done):
                scheduler.step()
        while done < phase["until"]:
            epoch, g = divmod(done, steps_per_epoch)
            order = np.random.default_rng([SEED, epoch]).permutation(len(pairs))[g * G:(g + 1) * G].tolist()
            micro = [order[i:i + K] for i in range(0, G, K)]
            logged_loss = 0.0
            for indices in micro:
                loss = simpo_loss(model, [pairs[i] for i in indices], phase["beta"]) / len(micro)
                loss.backward()
                logged_loss += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            out.append({"loss": logged_loss, "grad_norm": grad_norm, "lr": lr})
            done += 1
    return out


def simpo_loss(model, pairs: list[dict], beta: float) -> torch.Tensor:
    """SimPO on one micro-batch, as the reference computes it: chosen rows then rejected rows, right-padded, one
    forward; the average log-prob of each response's tokens; the mean over pairs."""
    rows = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
    labels = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # position t predicts t + 1
    targets = lab[:, 1:]
    seen = targets != -100
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * seen
    avg = token_logps.sum(-1) / seen.sum(-1)
    k = len(pairs)
    return -F.logsigmoid(beta * ((avg[:k] - avg[k:]) - RATIO)).mean()


def assert_matches(run: dict[int, dict], hf: list[dict], steps, what: str) -> None:
    """Per step, loss, grad norm and lr within TOLERANCE relative; prints the largest deviations (``pytest -s``)."""
    worst = {key: max(abs(run[s][key] - hf[s - 1][key]) / max(abs(hf[s - 1][key]), 1e-30) for s in steps)
             for key in ("loss", "grad_norm", "lr")}
    print(f"{what}: largest relative deviation from the HF loop:", ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    for step in steps:
        for key in ("loss", "grad_norm", "lr"):
            ours, ref = run[step][key], hf[step - 1][key]
            assert abs(ours - ref) <= TOLERANCE * abs(ref) + 1e-12, f"{what} step {step} {key}: {ours} vs HF {ref}"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """The synthetic task's 256 training rows as a local JSONL file (a file, so that the test can change it)."""
    from simpo_mcore.data.synthetic import generate_rows

    path = tmp_path_factory.mktemp("golden_data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in generate_rows(256, "train", seed=0)))
    return path


def golden_config(tmp_path, tiny, data_file, name, out, **sections):
    sections = {key: {**base, **sections.get(key, {})} for key, base in (
        ("data", {"train_path": str(data_file)}),
        ("loss", {"sft_weight": 0.0}),
        ("optim", {"lr": LR, "warmup_ratio": WARMUP, "weight_decay": WD, "clip_grad": CLIP}),
        ("train", {}), ("parallel", {"device": "cpu"}), ("checkpoint", {}))}
    return write_config(tmp_path / f"{name}.yaml", *tiny, output_dir=str(out), **sections)


def build_refusal(cfg, match: str) -> None:
    """``Trainer.build`` (what simpo-train runs first) refuses ``cfg`` with a ConfigError matching ``match``."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with distributed(cfg.parallel, cfg.train.seed) as layout:
            with pytest.raises(ConfigError, match=match):
                Trainer.build(cfg, layout)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_golden_trajectory_and_changed_resumes(tmp_path, tiny, data_file):
    # TP 1: 4 steps, then extended by epochs to 8.
    tp1, tp2 = tmp_path / "tp1", tmp_path / "tp2"
    first = golden_config(tmp_path, tiny, data_file, "tp1_a", tp1, train={"max_steps": None, "epochs": 0.125})
    run_ranks("train_entry.py", 1, first)
    ckpt4 = tp1 / "checkpoints" / "step_0000004"
    assert load_config(ckpt4 / "run_config.yaml") == load_config(first)  # the saved config, readable and whole
    shutil.copytree(tp1 / "checkpoints", tp2 / "checkpoints")  # the TP 2 run resumes from the same step 4
    second = golden_config(tmp_path, tiny, data_file, "tp1_b", tp1, train={"max_steps": None, "epochs": 0.25})
    extended = run_ranks("train_entry.py", 1, second)
    ours1 = read_metrics(tp1)
    assert sorted(ours1) == list(range(1, 9))

    from simpo_mcore.data.pipeline import TokenizedSplit
    from simpo_mcore.data.preference import build_preference_dataset
    from simpo_mcore.data.synthetic import build_tokenizer

    dataset, _ = build_preference_dataset(load_config(first).data, build_tokenizer(), "train", tiny[1])  # cache hit
    pairs = dataset.to_list()
    hf_dir = tiny[0].parent / "hf"
    hf1 = hf_trajectory(hf_dir, pairs, [{"total": 4, "until": 4, "lr": LR, "beta": BETA},
                                        {"total": 8, "until": 8, "lr": LR, "beta": BETA}])
    # The HF schedule: ceil(0.1 x 4) = ceil(0.1 x 8) = 1 warm-up step, so each run's first update uses lr 0.
    assert hf1[0]["lr"] == 0.0 and hf1[4]["lr"] > 0.0 and hf1[1]["lr"] == LR
    assert sum(h["grad_norm"] > CLIP for h in hf1) >= 4  # clipping active
    assert_matches(ours1, hf1, range(1, 9), "TP1, 4 steps then extended to 8 by epochs")
    assert "4 -> 8 total steps, warm-up 1; update 5 uses lr" in extended.stdout + extended.stderr

    # TP 2 from the same step 4, max_steps 8: a new beta is refused, naming the field; allowed, it trains with the
    # new beta and a new lr, on the schedule of 8 steps.
    changed = {"parallel": {"device": "cpu", "tp": 2}, "train": {"max_steps": 8}, "loss": {"beta": 4.0}}
    refused = golden_config(tmp_path, tiny, data_file, "refused", tp2, train={"max_steps": 8}, loss={"beta": 4.0})
    build_refusal(load_config(refused),  # in this process: a world of one
                  re.escape("changes what is optimised: loss.beta: 2.5 -> 4.0 (") + ".*"
                  + re.escape("add checkpoint.allow_changes=[loss.beta]"))
    allowed = run_ranks("train_entry.py", 2, golden_config(
        tmp_path, tiny, data_file, "tp2_b", tp2, optim={"lr": 1e-3}, checkpoint={"allow_changes": ["loss.beta"]},
        **changed))
    log = allowed.stdout + allowed.stderr
    assert "optim.lr: 0.002 -> 0.001; 4 -> 8 total steps" in log and "allows: loss.beta: 2.5 -> 4.0" in log
    hf2 = hf_trajectory(hf_dir, pairs, [{"total": 4, "until": 4, "lr": LR, "beta": BETA},
                                        {"total": 8, "until": 8, "lr": 1e-3, "beta": 4.0}])
    ours2 = read_metrics(tp2)
    assert sorted(ours2) == [5, 6, 7, 8]
    assert_matches(ours2, hf2, range(5, 9), "TP2 from step 4, lr 1e-3 and beta 4 over 8 steps")

    # What else a resume refuses (the functions Trainer.build calls, on the real checkpoint).
    for overrides, message in [
            (["train.global_batch_pairs=16"], "train.global_batch_pairs: 8 -> 16"),
            (["loss.type=simpo_hinge", "train.seed=1"], "loss.type: 'simpo' -> 'simpo_hinge'; train.seed: 7 -> 1"),
            (["data.max_length=64"], "data.max_length: 48 -> 64"),
            (["train.global_batch_pairs=24", "checkpoint.allow_changes=[train]"], "must divide the 32 pairs")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_resume_config(load_config(second, overrides), ckpt4)
    ckpt8 = tp1 / "checkpoints" / "step_0000008"
    bigger = load_config(second, ["train.global_batch_pairs=16", "checkpoint.allow_changes=[train]"])
    assert check_resume_config(bigger, ckpt8) == [("train.global_batch_pairs", 8, 16),
                                                  ("checkpoint.allow_changes", [], ["train"])]
    same = load_config(second)
    check_resume_data(same, ckpt8, [], TokenizedSplit(dataset, None).content_fingerprint())  # the same pairs
    edited = TokenizedSplit(dataset.select([1, 0, *range(2, len(dataset))]), None).content_fingerprint()
    with pytest.raises(ConfigError, match="differ from those .* was trained on: 256 pairs"):
        check_resume_data(same, ckpt8, [], edited)
    check_resume_data(load_config(second, ["checkpoint.allow_changes=[data]"]), ckpt8, [], edited)

    # The wiring: simpo-train (Trainer.build) refuses the training file changed in place (two rows swapped).
    rows = data_file.read_text().splitlines()
    data_file.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")
    build_refusal(same, r"differ from those .*step_0000008 was trained on: 256 pairs")
