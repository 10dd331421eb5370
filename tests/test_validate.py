"""`validate`: every bundled config checks in seconds without allocating, and the memory estimate is
within 25% of the peak measured on the tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lightning_tune.cli import bundled_configs
from lightning_tune.memory import estimate_memory
from lightning_tune.model import llama2_config
from lightning_tune.validate import check, validate_command

# Runs a config for 3 optimiser steps on full-length, fully labelled batches (the worst case the
# estimate assumes) and prints the estimate and the peak RSS increase over the pre-fit baseline.
# MALLOC_MMAP_THRESHOLD_ makes glibc return large freed blocks at once, so RSS tracks live tensors.
MEASURE = textwrap.dedent("""
    import resource, sys
    import torch
    from torch.utils.data import DataLoader
    from lightning_tune.cli import make_cli
    from lightning_tune.validate import check

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


@pytest.mark.parametrize("config", [p.name for p in bundled_configs()])
def test_validate_every_bundled_config_on_meta(config, capsys, tmp_path, monkeypatch):
    """7B/13B/70B configs: no checkpoint here, so the missing paths are reported (exit 2) and the
    estimate is still printed; nothing is allocated (the test process could not hold 70B)."""
    monkeypatch.chdir(tmp_path)
    code = validate_command(["--config", config])
    out, err = capsys.readouterr()
    assert "peak (estimate)" in out and "trainable parameters" in out
    if config.startswith("tiny"):
        assert code == 0 and "config OK" in out and "error" not in err
    else:
        assert code == 2
        assert "model.checkpoint_dir: checkpoint directory 'checkpoints/meta-llama/" in err
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
    from lightning_tune.data.datamodule import DEMO_TOKENIZER

    assert validate_command(["--config", "tiny_lora.yaml", "--data.source=missing.jsonl", f"--data.tokenizer_path={DEMO_TOKENIZER}"]) == 2
    assert "data.source: data file 'missing.jsonl' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lightning_tune.modules.LoRAFinetune\n  init_args:\n    model: tiny_llama2\n    lora_rnak: 4\n")
    assert validate_command(["--config", str(bad)]) == 2
    assert "lora_rnak" in capsys.readouterr().err
    assert validate_command(["--config", "no_such_config.yaml"]) == 2
    assert "no bundled config" in capsys.readouterr().err
