"""``simpo_mcore.plan`` against independent references: megatron's own buffer layout and pipeline schedule, the
public parameter counts of the shipped models, the FLOPs and step times docs/performance.md measured, the data
cache simpo-data writes; and ``simpo-plan`` on every shipped run config. (The bytes of built runs:
``tests/distributed/test_plan_bytes.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, error_lines

from simpo_mcore.config import DataConfig, load_config
from simpo_mcore.model.hf_config import ModelArch
from simpo_mcore.plan import (
    Implementation,
    Layout,
    MicroBatchShape,
    ModelShape,
    Numerics,
    Setup,
    Workload,
    cached_lengths,
    plan_json,
    plan_run,
    rank_memory,
)
from simpo_mcore.plan.layouts import step_batch
from simpo_mcore.plan.memory import ddp_buffer, in_flight_microbatches, shard_elements
from simpo_mcore.plan.shape import Chunk, batch_flops, chunk_parameters
from simpo_mcore.plan.timing import MEASURED_MFU, PEAK_TFLOPS

HF = ROOT / "configs" / "hf"
RUN_CONFIGS = sorted(p for p in ROOT.glob("configs/*/*.yaml")
                     if p.stem.endswith(("_8gpu", "_multinode")) and not p.name.startswith("_"))


def shape_of(folder: str) -> ModelShape:
    path = HF / folder / "config.json"
    return ModelShape.from_arch(ModelArch.from_hf_dict(json.loads(path.read_text()), str(path)))


# ------------------------------------------------------------------------------------ the model and its bytes

PUBLIC_PARAMETERS = {  # the total the models' Hugging Face pages give
    "princeton-nlp__Llama-3-Base-8B-SFT": 8_030_261_248, "meta-llama__Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "meta-llama__Llama-3.1-8B-Instruct": 8_030_261_248, "meta-llama__Meta-Llama-3-70B": 70_553_706_496,
    "alignment-handbook__zephyr-7b-sft-full": 7_241_732_096, "mistralai__Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "google__gemma-2-9b-it": 9_241_705_984, "Qwen__Qwen2.5-7B-Instruct": 7_615_616_512,
}


@pytest.mark.parametrize("folder", sorted(PUBLIC_PARAMETERS))
def test_shipped_architectures_have_the_public_parameter_count(folder):
    assert shape_of(folder).parameters() == PUBLIC_PARAMETERS[folder]


MIXTRAL = ModelShape(vocab_size=32000, hidden_size=4096, ffn_hidden_size=14336, num_layers=32, num_attention_heads=32,
                     num_query_groups=8, head_dim=128, num_experts=8, moe_top_k=2, moe_ffn_hidden_size=14336)


def test_moe_shapes_have_the_public_parameter_count():
    """Mixtral-8x7B and Qwen3-30B-A3B (the MoE fields a MoE ModelArch will fill in)."""
    assert MIXTRAL.parameters() == 46_702_792_704
    qwen3 = ModelShape(vocab_size=151936, hidden_size=2048, ffn_hidden_size=6144, num_layers=48, num_attention_heads=32,
                       num_query_groups=4, head_dim=128, qk_norm=True, num_experts=128, moe_top_k=8,
                       moe_ffn_hidden_size=768)
    assert qwen3.parameters() == 30_532_122_624
    # a token passes through the router and top_k = 2 experts of each layer
    assert MIXTRAL.mlp_params_per_token(0) == 8 * 4096 + 2 * 3 * 4096 * 14336


@pytest.mark.parametrize("folder, params", [("mistralai__Mixtral-8x7B-Instruct-v0.1", 46_702_792_704),
                                            ("Qwen__Qwen3-30B-A3B", 30_532_122_624)])
def test_moe_shape_from_the_shipped_config(folder, params):
    """The shape the planner reads from a MoE ``config.json`` (ModelArch's MoE fields) has the public parameter
    count, and the active parameters the step records' MFU counts."""
    arch = ModelArch.from_hf_dir(HF / folder)
    shape = ModelShape.from_arch(arch)
    assert shape.num_experts == arch.num_experts and shape.moe_top_k == arch.num_experts_per_tok
    assert shape.parameters() == params
    assert [shape.mlp_params_per_token(i) for i in range(shape.num_layers)] == [
        arch.mlp_params_per_token(i) for i in range(arch.num_layers)]


def test_expert_parallelism_shards_the_experts():
    setup = Setup(MIXTRAL, Implementation(), Numerics.for_precision("bf16"))
    micro = MicroBatchShape(tokens=4096)
    one, two = (rank_memory(setup, Layout(dp=2, ep=ep, distributed_optimizer=False), micro) for ep in (1, 2))
    experts_per_rank = 32 * 8 * 3 * 4096 * 14336 // 2  # half the experts leave each rank
    assert one.weights - two.weights == 2 * experts_per_rank
    assert one.grads - two.grads == 4 * experts_per_rank
    assert one.optimizer - two.optimizer == 12 * experts_per_rank


@pytest.mark.slow  # transformers' import
def test_shipped_tiny_architecture_is_the_embedded_model():
    from simpo_mcore.convert.tiny import TINY_ARCH
    from simpo_mcore.data.synthetic import build_tokenizer

    hf = json.loads((HF / "simpo_mcore__tiny-random" / "config.json").read_text())
    tokenizer = build_tokenizer()
    assert {k: hf[k] for k in TINY_ARCH} == TINY_ARCH
    assert (hf["vocab_size"], hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert hf["tie_word_embeddings"] is False


def megatron_layout(params, dp: int, distributed_optimizer: bool):
    """megatron-core's own layout of these parameters (the function its DDP calls)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _compute_default_per_buffer_param_layout
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    tensors = []
    for p in params:
        t = torch.nn.Parameter(torch.empty(p.numel, device="meta"))
        if p.shared_embedding:
            t.shared_embedding = True
        tensors.append(t)
    if distributed_optimizer:
        layout = DistributedOptimizer._compute_per_buffer_param_layout(
            tensors, None, dp, DistributedDataParallelConfig(use_distributed_optimizer=True))
    else:
        layout = _compute_default_per_buffer_param_layout(tensors, None)
    return layout.bucket_indices, [layout.param_index_map[t][:2] for t in tensors]


@pytest.mark.parametrize("pp_rank", [0, 1])
@pytest.mark.parametrize("dp,distributed_optimizer", [(1, False), (2, False), (1, True), (2, True), (3, True),
                                                      (8, True)])
def test_ddp_buffer_is_megatrons_layout(pp_rank, dp, distributed_optimizer):
    """Tied embeddings at PP 2 (the shared embedding gets a bucket of its own), odd sizes, a bias: the buckets and
    every parameter's place equal megatron's."""
    shape = ModelShape(vocab_size=250, hidden_size=64, ffn_hidden_size=160, num_layers=4, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, tied_embeddings=True, qkv_bias=True)
    chunk = Chunk(layers=(2 * pp_rank, 2 * pp_rank + 1), first=pp_rank == 0, last=pp_rank == 1)
    params = tuple(chunk_parameters(shape, chunk, "sdpa", tp=1, pp=2, ep=1, vocab_rows=256))
    buffer = ddp_buffer(params, dp, distributed_optimizer)
    buckets, ranges = megatron_layout(params, dp, distributed_optimizer)
    assert list(buffer.buckets) == [tuple(b) for b in buckets]
    assert list(buffer.ranges) == [tuple(r) for r in ranges]
    if distributed_optimizer:
        assert len(buffer.buckets) == 2  # the shared embedding alone, and the rest
        shards = [shard_elements(buffer, dp, r)[0] for r in range(dp)]
        assert sum(shards) == sum(p.numel for p in params)  # every element in exactly one shard


@pytest.mark.parametrize("pp,vpp", [(2, None), (4, None), (2, 2), (4, 2), (4, 3)])
@pytest.mark.parametrize("microbatches", [1, 4, 8, 12])
def test_in_flight_microbatches_follow_megatrons_schedule(pp, vpp, microbatches):
    """megatron's warm-up count (+1, the steady state's own) in units of a stage's chunks."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    if vpp and microbatches % pp:
        return  # the interleaved schedule needs a multiple of PP micro-batches (data/packing.py pads to one)
    for rank in range(pp):
        comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r),
                               virtual_pipeline_model_parallel_size=vpp)
        total, _, warmup, _ = get_pp_rank_microbatches(microbatches, vpp or 1, pp, p2p_communicator=comm)
        assert in_flight_microbatches(pp, vpp, rank, microbatches) == min(warmup + 1, total) / (vpp or 1)


