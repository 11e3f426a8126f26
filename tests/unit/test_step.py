"""``simpo_mcore.step.token_logps_forward``: the labels are checked once, on the host, before the batch
goes to the device, and the head is told so (its own check would be a device sync in mid-step)."""

from __future__ import annotations

import pytest
import torch

from simpo_mcore.logprobs import TokenLogpsContext
from simpo_mcore.step import token_logps_forward

HEAD = TokenLogpsContext(vocab_size=10, chunk_tokens=4)


class _RecordingModel:
    def __init__(self):
        self.calls = []

    def __call__(self, tokens, position_ids, attention_mask, labels, output_processor, output_processor_context):
        self.calls.append(dict(tokens=tokens, position_ids=position_ids, labels=labels,
                               context=output_processor_context))
        return torch.zeros(labels.shape)


def _batch(labels):
    labels = torch.tensor(labels)
    return {"tokens": labels.clamp(min=0), "labels": labels}


def test_checked_labels_reach_the_head_shifted():
    model = _RecordingModel()
    _, labels = token_logps_forward(model, _batch([[-100, 3, 4, 5], [-100, -100, 9, 1]]), HEAD, torch.device("cpu"))
    (call,) = model.calls
    assert call["context"].labels_checked and not HEAD.labels_checked  # a per-call copy; the shared one unchanged
    assert call["context"].vocab_size == 10 and call["context"].chunk_tokens == 4
    assert labels.tolist() == [[3, 4, 5, -100], [-100, 9, 1, -100]] and call["labels"] is labels
    assert call["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    # The labelled tokens in the head's flat order (position t of sequence i at t * 2 + i): the head skips the rest.
    assert call["context"].token_index.tolist() == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("labels, message", [
    ([[-100, 3, 10, 5], [-100, -100, 9, 1]], r"labels must be -100 or in \[0, 10\); found \[10\]"),
    # Only the first position is labelled, and it is no token's target once shifted.
    ([[-100, 3, 4, 5], [7, -100, -100, -100]], r"sequences \[1\] have no token with a label"),
])
def test_bad_labels_stop_the_step_before_the_model(labels, message):
    model = _RecordingModel()
    with pytest.raises(ValueError, match=message):
        token_logps_forward(model, _batch(labels), HEAD, torch.device("cpu"))
    assert model.calls == []
