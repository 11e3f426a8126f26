"""A packed row through ``GPTModel`` (SDPA spec, fp32, one CPU process) against the same pairs padded.

The padded micro-batch (right padding, positions from 0, causal attention: what the parity tests prove against
HF) is the reference: packed, every sequence must get the same token log-probs, sums and averages (RoPE restarts
at every sequence, attention stays inside it, labels stop at its end) and the same parameter gradients. Changing
one sequence's tokens must leave every other sequence of the row bit for bit unchanged; run as one causal
sequence instead (no packed parameters), the sequences after the changed one do change, so the test can tell.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import pair_columns, random_pairs

from simpo_mcore.config import LossConfig, ParallelConfig
from simpo_mcore.data.packing import collate_packed_row
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.logprobs import TokenLogpsContext, sequence_logps, token_logps_output_processor, unpack_token_logps
from simpo_mcore.microbatch import LossScale
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.forward import position_ids_like
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.objective import REPORT_FIELDS, make_forward_step, sequence_token_logps, token_logps_forward
from simpo_mcore.parallel import distributed

VOCAB = 250
ARCH = ModelArch(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=256, tie_word_embeddings=False)
HEAD = TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=16)
CPU = torch.device("cpu")


def pairs(seed: int = 0) -> list[dict]:
    return random_pairs(((5, 9, 3), (0, 12, 7), (8, 2, 15), (3, 6, 6)), VOCAB, seed, low=3)  # one without a prompt


def padded(rows: list[dict], seq_len: int):
    return collate_pairs(pair_columns(rows), list(range(len(rows))), seq_len=seq_len, pad_id=0, vocab_size=VOCAB)


def packed(rows: list[dict], length: int):
    return collate_packed_row(pair_columns(rows), list(range(len(rows))), length, pad_id=0, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with distributed(ParallelConfig(device="cpu"), seed=0):
        (chunk,) = build_model(ARCH, ModelOptions(spec="sdpa"))
        yield chunk


def per_sequence(model, batch):
    """(token_logps [2k, L], sum_logps, avg_logps), chosen sequences first."""
    token_logps = sequence_token_logps(batch, token_logps_forward(model, batch, HEAD))
    sum_logps, _, avg_logps = sequence_logps(token_logps, batch.sequence_targets)
    return token_logps, sum_logps, avg_logps


def objective(avg_logps):
    weights = torch.linspace(-1.0, 1.5, avg_logps.numel())
    return (weights * avg_logps).sum()


def grads(model):
    out = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_packed_row_matches_padded_pairs(model):
    rows = pairs()
    ref_tokens, ref_sum, ref_avg = per_sequence(model, padded(rows, 32))
    objective(ref_avg).backward()
    ref_grads = grads(model)
    token_logps, sum_logps, avg_logps = per_sequence(model, packed(rows, 112))  # 97 real positions, then a tail
    objective(avg_logps).backward()
    got_grads = grads(model)
    width = token_logps.shape[1]
    assert (ref_tokens[:, width:] == 0).all()
    assert (token_logps - ref_tokens[:, :width]).abs().max().item() <= 1e-6
    assert ((sum_logps - ref_sum).abs() <= 1e-6 * ref_sum.abs()).all(), (sum_logps - ref_sum)
    assert ((avg_logps - ref_avg).abs() <= 1e-6 * ref_avg.abs()).all(), (avg_logps - ref_avg)
    assert got_grads.keys() == ref_grads.keys() and len(ref_grads) == 2 * 6 + 3  # 2 layers x 6, embed, norm, out
    for name, ref in ref_grads.items():
        rel = ((got_grads[name] - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, (name, rel)


@torch.no_grad()
def test_changing_one_sequence_leaves_the_others_unchanged(model):
    rows = pairs()
    changed = [dict(p) for p in rows]
    rng = random.Random(9)
    changed[1]["chosen_input_ids"] = [rng.randrange(3, VOCAB) for _ in rows[1]["chosen_input_ids"]]
    changed[1]["chosen_labels"] = list(changed[1]["chosen_input_ids"])  # no prompt: every token labelled
    before, after = packed(rows, 112), packed(changed, 112)
    # Row order c0 r0 c1 r1 ...: c1 (chosen of pair 1, sequence slot 1) sits third, with sequences after it.
    logps_before, *_ = per_sequence(model, before)
    logps_after, *_ = per_sequence(model, after)
    slot = 1
    assert not torch.equal(logps_before[slot], logps_after[slot])
    for other in range(8):
        if other != slot:
            assert torch.equal(logps_before[other], logps_after[other]), other

    # The same rows as one causal sequence (no packed parameters, positions 0..T-1): the change reaches the
    # later sequences.
    def one_sequence(batch):
        out = model(batch.tokens, position_ids_like(batch.tokens), None, labels=batch.targets,  # [1, T], as packed
                    output_processor=token_logps_output_processor, output_processor_context=HEAD)
        return unpack_token_logps(out, batch.sequence_index)  # [2k, L]

    plain_before, plain_after = one_sequence(before), one_sequence(after)
    later = [4 + 1, 2, 4 + 2, 3, 4 + 3]  # r1, c2, r2, c3, r3: after c1 in the row
    assert all(not torch.equal(plain_before[s], plain_after[s]) for s in later)
    assert torch.equal(plain_before[0], plain_after[0])  # c0 precedes the change


def test_a_row_without_pairs_contributes_nothing(model):
    """A row with no pair (the interleaved pipeline can need more rows than a step's pairs fill): all padding,
    one segment; its loss is 0 and every gradient it leaves is 0, so the step's loss is the other rows'."""
    empty = collate_packed_row({name: [] for name in pair_columns(pairs())}, [], 32, pad_id=0, vocab_size=VOCAB)
    assert empty.cu_seqlens.tolist() == [0, 32] and empty.tokens_real == 0 and empty.chosen_tokens == 0
    forward_step = make_forward_step(LossConfig(sft_weight=0.5), HEAD, CPU, LossScale(2, 1, 4, 10))
    output, loss_func = forward_step(iter([empty]), model)
    loss, out = loss_func(output)
    loss.backward()
    assert loss.item() == 0.0
    report = dict(zip(REPORT_FIELDS, out["report"].tolist()))
    assert (report["pairs"], report["tokens_real"], report["tokens_computed"]) == (0, 0, 32)
    left = grads(model)
    assert len(left) == 2 * 6 + 3 and all((g == 0).all() for g in left.values())  # the backward reached them all
