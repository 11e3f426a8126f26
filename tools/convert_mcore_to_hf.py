"""Export a simpo_mcore checkpoint (converted or trained, any TP / PP) as a Hugging Face model.

    python tools/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--max-shard-size 5GB]
                                        [--dtype bfloat16] [--tokenizer DIR]

The same as ``python -m simpo_mcore.convert mcore-to-hf``; ``--help`` says what it writes and refuses.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpo_mcore.convert.tool import mcore_to_hf_main  # noqa: E402 (after the sys.path line)

if __name__ == "__main__":
    sys.exit(mcore_to_hf_main())
