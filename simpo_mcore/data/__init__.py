"""Preference data: rows -> rendered text -> token ids and labels -> packed rows or padded micro-batches.

- :mod:`formats`    the row layouts (H4, TRL, ShareGPT, OpenAI, plain strings): detection, prompt / responses
- :mod:`render`     a row -> prompt / chosen / rejected text (chat template, or plain text)
- :mod:`templates`  named chat templates, ``data.chat_template``, rendering within a time and size bound
- :mod:`tokenize`   text -> ids and labels, the reference's boundary / BOS / EOS / truncation rules
- :mod:`sources`    hub datasets, local parquet/jsonl/json, or the synthetic rows
- :mod:`cache`      the on-disk cache of tokenised datasets
- :mod:`preference` the entry point: :func:`build_preference_dataset`
- :mod:`sampler`    deterministic, resumable, DP-invariant order of pairs per step and rank
- :mod:`collate`    what both layouts share; a collated micro-batch leaves ready (``simpo_mcore.microbatch``)
- :mod:`padded`     pairs -> padded micro-batches ``[2k, S]``
- :mod:`packing`    pairs -> packed rows ``[1, T]`` of whole pairs (``data.packing``)
- :mod:`context_parallel` a micro-batch's positions kept by each context-parallel rank (megatron's split)
- :mod:`pipeline`   tokenised splits and each rank's micro-batches of a step (packed or padded)
- :mod:`synthetic`  the embedded character tokenizer and learnable preference rows
- :mod:`preview`    what ``simpo-data`` shows: rendered samples, lengths, padding efficiency
"""

from simpo_mcore.data.collate import pad_token_id
from simpo_mcore.data.padded import padded_micro_batches
from simpo_mcore.data.preference import BadRowError, DataReport, build_preference_dataset
from simpo_mcore.data.sampler import PairSampler, eval_micro_batches

__all__ = ["BadRowError", "DataReport", "PairSampler", "build_preference_dataset",
           "eval_micro_batches", "pad_token_id", "padded_micro_batches"]
