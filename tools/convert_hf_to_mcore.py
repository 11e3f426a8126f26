"""Convert a Hugging Face Llama directory (safetensors) into a simpo_mcore checkpoint.

    python tools/convert_hf_to_mcore.py --hf HF_DIR --out CKPT_DIR [--dtype bfloat16]

The checkpoint loads at any TP / PP (keys are layout independent, the vocabulary is unpadded) and
carries ``simpo_mcore.json`` (the architecture) and a copy of the tokenizer files. Bad input
(an unsupported config field, a missing / extra / misshapen tensor, ``.bin``-only weights, a
non-empty output directory) ends with a one-line ``error:`` naming it and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpo_mcore.convert.tool import DTYPES, run_conversion  # noqa: E402 (after the sys.path line)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep them)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert() -> None:
        from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore

        convert_hf_to_mcore(args.hf, args.out, dtype=args.dtype, log=lambda m: print(m, flush=True))

    return run_conversion(convert)


if __name__ == "__main__":
    sys.exit(main())
