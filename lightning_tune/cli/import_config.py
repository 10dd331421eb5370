"""`import-config torchtune CONFIG.yaml [-o OUT.yaml] [--recipe RECIPE]`: a torchtune 0.6.x recipe config
translated into a lightning_tune config (`torchtune_config.py` has the rules). The result is printed,
or written to OUT.yaml; what has no equivalent is listed on stderr, one line per key, and as comments
at the top of the output. An existing OUT.yaml is replaced only if this verb wrote it."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_tune.cli.errors import UsageError

SOURCES = ("torchtune",)


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from lightning_tune.cli.torchtune_config import read_torchtune_config, recipe_from_file_name, translate
    from lightning_tune.io.files import atomic_write_text

    parser = ArgumentParser(
        prog="python -m lightning_tune import-config",
        description="Translate another tool's recipe config into a lightning_tune config (fit --config OUT.yaml). Today: torchtune 0.6.x.",
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument("tool", type=str, help="Where the config comes from: torchtune.")
    parser.add_argument("config", type=str, help="The config file, or the name of one torchtune ships (as `tune ls` lists it, e.g. llama3_1/8B_lora_single_device) when torchtune is installed.")
    parser.add_argument("-o", "--output", type=str | None, default=None, help="Write the translated config here (default: print it).")
    parser.add_argument(
        "--recipe",
        type=str | None,
        default=None,
        help="The torchtune recipe the config is for (e.g. lora_finetune_distributed, lora_dpo_single_device); default: from the config's model builder, loss and file name.",
    )
    cfg = parser.parse_args(argv)
    if cfg.tool not in SOURCES:
        raise UsageError(f"tool: {cfg.tool!r}; expected one of {', '.join(SOURCES)}")
    source = Path(cfg.config)
    if not source.is_file():
        source = shipped_config(cfg.config)
    recipe = cfg.recipe or recipe_from_file_name(source.stem)
    translation = translate(read_torchtune_config(source), recipe)
    text = translation.to_yaml(str(source))
    for note in translation.notes:
        print(f"note: {note}", file=sys.stderr)
    if cfg.output is None:
        sys.stdout.write(text)
        return 0
    output = Path(cfg.output)
    if output.exists() and (not output.is_file() or not output.read_text(errors="replace").startswith("# Translated from the torchtune config")):
        raise UsageError(f"--output: {output} exists and was not written by import-config; name a new file")
    atomic_write_text(output, text)
    print(f"wrote {output} ({translation.recipe}); run it with: python -m lightning_tune validate --config {output}", file=sys.stderr)
    return 0


def shipped_config(name: str) -> Path:
    """The config file torchtune ships under `name` (llama3_1/8B_lora_single_device), found in the installed
    wheel's recipes/configs without importing torchtune; a one-line UsageError where there is none."""
    import importlib.metadata

    try:
        folder = Path(str(importlib.metadata.distribution("torchtune").locate_file("recipes/configs")))
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"config: {name} is not a file (and torchtune is not installed, so it is not one of its configs either)") from None
    stem = name.removesuffix(".yaml")
    path = (folder / f"{stem}.yaml").resolve()
    if ".." in Path(stem).parts or not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise UsageError(f"config: {name} is neither a file nor a config torchtune ships (see `tune ls`, or {folder})")
    return path
