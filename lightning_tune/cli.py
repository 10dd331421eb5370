"""`python -m lightning_tune VERB ...`: LightningCLI for fit/validate/test/predict, small verbs beside it.

Nothing heavy is imported before the verb is known: `--help`, `ls` and `cp` answer without
importing torch or Lightning. User mistakes (a bad key, value or path) end in one `error:` line and
exit code 2; set LIGHTNING_TUNE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
RECIPES = {
    "LoRAFinetune": "lightning_tune.modules.LoRAFinetune: LoRA adapters on a frozen Llama 2; exports adapter/ (PEFT) and merged/ (HF)",
    "FullFinetune": "lightning_tune.modules.FullFinetune: all weights train; exports merged/ (HF)",
}

HELP = """usage: python -m lightning_tune VERB [options]

Fine-tune Llama 2 (LoRA or full) with PyTorch Lightning.

verbs:
  fit|validate|test|predict  run a recipe through LightningCLI: --config FILE_OR_BUNDLED_NAME,
                             --print_config, --KEY VALUE overrides (VERB --help lists every key)
  generate                   generate text from a checkpoint (generate --help)
  data                       print the first training samples decoded, masked tokens marked (data --help)
  ls                         list the recipes and the bundled configs
  cp NAME DEST               copy a bundled config to DEST for editing

example:
  python -m lightning_tune fit --config tiny_lora.yaml
"""


class UsageError(Exception):
    """A mistake in the command line; printed as one line, exit code 2."""


def bundled_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str) -> str:
    """An existing path wins; otherwise a bundled config of that name (with or without .yaml)."""
    if Path(name).exists():
        return name
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    raise UsageError(f"--config: no file {name!r} and no bundled config of that name (python -m lightning_tune ls lists them)")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every `--config X` / `--config=X` so bundled names work after a plain pip install."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve_config(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def cmd_ls() -> int:
    print("recipes:")
    for name, text in RECIPES.items():
        print(f"  {name:<14} {text}")
    print(f"bundled configs ({CONFIG_DIR}):")
    for path in bundled_configs():
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"  {path.name:<28} {first}")
    return 0


def cmd_cp(args: list[str]) -> int:
    if len(args) != 2:
        raise UsageError("cp: usage: python -m lightning_tune cp NAME DEST")
    source = Path(resolve_config(args[0]))
    dest = Path(args[1])
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise UsageError(f"cp: {dest} already exists; remove it or choose another destination")
    if not dest.parent.exists():
        raise UsageError(f"cp: directory {dest.parent} does not exist")
    shutil.copyfile(source, dest)
    print(f"copied {source.name} to {dest}")
    return 0


def run_lightning(argv: list[str]) -> int:
    """fit / validate / test / predict through LightningCLI (imports Lightning only now)."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_tune.data import InstructDataModule
    from lightning_tune.modules import FinetuneModule

    class TuneCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # One value, one place: the model learns the tokenizer and length from the data.
            parser.link_arguments(("data.source", "data.tokenizer_path"), "model.init_args.tokenizer_path", compute_fn=InstructDataModule.resolve_tokenizer_path)
            parser.link_arguments("data.max_seq_len", "model.init_args.max_seq_len")

    TuneCLI(
        FinetuneModule,
        InstructDataModule,
        subclass_mode_model=True,
        args=resolve_config_args(argv),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": False},
    )
    return 0


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "ls":
        return cmd_ls()
    if verb == "cp":
        return cmd_cp(rest)
    if verb in LIGHTNING_VERBS:
        return run_lightning(argv)
    raise UsageError(f"unknown verb {verb!r}; expected one of fit, validate, test, predict, generate, data, ls, cp")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # our validation errors (config values, paths, data, checkpoints)
        if os.environ.get("LIGHTNING_TUNE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
