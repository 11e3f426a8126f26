"""What ``simpo-data`` shows before a run: how the rows were read and rendered, what is trained on,
how long the pairs are, and how much of a step's batch is padding.

    print(run_preview(cfg.data, tokenizer, "train", cache_dir, BatchShape(8, 128, 1, 16)))

The numbers come from the tokenised split the run itself reads (the same cache entry, which the
preview builds when it is missing).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import datasets

from simpo_mcore.config import DataConfig, RunConfig
from simpo_mcore.data.collate import sequence_lengths
from simpo_mcore.data.formats import FORMATS
from simpo_mcore.data.packing import packed_padding
from simpo_mcore.data.padded import step_padding
from simpo_mcore.data.pipeline import BatchLayout
from simpo_mcore.data.preference import DataReport, build_preference_dataset
from simpo_mcore.data.sampler import PairSampler
from simpo_mcore.data.tokenize import LABEL_PAD

Layout = Callable[[list[list[tuple[int, int]]]], tuple[int, int]]
"""A step as :func:`epoch_steps` yields it (lists of (chosen, rejected) lengths) -> (real tokens, token slots)."""

DIM, BOLD, RESET = "\033[2m", "\033[1;32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"


@dataclass(frozen=True)
class BatchShape:
    """The per-rank batch of a run: what decides how its steps are padded (as ``pipeline.BatchLayout``)."""
    micro_batch_pairs: int
    global_batch_pairs: int
    dp: int
    pad_to_multiple_of: int
    seed: int = 42
    pack_tokens: int | None = None
    """Packed rows of at most this many positions (``data.pack_tokens``); ``None``: padded micro-batches."""
    same_shape: bool = False
    """The step's micro-batches share one length (pipeline parallelism), else each is as long as it needs."""
    rows_multiple: int = 1
    """Packed rows per rank per step: a multiple of this (PP under the interleaved schedule)."""
    cp: int = 1
    """Context-parallel ranks sharing every sequence (``parallel.cp``): each computes 1/cp of every micro-batch."""
    split_multiple: int = 1
    """Under context parallelism every packed sequence is padded to a multiple of this for the split."""

    @classmethod
    def for_run(cls, cfg: RunConfig, dp: int) -> BatchShape:
        """The batch of a run of ``cfg`` at data-parallel size ``dp``."""
        t, p = cfg.train, cfg.parallel
        layout = BatchLayout.for_run(cfg.data, 0, p.tp, p.sequence_parallel, p.pp, p.vpp, cp=p.cp)
        return cls(t.micro_batch_pairs, t.global_batch_pairs, dp, layout.multiple, t.seed, layout.pack_tokens,
                    layout.same_shape, layout.rows_multiple, layout.cp, layout.split_multiple)


@dataclass(frozen=True)
class LengthStats:
    median: float
    p90: int
    """Nearest rank: the smallest length that at least 90% of the values do not exceed."""
    max: int


@dataclass
class Preview:
    report: DataReport
    pairs: int
    prompt: LengthStats
    """Prompt tokens before truncation (BOS included); likewise the responses (EOS included)."""
    chosen: LengthStats
    rejected: LengthStats
    truncated: int
    """Pairs cut to ``data.max_length``."""
    efficiency: float | None
    """Real tokens / token slots over one epoch of steps, on all data-parallel ranks."""
    efficiency_note: str
    """How the efficiency was measured, or why it was not."""
    per_rank_note: str | None = None
    """Under context parallelism: the positions each rank computes after the split."""


