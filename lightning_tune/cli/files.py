"""`ls` and `cp`: the recipes and configs there are, and a copy of one to edit. No torch, no Lightning."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning_tune.cli.errors import UsageError
from lightning_tune.cli.parser import find_config


def ls(argv: list[str]) -> int:
    """`ls`: every recipe (bundled and registered) and every config folder with its configs."""
    from lightning_tune.cli.recipes import config_folders, recipes

    if argv in (["-h"], ["--help"]):
        print("usage: python -m lightning_tune ls\n\nList the recipes (bundled and registered by installed packages) and the configs of every config folder, with each config's first comment line.")
        return 0
    if argv:
        raise UsageError("ls: takes no arguments")
    print("recipes:")
    for recipe in recipes():
        print(f"  {recipe.name:<14} {recipe.path}: {recipe.summary}")
    for label, folder in config_folders():
        configs = sorted(folder.glob("*.yaml"))
        print(f"{label} configs ({folder}):" + ("" if configs else " none"))
        for path in configs:
            print(f"  {path.name:<28} {summary(path.read_text(encoding='utf-8'))}")
    return 0


def summary(config_text: str) -> str:
    """A config's description: its first comment lines up to one that ends a sentence, joined (never cut mid-sentence)."""
    lines = []
    for line in config_text.splitlines():
        if not line.startswith("#") or not line[1:].strip():
            if lines:
                break
            continue
        lines.append(line[1:].strip())
        if lines[-1].endswith("."):  # a sentence ends with the line: enough for a listing
            break
    return " ".join(lines)


def cp(argv: list[str]) -> int:
    """`cp NAME DEST`: copy a config (bundled, or from a config folder) to DEST for editing."""
    if argv in (["-h"], ["--help"]):
        print(
            "usage: python -m lightning_tune cp NAME DEST\n\nCopy the config NAME (a name python -m lightning_tune ls lists, or a path) to DEST (a file, or a folder to copy it into); an existing file is never overwritten."
        )
        return 0
    if len(argv) != 2:
        raise UsageError("cp: usage: python -m lightning_tune cp NAME DEST")
    source = find_config(argv[0])
    dest = Path(argv[1])
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise UsageError(f"cp: {dest} already exists; remove it or choose another destination")
    if not dest.parent.exists():
        raise UsageError(f"cp: directory {dest.parent} does not exist")
    shutil.copyfile(source, dest)
    print(f"copied {source.name} to {dest}")
    return 0
