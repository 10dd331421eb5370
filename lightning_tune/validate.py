"""Check a config and estimate its memory, without training: what the `validate` verb
(`lightning_tune.cli.validate`) and the docs' memory table print.

Steps: the recipe CLI resolves the config exactly as `fit` would (`--print_config`, no instantiation),
then instantiates the model and data classes (cheap: weights load only in `configure_model`) with
the trainer on CPU, because the configured trainer (8 GPUs, FSDP) cannot be built on this machine.
Missing checkpoint/tokenizer/data paths and strategies the recipes refuse (Lightning's FSDP1 over
several processes: use `fsdp2`) are reported one line each; the memory estimate
(`lightning_tune.memory`) is still printed, from the named size when the checkpoint is absent.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tune.memory import MemoryEstimate, estimate_memory
from lightning_tune.paths import resolve_path


@contextlib.contextmanager
def quiet_lightning():
    """Hide Lightning's start-up chatter (seed, GPU available, tips): validate prints a summary."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def record_missing_paths(missing: list[str]):
    """Let the recipe's construction-time path checks record instead of raise, so validate can
    report every missing path and still estimate memory."""
    import lightning_tune.modules.base as base

    original = base.check_path

    def check_path(key: str, path: str | None, kind: str) -> None:
        if path is not None and not resolve_path(path).exists():
            missing.append(f"model.{key}: {kind} {path!r} does not exist")

    base.check_path = check_path
    try:
        yield
    finally:
        base.check_path = original


def instantiate(argv: list[str], missing: list[str]):
    """(model, datamodule) built by the recipe CLI, with a CPU trainer standing in for the real one."""
    from lightning_tune.cli.parser import make_cli

    cpu = ["--trainer.accelerator=cpu", "--trainer.strategy=auto", "--trainer.devices=1", "--trainer.precision=32", "--trainer.logger=false"]
    with record_missing_paths(missing):
        cli = make_cli([*argv, *cpu], run=False)
    return cli.model, cli.datamodule


def _tokenizer_exists(spec: str) -> bool:
    from lightning_tune.paths import resolve_path

    try:
        return resolve_path(spec).exists()
    except ValueError:  # a pkg:// path whose package is not installed
        return False


def data_path_problems(data: dict[str, Any]) -> list[str]:
    """Missing data files: the tokenizer, and a local source (hub names cannot be checked offline)."""
    from lightning_tune.data.datamodule import DEMO, LOADERS

    problems = []
    tokenizer = data.get("tokenizer_path")
    if tokenizer is not None and not _tokenizer_exists(tokenizer):  # a .model, a tokenizer.json, a checkpoint directory, a .gguf or pkg://
        problems.append(f"data.tokenizer_path: tokenizer file {tokenizer!r} does not exist")
    source = data.get("source")
    if source != DEMO and Path(source).suffix.lower() in LOADERS and not Path(source).is_file():
        problems.append(f"data.source: data file {source!r} does not exist")
    return problems


# `fsdp2` and the classes behind it: FSDP2 with every decoder layer its own unit (lightning_tune.sharding).
FSDP2_NAMES = ("fsdp2", "fsdp2strategy", "modelparallelstrategy")


