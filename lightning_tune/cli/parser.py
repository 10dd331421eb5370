"""The recipes' LightningCLI parser and where `--config NAME` is found; imports no verb.

Every verb that reads a recipe config (`fit`, `test`, `validate`, `data`, `check-config`) goes
through `make_cli`, so they agree on what a config means. A config name is found, in order, as a
path, in the folders of `LIGHTNING_TUNE_CONFIG_PATH` (os.pathsep-separated), in the folders that
installed packages register under the `lightning_tune.configs` entry-point group, and among the
bundled configs. Only the standard library and PyYAML are imported at module level, so `ls`, `cp`
and `--help` stay fast.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from lightning_tune.cli.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_PATH_ENV = "LIGHTNING_TUNE_CONFIG_PATH"
# Installed packages register config folders here: `name = "my_pkg.configs"` names a package whose folder holds *.yaml.
CONFIG_ENTRY_POINTS = "lightning_tune.configs"
# Lightning's checkpoint names that are not files: resolved by the Trainer.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


# The options of every verb that reads a recipe config (`fit`'s, and `validate`, `data`, `check-config`), for their --help.
CONFIG_OPTIONS_HELP = """options:
  --config FILE_OR_NAME   a config file, or a config's name (python -m lightning_tune ls lists them);
                          repeat to merge several, later wins
  --KEY VALUE             any key of the config, overriding it: --trainer.max_steps 100,
                          --model.init_args.lr 1e-4 (or --model.lr 1e-4), --data.max_seq_len 256
                          (python -m lightning_tune fit --help lists every trainer and data key;
                          fit --model.help lightning_tune.LoRAFinetune a recipe's keys)"""


def summary_of(doc: str | None) -> str:
    """A verb function's docstring without its `Args:` section, for `--help`'s description (jsonargparse
    lists each parameter with its own line of that section already)."""
    import inspect

    return inspect.cleandoc(doc or "").split("\nArgs:")[0].strip()


def entry_point_config_dirs() -> list[Path]:
    """Folders registered by installed packages (`lightning_tune.configs` entry points).

    The folder of the named package is located without running the package itself (its parent is
    imported by `find_spec`, so keep that light)."""
    import importlib.util

    dirs = []
    for ep in entry_points(group=CONFIG_ENTRY_POINTS):
        try:
            spec = importlib.util.find_spec(ep.value)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise UsageError(f"entry point {CONFIG_ENTRY_POINTS}:{ep.name} = {ep.value!r} is not an importable package folder of configs")
        dirs.extend(Path(location) for location in locations)
    return dirs


def env_config_dirs() -> list[Path]:
    """The folders of LIGHTNING_TUNE_CONFIG_PATH, in order; empty entries are skipped."""
    return [Path(p).expanduser() for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p]


def config_dirs() -> list[Path]:
    """Where `--config NAME` looks after the path itself, first match wins: the user's folders, the
    installed packages' folders, the bundled configs."""
    return [*env_config_dirs(), *entry_point_config_dirs(), CONFIG_DIR]


def bundled_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def find_config(name: str) -> Path:
    """An existing path wins; otherwise NAME (with or without .yaml) in `config_dirs()`."""
    if Path(name).exists():
        return Path(name)
    for folder in config_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise UsageError(f"--config: no file {name!r} and no bundled config of that name (python -m lightning_tune ls lists them; {CONFIG_PATH_ENV} adds folders)")


def check_config_file(path: Path) -> None:
    """A config must be a YAML mapping; say which file and which line when it is not (jsonargparse
    would report a YAML error or a list without naming the file)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--config: cannot read {path} ({type(err).__name__}: {err})") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"--config: {path}{where}: invalid YAML ({problem})") from None
    if content is None:
        raise UsageError(f"--config: {path} is empty; expected a mapping with trainer:, model: and data: sections")
    if not isinstance(content, dict):
        raise UsageError(f"--config: {path} holds a {type(content).__name__}, expected a mapping with trainer:, model: and data: sections")


def resolve_config(name: str) -> str:
    """The path `--config NAME` means, checked to be a YAML mapping."""
    path = find_config(name)
    if path.is_file():
        check_config_file(path)
    return str(path)


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every `--config X` / `--config=X` so config names work after a plain pip install."""
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


def names_data_class(argv: list[str]) -> bool:
    """Whether the arguments or config files give `data` a `class_path` (a data module other than
    InstructDataModule, e.g. `lightning_tune.ChatDataModule`). Only then is `data:` parsed in
    subclass mode (class_path + init_args), so every flat `data:` config reads exactly as before."""
    import yaml

    for i, arg in enumerate(argv):
        if arg.startswith("--data.class_path") or (arg.startswith("--data=") and "class_path" in arg) or (arg == "--data" and "class_path" in "".join(argv[i + 1 : i + 2])):
            return True
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path is None:
            continue
        try:
            data = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("data")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
            continue  # the CLI itself reports a config it cannot read
        if isinstance(data, dict) and "class_path" in data:
            return True
    return False


def check_ckpt_file(path: str) -> None:
    """Refuse, in one line, a `--ckpt_path` file that is not a weights-only torch checkpoint, before
    anything is written. The read is memory-mapped, so a 100 GB checkpoint costs nothing here; a
    pickle that would run code is refused by `weights_only=True` and never executed."""
    import pickle
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):  # torch.save (and so Lightning) writes a zip archive
        raise UsageError(f"--ckpt_path: {path} is not a torch checkpoint (not the zip archive torch.save writes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UsageError(f"--ckpt_path: {path}: refused: it holds Python objects other than tensors and plain containers, which could run code when loaded") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--ckpt_path: {path} cannot be read as a torch checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(f"--ckpt_path: {path} is not a Lightning checkpoint (no state_dict)")


def _class_of(spec: Any) -> type | None:
    """The class a parsed `class_path:` entry names, or None."""
    import importlib

    class_path = getattr(spec, "class_path", None) if spec is not None and not isinstance(spec, (bool, str)) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def derive_run_dirs(trainer: Any) -> None:
    """One value, one place: a run's logs go to `default_root_dir/logs/` (a logger's `save_dir`) and
    its checkpoints to `default_root_dir/checkpoints/` (ModelCheckpoint's `dirpath`) unless the
    config sets them; the exports already go to `default_root_dir`. So `--trainer.default_root_dir X`
    moves everything a run writes. Fills the parsed config in place (before it is validated), so the
    saved config.yaml says where they went."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import Logger

    root = trainer.get("default_root_dir") or os.getcwd()
    loggers = trainer.get("logger")
    for spec in loggers if isinstance(loggers, list) else [loggers]:
        cls, init_args = _class_of(spec), getattr(spec, "init_args", None)
        if cls is not None and issubclass(cls, Logger) and init_args is not None and "save_dir" in init_args and init_args.save_dir is None:
            init_args.save_dir = str(root)
    for spec in trainer.get("callbacks") or []:
        cls, init_args = _class_of(spec), getattr(spec, "init_args", None)
        if cls is not None and issubclass(cls, ModelCheckpoint) and init_args is not None and init_args.get("dirpath") is None:
            init_args.dirpath = str(Path(root) / "checkpoints")


def default_tokenizer_to_checkpoint(config: Any) -> None:
    """One value, one place: with `data.tokenizer_path` unset and `model.checkpoint_dir` set, the
    data is tokenised by the checkpoint's own tokenizer (a Hugging Face or Meta directory holds one,
    a `.gguf` file describes one; `tokenizer.load_tokenizer` reads all three). A checkpoint directory
    without a tokenizer (e.g. one our own tests save) leaves it unset: source demo then uses its
    bundled tokenizer, any other source is refused by the data module. A checkpoint not there yet
    still fills it, so `validate` reports the one missing path under model.checkpoint_dir. Fills
    the parsed config in place, so `--print_config` and the saved config.yaml show the path used."""
    from lightning_tune.io.paths import resolve_path

    data, model = config.get("data"), config.get("model")
    data_args = getattr(data, "init_args", data)
    model_args = getattr(model, "init_args", None)
    if data_args is None or model_args is None or "tokenizer_path" not in data_args:
        return
    checkpoint_dir = model_args.get("checkpoint_dir")
    if data_args.tokenizer_path is not None or not checkpoint_dir:
        return
    try:
        path = resolve_path(checkpoint_dir)
    except (OSError, ValueError):  # e.g. pkg:// of a package not installed: reported where the model loads it
        path = None
    if path is not None and path.is_dir() and not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return
    data_args.tokenizer_path = str(checkpoint_dir)


# What a finished run leaves in its default_root_dir (`FinetuneModule.export_to`).
EXPORT_DIRS = ("adapter", "merged")


def checkpoint_callbacks(trainer: Any) -> list:
    """The trainer's ModelCheckpoint callbacks that know their folder (ours: `derive_run_dirs` sets it)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]


