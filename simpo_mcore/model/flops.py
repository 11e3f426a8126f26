"""Training FLOPs of an architecture, and the dense bf16 peaks MFU divides them by.

The count the step records' MFU (:mod:`simpo_mcore.metrics_log`), the benchmarks and the planner
(:mod:`simpo_mcore.plan`) all use, kept free of torch so that planning a run on paper imports none.
"""

from __future__ import annotations

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 peak of the cards we run on (TFLOP/s), for MFU; matched against the device name."""


def model_flops_per_token(arch, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x (the non-embedding parameters a token passes through
    + output layer) + causal attention 6 x layers x hidden x seq (the score and value matmuls, half the square
    masked). The count docs/performance.md states and its targets were set with. A token passes through every
    weight of a dense MLP; of a mixture of experts' layer, through the router, its top-k experts and the shared
    expert (``mlp_params_per_token``): the active parameters. ``arch``: anything with
    :class:`~simpo_mcore.model.hf_config.ModelArch`'s size fields and ``mlp_params_per_token``."""
    h, n = arch.hidden_size, arch.num_layers
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    attention_and_norms = h * (q + 2 * kv) + q * h + 2 * h
    mlp = sum(arch.mlp_params_per_token(layer) for layer in range(n))
    params = n * attention_and_norms + mlp + h + arch.vocab_size * h  # + final norm + output layer
    return 6 * params + 6 * n * q * seq_len
