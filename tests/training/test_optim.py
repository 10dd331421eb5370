"""The optimiser and schedule chosen in the config: schedules against transformers', an SGD run against a
hand-written loop, 8-bit AdamW, one-line errors, --print_config, the memory estimate, exact resume."""

from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from kill_helpers import fit_args, run_fit, run_fits
from tiny_helpers import TINY, batches
from torch.utils.data import DataLoader

from lightning_tune.checkpoint import load_training_checkpoint
from lightning_tune.recipes import FullFinetune, LoRAFinetune
from lightning_tune.training.optim import lr_multiplier, state_bytes_per_parameter


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


class LearningRates(pl.Callback):
    """Every param group's learning rate as each optimiser step runs."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen.append([group["lr"] for group in optimizer.param_groups])


def transformers_schedule(name: str, warmup: int, total: int, min_ratio: float):
    from transformers import optimization as o

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if name == "cosine" and min_ratio:
        return optimizer, o.get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio)
    make = {"cosine": o.get_cosine_schedule_with_warmup, "linear": o.get_linear_schedule_with_warmup}.get(name)
    return optimizer, make(optimizer, warmup, total) if make else o.get_constant_schedule_with_warmup(optimizer, warmup)


@pytest.mark.parametrize(
    "name,warmup,total,min_ratio", [("cosine", 10, 100, 0.0), ("cosine", 7, 50, 0.1), ("cosine", 0, 30, 0.0), ("linear", 10, 100, 0.0), ("linear", 0, 17, 0.0), ("constant", 5, 40, 0.0)]
)
def test_schedules_equal_transformers(name, warmup, total, min_ratio):
    optimizer, scheduler = transformers_schedule(name, warmup, total, min_ratio)
    for step in range(total):
        # The same float64 formula, terms in another order: a few ulps of 1.
        assert lr_multiplier(step, name, warmup, total, min_ratio) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-12), step
        optimizer.step()
        scheduler.step()


def test_linear_decay_reaches_its_floor():
    assert lr_multiplier(20, "linear", 0, 20, 0.25) == 0.25 and lr_multiplier(10, "linear", 0, 20, 0.25) == pytest.approx(0.625)


def run_steps(module, steps: int, accumulate: int = 1) -> LearningRates:
    seen = LearningRates()
    trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[seen]).fit(module, DataLoader(batches(steps * accumulate), batch_size=None))
    return seen


def test_constant_schedule_gives_the_learning_rate_at_every_step():
    module = FullFinetune(model_name="tiny_llama2", model_args=TINY, export=False, lr=2e-3, lr_schedule="constant", warmup_steps=0)
    assert run_steps(module, 4).seen == [[2e-3, 2e-3]] * 4  # both groups (decayed matrices, undecayed vectors), exactly


def test_recipe_schedule_steps_per_optimiser_step_over_the_trainers_steps():
    """Warm-up 2, cosine to 0.1 x lr over max_steps 6 with 2 micro-batches per step: transformers' values."""
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, export=False, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1)
    seen = run_steps(module, 6, accumulate=2).seen
    optimizer, scheduler = transformers_schedule("cosine", 2, 6, 0.1)
    for got in seen:
        assert got[0] == pytest.approx(1e-2 * scheduler.get_last_lr()[0], rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert len(seen) == 6


def test_sgd_two_steps_equal_a_hand_written_loop():
    """SGD with momentum and weight decay, constant lr, the same batch twice; norm weights not decayed."""
    torch.manual_seed(0)
    lr, wd = 0.1, 0.01
    module = FullFinetune(
        model_name="tiny_llama2", model_args=TINY, export=False, optimizer="torch.optim.SGD", optimizer_args={"momentum": 0.9}, lr=lr, weight_decay=wd, lr_schedule="constant", warmup_steps=0
    )
    module.configure_model()  # fit reuses this model: the reference starts from the same weights
    reference = copy.deepcopy(module.model)
    batch = batches(1, masked_prompt=3)[0]
    trainer(max_steps=2).fit(module, DataLoader([batch, batch], batch_size=None))

    matrices = [p for p in reference.parameters() if p.dim() >= 2]
    vectors = [p for p in reference.parameters() if p.dim() < 2]
    assert vectors, "the tiny model has norm weights: the no-decay group is tested"
    sgd = torch.optim.SGD([{"params": matrices, "weight_decay": wd}, {"params": vectors, "weight_decay": 0.0}], lr=lr, momentum=0.9)
    for _ in range(2):
        logits = reference(batch["input_ids"])  # [B, T, V]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)  # mean over labelled tokens
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    # Gradients agree to fp32 rounding of sums over ~20 positions (chunked head vs full logits); two
    # steps move a weight by lr * (g0 + 1.9 g1): differences ~1e-7 |w| + 3e-8, far below one decay of a
    # norm weight (lr * wd = 1e-3), which a decayed norm would show.
    got = dict(module.model.named_parameters())
    for name, want in reference.named_parameters():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


class OptimiserDefaults(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.defaults = dict(optimizer.defaults)


@pytest.mark.parametrize(("optimizer_args", "fused", "foreach"), [(None, True, None), ({"foreach": True}, None, True), ({"fused": False}, False, None)])
def test_adamw_runs_fused_on_cpu_unless_the_config_says_otherwise(optimizer_args, fused, foreach):
    """The fused kernel is the default (one pass per tensor instead of ~8: the optimiser step of full
    fine-tuning is ~5x faster); a config's own fused/foreach choice is kept as given."""
    seen = OptimiserDefaults()
    module = FullFinetune(model_name="tiny_llama2", model_args=TINY, export=False, optimizer_args=optimizer_args)
    trainer(max_steps=1, callbacks=[seen]).fit(module, DataLoader(batches(1), batch_size=None))
    assert seen.defaults["fused"] == fused and seen.defaults["foreach"] == foreach


def test_fused_adamw_steps_equal_the_reference_loop():
    """Three fused AdamW steps on a recipe's parameter groups equal torch's single-tensor AdamW loop.

    The fused kernel computes each element's update with the same fp32 operations in another order:
    after three steps an element differs by a few ulp of its update (lr * ~1 = 1e-3, so ~1e-10),
    far below 1e-7 (rtol 1e-6 on weights ~0.02, atol 1e-9).
    """
    from lightning_tune.training.optim import param_groups, with_fused_default

    torch.manual_seed(0)
    weights = {"w": torch.nn.Parameter(torch.randn(64, 32) * 0.02), "norm": torch.nn.Parameter(torch.ones(32))}
    copies = {name: torch.nn.Parameter(p.detach().clone()) for name, p in weights.items()}
    kwargs = with_fused_default(torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01}, weights.values())
    assert kwargs["fused"] is True
    fused = torch.optim.AdamW(param_groups(weights.items(), 0.01), **kwargs)
    reference = torch.optim.AdamW(param_groups(copies.items(), 0.01), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, foreach=False)
    for step in range(3):
        for name in weights:
            weights[name].grad = copies[name].grad = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(step))
        fused.step()
        reference.step()
    for name in weights:
        torch.testing.assert_close(weights[name], copies[name], rtol=1e-6, atol=1e-9, msg=name)


