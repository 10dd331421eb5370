"""`check-config FILE [--KEY VALUE ...]` and `lightning_tune.check_config`: the check every bundled
config gets, for your own configs and recipes (use it in your test suite).

Three steps, each failing with one line: the config parses (through the parser `fit` uses, so a
custom `class_path:` recipe is imported and its typed parameters are checked); `--print_config`
round-trips (what it prints parses back to the same config); and the recipe trains two optimiser
steps, shrunk to a tiny random-init model on the bundled demo data on the CPU, with its exports.
"""

from __future__ import annotations

import tempfile
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tune.cli.errors import UsageError, condense_parse_error
from lightning_tune.cli.parser import CONFIG_OPTIONS_HELP
from lightning_tune.families import SIZES, model_config

# A tiny random-init model on the CPU with the bundled demo data (its tokenizer has 512 ids).
TINY_MODEL_ARGS = "{vocab_size: 512, num_layers: 1, num_heads: 4, num_kv_heads: 2, embed_dim: 32, intermediate_dim: 64}"
SHRINK = [
    "--model.init_args.checkpoint_dir=null",
    f"--model.init_args.model_args={TINY_MODEL_ARGS}",
    "--data.source=demo",
    "--data.tokenizer_path=null",
    "--data.max_seq_len=96",
    "--data.batch_size=2",
    "--data.val_size=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32",
    "--trainer.max_steps=2",
    "--trainer.max_epochs=1",
    "--trainer.accumulate_grad_batches=1",
    "--trainer.val_check_interval=null",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.callbacks=[]",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class ConfigCheckError(ValueError):
    """A config failed one of the checks; the message names the file and the step."""


@dataclass
class ConfigCheck:
    """What `check_config` ran: the resolved config, and the shrunk run's recipe and trainer."""

    resolved: dict[str, Any]
    model: Any
    trainer: Any


def shrink_args(resolved: dict[str, Any]) -> list[str]:
    """SHRINK, plus a named size when the config reads its architecture from checkpoint_dir (which
    the shrunk run drops)."""
    init = (resolved.get("model") or {}).get("init_args") or {}
    size_key = "model_name" if "model_name" in init else "model"
    named = [] if init.get(size_key) else [f"--model.init_args.{size_key}=tiny_llama2"]
    # A sampling recipe (GRPO) decodes max_completion_len tokens per rollout: a few are enough to check it runs.
    rollouts = ["--model.init_args.max_completion_len=8", "--model.init_args.num_generations=2"] if "max_completion_len" in init else []
    # LongRoPE lists one factor per rotary frequency of the size's head: keep its head_dim (decoupled from the tiny width).
    size = SIZES.get(init.get(size_key) or "")
    head = [f"--model.init_args.model_args={TINY_MODEL_ARGS[:-1]}, head_dim: {model_config(init[size_key]).head_dim}}}"] if size and size.config.get("rope_type") == "longrope" else []
    return [*SHRINK, *named, *rollouts, *head]


def check_config(path: str | Path, *overrides: str, root: str | Path | None = None) -> ConfigCheck:
    """Parse the config at `path` (a file, or a config name `--config` finds) with `overrides`,
    round-trip `--print_config`, and train two shrunk steps; raise `ConfigCheckError` (one line) on
    the first failure.

    Args:
        path: The config file (or a name in LIGHTNING_TUNE_CONFIG_PATH / the bundled configs).
        overrides: Extra `--KEY=VALUE` arguments, as on the command line.
        root: Where the two steps write (their exports); default: a temporary directory, removed.
    """
    import yaml

    from lightning_tune.cli.parser import make_cli, print_config

    config = ["--config", str(path), *overrides]
    try:
        make_cli(config, run=False, instantiate=False)  # parses and validates: unknown keys, bad types, missing values
        first = print_config(config)
    except ArgumentError as err:
        raise ConfigCheckError(f"{path}: {condense_parse_error(str(err))}") from None
    resolved = yaml.safe_load(first)
    with tempfile.TemporaryDirectory(prefix="lightning_tune_check_") as tmp:
        dumped = Path(tmp) / "print_config.yaml"
        dumped.write_text(first)
        again = print_config(["--config", str(dumped)])
        if again != first:
            changed = next((a for a, b in zip(first.splitlines(), again.splitlines()) if a != b), "(length differs)")
            raise ConfigCheckError(f"{path}: --print_config does not round-trip: re-reading it changes the line {changed.strip()!r}")
        out = Path(root) if root is not None else Path(tmp) / "run"
        cli = make_cli([*config, *shrink_args(resolved), f"--trainer.default_root_dir={out}"], run=False)
        if getattr(cli.model, "model", None) is not None:
            raise ConfigCheckError(f"{path}: the recipe built its model at construction; build it in configure_model (validate and FSDP need a cheap construction)")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if cli.trainer.global_step != 2:
            raise ConfigCheckError(f"{path}: the shrunk run stopped after {cli.trainer.global_step} optimiser steps, expected 2")
    return ConfigCheck(resolved, cli.model, cli.trainer)


def main(argv: list[str]) -> int:
    """`check-config FILE [--KEY VALUE ...]`: the three checks, one line each."""
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m lightning_tune check-config FILE_OR_NAME [--KEY VALUE ...]\n\n" + __doc__ + "\n" + CONFIG_OPTIONS_HELP.replace("  --config FILE_OR_NAME ", "  FILE_OR_NAME          ", 1)
        )
        return 0
    if argv[0].startswith("-"):
        raise UsageError("check-config: give the config file first: check-config FILE [--KEY VALUE ...]")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric"):  # the check prints its own summary
        logging.getLogger(name).setLevel(logging.WARNING)
    result = check_config(argv[0], *argv[1:])
    recipe = type(result.model).__name__
    print(f"{argv[0]}: parses ({recipe}), --print_config round-trips, trains 2 shrunk steps: OK")
    return 0
