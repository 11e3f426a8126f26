"""What a person watching a job sees: rank 0's console, no library noise, progress on every long task.

    quiet_third_party()     call before torch / megatron are imported: drops the library warnings that say
                            nothing a user can act on (matched by message *and* warning module), and
                            quiets the loggers that print them
    setup_logging(rank)     rank 0 logs at INFO; the other ranks print warnings and errors only
    Progress / track        a tqdm bar on a terminal; anywhere else (a SLURM log, a pipe) a plain line
                            every ``progress_interval_s`` seconds, with elapsed time and ETA
    command_started()       when the command started, across the CPU re-launch and torchrun: the step line's
                            elapsed time and the run summary's wall time count from it
    announce(text)          a ``[simpo_mcore] ...`` line from rank 0: what the job is doing now (start-up phases)

``SIMPO_MCORE_VERBOSE=1`` (what ``--verbose`` sets, so ranks started by torchrun inherit it) turns the
filtering off: every warning, and every rank's log at INFO. Progress is drawn by the process of global
rank 0 only (``RANK``; a process outside torchrun is rank 0).

This module imports neither torch nor megatron: the entry points call it before they do.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

import psutil

VERBOSE_ENV = "SIMPO_MCORE_VERBOSE"
"""Set to 1 (or pass ``--verbose``) to see every library warning and every rank's log."""

QUIET_WARNINGS = (
    # (start of the message, start of the module the warning is attributed to). The module keeps a
    # filter from hiding the same words raised elsewhere (in the user's code, or ours).
    ("Apex is not installed", "megatron"),  # megatron's optional fused kernels; our layers do not use Apex
    ("Transformer Engine and Apex are not installed", "megatron"),  # runtime says it once on a GPU without TE
    ("MimoModelConfig is experimental", "megatron"),  # imported by megatron, never used here
    ("MCore's async save is deprecated", "megatron"),  # megatron's own default, not a setting of ours
    ("full scope is deprecated", "megatron"),  # megatron's TransformerConfig default (cuda graphs, unused)
    ("torch.distributed is disabled, unavailable or uninitialized", "torch.distributed.checkpoint"),
    ("The argument order of load has been changed", "torch.distributed.checkpoint"),  # megatron's call
    # megatron's dist_checkpointing is built on ShardedTensor; the warning reaches us through its calls
    # (attributed to megatron, or to cpu_mode's redirection that forwards them on a CPU).
    ("Please use DTensor instead and we are deprecating ShardedTensor", "megatron|simpo_mcore.cpu_mode|torch"),
    # torch deprecations of the collectives megatron calls (attributed to torch's c10d logging wrapper).
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", "megatron|torch.distributed"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", "megatron|torch.distributed"),
    # megatron's optimizer reads .grad of its parameter views (on a CPU the warning is attributed to
    # cpu_mode's redirection, which forwards every call: simpo_mcore.optim.zero_grad silences it there).
    ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed", "megatron"),
    # On a GPU this matters, and runtime says it once (rank 0) when the variable is not set; on a CPU
    # it does not apply. megatron repeats it on every rank.
    ("When using async grad allreduce it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS", "megatron"),
    ("When using sequence parallelism it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS", "megatron"),
)
"""Library warnings that say nothing about this run. Everything else is shown: a warning we do not
know may be a real problem."""

QUIET_LOGGERS = {
    "torch.utils.cpp_extension": logging.ERROR,  # "No CUDA runtime is found" on every CPU import of megatron
    "megatron": logging.ERROR,  # megatron's INFO / WARNING chatter on every rank (layout, timers, ...)
    "torch.distributed": logging.ERROR,
    "datasets": logging.ERROR,  # progress and cache notes: we report the data ourselves
    "transformers": logging.ERROR,
}
"""Library loggers set to errors only (their warnings repeat what our own log says, once per rank)."""

COMMAND_STARTED_ENV = "SIMPO_COMMAND_STARTED"
"""Set by the CPU re-launch for its ranks: when the command started (``time.time()`` seconds)."""

DEFAULT_PROGRESS_INTERVAL_S = 30.0
"""Seconds between the progress lines of a task when no terminal is attached (``logging.progress_interval_s``)."""

_progress_interval_s = DEFAULT_PROGRESS_INTERVAL_S


