"""The context-parallel code path at CP 1 leaves a model's results unchanged (one CPU process, SDPA spec, fp32).

At CP 1 the split still pads every segment of a packed row to an even length (``cp_multiple(1) == 2``), hands
the model the padded boundaries (``cu_seqlens_q_padded``: RoPE and attention split the row by them) and maps the
tokens back through the local ``sequence_index``; padded micro-batches go through ``split_rows`` and the CP
reduction of ``sequence_logps``. Against simpo_mcore's plain packed path (which the parity tests prove against
HF), with a sliding window of 4 shorter than every sequence: token log-probs within 1e-6, sums and averages
within 1e-6 relative, parameter gradients within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from helpers import pair_columns, random_pairs

from simpo_mcore.config import ParallelConfig
from simpo_mcore.data.context_parallel import cp_multiple, split_packed_row, split_packed_row_batch, split_padded_pairs
from simpo_mcore.data.packing import collate_packed_row
from simpo_mcore.data.padded import collate_pairs
from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.model.builder import ModelOptions, build_model
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.objective import batch_sequence_logps, sequence_token_logps, token_logps_forward
from simpo_mcore.parallel import distributed

VOCAB = 250
ARCH = ModelArch(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=256, tie_word_embeddings=False, model_type="mistral", sliding_window=4)
HEAD = TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=16)


def columns() -> dict[str, list]:
    # Odd lengths: padded at CP 1 too.
    return pair_columns(random_pairs(((5, 9, 4), (0, 12, 7), (8, 3, 15)), VOCAB, seed=4, low=3))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with distributed(ParallelConfig(device="cpu"), seed=0) as layout:
        assert (layout.cp, layout.cp_rank) == (1, 0)
        (chunk,) = build_model(ARCH, ModelOptions(spec="sdpa"))
        yield chunk


def run(model, batch):
    """(token_logps [2k, L], sum, avg) of a ready micro-batch through the objective's forward and reduction."""
    out = token_logps_forward(model, batch, HEAD)
    sum_logps, _, avg_logps = batch_sequence_logps(batch, out)
    return sequence_token_logps(batch, out), sum_logps, avg_logps


def objective_and_grads(model, result):
    _, sum_logps, avg_logps = result
    (torch.linspace(-1.0, 1.5, avg_logps.numel()) * avg_logps + 0.01 * sum_logps).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same(ref, got, ref_grads, got_grads):
    assert got[0].shape == ref[0].shape
    assert (got[0] - ref[0]).abs().max().item() <= 1e-6
    for r, g in zip(ref[1:], got[1:]):
        assert ((g - r).abs() <= 1e-6 * r.abs()).all(), (g - r)
    assert got_grads.keys() == ref_grads.keys() and len(ref_grads) == 2 * 6 + 3  # 2 layers x 6, embed, norm, out
    for name, r in ref_grads.items():
        assert ((got_grads[name] - r).norm() / r.norm()).item() <= 1e-5, name


def test_packed_rows_through_the_cp_path_at_cp1(model):
    batch = collate_packed_row(columns(), [0, 1, 2], 80, pad_id=0, vocab_size=VOCAB)  # 76 real positions, a tail
    ref = run(model, batch)
    ref_grads = objective_and_grads(model, ref)
    local = split_packed_row_batch(batch, split_packed_row(batch.cu_seqlens, 1, 0, cp_multiple(1)), pad_id=0)
    assert local.cu_seqlens_padded is not None and local.tokens_computed > batch.tokens_computed  # segments padded
    got = run(model, local)
    assert_same(ref, got, ref_grads, objective_and_grads(model, got))


def test_padded_rows_through_the_cp_path_at_cp1(model):
    batch = collate_pairs(columns(), [0, 1, 2], seq_len=24, pad_id=0, vocab_size=VOCAB)
    ref = run(model, batch)
    ref_grads = objective_and_grads(model, ref)
    got = run(model, split_padded_pairs(batch, 1, 0))
    assert_same(ref, got, ref_grads, objective_and_grads(model, got))
