"""Single-process (TP=1) checks of the log-prob head against ``log_softmax`` over the full vocabulary.

The reference is plain autograd in float64 through ``log_softmax(logits[..., :vocab_size])`` (of
``c * tanh(logits / c)`` with final logit soft-capping c): padded rows are simply not part of it, so any
probability they carry shows up as an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import (
    SOFTCAP,
    VOCAB,
    B,
    S,
    abs_err,
    check_fused_head_against_reference,
    make_inputs,
    reference_grads,
    reference_token_logps,
    rel_err,
    simpo_like_objective,
)

from simpo_mcore import logprobs
from simpo_mcore.logprobs import (
    TokenLogpsContext,
    fused_token_logps,
    sequence_logps,
    token_logps_output_processor,
    vocab_parallel_token_logps,
)
from simpo_mcore.microbatch import check_targets, labelled_positions
from simpo_mcore.parallel import ensure_process_group


@pytest.fixture(scope="module")
def tp_group():
    ensure_process_group()
    return dist.new_group([dist.get_rank()])


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("labelled_only", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 39, 1000])
def test_fused_values_and_grads_match_full_log_softmax(tp_group, chunk_tokens, recompute, labelled_only, softcap):
    check_fused_head_against_reference(tp_group, chunk_tokens, kernel="torch", recompute=recompute,
                                       labelled_only=labelled_only, softcap=softcap)


def test_softcap_changes_the_result(tp_group):
    """The capped reference is not the uncapped one at these logits: the soft-capping tests above compare
    something the cap decides (the head with the cap forgotten would fail them by this much)."""
    hidden, weight, labels = make_inputs()
    capped, grad_h, _ = reference_grads(hidden, weight, labels, SOFTCAP)
    plain, plain_grad_h, _ = reference_grads(hidden, weight, labels)
    assert abs_err(capped, plain) > 0.5
    assert rel_err(grad_h, plain_grad_h) > 0.1
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        fused_token_logps(hidden, weight, labels, VOCAB, tp_group, softcap=0.0)


def test_labelled_positions_by_hand():
    """Flat token order is sequence position major: token t of sequence i is row t * b + i."""
    labels = torch.tensor([[-100, 4, 5], [-100, -100, 9]])  # b = 2, s = 3
    assert labelled_positions(labels).tolist() == [2, 4, 5]  # (t=1, i=0), (t=2, i=0), (t=2, i=1)


def test_labelled_only_head_skips_the_rest_and_accepts_extra_positions(tp_group, monkeypatch):
    """Given the labelled positions the head's GEMMs see only those rows (22 of the 39 here); positions
    beyond them (a superset) change nothing; values and gradients equal the all-token head's."""
    hidden, weight, labels = make_inputs()
    rows_seen = []
    apply = logprobs._FusedTokenLogps.apply
    monkeypatch.setattr(logprobs._FusedTokenLogps, "apply", lambda h, *a: rows_seen.append(h.shape[0]) or apply(h, *a))
    index = labelled_positions(labels)
    superset = torch.unique(torch.cat([index, torch.tensor([0, 1, 38])]))
    out = {}
    for name, token_index in (("all", None), ("labelled", index), ("superset", superset)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        token_logps = fused_token_logps(h, w, labels, VOCAB, tp_group, chunk_tokens=7, token_index=token_index)
        simpo_like_objective(token_logps, labels).backward()
        out[name] = token_logps.detach(), h.grad, w.grad
    assert rows_seen == [S * B, int((labels != -100).sum()), len(superset)] == [39, 22, 25]
    for name in ("labelled", "superset"):
        assert abs_err(out[name][0], out["all"][0]) < 1e-6
        assert (out[name][0][labels == -100] == 0).all()
        assert rel_err(out[name][1], out["all"][1]) < 1e-6 and rel_err(out[name][2], out["all"][2]) < 1e-6
        assert (out[name][1].transpose(0, 1)[labels == -100] == 0).all()  # no gradient into unlabelled tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeping_the_logits_gives_the_same_values_and_close_gradients(tp_group, dtype):
    """``recompute=False`` runs the same forward (bit for bit) and replaces the backward's sliced,
    recomputed GEMMs by two GEMMs over the kept logits: only the GEMMs' accumulation order and, for
    ``grad_hidden``, one rounding instead of an fp32 sum of bf16 slices, differ."""
    hidden, weight, labels = make_inputs(dtype)
    out = {}
    for recompute in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        token_logps = fused_token_logps(h, w, labels, VOCAB, tp_group, chunk_tokens=7, kernel="torch",
                                        recompute=recompute)
        simpo_like_objective(token_logps, labels).backward()
        out[recompute] = token_logps.detach(), h.grad, w.grad
    assert torch.equal(out[True][0], out[False][0])
    tol = 1e-6 if dtype == torch.float32 else 2 * 2**-8  # bf16: two ulps of the gradient's largest entries
    assert rel_err(out[False][1], out[True][1]) < tol
    assert rel_err(out[False][2], out[True][2]) < tol
    assert (out[False][2][VOCAB:] == 0).all()


def test_kept_logits_allow_one_backward_only(tp_group):
    hidden, weight, labels = make_inputs()
    h = hidden.clone().requires_grad_()
    token_logps = fused_token_logps(h, weight, labels, VOCAB, tp_group, chunk_tokens=7, recompute=False)
    objective = simpo_like_objective(token_logps, labels)
    objective.backward(retain_graph=True)
    # The first backward turned the kept logits into gradients in place; autograd's version check sees it.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        objective.backward()


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 39, 1000])
def test_unfused_values_and_grads_match_and_logits_untouched(tp_group, chunk_tokens, softcap):
    hidden, weight, labels = make_inputs()
    logits = (hidden @ weight.t()).requires_grad_()  # [s, b, v_pad], fp32: megatron would overwrite it
    before = logits.detach().clone()
    ref_logits = logits.detach().double().requires_grad_()
    ref = reference_token_logps(ref_logits, labels, VOCAB, softcap)
    simpo_like_objective(ref, labels).backward()

    token_logps = vocab_parallel_token_logps(logits, labels, VOCAB, tp_group, chunk_tokens=chunk_tokens,
                                             softcap=softcap)
    assert torch.equal(logits.detach(), before), "the caller's logits were modified"
    assert token_logps.dtype == torch.float32 and token_logps.shape == (B, S)
    assert abs_err(token_logps, ref) < 1e-5
    assert (token_logps[labels == -100] == 0).all()
    simpo_like_objective(token_logps, labels).backward()
    assert rel_err(logits.grad, ref_logits.grad) < 1e-5
    assert (logits.grad[..., VOCAB:] == 0).all()
    assert torch.equal(logits.detach(), before), "backward modified the caller's logits"


