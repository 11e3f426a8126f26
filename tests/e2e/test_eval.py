"""``simpo-eval`` on a converted tiny model: the metrics file is identical at TP=1, TP=2 and PP=2 x VPP=2,
and its numbers are those of the Hugging Face model on the same tokenised pairs.

The pairs come from a local jsonl in the UltraFeedback message schema (multi-turn, a system turn,
one over-long pair that gets truncated, one bad row that is dropped). The expected numbers are
recomputed here from ``LlamaForCausalLM`` (the ``hf/`` half of the tiny checkpoint), one unpadded
sequence at a time, with the reference's formulas::

    token_logps[t] = log_softmax(logits[t])[ids[t + 1]]        for labels[t + 1] != -100
    avg_logps      = sum(token_logps) / count                  (sum_logps for DPO)
    rewards        = beta * avg_logps                          (SimPO)
    loss           = mean(-logsigmoid(beta * (avg_c - avg_r - gamma_beta_ratio)))
                     + sft_weight * (sum of -token_logps over chosen responses) / (their count)
"""

from __future__ import annotations

import json
import math
import pickle
import shutil

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks
from train_utils import write_config

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def _msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def _row(i: int, prompt_turns: list[tuple[str, str]], chosen: str, rejected: str) -> dict:
    prompt = _msgs(*prompt_turns)
    return {"prompt": prompt_turns[-1][1], "prompt_id": f"p{i:02d}",
            "chosen": prompt + _msgs(("assistant", chosen)), "rejected": prompt + _msgs(("assistant", rejected)),
            "score_chosen": 8.0, "score_rejected": 3.0}


ROWS = [
    _row(0, [("user", "sort up 5120")], "0125", "5210"),
    _row(1, [("user", "sort down 93")], "93", "39"),
    _row(2, [("system", "be brief"), ("user", "sort up 771")], "177", "771"),
    _row(3, [("user", "hi"), ("assistant", "hello"), ("user", "sort up 42")], "24", "42"),
    _row(4, [("user", "sort down 8812")], "8821", "1288 and that is all"),
    # Over-long: the prompt keeps its last tokens and the rejected response is cut.
    _row(5, [("user", "sort up " + "9876543210" * 3)], "0123456789", "the digits unchanged " * 3),
    {"prompt": "bad", "prompt_id": "p06", "chosen": _msgs(("user", "no reply")),
     "rejected": _msgs(("user", "no reply"))},  # last turn not from the assistant: dropped
    _row(7, [("user", "sort up 60")], "06", "60"),
    _row(8, [("user", "sort down 314")], "431", "134"),
]
KEPT = 8  # micro-batches of 3 pairs: 3, 3, 2 (the smaller one is a schedule call of its own)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    data = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return data


@pytest.fixture(scope="module")
def model(tiny, prefs):
    """(converted checkpoint, its HF original, the jsonl): ``tiny`` is the session's converted model
    (tests/e2e/conftest.py), built by ``make_tiny`` as ``<root>/mcore`` beside ``<root>/hf``."""
    ckpt = tiny[0]
    return ckpt, ckpt.parent / "hf", prefs


def run_eval(tmp_path, model, name, nproc, parallel, **sections):
    ckpt, _, data = model
    out = tmp_path / name
    sections["data"] = {"train_path": None, "eval_path": str(data), "cache_dir": None, **sections.get("data", {})}
    cfg = write_config(tmp_path / f"{name}.yaml", ckpt, tmp_path, output_dir=str(out),
                       parallel={"device": "cpu", **parallel},
                       train={"micro_batch_pairs": 3, "global_batch_pairs": 3}, **sections)
    run_ranks("eval_entry.py", nproc, cfg)
    return json.loads((out / "eval_metrics.json").read_text()), out


def tokenised_pairs(out) -> datasets.Dataset:
    """The eval split as the run tokenised it: ``<output_dir>/data_cache`` (no data.cache_dir)."""
    entries = list((out / "data_cache").glob("eval-*"))
    assert len(entries) == 1, entries
    return datasets.load_from_disk(str(entries[0] / "dataset"))