def test_8bit_adamw_trains_on_cpu_with_uint8_state():
    pytest.importorskip("bitsandbytes")
    module = FullFinetune(model_name="tiny_llama2", model_args={**TINY, "vocab_size": 256}, export=False, optimizer="bitsandbytes.optim.AdamW8bit")
    run_steps(module, 2)
    optimizer = module.trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    embedding = module.model.model.embed_tokens.weight  # 256 x 32: bitsandbytes keeps tensors under 4096 elements in fp32
    assert optimizer.state[embedding]["state1"].dtype == torch.uint8
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # norms undecayed, whatever the optimiser


def test_8bit_adamw_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ValueError, match=re.escape("optimizer: bitsandbytes.optim.AdamW8bit needs bitsandbytes: pip install bitsandbytes (in a checkout: pip install -e '.[qlora]')")):
        FullFinetune(model_name="tiny_llama2", optimizer="bitsandbytes.optim.AdamW8bit")


def test_optimiser_state_bytes_per_parameter():
    assert state_bytes_per_parameter("torch.optim.AdamW", None) == 8  # exp_avg, exp_avg_sq in fp32
    assert state_bytes_per_parameter("AdamW", {"amsgrad": True}) == 12
    assert state_bytes_per_parameter("torch.optim.AdamW", None, torch.bfloat16) == 4
    assert state_bytes_per_parameter("torch.optim.SGD", {"momentum": 0.9}) == 4
    assert state_bytes_per_parameter("torch.optim.SGD", None) == 0
    pytest.importorskip("bitsandbytes")
    # Two uint8 states plus one fp32 absmax per 256-element block for each: a quarter of AdamW's, and 2 x 4 / 256.
    assert state_bytes_per_parameter("bitsandbytes.optim.AdamW8bit", None) == 2 + 2 * 4 / 256


def test_memory_estimate_counts_the_chosen_optimiser():
    from lightning_tune.model import llama2_config
    from lightning_tune.training.memory import estimate_memory

    config = llama2_config("tiny_llama2", **TINY)
    settings = dict(batch_size=2, seq_len=16)
    adamw = estimate_memory(config, lambda model: None, **settings)
    assert adamw.optimizer == 8 * adamw.trainable
    assert estimate_memory(config, lambda model: None, **settings, optimizer="torch.optim.SGD").optimizer == 0
    pytest.importorskip("bitsandbytes")
    eight = estimate_memory(config, lambda model: None, **settings, optimizer="bitsandbytes.optim.AdamW8bit")
    assert eight.optimizer == int((2 + 8 / 256) * adamw.trainable)
    assert eight.total < adamw.total


