"""Preference rows -> a cached, tokenised ``datasets.Dataset`` of chosen/rejected ids and labels.

    dataset, report = build_preference_dataset(cfg.data, tokenizer, "train", f"{output_dir}/data_cache")

Columns: ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (int32
lists; labels are -100 on the prompt, not shifted) and ``row_id`` (the row's ``prompt_id``, else its
index in the source split), and the lengths before truncation ``prompt_length``, ``chosen_length``,
``rejected_length`` with ``truncated`` (for the preview). Each file's format is detected (or checked
against ``data.format``) from its columns (:mod:`formats`); rows are rendered (:mod:`render`) and
tokenised (:mod:`tokenize`) once with ``datasets.map`` and cached on disk (:mod:`cache`). Rows that
cannot form a valid pair are dropped with one warning that counts them by reason, or raise under
``data.on_bad_row: error``; a file of an unknown layout is refused once, naming its columns.

Every rank may call this; the first to finish publishes the cache entry and the others' copies are
discarded. Callers that want one build should call it on rank 0 first, then barrier, then elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import datasets
import pyarrow

from simpo_mcore.config import DataConfig
from simpo_mcore.config.paths import SYNTHETIC, check_local_path
from simpo_mcore.console import Progress
from simpo_mcore.data import cache, sources
from simpo_mcore.data.formats import (
    FORMATS,
    OVERSIZE_COLUMN,
    ROW_TOO_LARGE,
    check_row_size,
    column_kinds,
    map_columns,
    resolve_format,
)
from simpo_mcore.data.render import (
    ALONE_REFUSED,
    IN_CONVERSATION_HINT,
    RenderOptions,
    describe_response_prefix,
    needs_template,
    no_template_error,
    render_row,
    takes_system_turn,
    template_response_prefix,
)
from simpo_mcore.data.templates import read_chat_template, template_label
from simpo_mcore.data.tokenize import BadRow, tokenize_pair

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
LENGTH_COLUMNS = ("prompt_length", "chosen_length", "rejected_length")
"""Token counts before truncation (BOS / EOS included), with the boolean column ``truncated``."""
ROWS_PER_PROCESS = 1000
"""With ``data.num_proc: null``, tokenise with one process per this many rows (at most 8)."""
PROGRESS_STEPS = 20
"""Tokenisation runs in about this many pieces, each reported to the progress bar or line when done."""
REPORTED_BAD_ROWS = 5
"""How many bad rows the warning (and the report) name."""


class BadRowError(ValueError):
    """A bad row under ``data.on_bad_row: error``."""


@dataclass
class DataReport:
    source: str
    """The configured path (``synthetic``, a hub name, or local files)."""
    split: str
    """``train`` or ``eval``."""
    rows_in: int
    """Rows read (after ``max_pairs`` / ``max_eval_pairs``)."""
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    """Dropped rows by reason (see :mod:`tokenize`, :mod:`formats` and :mod:`render` for the reasons)."""
    first_dropped: list[dict] = field(default_factory=list)
    """The first few dropped rows: ``row_id``, ``index``, ``reason``, ``detail``."""
    formats: dict[str, str] = field(default_factory=dict)
    """Each file (hub split, ``synthetic``) -> its format (:data:`formats.FORMATS`)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the rows are rendered (logged once per split)."""
    warnings: list[str] = field(default_factory=list)
    """The same, where the rendering may not be what they want (a template's default system prompt)."""
    identical: int = 0
    """Valid pairs whose chosen and rejected responses tokenise the same (after truncation)."""
    identical_dropped: bool = False
    """Whether they were removed (``data.identical_pairs: drop``) rather than kept."""
    hint: str = ""
    """The setting that would keep dropped rows, when one would (``data.response_rendering``)."""
    cache_path: str = ""
    cache_hit: bool = False

    TRANSIENT = ("cache_path", "cache_hit")
    """Not stored in ``report.json``: where the entry is, and whether this call found it."""

    def to_dict(self) -> dict:
        """What ``report.json`` holds."""
        return {k: v for k, v in asdict(self).items() if k not in self.TRANSIENT}

    @classmethod
    def from_dict(cls, stored, **transient) -> DataReport:
        """A report from ``report.json``; ValueError when it is not one (a damaged or foreign file)."""
        kinds = {f.name: f.type.split("[")[0] for f in fields(cls) if f.name not in cls.TRANSIENT}
        if not isinstance(stored, dict) or set(stored) != set(kinds):
            keys = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
            raise ValueError(f"report.json holds {keys}, not the fields of a data report")
        types = {"str": str, "int": int, "bool": bool, "dict": dict, "list": list}
        wrong = [name for name, kind in kinds.items() if not isinstance(stored[name], types[kind])]
        if wrong:
            raise ValueError(f"report.json has a {wrong[0]} of type {type(stored[wrong[0]]).__name__}")
        return cls(**stored, **transient)

    @property
    def bad_rows(self) -> int:
        return sum(self.dropped.values())

    def drop_summary(self) -> str:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items()))
        named = "; ".join(f"{r['row_id']} ({r['reason']}: {r['detail']})" for r in self.first_dropped)
        hint = f". {self.hint}" if self.hint else ""
        return (f"dropped {self.bad_rows} of {self.rows_in} {self.split} rows from "
                f"{self.source} ({counts}); first: {named}{hint}")

    def identical_summary(self) -> str:
        what = ("removed (data.identical_pairs: drop)" if self.identical_dropped else
                "kept, as the reference does (data.identical_pairs: drop removes them)")
        return (f"{self.identical} of {self.rows_in - self.bad_rows} pairs from {self.source} have identical chosen "
                f"and rejected responses: they carry no preference (no gradient from their loss term; they "
                f"count in the batch mean and as misses in reward accuracy); {what}")

    def format_summary(self) -> str:
        by_format: dict[str, list[str]] = {}
        for name, fmt in self.formats.items():
            by_format.setdefault(fmt, []).append(name)
        return "; ".join(f"{fmt} ({FORMATS[fmt].title}): {', '.join(names)}" for fmt, names in by_format.items())