# ------------------------------------------------------------------------------------------ time

def test_step_flops_and_times_are_the_benchmarks():
    """At the benchmark's step (2 pairs x 2048 tokens, one GPU) the FLOPs are docs/performance.md's 64.04 / 70.35
    TFLOP, and each measured MFU turns them back into the measured step time (TE bf16 0.1231 / 0.1309 s, FP8
    0.0976 / 0.1060 s, SDPA 0.1410 / 0.1487 s)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_common import make_arch

    measured = {("1b", "te", "bf16"): 0.1231, ("8b4", "te", "bf16"): 0.1309, ("1b", "te", "fp8"): 0.0976,
                ("8b4", "te", "fp8"): 0.1060, ("1b", "sdpa", "bf16"): 0.1410, ("8b4", "sdpa", "bf16"): 0.1487}
    flops = {}
    for name, tflop in (("1b", 64.04), ("8b4", 70.35)):
        shape = ModelShape.from_arch(make_arch(name, 2048))
        flops[name] = batch_flops(shape, 4 * 2048, 4 * 2048 ** 2)
        assert flops[name] / 1e12 == pytest.approx(tflop, abs=0.005)
    for m in MEASURED_MFU:
        name = "1b" if m.hidden == 2048 else "8b4"
        seconds = flops[name] / (m.mfu * PEAK_TFLOPS * 1e12)
        assert seconds == pytest.approx(measured[name, m.spec, m.precision], rel=2e-3), m


# ------------------------------------------------------------------------------------------ data

def test_data_cache_lengths_are_read(tmp_path):
    """The lengths of the cache entry simpo-data / simpo-train write for this source, and their use: a step's
    tokens are the global batch times the mean pair."""
    from simpo_mcore.data.collate import sequence_lengths
    from simpo_mcore.data.preference import build_preference_dataset
    from simpo_mcore.data.synthetic import build_tokenizer

    data = DataConfig(train_path="synthetic", synthetic_pairs=96, max_length=64, max_prompt_length=40, num_proc=1)
    dataset, _ = build_preference_dataset(data, build_tokenizer(), "train", tmp_path / "data_cache", announce=False)
    lengths, note = cached_lengths(data, tmp_path)
    assert lengths is not None and str(tmp_path / "data_cache") in note
    assert list(zip(lengths.chosen.tolist(), lengths.rejected.tolist())) == sequence_lengths(dataset)
    labels = list(dataset["chosen_labels"]) + list(dataset["rejected_labels"])
    labelled = sum(x != -100 for row in labels for x in row) / sum(len(row) for row in labels)
    assert lengths.labelled_fraction == pytest.approx(labelled)
    work = Workload(global_pairs=16, micro_batch_pairs=2, packed=True, pack_tokens=256, max_length=64, dpo=False,
                    lengths=lengths)
    batch = step_batch(work, Layout(dp=2), 16)
    assert batch.tokens == pytest.approx(16 * float((lengths.chosen + lengths.rejected).mean()))
    other = DataConfig(train_path="elsewhere.jsonl", max_length=64, max_prompt_length=40)
    assert cached_lengths(other, tmp_path)[0] is None  # another source's entry is not used
    assert cached_lengths(DataConfig(train_path="synthetic", max_length=32, max_prompt_length=16), tmp_path)[0] \
        is None  # pairs longer than this max_length: another run's entry


# ------------------------------------------------------------------------------------ the shipped configs

def target_gpu_gib(path: Path) -> float:
    """The GPU a shipped config is written for: 80 GiB (H100), or an H200 (143,771 MiB, "141 GB") where its
    first line says so (the one-node MoE configs)."""
    return 140.0 if "141 GB" in path.read_text().splitlines()[0] else 80.0


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_layout_fits_its_gpus(path):
    cfg = load_config(path)
    gpus = 32 if path.stem.endswith("_multinode") else 8
    plan = plan_run(cfg, gpus, config_path=path, gpu_memory_gib=target_gpu_gib(path))
    configured = [p for p in plan.layouts if p.configured]
    assert len(configured) == 1 and configured[0].fits, (path, configured and configured[0].memory)
    assert plan.layouts[0].fits
    times = [round(p.time.total, 6) for p in plan.layouts if p.fits]  # the ranking's key: ties go to less traffic
    assert times == sorted(times)


def test_json_layouts(tmp_path):
    path = ROOT / "configs" / "simpo" / "llama3_8b_base_8gpu.yaml"
    layouts = plan_json(plan_run(load_config(path), 8, config_path=path))
    keys = {"tp", "pp", "vpp", "dp", "cp", "ep", "recompute", "distributed_optimizer", "fits", "memory_gib",
            "step_time_s", "comm_gib", "overrides"}
    for layout in layouts:
        assert keys <= set(layout)
        assert layout["tp"] * layout["pp"] * layout["dp"] * layout["cp"] == 8
        parts = layout["memory_gib"]
        assert {"weights", "grads", "optimizer", "activations", "pipeline_in_flight", "head", "buffers"} < set(parts)
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], abs=0.01)
    configured = [x for x in layouts if x["configured"]]
    assert configured[0]["overrides"] == [] and (configured[0]["tp"], configured[0]["dp"]) == (2, 4)
    other = next(x for x in layouts if x["tp"] == 1 and x["pp"] == 2 and x["vpp"] is None)
    assert "parallel.tp=1" in other["overrides"] and "parallel.pp=2" in other["overrides"]


def test_setup_follows_the_config():
    from simpo_mcore.plan.planner import setup_for

    cfg = load_config(ROOT / "configs" / "simpo" / "llama3_8b_base_8gpu.yaml",
                      ["train.precision=fp32", "model.spec=sdpa", "model.logprob_recompute=false"])
    setup = setup_for(cfg, shape_of("princeton-nlp__Llama-3-Base-8B-SFT"))
    assert isinstance(setup, Setup)
    assert (setup.impl.spec, setup.impl.act_bytes, setup.numerics.param_bytes, setup.keep_logits) == \
        ("sdpa", 4, 4, True)
    assert setup.numerics.torch_adam  # no TE: megatron falls back to torch's AdamW


# -------------------------------------------------------------------------------------------- the command

def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simpo_mcore.cli", "simpo-plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # four processes of the command
def test_plan_command_table_and_errors(tmp_path):
    proc = plan_cli("configs/simpo/llama3_8b_base_8gpu.yaml", "--gpus", "8", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "on 8 GPUs of 80 GiB" in lines[0] and "measured H200 MFU" in proc.stdout
    assert "(as configured)" in proc.stdout  # the shipped layout, shown below the top 3
    bad_ckpt = tmp_path / "bad.yaml"
    bad_ckpt.write_text("_base_: " + str(ROOT / "configs/simpo/llama3_8b_base_8gpu.yaml") +
                        "\nmodel: {checkpoint: checkpoints/unknown-model-mcore}\n")
    cases = {("configs/simpo/missing.yaml", "--gpus", "8"): "missing.yaml does not exist",
             ("configs/simpo/llama3_8b_base_8gpu.yaml", "--gpus", "0"): "--gpus must be >= 1",
             (str(bad_ckpt), "--gpus", "8"): "no architecture found for model.checkpoint"}
    for args, message in cases.items():
        proc = plan_cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert error_lines(proc.stderr) == proc.stderr.splitlines() and len(error_lines(proc.stderr)) == 1
        assert message in proc.stderr


def test_plan_imports_neither_torch_nor_megatron():
    """``--help`` and a whole plan answer without importing torch or megatron (most of the command's time
    otherwise): the planner reads the architecture and the FLOP count from torch-free modules."""
    code = ("import sys\nfrom simpo_mcore import cli\ntry:\n    cli.plan_main(['--help'])\nexcept SystemExit:\n"
            "    pass\nrc = cli.plan_main(['configs/simpo/llama3_8b_base_8gpu.yaml', '--gpus', '8', '--top', '1'])\n"
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron'}), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip() == "0 []", proc.stderr[-2000:]
    assert "simpo-plan" in proc.stdout and "on 8 GPUs of 80 GiB" in proc.stdout


def test_long_context_config_fits_by_context_parallelism():
    """The 32k-token config (pairs of two 32k sequences, one 64k row per micro-batch) on 8 GPUs: its CP 4 x TP 2
    layout without recomputation fits 80 GiB, the same at CP 1 or 2 does not; per rank the activations at CP c are
    close to 1 / c of CP 1's (the attention keeps less of the keys under CP: a little below), and the weights,
    gradients and optimizer state do not change with CP at DP x CP = 4."""
    path = ROOT / "configs" / "simpo" / "llama3.1_8b_instruct_32k_8gpu.yaml"
    plan = plan_run(load_config(path), 8, config_path=path, cp_sizes=(1, 2, 4, 8))
    (mine,) = [p for p in plan.layouts if p.configured]
    assert (mine.layout.tp, mine.layout.cp, mine.layout.dp, mine.layout.recompute) == (2, 4, 1, "none") and mine.fits
    by_cp = {p.layout.cp: p for p in plan.layouts if (p.layout.tp, p.layout.pp, p.layout.recompute) == (2, 1, "none")
             and p.layout.distributed_optimizer}
    assert not by_cp[1].fits and not by_cp[2].fits and by_cp[4].fits
    for cp in (2, 4):
        ratio = by_cp[cp].memory.activations / by_cp[1].memory.activations
        assert 0.85 / cp <= ratio <= 1 / cp, (cp, ratio)
        assert by_cp[cp].memory.weights + by_cp[cp].memory.grads + by_cp[cp].memory.optimizer == \
            by_cp[1].memory.weights + by_cp[1].memory.grads + by_cp[1].memory.optimizer


def test_long_context_sizing_tool_is_the_planner():
    """``tools/long_context_sizing.py`` (the tables of docs/long_context.md) gives, for one 32k pair at CP 4 x TP 2,
    the activations ``simpo-plan`` gives the 32k config."""
    proc = subprocess.run([sys.executable, "tools/long_context_sizing.py", "--models",
                           "meta-llama__Llama-3.1-8B-Instruct", "--lengths", "32768", "--cp", "4", "--recompute",
                           "none"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| none | 32k |"))
    saved = float(row.split("|")[3].split("/")[0])
    path = ROOT / "configs" / "simpo" / "llama3.1_8b_instruct_32k_8gpu.yaml"
    (mine,) = [p for p in plan_run(load_config(path), 8, config_path=path).layouts if p.configured]
    assert saved == round(mine.memory.activations / 2**30, 1)


@pytest.mark.slow  # a process of the command
def test_hf_config_flag_and_70b(tmp_path):
    """``--hf-config`` wins over the config's model: the 70B on 64 GPUs fits only with model parallelism."""
    path = Path("configs/simpo/llama3_8b_base_multinode.yaml")
    proc = plan_cli(str(path), "--gpus", "64", "--json", "--hf-config",
                    "configs/hf/meta-llama__Meta-Llama-3-70B/config.json")
    assert proc.returncode == 0, proc.stderr
    layouts = json.loads(proc.stdout)
    assert layouts[0]["fits"] and layouts[0]["tp"] * layouts[0]["pp"] > 1
    assert not any(x["fits"] for x in layouts if x["tp"] == 1 and x["pp"] == 1)


@pytest.mark.slow  # builds and trains two tiny models in a process of its own
def test_gpu_check_script_runs_on_a_cpu(tmp_path):
    """``benchmarks/plan_gpu_check.py`` (prepared for a GPU) at the tiny shape on a CPU: its cases run and its
    predictions match there (the GPU numbers wait for a GPU)."""
    out = tmp_path / "plan_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/plan_gpu_check.py", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}",
                               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and len(report["cases"]) == 2
    for case in report["cases"]:
        ratios = case["predicted_over_measured"]
        assert ratios["weights"] == ratios["grads"] == ratios["optimizer"] == 1.0, case
        assert ratios["activations"] == pytest.approx(1.0, abs=0.02), case