def test_bf16_within_bf16_tolerance_of_fp32_reference(tp_group):
    """Logits are rounded to bf16 as the output layer would produce them: |z| ~ 3 here gives errors of
    a few 1e-2 at most; gradients are cast to bf16 (relative 2^-8) once per GEMM."""
    hidden, weight, labels = make_inputs()
    ref, ref_grad_h, ref_grad_w = reference_grads(hidden, weight, labels)
    h = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.to(torch.bfloat16).requires_grad_()
    fused = fused_token_logps(h, w, labels, VOCAB, tp_group, chunk_tokens=7)
    simpo_like_objective(fused, labels).backward()
    logits = (h.detach() @ w.detach().t()).requires_grad_()  # [s, b, v_pad] bf16
    unfused = vocab_parallel_token_logps(logits, labels, VOCAB, tp_group, chunk_tokens=7)
    assert fused.dtype == unfused.dtype == torch.float32
    assert abs_err(fused, ref) < 5e-2
    assert abs_err(unfused, ref) < 5e-2
    assert abs_err(fused, unfused) < 2e-2  # same bf16 logits up to GEMM accumulation order
    assert rel_err(h.grad, ref_grad_h) < 2e-2
    assert rel_err(w.grad, ref_grad_w) < 2e-2
    assert (w.grad[VOCAB:] == 0).all()


def test_frozen_weight_and_no_grad(tp_group):
    hidden, weight, labels = make_inputs()
    ref, ref_grad_h, _ = reference_grads(hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    token_logps = fused_token_logps(h, weight, labels, VOCAB, tp_group, chunk_tokens=5)
    simpo_like_objective(token_logps, labels).backward()
    assert rel_err(h.grad, ref_grad_h) < 1e-5
    with torch.no_grad():
        assert abs_err(fused_token_logps(hidden, weight, labels, VOCAB, tp_group, chunk_tokens=5), ref) < 1e-5


def test_labels_on_padded_rows_are_rejected(tp_group):
    hidden, weight, labels = make_inputs()
    labels[0, 6] = VOCAB  # a padded row: no real token has this id
    with pytest.raises(ValueError, match="labels must be"):
        fused_token_logps(hidden, weight, labels, VOCAB, tp_group)
    with pytest.raises(ValueError, match="labels must be"):
        vocab_parallel_token_logps(hidden @ weight.t(), labels, VOCAB, tp_group)


class _FakeOutputLayer:
    """What the output processor reads from megatron's ColumnParallelLinear."""

    def __init__(self, weight, tp_group):
        self.weight, self.tp_group, self.sequence_parallel, self.bias = weight, tp_group, False, None

    def __call__(self, hidden, weight=None, runtime_gather_output=None):
        assert runtime_gather_output is False  # vocab-parallel logits, never gathered
        return hidden @ (self.weight if weight is None else weight).t(), None


@pytest.mark.parametrize("chunk_tokens", [0, 7])
@pytest.mark.parametrize("tied", [False, True])
def test_output_processor_uses_the_right_weight(tp_group, chunk_tokens, tied):
    hidden, weight, labels = make_inputs()
    ref = reference_token_logps(hidden @ weight.t(), labels, VOCAB)
    # Tied: the layer's own weight is absent (megatron skips its allocation) or unused.
    layer = _FakeOutputLayer(torch.zeros_like(weight) if tied else weight, tp_group)
    token_logps = token_logps_output_processor(
        hidden_states=hidden, output_layer=layer, output_weight=weight if tied else None, labels=labels,
        context=TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=chunk_tokens), loss_mask=None)
    assert abs_err(token_logps, ref) < 1e-5


