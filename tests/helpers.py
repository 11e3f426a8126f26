"""Helpers for tests: tiny HF models, a multi-rank launcher (torchrun, gloo, CPU), tokenised pairs."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from simpo_mcore import parallel
from simpo_mcore.convert import keymap
from simpo_mcore.convert.checkpoint_meta import META_FILE
from simpo_mcore.convert.integrity import write_manifest
from simpo_mcore.logprobs import fused_token_logps
from simpo_mcore.microbatch import labelled_positions

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "distributed" / "scripts"


QUIET = dict(log=None)
"""Keyword arguments that silence the converters' progress lines."""

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
"""Llama-3.1 rope scaling with a small original context, so that sequences of ~100 tokens reach it."""


def free_port() -> int:
    """A free local TCP port (the package's own helper)."""
    return parallel.free_port()


def run_ranks(script: str | Path, nproc: int, *args: str, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` CPU ranks with torchrun; raise with the output if any rank fails.

    Each rank gets one intra-op thread so several ranks share 2 cores without oversubscription.
    """
    script = Path(script)
    if not script.is_absolute():
        script = SCRIPTS / script
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
                "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed with {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-12000:]}")
    return proc


def launch_ranks(script: str | Path, nproc: int, *args: str, timeout: float = 600,
                 env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``script`` on ``nproc`` CPU ranks started here, one process each (no torchrun), so that every
    rank's own exit code and output can be checked. Does not raise when they fail."""
    script = Path(script)
    if not script.is_absolute():
        script = SCRIPTS / script
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
            "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), **(env or {})}
    # Files, not pipes: a rank blocked on a full pipe would hold up the other in a collective.
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(nproc)]
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=out, stderr=err)
             for r, (out, err) in enumerate(files)]
    results = []
    try:
        deadline = time.monotonic() + timeout
        for proc, (out, err) in zip(procs, files):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
    finally:
        for proc, (out, err) in zip(procs, files):
            if proc.poll() is None:
                proc.kill()
            out.close(), err.close()
    return results


class CommandRun:
    """``python -X importtime -m simpo_mcore.cli ARGS`` in its own session: every line it writes (stdout and stderr
    in one pipe, so in the order written) with the seconds since the command started, the modules the process it
    started imported (``-X importtime``: that process only, not the ranks it launches) and its exit code."""

    def __init__(self, args: list[str], *, timeout: float, env: dict[str, str] | None = None,
                 until: str | None = None):
        """``until``: stop (kill the command and whatever it started) once a line containing it was written."""
        cmd = [sys.executable, "-X", "importtime", "-m", "simpo_mcore.cli", *map(str, args)]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "CUDA_VISIBLE_DEVICES": "", **(env or {})}
        self.lines: list[tuple[float, str]] = []
        """``(seconds since the command started, line)`` of each line but ``-X importtime``'s."""
        self.imports: list[tuple[int, str]] = []
        """``(number of lines written before it, module)`` of each import of the command's own process."""
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        reader = threading.Thread(target=self._read, args=(proc, started, until), daemon=True)
        reader.start()
        reader.join(timeout)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(10)
        self.returncode = proc.returncode
        self.wall_s = time.monotonic() - started

    def _read(self, proc: subprocess.Popen, started: float, until: str | None) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("import time:"):
                self.imports.append((len(self.lines), line.rsplit("|", 1)[-1].strip()))
                continue
            self.lines.append((time.monotonic() - started, line))
            if until is not None and until in line:
                os.killpg(proc.pid, signal.SIGKILL)
                return

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def imported_before(self, package: str) -> int | None:
        """How many lines the command had written when a module of ``package`` was first imported (None: never).
        ``-X importtime`` names a module once its import ends: a package's submodules come before it."""
        return next((n for n, name in self.imports if name == package or name.startswith(package + ".")), None)


def error_lines(text: str) -> list[str]:
    """The ``error:`` lines of a command's output."""
    return [line for line in text.splitlines() if "error:" in line]


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def read_tensors(hf_dir: str | Path) -> dict:
    """Every tensor of an HF directory, through the index when there is one."""
    from safetensors import safe_open

    from simpo_mcore.convert.hf_io import INDEX_FILE, SINGLE_FILE

    hf_dir = Path(hf_dir)
    files = ([SINGLE_FILE] if (hf_dir / SINGLE_FILE).is_file()
             else sorted(set(json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"].values())))
    out = {}
    for name in files:
        with safe_open(hf_dir / name, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


WINDOW = 16
"""The tiny models' sliding window: the parity sequences (64-100 tokens) reach well past it."""

FAMILY_MODELS = {
    "mistral": dict(family="mistral", sliding_window=WINDOW),
    # Layers 1-3 slide (max_window_layers=1), layer 0 attends fully; tied embeddings.
    "qwen2": dict(family="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie=True),
    "qwen3": dict(family="qwen3", head_dim=32),
    # Caps small enough, and weights large enough (init_std 0.1: logits up to about 2.6), that each of them,
    # the window and query_pre_attn_scalar move the logits by 0.3 to 3.4 (measured with the caps removed).
    "gemma2": dict(family="gemma2", head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, init_std=0.1, tie=True),
}
"""``make_tiny_hf_model`` arguments of one tiny model per family beyond Llama, the same in every test."""

MOE_MODELS = {
    # 6 experts, top-2, a window on every layer.
    "mixtral": dict(family="mixtral", num_local_experts=6, num_experts_per_tok=2, sliding_window=WINDOW),
    # 8 experts of FFN 48, top-3 renormalised, layers 0 and 3 dense (FFN 160): a dense / MoE mix.
    "qwen3_moe": dict(family="qwen3_moe", head_dim=32, num_experts=8, num_experts_per_tok=3,
                      moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[0, 3]),
    # 8 experts, top-3 not renormalised, a shared expert (FFN 96) with its sigmoid gate, q / k / v biases.
    "qwen2_moe": dict(family="qwen2_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96, norm_topk_prob=False),
}
"""``make_tiny_hf_model`` arguments of one tiny mixture-of-experts model per MoE family."""

MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")

FAMILY_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "gemma2": "Gemma2Config", "mixtral": "MixtralConfig",
                  "qwen3_moe": "Qwen3MoeConfig", "qwen2_moe": "Qwen2MoeConfig"}


def make_tiny_hf_model(out_dir: str | Path, *, family: str = "llama", vocab_size: int = 250, hidden_size: int = 64,
                       intermediate_size: int = 160, num_layers: int = 4, heads: int = 4, kv_heads: int = 2,
                       tie: bool = False, rope_scaling: dict | None = None, head_dim: int | None = None,
                       seed: int = 0, dtype: str = "float32", max_position_embeddings: int = 512,
                       init_std: float = 0.02, **family_kw):
    """A random-weight HF model of ``family`` saved with safetensors; returns it (eval mode; see
    :func:`hf_attention` for its attention implementation).

    ``family_kw`` go to the family's config class as they are (``sliding_window``, ``use_sliding_window``,
    ``max_window_layers``, ``query_pre_attn_scalar``, the soft-capping values, ...). Norm weights and biases are
    random (HF initialises them to 1 or 0 and 0), so that a wrong mapping of any of them shows; MoE routers get
    large random weights (decisive routing).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=init_std, **family_kw)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = getattr(transformers, FAMILY_CONFIGS[family])(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, **hf_implementations(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # (1 + w) norms (Gemma) get weights around 0, the others around 1.
                p.uniform_(-0.5, 0.5) if family == "gemma2" else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("mlp.gate.weight"):
                # Routers far from uniform: each token's top-k experts stand apart by much more than rounding, so
                # every layout routes the same tokens to the same experts.
                p.normal_(0.0, 0.5)
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def make_tiny_hf_llama(out_dir: str | Path, *, model_type: str = "llama", **kwargs):
    """A random-weight HF Llama (or Mistral) saved with safetensors; see :func:`make_tiny_hf_model`."""
    return make_tiny_hf_model(out_dir, family=model_type, **kwargs)


def hf_attention(family: str) -> str:
    """HF's attention implementation for references: ``eager`` for Gemma-2 (the one that soft-caps the
    scores), transformers' default ``sdpa`` (a banded mask where a window applies) for the others."""
    return "eager" if family == "gemma2" else "sdpa"


def hf_implementations(family: str) -> dict:
    """``from_pretrained`` / ``from_config`` keywords of a reference model: the attention of
    :func:`hf_attention` and, for an MoE family, the experts' ``eager`` loop (the modeling code itself;
    transformers' default ``grouped_mm`` has no float64)."""
    out = {"attn_implementation": hf_attention(family)}
    if family in MOE_FAMILIES:
        out["experts_implementation"] = "eager"
    return out


def hub_names(tensors: dict[str, torch.Tensor], arch) -> dict[str, torch.Tensor]:
    """HF tensors under transformers 5's in-memory names (each MoE layer's experts fused:
    ``mlp.experts.gate_up_proj [E, 2F, H]``, ``down_proj``; Mixtral's router as ``mlp.gate``) -> the hub's
    per-expert names, through the key map."""
    out = dict(tensors)
    for i in range(arch.num_layers):
        for t in keymap.layer_tensors(arch, i):
            fused = keymap.hf_layer_key(i, t.fused) if t.fused else None
            if fused not in out:
                continue
            whole = out.pop(fused)
            for names, tensor in zip(keymap.hf_names(t, arch), whole if t.experts else [whole]):
                out.update({keymap.hf_layer_key(i, n): part
                            for n, part in zip(names, keymap.unpack(tensor, t.packing, arch))})
    return out


def load_hf_model(hf_dir: str | Path, dtype=None):
    """An HF model directory loaded for comparisons: fp32 unless told, implementations as
    :func:`hf_implementations`."""
    import torch
    from transformers import AutoModelForCausalLM

    family = json.loads((Path(hf_dir) / "config.json").read_text())["model_type"]
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype or torch.float32,
                                                **hf_implementations(family)).eval()


WARNING_LINE = re.compile(r"Warning\b|warnings\.warn\(|^[WE]\d{4} \d\d:\d\d:\d\d")
"""A line of a library warning: ``...: UserWarning: ...``, its ``warnings.warn(`` source line, or torch's
glog-style ``W1130 11:19:46.5 ...`` log lines."""


def warning_lines(text: str) -> list[str]:
    """The library-warning lines of a console output."""
    return [line for line in text.splitlines() if WARNING_LINE.search(line)]


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: a LevelDB-style log (7-byte file header, then 32 KiB blocks of
    records each with a 7-byte header: CRC, length, type full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending, payloads = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        else:
            payloads.append(pending + payload)
    return [pb.Record.FromString(p) for p in payloads]


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)



def resave_checkpoint(ckpt: Path, out: Path, drop=(), put: dict | None = None) -> Path:
    """A copy of a megatron checkpoint with tensors dropped (``drop``: keys) / replaced or added (``put``), its
    ``simpo_mcore.json``, and an ``integrity.json`` as every checkpoint simpo_mcore writes has: the loaders then
    read it, and what is checked is the tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from simpo_mcore.convert.mcore_io import save_sharded

    tensors = dist_checkpointing.load_plain_tensors(str(ckpt))
    for key in drop:
        del tensors[key]
    tensors.update(put or {})
    out.mkdir()
    save_sharded({k: ShardedTensor.from_rank_offsets(k, t, replica_id=0) for k, t in tensors.items()}, out)
    (out / META_FILE).write_text((ckpt / META_FILE).read_text())
    write_manifest(out)
    return out


# ------------------------------------------------------------------------------------------ tokenised pairs


def make_pair(index: int, prompt_len: int, chosen_len: int, rejected_len: int) -> dict:
    """A tokenised pair whose ids encode (pair, side, position), so a misplaced token is visible:
    ``1000 * index + 100 * side + t + 1``; labels -100 on the prompt (a prompt of 0 labels every token)."""
    out = {}
    for side, (name, length) in enumerate((("chosen", chosen_len), ("rejected", rejected_len))):
        ids = [1000 * index + 100 * side + t + 1 for t in range(prompt_len + length)]
        out[f"{name}_input_ids"] = ids
        out[f"{name}_labels"] = [-100] * prompt_len + ids[prompt_len:]
    return out


def random_pair(prompt: int, chosen: int, rejected: int, vocab: int, rng: random.Random, low: int = 0) -> dict:
    """A tokenised pair of random ids in ``[low, vocab)`` with a shared prompt length (labels -100 there)."""
    out = {}
    for side, n in (("chosen", chosen), ("rejected", rejected)):
        ids = [rng.randrange(low, vocab) for _ in range(prompt + n)]
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, [-100] * prompt + ids[prompt:]
    return out


def random_pairs(shapes, vocab: int, seed: int, low: int = 0) -> list[dict]:
    """One :func:`random_pair` per ``(prompt, chosen, rejected)`` length of ``shapes``, from one seeded generator."""
    rng = random.Random(seed)
    return [random_pair(prompt, chosen, rejected, vocab, rng, low) for prompt, chosen, rejected in shapes]


def pair_columns(pairs: list[dict]) -> dict[str, list]:
    """Pairs as the collators take them: column -> one value per pair."""
    return {name: [p[name] for p in pairs] for name in pairs[0]}


# ------------------------------------------------------------------------------- the log-prob head's reference


S, B, H = 13, 3, 16  # 39 tokens
VOCAB, V_PAD = 50, 64
"""The head checks' shapes: sequence length, batch, hidden size, real and padded vocabulary."""
SOFTCAP = 2.0
"""Logits here have a standard deviation of about 2: a cap of 2 bends most of them (Gemma-2 caps at 30 logits
that are of that order)."""


def make_inputs(dtype=torch.float32, seed=0):
    """hidden [s, b, h], weight [v_pad, h] with large random padded rows, labels [b, s] with a -100 prompt
    prefix and -100 right padding of different lengths per sequence."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g)
    weight = torch.randn(V_PAD, H, generator=g) * 0.5
    # Padded rows that would dominate the softmax if they were not masked.
    weight[VOCAB:] = torch.randn(V_PAD - VOCAB, H, generator=g) * 5.0
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 10:] = -100  # right padding
    labels[2, :7] = -100
    labels[2, 12:] = -100
    labels[0, 5] = VOCAB - 1  # the last real id
    return hidden.to(dtype), weight.to(dtype), labels


def reference_token_logps(logits, labels, vocab_size, softcap=None):
    """``[b, s]`` from full logits ``[s, b, v_pad]``, by plain autograd (any dtype in, float64 math)."""
    logits = logits[..., :vocab_size].double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logps = torch.log_softmax(logits, dim=-1)  # [s, b, v]
    valid = labels.t() != -100  # [s, b]
    target = torch.where(valid, labels.t(), 0)
    token = logps.gather(-1, target[..., None]).squeeze(-1)  # [s, b]
    return torch.where(valid, token, 0.0).t()  # [b, s]


def simpo_like_objective(token_logps, labels, seed=1):
    """A random linear combination of per-sequence averages: an upstream gradient that differs per sequence
    and per token count, like SimPO's."""
    mask = labels != -100
    avg = (token_logps.double() * mask).sum(-1) / mask.sum(-1)
    coef = torch.randn(labels.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (coef * avg).sum()


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def abs_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def reference_grads(hidden, weight, labels, softcap=None):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    ref = reference_token_logps(h @ w.t(), labels, VOCAB, softcap)
    simpo_like_objective(ref, labels).backward()
    return ref.detach(), h.grad, w.grad


def check_fused_head_against_reference(tp_group, chunk_tokens: int, kernel: str = "auto",
                                       recompute: bool = True, labelled_only: bool = False,
                                       softcap: float | None = None) -> None:
    """Values and gradients of the fused head equal float64 ``log_softmax`` over the real vocabulary
    (``labelled_only``: the head given the labelled positions, as the training step gives them)."""
    hidden, weight, labels = make_inputs()
    ref, ref_grad_h, ref_grad_w = reference_grads(hidden, weight, labels, softcap)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    token_logps = fused_token_logps(h, w, labels, VOCAB, tp_group, sequence_parallel=False,
                                    chunk_tokens=chunk_tokens, kernel=kernel, recompute=recompute,
                                    token_index=labelled_positions(labels) if labelled_only else None,
                                    softcap=softcap)
    assert token_logps.dtype == torch.float32 and token_logps.shape == (B, S)
    assert abs_err(token_logps, ref) < 1e-5
    assert (token_logps[labels == -100] == 0).all()
    simpo_like_objective(token_logps, labels).backward()
    assert rel_err(h.grad, ref_grad_h) < 1e-5
    assert rel_err(w.grad, ref_grad_w) < 1e-5
    assert (w.grad[VOCAB:] == 0).all()