def build_preference_dataset(cfg: DataConfig, tokenizer, split: Literal["train", "eval"],
                             cache_dir: str | Path, *, announce: bool = True) -> tuple[datasets.Dataset, DataReport]:
    """Load, render, tokenise and cache one split; ``cache_dir`` is used when ``cfg.cache_dir`` is
    unset. Returns the tokenised dataset (kept rows, source order) and its :class:`DataReport`.
    ``announce``: log the formats, notes and drops (one rank of a job does)."""
    path, hub_split, limit = _split_source(cfg, split)
    cache_dir = Path(cfg.cache_dir or cache_dir)
    settings = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                    truncation_mode=cfg.truncation_mode)
    rendering = dict(format=cfg.format, columns=cfg.columns, chat_template=read_chat_template(cfg.chat_template),
                     plain_strings=cfg.plain_strings, response_rendering=cfg.response_rendering)

    parts, files = None, None
    if path == SYNTHETIC:
        num = cfg.synthetic_pairs if split == "train" else sources.SYNTHETIC_EVAL_PAIRS
        rows, fingerprint = sources.load_synthetic(split, num)
        parts = [sources.RowSource(SYNTHETIC, rows)]
    elif (files := sources.local_files(path)) is not None:
        fingerprint = sources.local_fingerprint(files)
    else:
        check_local_path(path, f"data.{split}_path")
        rows, fingerprint = sources.load_hub(path, hub_split, f"data.{split}_path")
        parts = [sources.RowSource(f"{path} ({hub_split})", rows)]
    key = cache.cache_key(source=fingerprint, tokenizer=cache.tokenizer_fingerprint(tokenizer),
                          limit=limit, rendering=rendering, identical_pairs=cfg.identical_pairs, **settings)
    entry = cache.entry_dir(cache_dir, split, key)
    found = _read_entry(entry) if cache.is_complete(entry) else None
    if found is None:
        cache.check_writable(cache_dir, f"data.cache_dir {cache_dir}" if cfg.cache_dir else
                             f"the data cache {cache_dir} (in output_dir; data.cache_dir moves it)")
        with _datasets_bars_off():
            if parts is None:
                parts = [sources.load_local(f, cache_dir / "raw") for f in files]
            parts = _first_rows(parts, limit)
            if not parts:
                raise ValueError(f"data.{split}_path {path}: no rows")
            if announce:  # the slow part of a first run: say so before it starts
                logger.info("%s data from %s: tokenising %d rows", split, path, sum(len(p.rows) for p in parts))
            _build_entry(parts, tokenizer, settings, rendering, cfg.num_proc, cache_dir, key, entry,
                         source=path, split=split, drop_identical=cfg.identical_pairs == "drop",
                         label=template_label(cfg.chat_template, tokenizer))
        if (built := _read_entry(entry)) is None:
            raise ValueError(f"the data cache entry {entry} cannot be read back after it was written")
    dataset, report = found or built
    report.cache_hit = found is not None
    _announce(report, path, cfg.on_bad_row, announce)
    return dataset, report