def length_stats(values: list[int]) -> LengthStats:
    ordered = sorted(values)
    p90 = ordered[max(0, -(-9 * len(ordered) // 10) - 1)]  # nearest rank: ceil(0.9 n)-th value
    return LengthStats(statistics.median(ordered), p90, ordered[-1])


def epoch_steps(num_pairs: int, batch: BatchShape) -> Iterator[list[list[int]]]:
    """Every step of the first epoch (dataset indices): each rank's micro-batches, or packed (where the
    ranks' rows come from the whole global batch) the global batch as one list."""
    if batch.pack_tokens is not None:
        sampler = PairSampler(num_pairs, batch.global_batch_pairs, 1, 0, batch.dp, batch.seed)
        for step in range(sampler.steps_per_epoch):
            yield [sampler.global_batch(step)]
        return
    samplers = [PairSampler(num_pairs, batch.global_batch_pairs, batch.micro_batch_pairs, rank, batch.dp,
                            batch.seed) for rank in range(batch.dp)]
    for step in range(samplers[0].steps_per_epoch):
        for sampler in samplers:
            yield sampler.micro_batches(step)


def batch_layout(batch: BatchShape) -> Layout:
    """The layout a run of ``batch`` gives its steps: packed rows (:func:`packing.packed_padding`), or padded
    micro-batches (:func:`padded.step_padding`), as the training step collates them."""
    multiple = batch.pad_to_multiple_of
    if batch.pack_tokens is not None:
        return lambda step: packed_padding(step[0], batch.pack_tokens, batch.dp, multiple, batch.same_shape,
                                           batch.rows_multiple, batch.split_multiple)
    return lambda step: step_padding(step, multiple, same_shape=batch.same_shape)


def describe_layout(batch: BatchShape, steps: int) -> str:
    """How :func:`batch_layout` lays out ``steps`` steps, in words."""
    multiple, per_rank = batch.pad_to_multiple_of, batch.global_batch_pairs // batch.dp
    if batch.pack_tokens is not None:
        return (f"packed rows of at most {batch.pack_tokens} positions: each step's {batch.global_batch_pairs} "
                f"pairs in the fewest rows per rank that fit, "
                f"{'all of the longest row' if batch.same_shape else 'each'} rounded up to {multiple}; DP={batch.dp}, "
                f"{steps} steps in the epoch")
    how = ("step-wide padding: each rank's micro-batches padded to its step's longest sequence" if batch.same_shape
           else "padding per micro-batch: each padded to its longest sequence")
    return (f"{how}, rounded up to {multiple}; {per_rank} pairs per rank per step in micro-batches of "
            f"{batch.micro_batch_pairs}, DP={batch.dp}, {steps} steps in the epoch")


def batch_efficiency(lengths: list[tuple[int, int]], steps: Iterable[list[list[int]]],
                     layout: Layout) -> float:
    """The fraction of a batch layout's token slots that hold real tokens over ``steps``;
    ``layout`` lays out one step (:func:`batch_layout`; :func:`padded.step_padding` for one rank's padded
    micro-batches)."""
    real, slots = batch_totals(lengths, steps, layout)
    return real / slots


def batch_totals(lengths: list[tuple[int, int]], steps: Iterable[list[list[int]]], layout: Layout) -> tuple[int, int]:
    """``(real tokens, token slots)`` of a batch layout over ``steps`` (see :func:`batch_efficiency`)."""
    real = slots = 0
    for micro_batches in steps:
        step_real, step_slots = layout([[lengths[i] for i in micro] for micro in micro_batches])
        real, slots = real + step_real, slots + step_slots
    return real, slots


def per_rank_note(batch: BatchShape, steps: int, real: int, slots: int, longest: int) -> str:
    """What each context-parallel rank computes: its share of the epoch's positions per step and of the longest
    sequence (padded for the split), and its largest packed row."""
    share = steps * batch.dp * batch.cp  # rank-steps of the epoch
    split = batch.split_multiple if batch.pack_tokens is not None else batch.pad_to_multiple_of
    rows = f"; packed rows of at most {batch.pack_tokens // batch.cp} positions" if batch.pack_tokens else ""
    return (f"parallel.cp {batch.cp}: every sequence padded to a multiple of {split} and split over {batch.cp} "
            f"ranks; each rank computes "
            f"{slots / share:.0f} positions per step on average ({real / share:.0f} of them real tokens), the "
            f"longest sequence ({longest} tokens) {-(-longest // split) * split // batch.cp} positions{rows}")


def preview_split(dataset: datasets.Dataset, report: DataReport, batch: BatchShape) -> Preview:
    table = dataset.with_format("arrow")
    columns = {name: table[name].to_pylist() for name in ("prompt_length", "chosen_length", "rejected_length")}
    lengths = sequence_lengths(dataset)
    cp_note = None
    try:
        steps = list(epoch_steps(len(dataset), batch))
        real, slots = batch_totals(lengths, steps, batch_layout(batch))
        efficiency = real / slots
    except ValueError as exc:  # fewer pairs than a global batch, sizes that do not divide, a pair too long
        efficiency, note = None, f"not computed: {exc}"
    else:
        num_steps = len(steps) if batch.pack_tokens is not None else len(steps) // batch.dp
        note = describe_layout(batch, num_steps)
        if batch.cp > 1:
            cp_note = per_rank_note(batch, num_steps, real, slots, max(max(pair) for pair in lengths))
    return Preview(report, len(dataset), *(length_stats(columns[c]) for c in columns),
                   truncated=sum(table["truncated"].to_pylist()), efficiency=efficiency, efficiency_note=note,
                   per_rank_note=cp_note)


def marked_text(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """The sequence as text with its trained tokens (label set) marked: bold on a terminal
    (prompt dim), between ``[[`` and ``]]`` otherwise."""
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        trained = label != LABEL_PAD
        if spans and spans[-1][0] == trained:
            spans[-1][1].append(token)
        else:
            spans.append((trained, [token]))
    out = []
    for trained, tokens in spans:
        text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            out.append(f"{BOLD if trained else DIM}{text}{RESET}")
        else:
            out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(out)


def _stats_row(name: str, stats: LengthStats) -> str:
    return f"  {name:<9}{stats.median:>9g}{stats.p90:>8}{stats.max:>8}"


def format_preview(preview: Preview, dataset: datasets.Dataset, tokenizer, *, samples: int = 3,
                   color: bool = False, max_length: int | None = None) -> str:
    """The preview as text: formats, notes, drops, ``samples`` rendered pairs, lengths, padding."""
    report = preview.report
    lines = [f"{report.split} data: {report.source}"]
    lines += [f"format: {fmt} ({FORMATS[fmt].title}) <- {name}" for name, fmt in report.formats.items()]
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines.append(f"rows: {report.rows_in} read, {report.rows_kept} kept"
                 + (f"; {report.drop_summary()}" if report.bad_rows else ""))
    if report.identical:
        lines.append(f"warning: {report.identical_summary()}")
    marks = "bold: trained on, dim: not" if color else f"{OPEN} {CLOSE}: trained on"
    for index in range(min(samples, len(dataset))):
        row = dataset[index]
        lines.append(f"\n--- sample {index + 1} (row {row['row_id']}; {marks})")
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            prompt = sum(label == LABEL_PAD for label in labels)
            trained = sum(label != LABEL_PAD for label in labels[1:])  # position 0 is never predicted
            lines.append(f"{side}: {len(ids)} tokens, {prompt} prompt, {trained} trained")
            lines.append(marked_text(tokenizer, ids, labels, color))
    lines.append(f"\nlengths in tokens before truncation, {preview.pairs} pairs:")
    lines.append(f"  {'':<9}{'median':>9}{'p90':>8}{'max':>8}")
    lines += [_stats_row("prompt", preview.prompt), _stats_row("chosen", preview.chosen),
              _stats_row("rejected", preview.rejected)]
    limit = f" to data.max_length {max_length}" if max_length is not None else ""
    lines.append(f"truncated{limit}: {preview.truncated} of {preview.pairs} pairs")
    if preview.efficiency is None:
        lines.append(f"padding efficiency: {preview.efficiency_note}")
    else:
        lines.append(f"padding efficiency: {100 * preview.efficiency:.1f}% of the batch's tokens are real "
                     f"({preview.efficiency_note})")
    if preview.per_rank_note is not None:
        lines.append(f"context parallelism: {preview.per_rank_note}")
    return "\n".join(lines)


def run_preview(cfg: DataConfig, tokenizer, split: str, cache_dir, batch: BatchShape, *,
                samples: int = 3, color: bool = False, warnings: Iterable[str] = ()) -> str:
    """Build (or read from the cache) one split and describe it; ``warnings``: the caller's own
    (e.g. a ``max_length`` beyond the model's positions), printed last."""
    dataset, report = build_preference_dataset(cfg, tokenizer, split, cache_dir, announce=False)
    text = format_preview(preview_split(dataset, report, batch), dataset, tokenizer, samples=samples,
                          color=color, max_length=cfg.max_length)
    return "\n".join([text, *(f"warning: {w}" for w in warnings)])
