"""What the two conversion commands (``tools/convert_*.py``) share: dtype names, which exceptions are
bad input, and running a conversion on the CPU in a world of one with a one-line ``error:`` and exit
code 2 for bad input."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DTYPES = ("bfloat16", "float16", "float32")  # hf_to_mcore.DTYPES keys, without importing torch for --help
# What bad input raises; the library's messages name the field / tensor / file.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def run_conversion(convert: Callable[[], None]) -> int:
    """0 when ``convert()`` finished, 2 (message on stderr) when it refused its input.

    Sets ``CUDA_VISIBLE_DEVICES=""`` (unless set) before torch is imported: a file conversion leaves any
    GPU alone. ``convert`` should import what it needs itself, after this.
    """
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch.distributed as dist

    from simpo_mcore.parallel import ensure_process_group

    try:
        ensure_process_group()  # dist_checkpointing needs a process group, even a world of one
        convert()
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