def _split_source(cfg: DataConfig, split: str) -> tuple[str, str, int | None]:
    """(path, hub split, row limit) of ``split`` (the lengths are checked where the config loads)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path, hub_split, limit = ((cfg.train_path, cfg.train_split, cfg.max_pairs) if split == "train"
                              else (cfg.eval_path, cfg.eval_split, cfg.max_eval_pairs))
    if path is None:
        raise ValueError(f"data.{split}_path is not set")
    return path, hub_split, limit


def _read_entry(entry: Path) -> tuple[datasets.Dataset | None, DataReport] | None:
    """A complete cache entry's dataset and report; ``None`` (and the entry removed, to be built again) when
    either cannot be read or they disagree. An entry of no pairs has no dataset (datasets cannot read back an
    empty one; its report says why there is none)."""
    try:
        report = DataReport.from_dict(cache.read_report(entry), cache_path=str(entry))
        dataset = datasets.load_from_disk(str(entry / "dataset")) if report.rows_kept else None
        if dataset is not None and len(dataset) != report.rows_kept:
            raise ValueError(f"it holds {len(dataset)} pairs, its report.json {report.rows_kept}")
    except (ValueError, TypeError, KeyError, OSError, datasets.exceptions.DatasetsError,
            pyarrow.ArrowException) as exc:
        logger.warning("the data cache entry %s is damaged (%s: %s); building it again", entry,
                       type(exc).__name__, exc)
        cache.discard(entry)
        return None
    return dataset, report


def _announce(report: DataReport, path: str, on_bad_row: str, announce: bool) -> None:
    """Log what the user should know of a split (``announce``) and refuse its drops as ``on_bad_row`` says."""
    split = report.split
    if announce:
        logger.info("%s data from %s: %s", split, path, report.format_summary())
        for note in report.notes:
            logger.info("%s data: %s", split, note)
        for warning in report.warnings:
            logger.warning("%s data: %s", split, warning)
        if report.identical:
            logger.warning("%s data: %s", split, report.identical_summary())
    _check_drops(report, on_bad_row, announce)
    if announce:
        logger.info("%s data from %s: %d of %d rows kept (%s %s)", split, path, report.rows_kept,
                    report.rows_in, "cache hit" if report.cache_hit else "tokenised into", report.cache_path)


def _first_rows(parts: list[sources.RowSource], limit: int | None) -> list[sources.RowSource]:
    """The first ``limit`` rows over the files in order; files left with no rows are skipped."""
    out = []
    for part in parts:
        rows = part.rows
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
            limit -= len(rows)
        if len(rows):
            out.append(dataclasses.replace(part, rows=rows))
    return out


def _check_drops(report: DataReport, on_bad_row: str, announce: bool = True) -> None:
    if report.rows_kept == 0:
        why = report.identical_summary() if report.identical_dropped and report.identical else report.drop_summary()
        raise ValueError(f"no valid preference pairs in {report.source} ({report.split}): {why}")
    if report.bad_rows == 0:
        return
    if on_bad_row == "error":
        first = report.first_dropped[0]
        raise BadRowError(f"data.on_bad_row is 'error' and row {first['row_id']} (index "
                          f"{first['index']}) of {report.source} is bad: {first['reason']}: "
                          f"{first['detail']}. In all, {report.drop_summary()}")
    if announce:
        logger.warning(report.drop_summary())


def _plan(parts: list[sources.RowSource], tokenizer, rendering: dict, label: str) -> tuple[list, dict, list, list]:
    """Each file's rows with its columns mapped, its render options and whether its values are JSON text; the
    formats, notes and warnings."""
    mapped, formats, notes, warnings = [], {}, [], []
    template = rendering["chat_template"] or tokenizer.chat_template
    for part in parts:
        rows = map_columns(part.rows, rendering["columns"], part.name)
        kinds = column_kinds(rows, json_text=part.json_text)
        fmt = formats[part.name] = resolve_format(rendering["format"], kinds, part.name)
        if needs_template(fmt, rendering["plain_strings"]) and template is None:
            raise no_template_error(tokenizer, f"{part.name}: {fmt} rows")
        mapped.append((rows, fmt, part.json_text))
    raw = [name for name, fmt in formats.items() if not FORMATS[fmt].messages]
    if raw and rendering["plain_strings"] == "raw":
        notes.append(f"plain-string rows ({', '.join(raw)}) are used as raw text, without a chat template (as "
                     f"the reference and TRL do); data.plain_strings: chat renders each as one user turn and "
                     f"one assistant turn with the chat template")
    chat = any(needs_template(fmt, rendering["plain_strings"]) for fmt in formats.values())
    system_turn = takes_system_turn(tokenizer, template, label) if chat else None
    if chat and rendering["response_rendering"] == "alone":
        found = template_response_prefix(tokenizer, template, label, system_turn)
        if found is not None:
            warnings.append(describe_response_prefix(*found))
    planned = [(rows, RenderOptions(fmt, rendering["chat_template"], rendering["plain_strings"],
                                    rendering["response_rendering"], label, system_turn), json_text)
               for rows, fmt, json_text in mapped]
    return planned, formats, notes, warnings


def _build_entry(parts: list[sources.RowSource], tokenizer, settings: dict, rendering: dict,
                 num_proc: int | None, cache_dir: Path, key: str, entry: Path, *, source: str,
                 split: str, drop_identical: bool = False, label: str = "the chat template") -> None:
    planned, formats, notes, warnings = _plan(parts, tokenizer, rendering, label)
    tmp = cache.new_tmp_dir(cache_dir, key)
    try:
        (tmp / "work").mkdir()
        mapped = _tokenize(planned, tokenizer, settings, num_proc, tmp / "work", key, split)
        reasons = list(mapped["drop_reason"])
        identical = list(mapped["identical"])
        bad = [i for i, reason in enumerate(reasons) if reason]
        first_bad = mapped.select(bad[:REPORTED_BAD_ROWS])
        alone_refused = any(d.startswith(ALONE_REFUSED) for d in mapped.select(bad)["drop_detail"])
        keep = [i for i, reason in enumerate(reasons) if not reason and not (drop_identical and identical[i])]
        report = DataReport(
            source=source, split=split, rows_in=len(mapped), rows_kept=len(keep),
            dropped=dict(Counter(reasons[i] for i in bad)),
            first_dropped=[{"row_id": r["row_id"], "index": i, "reason": r["drop_reason"],
                            "detail": r["drop_detail"]} for i, r in zip(bad, first_bad)],
            formats=formats, notes=notes, warnings=warnings, identical=sum(identical),
            identical_dropped=drop_identical, hint=IN_CONVERSATION_HINT if alone_refused else "")
        kept = mapped.select(keep)
        kept.remove_columns(["identical", "drop_reason", "drop_detail"]).save_to_disk(str(tmp / "dataset"))
        shutil.rmtree(tmp / "work")
        cache.commit(tmp, entry, report.to_dict())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenize(planned: list, tokenizer, settings: dict, num_proc: int | None, work: Path, key: str,
              split: str) -> datasets.Dataset:
    """Every planned file's rows through :func:`_tokenize_batch`, in pieces (``datasets.map`` into ``work``)."""
    rows_in = sum(len(rows) for rows, _, _ in planned)
    explicit = num_proc is not None
    num_proc = max(1, num_proc if explicit else min(8, os.cpu_count() or 1, rows_in // ROWS_PER_PROCESS))
    ids = datasets.List(datasets.Value("int32")) if hasattr(datasets, "List") else \
        datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({**{c: ids for c in PAIR_COLUMNS},
                                  **{c: datasets.Value("int32") for c in LENGTH_COLUMNS},
                                  "truncated": datasets.Value("bool"), "row_id": datasets.Value("string"),
                                  "identical": datasets.Value("bool"), "drop_reason": datasets.Value("string"),
                                  "drop_detail": datasets.Value("string")})
    mapped, offset = [], 0
    # In pieces, so that the progress can be told: datasets' own bar is one endless line in a log file.
    piece = max(math.ceil(rows_in / PROGRESS_STEPS), ROWS_PER_PROCESS * num_proc)
    with Progress(rows_in, f"tokenising {split} data", "rows") as progress:
        for i, (rows, options, json_text) in enumerate(planned):
            for j, start in enumerate(range(0, len(rows), piece)):
                part = rows.select(range(start, min(start + piece, len(rows))))  # contiguous: no copy
                procs = min(num_proc, len(part)) if explicit else \
                    max(1, min(num_proc, len(part) // ROWS_PER_PROCESS))
                # new_fingerprint: our key already covers the tokenizer, so datasets need not hash it.
                mapped.append(part.map(
                    _tokenize_batch, batched=True, with_indices=True, num_proc=procs,
                    fn_kwargs=dict(tokenizer=tokenizer, settings=settings, options=options,
                                   offset=offset + start, json_text=json_text),
                    remove_columns=rows.column_names, features=features,
                    cache_file_name=str(work / f"tokenized-{i}-{j}.arrow"), new_fingerprint=f"{key}-{i}-{j}"))
                progress.update(len(part))
            offset += len(rows)
    return datasets.concatenate_datasets(mapped) if len(mapped) > 1 else mapped[0]


@contextlib.contextmanager
def _datasets_bars_off():
    """datasets' per-call bars (map, save_to_disk) off for the block: ours reports the whole split."""
    was_on = datasets.is_progress_bar_enabled()
    if was_on:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, tokenizer, settings: dict,
                    options: RenderOptions, offset: int, json_text: bool = False) -> dict[str, list]:
    """``datasets.map`` body: every input row gives one output row; bad rows carry a reason. ``json_text``:
    the values are JSON text (``sources.load_json``)."""
    out = {c: [] for c in (*PAIR_COLUMNS, *LENGTH_COLUMNS, "truncated", "row_id", "identical", "drop_reason",
                           "drop_detail")}
    for i, index in enumerate(indices):
        row = {name: values[i] for name, values in batch.items()}
        line_bytes = row.pop(OVERSIZE_COLUMN, None)
        row = sources.decode_row(row) if json_text else row
        prompt_id = row.get("prompt_id")
        out["row_id"].append(str(prompt_id) if prompt_id is not None else str(offset + index))
        try:
            if line_bytes is not None:
                raise BadRow(ROW_TOO_LARGE, f"its line is {line_bytes} bytes long; a line over "
                                            f"{sources.MAX_LINE_BYTES} bytes is not read")
            check_row_size(row)
            pair = tokenize_pair(tokenizer, *render_row(row, tokenizer, options), **settings)
            reason = detail = ""
        except BadRow as exc:
            pair = {**{c: [] for c in PAIR_COLUMNS}, **{c: 0 for c in LENGTH_COLUMNS}, "truncated": False}
            reason, detail = exc.reason, exc.detail
        for c in (*PAIR_COLUMNS, *LENGTH_COLUMNS, "truncated"):
            out[c].append(pair[c])
        out["identical"].append(not reason and pair["chosen_input_ids"] == pair["rejected_input_ids"])
        out["drop_reason"].append(reason)
        out["drop_detail"].append(detail)
    return out
