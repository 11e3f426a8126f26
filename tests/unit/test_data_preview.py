"""``simpo-data``: the preview's numbers against values computed here, its marked samples, its errors.

The data is the 300-row LLaMA-Factory layout of test_data_formats (6 rows call tools and are dropped),
tokenised with the Llama-3 template and a max_length that truncates some pairs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from test_data_formats import build_tokenizer, expected_chat, llama_factory_rows, write_rows

from simpo_mcore.cli import data_main
from simpo_mcore.config import DataConfig, ParallelConfig, RunConfig, TrainConfig
from simpo_mcore.data.padded import padded_micro_batches
from simpo_mcore.data.pipeline import BatchLayout, TokenizedSplit, TrainBatches
from simpo_mcore.data.preference import build_preference_dataset
from simpo_mcore.data.preview import BOLD, DIM, BatchShape, format_preview, marked_text, preview_split
from simpo_mcore.data.sampler import PairSampler

MAX_LENGTH, MAX_PROMPT = 160, 100
BATCH = BatchShape(micro_batch_pairs=2, global_batch_pairs=8, dp=2, pad_to_multiple_of=16, seed=3, same_shape=True)
"""Padded micro-batches as a pipeline-parallel run lays them out: each rank's step to its longest sequence."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    tok = build_tokenizer("llama3")
    rows, meant = llama_factory_rows()
    path = write_rows(rows, root / "dpo_en.json")
    cfg = DataConfig(train_path=str(path), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, num_proc=1)
    ds, report = build_preference_dataset(cfg, tok, "train", root / "cache")
    return root, tok, path, ds, report, [x for x in meant if x is not None]


def by_hand(values):
    """(median, nearest-rank p90, max), written out."""
    s, n = sorted(values), len(values)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return median, s[math.ceil(0.9 * n) - 1], s[-1]