def last_checkpoint_exists(trainer: Any) -> bool:
    """Whether `--ckpt_path last` finds something to resume: a last*.ckpt (file, or a sharded directory) in a
    ModelCheckpoint's folder. True when no callback names its folder (Lightning then searches itself)."""
    callbacks = checkpoint_callbacks(trainer)
    return not callbacks or any(any(Path(cb.dirpath).glob(f"{cb.CHECKPOINT_NAME_LAST}*.ckpt")) for cb in callbacks)


def check_no_finished_run(root: Path) -> None:
    """Refuse, in one line, a new run whose exports would replace a finished run's adapter/ or merged/ in `root`."""
    found = [name for name in EXPORT_DIRS if (root / name).exists()]
    if found:
        raise UsageError(
            f"trainer.default_root_dir: {root} holds a finished run's {' and '.join(f'{name}/' for name in found)}, which this run's exports would replace;"
            " give this run its own --trainer.default_root_dir (or resume that run with --ckpt_path last)"
        )


def make_cli(argv: list[str], run: bool = True, instantiate: bool = True):
    """The LightningCLI of the recipes. With `run=False`, argv holds no verb and the CLI only parses
    and instantiates (model, data, trainer): what `validate` and notebooks-from-configs need. With
    `instantiate=False` too it only parses: `cli.config` is the resolved config."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_tune.data import InstructDataModule, TokenizedDataModule
    from lightning_tune.recipes import FinetuneModule
    from lightning_tune.training.callbacks import DivergenceGuard, StepSeed

    class TuneCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # One value, one place: the model learns the tokenizer (the data module's, with its own
            # default for the demo data) and the length from the data.
            parser.link_arguments("data.tokenizer_path", "model.init_args.tokenizer_path", apply_on="instantiate")
            parser.link_arguments(f"{data_prefix}max_seq_len", "model.init_args.max_seq_len")
            # Always on, whatever callbacks a config lists: exact resume and a clear stop on NaN/inf.
            parser.add_lightning_class_args(StepSeed, "step_seed")
            parser.add_lightning_class_args(DivergenceGuard, "divergence_guard")

        def _parse_ckpt_path(self) -> None:
            """The command line wins over the checkpoint: Lightning would load the checkpoint's
            hyper-parameters over the parsed ones (a `--model.lora_rank 8` silently trained at the
            checkpoint's rank). The recipe's `on_load_checkpoint` refuses a checkpoint that does not
            fit. Only check here that the file is a weights-only checkpoint, in one line."""
            if not self.config.get("subcommand"):
                return
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
                return
            path = Path(ckpt_path).expanduser()
            if path.is_file():
                check_ckpt_file(str(path))
            elif not path.is_dir():  # a directory is a sharded (FSDP2) checkpoint: its reader checks it
                raise UsageError(f"--ckpt_path: {ckpt_path} does not exist (give a .ckpt file, a sharded checkpoint directory, or last)")

        def parse_arguments(self, parser, args) -> None:
            """Parse, fill in the run directories derived from default_root_dir and the tokenizer
            from the checkpoint, then validate (a logger's save_dir is required, so it is filled
            before the check) and, with --print_config, print the result and exit."""
            # --print_config is taken out and done here, after the values derived below are filled
            # in (jsonargparse would print from inside parse_args, before them).
            printing = [a for a in args if a == "--print_config" or a.startswith("--print_config=")]
            config = parser.parse_args([a for a in args if a not in printing], _skip_validation=True)
            subcommand = config.get("subcommand")
            run_config = config[subcommand] if subcommand else config
            derive_run_dirs(run_config.trainer)
            default_tokenizer_to_checkpoint(run_config)
            parser.validate(config)
            self.config = config
            if printing:
                flags = printing[-1].partition("=")[2]
                skip_none = "skip_null" in flags.split(",")
                sys.stdout.write(self._parser(subcommand).dump(run_config, skip_none=skip_none))
                sys.exit(0)

        def instantiate_classes(self) -> None:
            if instantiate:
                super().instantiate_classes()
                check = getattr(self.model, "check_data_module", None)
                if check is not None:  # before the Trainer saves the config: a refused run writes nothing
                    check(self.datamodule)

        def before_fit(self) -> None:
            """Before anything is written: `--ckpt_path last` with no last checkpoint yet says so in one line
            (and starts the new run it would start anyway); a new run into a folder holding a finished
            run's exports is refused (it would replace them)."""
            fit_args = self.config_init["fit"]
            if fit_args.get("ckpt_path") == "last" and not last_checkpoint_exists(self.trainer):
                dirs = ", ".join(str(cb.dirpath) for cb in checkpoint_callbacks(self.trainer))
                print(f"fit: --ckpt_path last: no last checkpoint in {dirs} to resume; starting a new run", file=sys.stderr)
                fit_args["ckpt_path"] = None
            if fit_args.get("ckpt_path") is None and getattr(self.model, "export", False):
                check_no_finished_run(Path(self.trainer.default_root_dir))

        def instantiate_trainer(self, **kwargs: Any):
            from lightning.fabric.utilities.exceptions import MisconfigurationException
            from lightning.pytorch.callbacks import ProgressBar

            from lightning_tune.training.progress import progress_bar

            # Progress by optimiser step with an ETA (training/progress.py), unless the config turns the bar
            # off or names its own.
            trainer = self._get(self.config_init, "trainer", default={})
            callbacks = trainer.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if trainer.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                trainer["callbacks"] = [*callbacks, progress_bar()]
            try:
                return super().instantiate_trainer(**kwargs)
            except MisconfigurationException as err:  # e.g. accelerator cuda on a machine without a GPU
                message = " ".join(str(err).split())
                key = "trainer.accelerator" if "accelerator" in message.lower() else "trainer"
                raise UsageError(f"{key}: {message}") from None

    # `data:` is InstructDataModule's arguments, or any of our data modules when a config names one
    # (`data: {class_path: lightning_tune.ChatDataModule, init_args: ...}`).
    args = resolve_config_args(argv)
    data_subclass = names_data_class(args)
    data_prefix = "data.init_args." if data_subclass else "data."
    # We pass argv explicitly (to resolve config names); Lightning warns about that.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return TuneCLI(
        FinetuneModule,
        TokenizedDataModule if data_subclass else InstructDataModule,
        subclass_mode_model=True,
        subclass_mode_data=data_subclass,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # Checkpoints are written to a temporary file and renamed into place, after a disk-space check.
        trainer_defaults={"plugins": {"class_path": "lightning_tune.training.callbacks.AtomicCheckpointIO"}},
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": False, "prog": "python -m lightning_tune", "exit_on_error": False},
    )


def print_config(argv: list[str]) -> str:
    """The config `fit` would run, as YAML text: LightningCLI's own `--print_config`, captured.
    `argv` holds no verb."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            make_cli([*argv, "--print_config"], run=False, instantiate=False)
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise
    return out.getvalue()


def resolved_config(argv: list[str]) -> dict[str, Any]:
    """The config `fit` would run, as a dict."""
    import yaml

    return yaml.safe_load(print_config(argv))