def strategy_setting(trainer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(lower-case registered name or class name, init_args) of `trainer.strategy`."""
    strategy = trainer.get("strategy") or "auto"
    init_args: dict = {}
    if isinstance(strategy, dict):
        init_args = strategy.get("init_args") or {}
        strategy = strategy.get("class_path", "")
    return str(strategy).lower().rsplit(".", 1)[-1], init_args


def strategy_of(trainer: dict[str, Any]) -> tuple[str, bool]:
    """('fsdp' | 'ddp' | 'single', FSDP wraps each decoder layer) from the trainer's strategy setting.

    `fsdp2` always wraps each layer; Lightning's FSDP1 `fsdp` only with an `auto_wrap_policy`.
    """
    name, init_args = strategy_setting(trainer)
    if name in FSDP2_NAMES:
        return "fsdp", True
    kind = "fsdp" if "fsdp" in name else "ddp" if "ddp" in name else "single"
    return kind, bool(init_args.get("auto_wrap_policy"))


def device_count(trainer: dict[str, Any]) -> int:
    """Devices per node, as Lightning would count them (`auto`: the GPUs here, else 1)."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    import torch

    return max(1, torch.cuda.device_count()) if trainer.get("accelerator") != "cpu" else 1


def node_count(trainer: dict[str, Any]) -> int:
    return int(trainer.get("num_nodes") or 1)


def strategy_problems(trainer: dict[str, Any]) -> list[str]:
    """Strategies the recipes refuse at `fit`, reported now: FSDP1 over several processes (it would
    load the whole model in every one) and ModelParallelStrategy with tensor parallelism."""
    name, init_args = strategy_setting(trainer)
    kind, _ = strategy_of(trainer)
    devices, nodes = device_count(trainer), node_count(trainer)
    if kind == "fsdp" and name not in FSDP2_NAMES and devices * nodes > 1:
        return [f"trainer.strategy: Lightning's FSDPStrategy (FSDP1) on {devices} x {nodes} processes would load the whole model in every process; use --trainer.strategy fsdp2"]
    if name == "modelparallelstrategy":
        tensor_parallel = init_args.get("tensor_parallel_size", "auto")
        tensor_parallel = devices if tensor_parallel == "auto" else int(tensor_parallel)  # Lightning's "auto": the devices of a node
        if tensor_parallel != 1:
            return [f"trainer.strategy: ModelParallelStrategy with tensor_parallel_size {tensor_parallel}, but lightning_tune shards with FSDP2 only; use --trainer.strategy fsdp2"]
    return []


def model_config(model):
    """The architecture without reading weights: the checkpoint's config.json, else the named size."""
    from lightning_tune.model import llama2_config

    if model.checkpoint_dir is not None and resolve_path(model.checkpoint_dir).exists():
        return model.model_config()
    if model.model_name is None:
        return None
    return llama2_config(model.model_name, **model.model_args)


@dataclass
class Check:
    """What validate found: the recipe, the run's shape, problems (missing paths, refused strategies)
    and the memory estimate."""

    model: Any
    data: Any
    trainer: dict[str, Any]  # the resolved `trainer:` section
    settings: dict[str, Any]
    problems: list[str]
    estimate: MemoryEstimate | None


def check(argv: list[str]) -> Check:
    """Resolve and instantiate the config, collect problems, estimate memory (None without an architecture)."""
    from lightning_tune.cli.parser import resolved_config

    resolved = resolved_config(argv)
    missing: list[str] = []
    with quiet_lightning():
        model, data = instantiate(argv, missing)
    data_section = resolved.get("data") or {}
    data_section = data_section.get("init_args") or data_section  # `data: {class_path, init_args}` (ChatDataModule)
    data_problems = data_path_problems(data_section)
    # The model's tokenizer_path is linked from data's: report each missing file once, under data.
    tokenizer = data_section.get("tokenizer_path")
    missing = [m for m in missing if not (m.startswith("model.tokenizer_path:") and tokenizer and repr(tokenizer) in m)] + data_problems
    trainer = resolved.get("trainer") or {}
    problems = strategy_problems(trainer) + missing
    config = model_config(model)
    strategy, wrapped = strategy_of(trainer)
    precision = str(trainer.get("precision") or "32")
    settings = dict(
        batch_size=data.batch_size * getattr(data, "rows_per_sample", 1),  # a DPO pair is two rows
        seq_len=data.max_seq_len if config is None else min(data.max_seq_len, config.max_seq_len),
        precision="32" if precision in ("32-true", "32", "32.0") else precision,
        activation_checkpointing=bool(model.activation_checkpointing),
        strategy=strategy,
        devices=device_count(trainer),
        num_nodes=node_count(trainer),
        fsdp_wrapped_layers=wrapped,
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
        accelerator=str(trainer.get("accelerator") or "auto"),
        loss_chunk_size=int(getattr(model, "loss_chunk_size", 0) or 0),
        optimizer=model.optimizer,  # its state is counted as measured (8-bit AdamW: a quarter of AdamW's)
        optimizer_args=model.optimizer_args,
        reference_copy=bool(getattr(model, "keeps_reference_copy", False)),
    )
    estimate = None if config is None else estimate_memory(config, model.adapt_model, **settings)
    return Check(model, data, trainer, settings, problems, estimate)
