"""The conversion commands, one module: ``python -m simpo_mcore.convert COMMAND ...``.

    hf-to-mcore --hf HF_DIR --out CKPT_DIR [--dtype bfloat16]        (tools/convert_hf_to_mcore.py)
    mcore-to-hf --ckpt CKPT_DIR --out HF_DIR [--max-shard-size 5GB]  (tools/convert_mcore_to_hf.py)
                [--dtype bfloat16] [--tokenizer DIR]
    tiny --out DIR [--seed N]                                        the embedded default's model

Each runs on the CPU in a world of one (``dist_checkpointing`` needs a process group) and ends bad
input with a one-line ``error:`` and exit code 2. The training job runs ``mcore-to-hf`` and ``tiny`` in a
fresh process through this module (:func:`run_in_fresh_process`): a world of one of their own, while
the job's ranks keep theirs.

This is an entry point: it imports the converters inside the commands, after ``CUDA_VISIBLE_DEVICES``
is set and the arguments parsed, so ``--help`` and argument errors cost no torch import.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from simpo_mcore import console
from simpo_mcore.config import USER_ERRORS

DTYPES = ("bfloat16", "float16", "float32")  # hf_to_mcore.DTYPES keys, without importing torch for --help
# What bad input raises; the library's messages name the field / tensor / file.
INPUT_ERRORS = USER_ERRORS  # the same set as the training commands: a permission error is one line too

HF_TO_MCORE_HELP = """Convert a Hugging Face model directory (safetensors) into a simpo_mcore checkpoint:
Llama 2 / 3 / 3.x, Mistral, Qwen2 / 2.5, Qwen3, Gemma-2 (docs/conversion.md lists what each family may hold).

The checkpoint loads at any TP / PP (keys are layout independent, the vocabulary is unpadded) and
carries simpo_mcore.json (the architecture) and a copy of the tokenizer files. Bad input (an
unsupported config field, a missing / extra / misshapen tensor, .bin-only weights, a non-empty output
directory) ends with a one-line error: naming it and exit code 2. Progress: a bar on a terminal, a line
per layer otherwise."""

HF_TO_MCORE_EXAMPLES = """examples:
  python tools/convert_hf_to_mcore.py --hf /models/Llama-3-Base-8B-SFT --out checkpoints/llama-3-base-8b-sft-mcore
  python -m simpo_mcore.convert hf-to-mcore --hf /models/Mistral-7B-SFT --out checkpoints/mistral-mcore --dtype bfloat16
  then: simpo-train CONFIG model.checkpoint=checkpoints/llama-3-base-8b-sft-mcore"""

MCORE_TO_HF_HELP = """Export a simpo_mcore checkpoint (converted or trained, any TP / PP) as a Hugging Face model.

Writes config.json and safetensors (model-0000i-of-0000N.safetensors + index past the size limit)
without padded vocabulary rows, and the tokenizer files (from --tokenizer, else the copy inside the
checkpoint); loads with AutoModelForCausalLM.from_pretrained. Bad input ends with a one-line error:
naming the tensor / field / file and exit code 2. Progress: a bar on a terminal, a line per layer otherwise."""

MCORE_TO_HF_EXAMPLES = """examples:
  python tools/convert_mcore_to_hf.py --ckpt runs/simpo_llama3_8b_base/checkpoints/step_0000400 --out hf/simpo-8b
  python -m simpo_mcore.convert mcore-to-hf --ckpt CKPT --out HF_DIR --dtype bfloat16 --max-shard-size 2GB
  (a run with checkpoint.export_hf: true exports its last checkpoint to <output_dir>/hf itself)"""

VERBOSE_HELP = f"show every library warning ({console.VERBOSE_ENV}=1)"


def run_conversion(convert: Callable[[], None]) -> int:
    """0 when ``convert()`` finished, 2 (message on stderr) when it refused its input.

    Sets ``CUDA_VISIBLE_DEVICES=""`` (unless set) before torch is imported: a file conversion leaves any
    GPU alone. ``convert`` should import what it needs itself, after this.
    """
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    console.quiet_third_party()  # before torch / megatron are imported
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


def hf_to_mcore_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=HF_TO_MCORE_HELP, epilog=HF_TO_MCORE_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep them)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def mcore_to_hf_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=MCORE_TO_HF_HELP, epilog=MCORE_TO_HF_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="simpo_mcore checkpoint directory (holds simpo_mcore.json)")
    p.add_argument("--out", required=True, help="HF directory to create (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file: 5GB, 500MB, 2GiB, bytes")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the exported weights (default: the checkpoint's torch_dtype)")
    p.add_argument("--tokenizer", default=None,
                   help="copy tokenizer files from this directory (default: the checkpoint's tokenizer/)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        console.set_verbose()
    return args


def hf_to_mcore_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = _parse(hf_to_mcore_parser(prog), argv)

    def convert() -> None:
        from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore

        convert_hf_to_mcore(args.hf, args.out, dtype=args.dtype, log=lambda m: print(m, flush=True))

    return run_conversion(convert)


def mcore_to_hf_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = _parse(mcore_to_hf_parser(prog), argv)

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


def tiny_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Write the embedded default's random tiny Llama "
                                "(DIR/hf) and its converted checkpoint (DIR/mcore).")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = _parse(p, argv)

    def convert() -> None:
        from simpo_mcore.convert.tiny import make_tiny_checkpoint

        make_tiny_checkpoint(args.out, seed=args.seed)

    return run_conversion(convert)


COMMANDS = {"hf-to-mcore": hf_to_mcore_main, "mcore-to-hf": mcore_to_hf_main, "tiny": tiny_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m simpo_mcore.convert {{{','.join(COMMANDS)}}} ...\n\n{__doc__.split(chr(10) * 2)[0]}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:], prog=f"python -m simpo_mcore.convert {argv[0]}")


def run_in_fresh_process(command: str, *args: str) -> None:
    """``python -m simpo_mcore.convert COMMAND ARGS`` in a new process with a world of one of its own.

    torchrun's variables are dropped: with TORCHELASTIC_USE_AGENT_STORE the child would wait forever for
    the launcher's store instead of creating its own one-rank group. Raises with the command's stderr
    (a one-line ``error:`` for bad input) when it fails.
    """
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
    proc = subprocess.run([sys.executable, "-m", "simpo_mcore.convert", command, *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m simpo_mcore.convert {command} {' '.join(args)} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