@torch.no_grad()
def hf_sequence_logps(hf_dir, pairs: datasets.Dataset) -> dict[str, torch.Tensor]:
    """Per pair (float64): sum / count / avg of the response log-probs, chosen and rejected, and
    the chosen responses' summed NLL, from HF's model on each unpadded sequence."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir).float().eval()
    out = {k: [] for k in ("sum_c", "sum_r", "n_c", "n_r")}
    for row in pairs:
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row[f"{side}_input_ids"]])  # [1, s]
            labels = torch.tensor(row[f"{side}_labels"])[1:]  # [s - 1]: the target of logits[t]
            logps = F.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)  # [s - 1, v]
            mask = labels != -100
            token_logps = logps[mask].gather(-1, ids[0, 1:][mask].unsqueeze(-1)).squeeze(-1)
            out[f"sum_{side[0]}"].append(token_logps.sum())
            out[f"n_{side[0]}"].append(float(mask.sum()))
    res = {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
    res["avg_c"], res["avg_r"] = res["sum_c"] / res["n_c"], res["sum_r"] / res["n_r"]
    return res


def test_local_rows_tokenise_as_the_pipeline_says(prefs, tmp_path):
    """The cache holds the kept rows, in source order, tokenised by render_row + tokenize_pair
    (so the HF recomputation below scores exactly the reference's token ids)."""
    from simpo_mcore.config import DataConfig
    from simpo_mcore.data.preference import build_preference_dataset
    from simpo_mcore.data.render import render_row
    from simpo_mcore.data.synthetic import build_tokenizer
    from simpo_mcore.data.tokenize import tokenize_pair

    tok = build_tokenizer()
    cfg = DataConfig(eval_path=str(prefs), max_length=48, max_prompt_length=30, num_proc=1)
    pairs, report = build_preference_dataset(cfg, tok, "eval", tmp_path / "cache")
    assert (report.rows_in, report.rows_kept, report.dropped) == (9, KEPT, {"last_turn_not_assistant": 1})
    kept = [r for r in ROWS if r["prompt_id"] != "p06"]
    assert pairs["row_id"] == [r["prompt_id"] for r in kept]
    for row, got in zip(kept, pairs):
        want = tokenize_pair(tok, *render_row(row, tok), max_length=48, max_prompt_length=30)
        for col in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert got[col] == want[col], (row["prompt_id"], col)
    long = pairs[5]
    assert len(long["rejected_input_ids"]) == 48 and long["rejected_input_ids"][-1] != tok.eos_token_id


@pytest.mark.slow
def test_simpo_eval_same_at_tp1_tp2_vpp_and_equals_hf(tmp_path, model):
    beta, gbr, sft_w = 2.5, 0.5, 0.2
    loss = {"type": "simpo", "beta": beta, "gamma_beta_ratio": gbr, "sft_weight": sft_w}
    tp1, out1 = run_eval(tmp_path, model, "tp1", 1, {"tp": 1}, loss=loss)  # packed rows (the default)
    # Padded micro-batches of 3 pairs, each to its own longest sequence.
    tp2, out2 = run_eval(tmp_path, model, "tp2", 2, {"tp": 2}, loss=loss, data={"packing": False})
    # Interleaved pipeline: megatron needs a multiple of PP micro-batches per schedule call, so the
    # group holding the last (here: the only) packed row is padded with a copy whose report is dropped.
    vpp, _ = run_eval(tmp_path, model, "pp2vpp2", 2, {"pp": 2, "vpp": 2}, loss=loss)

    assert tp1["num_pairs"] == tp2["num_pairs"] == vpp["num_pairs"] == KEPT
    assert set(METRICS) | {"sft_loss"} <= set(tp1)
    assert set(tp1) == set(tp2) == set(vpp)
    for key in set(tp1) - {"tokens_computed"}:
        assert tp2[key] == pytest.approx(tp1[key], rel=1e-5, abs=1e-7), key
        assert vpp[key] == pytest.approx(tp1[key], rel=1e-5, abs=1e-7), key

    pairs = tokenised_pairs(out1)
    assert pairs["chosen_input_ids"] == tokenised_pairs(out2)["chosen_input_ids"]
    lengths = [len(ids) for side in ("chosen", "rejected") for ids in pairs[f"{side}_input_ids"]]
    assert tp1["tokens_real"] == sum(lengths)
    assert tp1["tokens_computed"] == -(-sum(lengths) // 16) * 16  # one row, rounded up to 16
    padded = 0  # micro-batches of 3, 3, 2 pairs, each [2k, S], S its longest sequence rounded up to 16
    for m in range(0, KEPT, 3):
        micro = [len(pairs[i][f"{side}_input_ids"]) for i in range(m, min(m + 3, KEPT))
                 for side in ("chosen", "rejected")]
        padded += len(micro) * -(-max(micro) // 16) * 16
    assert tp2["tokens_real"] == sum(lengths) and tp2["tokens_computed"] == padded
    hf = hf_sequence_logps(model[1], pairs)
    rc, rr = beta * hf["avg_c"], beta * hf["avg_r"]
    pref = -F.logsigmoid(beta * (hf["avg_c"] - hf["avg_r"] - gbr))
    sft = -hf["sum_c"].sum() / hf["n_c"].sum()
    want = {
        "logps/chosen": hf["avg_c"].mean(), "logps/rejected": hf["avg_r"].mean(),
        "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
        "rewards/accuracies": (rc > rr).double().mean(), "sft_loss": sft, "loss": pref.mean() + sft_w * sft,
        "response_tokens": hf["n_c"].sum() + hf["n_r"].sum(),
    }
    assert 0 < want["rewards/accuracies"] < 1  # a random model: neither all right nor all wrong
    for key, value in want.items():
        assert tp1[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_dpo_eval_against_itself_is_log2(tmp_path, model):
    """DPO with the evaluated checkpoint as its own reference: every logit is 0, so the loss is
    -logsigmoid(0) = log 2 and the rewards beta * (sum - ref_sum) are 0; logps/* are the summed
    log-probs (DPO's), which the stored reference file holds per pair. CP=2 x DP=2: each data-parallel replica
    scores half the pairs, each of its two context-parallel ranks half of every sequence (the reference pass and the
    evaluation both), the per-sequence sums reduced over them."""
    metrics, out = run_eval(tmp_path, model, "dpo", 4, {"cp": 2},
                            loss={"type": "dpo", "beta": 0.1, "gamma_beta_ratio": 0.0, "sft_weight": 0.0})
    assert metrics["num_pairs"] == KEPT
    assert set(METRICS) <= set(metrics) and "sft_loss" not in metrics
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-6), key

    hf = hf_sequence_logps(model[1], tokenised_pairs(out))
    assert metrics["logps/chosen"] == pytest.approx(float(hf["sum_c"].mean()), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(float(hf["sum_r"].mean()), rel=1e-5)
    ref = torch.from_numpy(np.load(out / "reference_logps" / "eval.npz")["logps"])
    torch.testing.assert_close(ref, torch.stack([hf["sum_c"], hf["sum_r"]], dim=1), rtol=1e-5, atol=1e-5)


class Payload:
    """Unpickling it creates ``marker`` (standing for any code a crafted checkpoint would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.slow  # builds a model in this process
def test_simpo_eval_of_a_crafted_checkpoint_runs_nothing(tmp_path, tiny, capsys):
    """A ``.metadata`` crafted to run code (with a matching integrity.json, as its author would write), which
    torch's reader would unpickle during an ordinary ``simpo-eval``: the run stops with one line naming the
    file and what it asked for, before megatron reads anything."""
    from simpo_mcore.cli import eval_main
    from simpo_mcore.convert.integrity import write_manifest

    crafted = tmp_path / "crafted"
    shutil.copytree(tiny[0], crafted)
    marker = tmp_path / "pwned"
    (crafted / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(crafted)
    cfg = write_config(tmp_path / "c.yaml", crafted, tmp_path / "cache", output_dir=str(tmp_path / "eval"),
                       data={"train_path": None, "eval_path": "synthetic"})
    capsys.readouterr()
    assert eval_main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"simpo-eval: error: {crafted}/.metadata: refusing to load: it names builtins.exec, which this kind of file "
        f"never holds and which could run code on load. The checkpoint was not written by simpo_mcore / megatron "
        f"as it is, or has been tampered with"]
    assert not marker.exists()
