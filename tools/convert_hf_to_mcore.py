"""Convert a Hugging Face model directory (safetensors; every family of docs/conversion.md) into a simpo_mcore
checkpoint.

    python tools/convert_hf_to_mcore.py --hf HF_DIR --out CKPT_DIR [--dtype bfloat16]

The same as ``python -m simpo_mcore.convert hf-to-mcore``; ``--help`` says what it writes and refuses.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpo_mcore.convert.tool import hf_to_mcore_main  # noqa: E402 (after the sys.path line)

if __name__ == "__main__":
    sys.exit(hf_to_mcore_main())