def verbose() -> bool:
    """Whether ``SIMPO_MCORE_VERBOSE`` (or ``--verbose``) asks for everything."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose() -> None:
    """``--verbose``: for this process and every rank it launches."""
    os.environ[VERBOSE_ENV] = "1"


def quiet_third_party() -> None:
    """Filter the warnings of :data:`QUIET_WARNINGS` and quiet :data:`QUIET_LOGGERS` (unless verbose).

    Must run before torch / megatron are imported: most of these are raised at import time. Also keeps
    the C++ side of torch at errors, and datasets' own progress bars off (we draw our own)."""
    if verbose():
        return
    for message, module in QUIET_WARNINGS:
        # `message` is a regex matched at the start of the text; escape ours, which are literal.
        warnings.filterwarnings("ignore", message=re.escape(message), module=module)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # transformers sets its own logger's level when it first logs, from this variable (default: warnings):
    # the level set above would not last ("Token indices sequence length is longer than the specified maximum
    # sequence length", printed by simpo-data, when our truncation handles those rows).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    if "datasets" in sys.modules:  # already imported (a caller in the same process): tell it directly
        sys.modules["datasets"].disable_progress_bars()


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO, the others print warnings and errors only (every rank at INFO when verbose)."""
    loud = verbose()
    fmt = f"[%(asctime)s simpo_mcore{f' rank {rank}' if loud and rank else ''}] %(message)s"
    logging.basicConfig(level=logging.INFO if rank == 0 or loud else logging.WARNING, format=fmt,
                        datefmt="%H:%M:%S", force=True)
    if not loud:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)


def is_main_process() -> bool:
    """Global rank 0 (a process outside torchrun is rank 0): the one process that draws progress."""
    return os.environ.get("RANK", "0") == "0"


def set_progress_interval(seconds: float) -> None:
    """Seconds between progress lines without a terminal (the jobs pass ``logging.progress_interval_s``)."""
    global _progress_interval_s
    _progress_interval_s = float(seconds)


def progress_interval() -> float:
    return _progress_interval_s


def use_bar() -> bool:
    """A progress bar only on a terminal: anywhere else its carriage returns make one endless line."""
    return sys.stderr.isatty()


def command_started() -> float:
    """When the command this process serves started (``time.time()`` seconds): :data:`COMMAND_STARTED_ENV` when
    the CPU re-launch set it, else (a rank of a plain ``torchrun``) when that torchrun started, else when this
    process started. Times shown to the user count from it: a rank starts seconds after the command (the
    launcher's imports, torchrun, the rank's own imports)."""
    with contextlib.suppress(KeyError, ValueError):
        return float(os.environ[COMMAND_STARTED_ENV])
    process = psutil.Process()
    launcher = process.parent() if "TORCHELASTIC_RUN_ID" in os.environ else None
    return (launcher or process).create_time()


def announce(text: str) -> None:
    """``[simpo_mcore] text`` on stdout from rank 0 (the other ranks say nothing)."""
    if is_main_process():
        print(f"[simpo_mcore] {text}", flush=True)


def format_duration(seconds: float) -> str:
    """``1:02:03``, ``2:03``; ``?`` when not known."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(n: float) -> str:
    """``950``, ``12.3k``, ``4.56M``, ``7.89B``."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def print_line(text: str) -> None:
    print(text, flush=True)


class Progress:
    """Progress of one task, drawn by rank 0: a tqdm bar on a terminal, otherwise (``write``) a line
    ``desc: n/total unit (pct%) | elapsed | ETA`` at most every ``interval_s`` seconds (and one at the end
    of a task that printed any). ``write=None``: silent."""

    def __init__(self, total: int, desc: str, unit: str = "", *, write: Callable[[str], None] | None = print_line,
                 interval_s: float | None = None, bar: bool | None = None, leave: bool = False):
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.started = time.monotonic()
        self.active = write is not None and is_main_process()
        self._write = write
        self._interval = progress_interval() if interval_s is None else interval_s
        self._last_line = self.started
        self._printed_n: int | None = None
        self._closed = False
        self._bar = None
        if self.active and (use_bar() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=f" {unit}" if unit else "it", file=sys.stderr,
                             dynamic_ncols=True, leave=leave)

    @property
    def drawing_bar(self) -> bool:
        """Whether this progress is a bar (on a terminal) rather than lines."""
        return self.active and self._bar is not None

    def update(self, n: int = 1) -> None:
        self.set(self.n + n)

    def set(self, n: int, postfix: str | None = None) -> None:
        """``n`` done; ``postfix`` is shown after the bar."""
        self.n = min(n, self.total) if self.total else n
        if not self.active:
            return
        if self._bar is not None:
            self._bar.n = self.n
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line >= self._interval:
            self._line(now)

    def _line(self, now: float) -> None:
        self._last_line = now
        self._printed_n = self.n
        self._write(f"{self.desc}: {self.describe(now)}")

    def describe(self, now: float | None = None) -> str:
        """``n/total unit (pct%) | elapsed | ETA``."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = elapsed / self.n * (self.total - self.n) if self.n and self.total else float("nan")
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.n}/{self.total}{unit}{pct} | {format_duration(elapsed)} elapsed | "
                f"ETA {format_duration(eta)}")

    def write(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            self._write(text)

    def close(self) -> None:
        """Ends the bar (or prints the last line of a task that printed any); :meth:`write` still prints."""
        if not self.active or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._printed_n is not None and self._printed_n != self.n:
            self._line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track[T](items: Iterable[T], total: int, desc: str, unit: str = "", size: Callable[[T], int] = lambda _: 1,
          **kwargs) -> Iterator[T]:
    """``items`` as they are, with a :class:`Progress` advanced by ``size(item)`` after each is consumed."""
    with Progress(total, desc, unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update(size(item))
