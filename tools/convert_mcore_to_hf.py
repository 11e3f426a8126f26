"""Export a simpo_mcore checkpoint (converted or trained, any TP / PP) as a Hugging Face Llama.

    python tools/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--max-shard-size 5GB]
                                        [--dtype bfloat16] [--tokenizer DIR]

Writes ``config.json`` and safetensors (``model-0000i-of-0000N.safetensors`` + index past the size
limit) without padded vocabulary rows, and the tokenizer files (from ``--tokenizer``, else the copy
inside the checkpoint); loads with ``AutoModelForCausalLM.from_pretrained``. Bad input ends with a
one-line ``error:`` naming the tensor / field / file and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpo_mcore.convert.tool import DTYPES, run_conversion  # noqa: E402 (after the sys.path line)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="simpo_mcore checkpoint directory (holds simpo_mcore.json)")
    p.add_argument("--out", required=True, help="HF directory to create (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file: 5GB, 500MB, 2GiB, bytes")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the exported weights (default: the checkpoint's torch_dtype)")
    p.add_argument("--tokenizer", default=None,
                   help="copy tokenizer files from this directory (default: the checkpoint's tokenizer/)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def convert() -> None:
        from simpo_mcore.convert.hf_io import parse_size
        from simpo_mcore.convert.mcore_to_hf import convert_mcore_to_hf

        try:
            max_bytes = parse_size(args.max_shard_size)
        except ValueError:
            max_bytes = 0
        if max_bytes <= 0:
            raise ValueError(f"--max-shard-size {args.max_shard_size!r} is not a positive size (e.g. 5GB)")
        if args.tokenizer and not Path(args.tokenizer).is_dir():
            raise NotADirectoryError(f"--tokenizer {args.tokenizer} is not a directory")
        convert_mcore_to_hf(args.ckpt, args.out, max_shard_bytes=max_bytes, dtype=args.dtype,
                            tokenizer_dir=args.tokenizer, log=lambda m: print(m, flush=True))

    return run_conversion(convert)


if __name__ == "__main__":
    sys.exit(main())