@pytest.mark.parametrize("chunk_tokens", [0, 7])
def test_output_processor_caps_as_the_model_config_says(tp_group, chunk_tokens):
    """The model's final soft-capping reaches the head from the config GPTModel passes, not from the caller."""
    from types import SimpleNamespace

    hidden, weight, labels = make_inputs()
    ref = reference_token_logps(hidden @ weight.t(), labels, VOCAB, SOFTCAP)
    token_logps = token_logps_output_processor(
        hidden_states=hidden, output_layer=_FakeOutputLayer(weight, tp_group), output_weight=None, labels=labels,
        context=TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=chunk_tokens),
        config=SimpleNamespace(final_logit_softcapping=SOFTCAP))
    assert abs_err(token_logps, ref) < 1e-5


def test_sequence_logps_by_hand():
    """Sequence 0: tokens -1.0 and -3.0 count (label -100 at t=0) -> sum -4, count 2, avg -2.
    Sequence 1: only t=2 counts -> sum -0.5, count 1, avg -0.5. The value under a -100 label (7.0) must
    not leak in even if a caller passes unmasked log-probs."""
    token_logps = torch.tensor([[7.0, -1.0, -3.0], [7.0, 7.0, -0.5]])
    labels = torch.tensor([[-100, 4, 5], [-100, -100, 9]])
    sum_logps, num_tokens, avg_logps = sequence_logps(token_logps, labels)
    assert sum_logps.tolist() == [-4.0, -0.5]
    assert num_tokens.tolist() == [2, 1]
    assert avg_logps.tolist() == [-2.0, -0.5]
    assert sum_logps.dtype == avg_logps.dtype == torch.float32


def test_sequence_logps_rejects_empty_sequences():
    labels = torch.tensor([[-100, 4], [-100, -100]])
    with pytest.raises(ValueError, match=r"sequences \[1\]"):
        sequence_logps(torch.zeros(2, 2), labels)


def test_collation_check_refuses_what_the_head_cannot_score():
    """The one check a micro-batch's targets get, on the host at collation: int64, every target -100 or a real
    id, and at least one per sequence."""
    check_targets(torch.tensor([[-100, 4], [3, -100]]), VOCAB)
    with pytest.raises(ValueError, match=rf"labels must be -100 or in \[0, {VOCAB}\); found \[{VOCAB}\]"):
        check_targets(torch.tensor([[-100, VOCAB], [3, -100]]), VOCAB)
    with pytest.raises(ValueError, match=r"sequences \[1\] have no token with a label"):
        check_targets(torch.tensor([[-100, 4], [-100, -100]]), VOCAB)
    with pytest.raises(TypeError, match="int64"):
        check_targets(torch.tensor([[1, 4]], dtype=torch.int32), VOCAB)


@pytest.mark.parametrize("chunk_tokens", [0, 7])
def test_head_skips_its_device_check_only_when_told(tp_group, monkeypatch, chunk_tokens):
    """``labels_checked`` (set by the objective for a collated micro-batch, whose targets were checked on the
    host) keeps the head from checking again, which on a GPU would be a device sync; by default it checks."""
    hidden, weight, labels = make_inputs()
    calls = []
    monkeypatch.setattr(logprobs, "check_label_values", lambda *args: calls.append(args))
    layer = _FakeOutputLayer(weight, tp_group)
    for checked in (False, True):
        token_logps_output_processor(
            hidden_states=hidden, output_layer=layer, output_weight=None, labels=labels,
            context=TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=chunk_tokens, labels_checked=checked))
        assert len(calls) == 1, checked  # one call from the unchecked run, none from the checked one
    monkeypatch.setattr(logprobs, "check_sequence_counts", lambda *args: calls.append(args))
    sequence_logps(torch.zeros(B, S), labels, check=False)
    assert len(calls) == 1
    sequence_logps(torch.zeros(B, S), labels)
    assert len(calls) == 2


def test_output_processor_passes_the_context_on(tp_group, monkeypatch):
    """Every per-run and per-call field of the context reaches the fused head."""
    hidden, weight, labels = make_inputs()
    seen = {}
    monkeypatch.setattr(logprobs, "fused_token_logps", lambda *a, **kw: seen.update(kw))
    index = labelled_positions(labels)
    context = TokenLogpsContext(vocab_size=VOCAB, chunk_tokens=7, kernel="torch", recompute=False,
                                labels_checked=True, token_index=index)
    token_logps_output_processor(hidden_states=hidden, output_layer=_FakeOutputLayer(weight, tp_group),
                                 output_weight=None, labels=labels, context=context)
    assert seen["chunk_tokens"] == 7 and seen["kernel"] == "torch" and seen["recompute"] is False
    assert seen["check"] is False and seen["token_index"] is index and seen["sequence_parallel"] is False
