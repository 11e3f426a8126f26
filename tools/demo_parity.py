"""Demo: a random tiny HF Llama, converted, run at TP=2 on CPU, compared with HF. Prints PASS/FAIL.

    python tools/demo_parity.py            # (make demo-parity)

The model has grouped-query attention (4 heads / 2 kv heads), Llama-3.1 rope scaling that matters
at the demo's sequence length, and a vocabulary (1000) that megatron pads at TP=2. This process
converts it (a world of one), then re-launches itself under ``torch.distributed.run`` with two
CPU ranks, which load the checkpoint at TP=2 and compare full-vocabulary logits with HF's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOLERANCE = 1e-4  # max |logits_mcore - logits_hf| in fp32
SEQ = 96  # > original_max_position_embeddings below, so the rope scaling changes the logits


def make_hf_model(path: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    LlamaForCausalLM(config).save_pretrained(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    from simpo_mcore.convert.hf_to_mcore import convert_hf_to_mcore
    from simpo_mcore.parallel import ensure_process_group, shutdown

    with tempfile.TemporaryDirectory(prefix="demo_parity_") as tmp:
        print(f"[demo] random HF Llama -> {tmp}/hf; converting to {tmp}/ckpt", flush=True)
        make_hf_model(Path(tmp) / "hf")
        ensure_process_group()
        convert_hf_to_mcore(Path(tmp) / "hf", Path(tmp) / "ckpt", log=None)
        shutdown()
        print("[demo] loading the checkpoint at TP=2 (2 CPU ranks, gloo)", flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={free_port()}", str(Path(__file__).resolve()), tmp]
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def worker(tmp: str) -> int:
    import torch
    from transformers import LlamaForCausalLM

    from simpo_mcore.config import ParallelConfig
    from simpo_mcore.convert.checkpoint_meta import CheckpointMeta
    from simpo_mcore.convert.mcore_io import load_model_weights
    from simpo_mcore.model.builder import ModelOptions, build_model
    from simpo_mcore.model.forward import forward_logits
    from simpo_mcore.parallel import init_distributed, shutdown

    init_distributed(ParallelConfig(tp=2, pp=1, device="cpu"), seed=0)
    arch = CheckpointMeta.read(f"{tmp}/ckpt").arch
    chunks = build_model(arch, ModelOptions(tp=2, precision="fp32"))
    load_model_weights(chunks, f"{tmp}/ckpt")
    tokens = torch.randint(0, arch.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    logits = forward_logits(chunks, tokens, arch.vocab_size)  # [b, s, vocab], fp32, padded rows stripped
    with torch.no_grad():
        hf = LlamaForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.float32, trust_remote_code=False)
        ref = hf.eval()(tokens).logits
    err = (logits - ref).abs().max().item()
    ok = err <= TOLERANCE
    if torch.distributed.get_rank() == 0:
        print(f"[demo] vocab {arch.vocab_size} (padded to {chunks[0].embedding.word_embeddings.weight.shape[0] * 2} "
              f"at TP=2), seq {SEQ}: max |logits_mcore - logits_hf| = {err:.3g} (tolerance {TOLERANCE:g})")
        print("PASS" if ok else "FAIL", flush=True)
    shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    # A demo's output is its result: library notes filtered as the CLI filters them (in this process and, as
    # each runs this file, in both ranks), before torch / megatron are imported; progress bars off.
    from simpo_mcore import console

    console.quiet_third_party()
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1")
    sys.exit(worker(sys.argv[1]) if "TORCHELASTIC_RUN_ID" in os.environ else launcher())