def test_preview_numbers(data):
    _, tok, _, ds, report, meant = data
    preview = preview_split(ds, report, BATCH)
    assert preview.pairs == len(meant) == 294
    # Lengths before truncation, from the whole conversations through the chat template.
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    truncated = 0
    for prompt, chosen, rejected in meant:
        c_ids, c_labels = expected_chat(tok, prompt, chosen)
        r_ids, _ = expected_chat(tok, prompt, rejected)
        n_prompt = c_labels.count(-100)
        lengths["prompt"].append(n_prompt)
        lengths["chosen"].append(len(c_ids) - n_prompt)
        lengths["rejected"].append(len(r_ids) - n_prompt)
        truncated += max(len(c_ids), len(r_ids)) > MAX_LENGTH  # prompt + the longer response
    for name, values in lengths.items():
        stats = getattr(preview, name)
        assert (stats.median, stats.p90, stats.max) == by_hand(values), name
    assert 0 < preview.truncated == truncated < len(meant)

    # Padding efficiency: each rank's step padded to its longest sequence rounded up to 16, over
    # one epoch of global batches (numpy's permutation seeded by [seed, epoch]), both DP ranks.
    seq = [(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in ds]
    assert max(max(p) for p in seq) <= MAX_LENGTH
    perm = np.random.default_rng([BATCH.seed, 0]).permutation(len(ds))
    G, per_rank = BATCH.global_batch_pairs, BATCH.global_batch_pairs // BATCH.dp
    real = slots = 0
    for g in range(len(ds) // G):
        for rank in range(BATCH.dp):
            mine = perm[g * G + rank * per_rank:g * G + (rank + 1) * per_rank]
            lens = [n for i in mine for n in seq[i]]
            real += sum(lens)
            slots += len(lens) * math.ceil(max(lens) / 16) * 16
    assert preview.efficiency == pytest.approx(real / slots, abs=1e-12)
    # ... and it is what the training step's own collation allocates.
    allocated = 0
    for rank in range(BATCH.dp):
        sampler = PairSampler(len(ds), G, BATCH.micro_batch_pairs, rank, BATCH.dp, BATCH.seed)
        for step in range(sampler.steps_per_epoch):
            allocated += sum(b.tokens_computed for b in padded_micro_batches(ds, sampler.micro_batches(step), 0,
                                                                             len(tok)))
    assert allocated == slots and 0.5 < real / slots < 0.95

    text = format_preview(preview, ds, tok, samples=2, max_length=MAX_LENGTH)
    assert f"{100 * real / slots:.1f}% of the batch's tokens are real" in text
    assert "step-wide padding: each rank's micro-batches padded to its step's longest sequence" in text
    step_wide = real / slots

    # Packed rows (the default) and padding per micro-batch (without pipeline parallelism): what the
    # training step's own micro-batches hold and allocate over the epoch, on both ranks.
    split = TokenizedSplit(ds, report)
    train = TrainConfig(micro_batch_pairs=2, global_batch_pairs=8, seed=3)
    efficiency = {}
    for pack_tokens in (2 * MAX_LENGTH, None):
        shape = BatchShape(2, 8, 2, 16, seed=3, pack_tokens=pack_tokens)
        got = preview_split(ds, report, shape)
        real = allocated = 0
        for rank in range(BATCH.dp):
            batches = TrainBatches(train, split, BatchLayout(0, 16, pack_tokens, vocab_size=len(tok)), rank, BATCH.dp)
            for step in range(len(ds) // G):
                micro = batches.step_batches(step * G).micro_batches
                real += sum(b.tokens_real for b in micro)
                allocated += sum(b.tokens_computed for b in micro)
        assert got.efficiency == pytest.approx(real / allocated, abs=1e-12)
        efficiency[pack_tokens] = got
    assert step_wide < efficiency[None].efficiency < efficiency[2 * MAX_LENGTH].efficiency
    assert "packed rows of at most 320 positions: each step's 8 pairs in the fewest rows per rank that fit" in \
        format_preview(efficiency[2 * MAX_LENGTH], ds, tok, samples=0)
    assert "padding per micro-batch" in format_preview(efficiency[None], ds, tok, samples=0)
    assert f"truncated to data.max_length {MAX_LENGTH}: {truncated} of 294 pairs" in text
    assert "format: sharegpt (ShareGPT / LLaMA-Factory ranking)" in text
    assert "rows: 300 read, 294 kept; dropped 6 of 300 train rows" in text and "unsupported_role: 6" in text
    med, p90, mx = by_hand(lengths["prompt"])
    assert f"  prompt   {med:>9g}{p90:>8}{mx:>8}" in text


def test_marked_samples(data):
    _, tok, _, ds, report, _ = data
    index = ds["truncated"].index(False)  # a pair whose response keeps its EOS
    text = format_preview(preview_split(ds, report, BATCH), ds, tok, samples=index + 1)
    row = ds[index]
    ids, labels = row["chosen_input_ids"], row["chosen_labels"]
    n_prompt = labels.count(-100)
    prompt_text, response_text = tok.decode(ids[:n_prompt]), tok.decode(ids[n_prompt:])
    assert f"chosen: {len(ids)} tokens, {n_prompt} prompt, {len(ids) - n_prompt} trained" in text
    assert f"{prompt_text}[[{response_text}]]" in text
    assert response_text.startswith("<|start_header_id|>assistant") and response_text.endswith("<|end_of_text|>")
    colored = marked_text(tok, ids, labels, color=True)
    assert colored.startswith(DIM + prompt_text) and f"{BOLD}{response_text}" in colored
    assert f"--- sample {index + 1} (row {row['row_id']}; [[ ]]: trained on)" in text
    assert f"--- sample {index + 2}" not in text


def write_config(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_simpo_data_command(data, tmp_path, capsys):
    root, tok, path, _, _, _ = data
    tok.save_pretrained(tmp_path / "tok")
    cfg = write_config(tmp_path / "run.yaml", model={"tokenizer": str(tmp_path / "tok")},
                       data={"train_path": str(path), "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT,
                             "num_proc": 1},
                       train={"micro_batch_pairs": 2, "global_batch_pairs": 8, "seed": 3},
                       output_dir=str(tmp_path / "run"))
    assert data_main([cfg, "--samples", "1", "--dp", "2"]) == 0
    out = capsys.readouterr().out
    assert "format: sharegpt" in out and "--- sample 1" in out and "DP=2" in out and "[[" in out
    assert (tmp_path / "run" / "data_cache").is_dir()  # the run reads this entry instead of tokenising again

    # User errors: one line, exit 2.
    unknown = write_rows([{"question": "q", "good": "a", "bad": "b"}], tmp_path / "mine.jsonl")
    for argv, message in [
        ([cfg, f"data.train_path={unknown}"], "rows of an unknown layout, with columns question (text)"),
        ([cfg, "--samples", "0", "data.format=openai"], "data.format is 'openai' but it has no 'input' column"),
        ([cfg, "data.colums.prompt=x"], "unknown config key data.colums"),
        ([str(tmp_path / "missing.yaml")], "does not exist"),
        ([cfg, "model.tokenizer=null", "model.checkpoint=/nowhere"], "model.checkpoint /nowhere does not exist"),
    ]:
        assert data_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("simpo-data: error: ") and message in err and "\n" not in err, err


def test_simpo_data_warns_about_max_length_beyond_the_model(tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", model={"checkpoint": "tiny-random"},
                       data={"train_path": "synthetic", "synthetic_pairs": 24, "max_length": 300, "num_proc": 1,
                             "max_prompt_length": 40},
                       train={"micro_batch_pairs": 4, "global_batch_pairs": 8}, output_dir=str(tmp_path / "run"))
    assert data_main([cfg, "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == (
        "warning: data.max_length (300) exceeds the model's max_position_embeddings (256): positions past 256 are "
        "beyond what the model was trained on")
    assert "format: h4" in out and "rows: 24 read, 24 kept" in out and "3 steps in the epoch" in out
    assert data_main([cfg, "data.max_length=256", "--samples", "0"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_preview_counts_the_split_under_context_parallelism(data):
    """At ``parallel.cp`` 2 (DP 2), packed and padded: the efficiency counts the padding for the split as the
    training's collation allocates it (every sequence of a packed row to a multiple of 4, rows and padded lengths
    to 32), and the per-rank line gives what each CP rank computes per step, on average over the epoch."""
    _, tok, _, ds, report, _ = data
    split = TokenizedSplit(ds, report)
    train = TrainConfig(micro_batch_pairs=2, global_batch_pairs=8, seed=3)
    steps = len(ds) // 8
    for packing in (True, False):
        cfg = RunConfig(data=DataConfig(packing=packing, pack_tokens=2 * MAX_LENGTH), train=train,
                        parallel=ParallelConfig(cp=2))
        got = preview_split(ds, report, BatchShape.for_run(cfg, dp=2))
        real = allocated = local = 0
        for rank in range(2):
            layout = BatchLayout.for_run(cfg.data, 0, 1, False, 1, None, len(tok), cp=2, cp_rank=1)
            for step in range(steps):
                micro = TrainBatches(train, split, layout, rank, 2).step_batches(step * 8).micro_batches
                real += sum(b.tokens_real for b in micro)
                allocated += sum(b.tokens_computed for b in micro)
                local += sum(b.tokens.numel() for b in micro)
        assert got.efficiency == pytest.approx(real / allocated, abs=1e-12) and local * 2 == allocated
        longest = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in ds)
        text = format_preview(got, ds, tok, samples=0)
        multiple = 4 if packing else 32
        assert (f"context parallelism: parallel.cp 2: every sequence padded to a multiple of {multiple} and split over "
                f"2 ranks; each rank computes "
                f"{local / (steps * 2):.0f} positions per step on average ({real / (steps * 2 * 2):.0f} of them real "
                f"tokens), the longest sequence ({longest} tokens) ") in text, text