def test_print_config_shows_the_optimiser_and_schedule(capsys):
    from lightning_tune.cli import make_cli

    args = [
        "fit",
        "--config",
        "tiny_lora.yaml",
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer_args",
        "{momentum: 0.9, nesterov: true}",
        "--model.lr_schedule",
        "linear",
        "--model.min_lr_ratio",
        "0.1",
        "--print_config",
    ]
    with pytest.raises(SystemExit):
        make_cli(args)
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert (init["optimizer"], init["optimizer_args"], init["lr_schedule"], init["min_lr_ratio"], init["lr"], init["warmup_steps"]) == (
        "torch.optim.SGD",
        {"momentum": 0.9, "nesterov": True},
        "linear",
        0.1,
        0.003,
        20,
    )


BAD = [
    (["--model.optimizer", "torch.optim.Adamm"], "optimizer: 'torch.optim.Adamm' is not a torch.optim.Optimizer class"),
    (["--model.optimizer", "no_such_package.Optim"], "optimizer: cannot import 'no_such_package' for 'no_such_package.Optim'"),
    (["--model.optimizer", "torch.nn.Linear"], "optimizer: 'torch.nn.Linear' is not a torch.optim.Optimizer class"),
    (["--model.optimizer", "SGD", "--model.optimizer_args", "{mommentum: 0.9}"], "optimizer_args: torch.optim.sgd.SGD takes no argument 'mommentum'; it takes momentum, dampening"),
    (["--model.optimizer", "SGD", "--model.optimizer_args", "{momentum: -1}"], "optimizer_args: torch.optim.sgd.SGD refused {'momentum': -1"),
    (["--model.optimizer_args", "{lr: 0.1}"], "optimizer_args: 'lr' is a recipe parameter; set model.lr instead"),
    (["--model.lr_schedule", "cosin"], "model.lr_schedule"),
    (["--model.lr_schedule", "constant", "--model.min_lr_ratio", "0.1"], "min_lr_ratio: a constant schedule does not decay"),
]

# One interpreter runs every case through the entry point's main(), capturing stderr per case.
CASES_SCRIPT = """
import contextlib, io, json, sys
from lightning_tune.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_bad_optimiser_settings_are_one_line(tmp_path):
    cases = [["fit", "--config", "tiny_lora.yaml", "--trainer.max_steps=1", *args, f"--trainer.default_root_dir={tmp_path / str(i)}"] for i, (args, _) in enumerate(BAD)]
    result = subprocess.run([sys.executable, "-c", CASES_SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for (args, expected), (code, err) in zip(BAD, json.loads(result.stdout.splitlines()[-1])):
        lines = [line for line in err.splitlines() if line.strip() and line != "Seed set to 42" and "kernels" not in line]  # bitsandbytes' import notice
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, err)
    assert not any(tmp_path.iterdir()), "a rejected configuration writes nothing"


def train_losses(root: Path, version: str) -> dict[int, str]:
    with (root / "logs" / version / "metrics.csv").open() as file:
        return {int(row["step"]): row["train_loss"] for row in csv.DictReader(file) if row.get("train_loss")}


@pytest.mark.slow  # a whole run in subprocesses (kill and resume, several processes, a notebook)
def test_resume_restores_a_non_default_optimiser_and_schedule_exactly(tmp_path):
    """SGD with Nesterov momentum and a linear decay with a floor: killed after step 3, resumed, it equals
    the uninterrupted run bit for bit (losses, learning rates, momentum buffers, scheduler state)."""
    choice = [
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer_args",
        "{momentum: 0.9, nesterov: true}",
        "--model.lr",
        "0.05",
        "--model.lr_schedule",
        "linear",
        "--model.warmup_steps",
        "2",
        "--model.min_lr_ratio",
        "0.2",
        "--model.weight_decay",
        "0",
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_fits(
        (fit_args(straight, "run", max_steps=6, extra=choice), False),
        (fit_args(broken, "run", max_steps=6, extra=[*choice, "--trainer.callbacks+", "kill_helpers.KillAtStep", "--trainer.callbacks.step", "3"]), True),
    )
    run_fit(fit_args(broken, "resumed", max_steps=6, extra=[*choice, "--ckpt_path", "last"]))
    assert {**train_losses(broken, "run"), **train_losses(broken, "resumed")} == train_losses(straight, "run")
    a, b = load_training_checkpoint(straight / "checkpoints" / "last.ckpt"), load_training_checkpoint(broken / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["lr_schedulers"][0]["_last_lr"] != [0.05, 0.05]
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]
    assert a["optimizer_states"][0]["param_groups"][0]["nesterov"] is True
    states_a, states_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert states_a.keys() == states_b.keys() and states_a
    assert all(torch.equal(states_a[k]["momentum_buffer"], states_b[k]["momentum_buffer"]) for k in states_a)
