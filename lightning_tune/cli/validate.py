"""`python -m lightning_tune validate --config X [overrides]`: check a config and estimate its memory, without training.

The config is parsed once, by the recipe parser `fit` uses. Missing checkpoint/tokenizer/data paths
are read from the resolved config, and strategies the recipes refuse (Lightning's FSDP1 over several
processes: use `fsdp2`) from its trainer section; each is reported in one line. Then the model and
data classes are instantiated (cheap: weights load only in `configure_model`) with the missing
paths passed as null and a CPU trainer standing in for the configured one (8 GPUs, FSDP), and the
memory estimate (`lightning_tune.training.memory`) is printed, from the named size when the
checkpoint is absent.

Exit codes: 0 valid (and fits a present GPU), 2 bad config, missing paths or refused strategy,
1 estimated not to fit the GPU of this machine.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_tune.cli.parser import CONFIG_OPTIONS_HELP

if TYPE_CHECKING:
    from lightning_tune.training.memory import MemoryEstimate

USAGE = "usage: python -m lightning_tune validate --config FILE_OR_NAME [--KEY VALUE ...]\n\n" + __doc__ + "\n" + CONFIG_OPTIONS_HELP

# The trainer validate instantiates in place of the configured one: it builds on any machine.
CPU_TRAINER = {"accelerator": "cpu", "strategy": "auto", "devices": 1, "precision": 32, "logger": False}
# The recipe's arguments that name a path it checks when constructed (FinetuneModule's check_path).
RECIPE_PATHS = ("checkpoint_dir", "tokenizer_path")
# `fsdp2` and the classes behind it: FSDP2 with every decoder layer its own unit (lightning_tune.training.sharding).
FSDP2_NAMES = ("fsdp2", "fsdp2strategy", "modelparallelstrategy")


@contextlib.contextmanager
def quiet_lightning():
    """Hide Lightning's start-up chatter (seed, GPU available, tips): validate prints a summary."""
    import lightning.pytorch  # noqa: F401 - importing it sets its loggers' levels: first, so ours below win

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def path_missing(spec: str | None) -> bool:
    """Whether a configured path is set and absent (pkg://PACKAGE/FILE: in an installed package), as the recipe checks it."""
    from lightning_tune.io.paths import resolve_path

    return spec is not None and not resolve_path(spec).exists()


def _tokenizer_exists(spec: str) -> bool:
    from lightning_tune.io.paths import resolve_path

    try:
        return resolve_path(spec).exists()
    except ValueError:  # a pkg:// path whose package is not installed
        return False


def download_hint(checkpoint_dir: str) -> str:
    """The `download` command that fetches a missing `checkpoints/OWNER/NAME` (where `download` puts a Hub repository), or ""."""
    parts = Path(checkpoint_dir).parts
    if len(parts) >= 3 and parts[-3] == "checkpoints":
        repo = f"{parts[-2]}/{parts[-1]}"
        where = "" if Path(checkpoint_dir) == Path("checkpoints", repo) else f" --output_dir {checkpoint_dir}"
        return f"; fetch it with: python -m lightning_tune download {repo}{where}"
    return ""


def data_path_problems(data: dict[str, Any]) -> list[str]:
    """Missing data files: the tokenizer, and a local source (hub names cannot be checked offline)."""
    from lightning_tune.data.base import LOADERS, source_file

    problems = []
    tokenizer = data.get("tokenizer_path")
    if tokenizer is not None and not _tokenizer_exists(tokenizer):  # a .model, a tokenizer.json, a checkpoint directory, a .gguf or pkg://
        problems.append(f"data.tokenizer_path: tokenizer file {tokenizer!r} does not exist")
    source = data.get("source")
    file = source_file(source) if isinstance(source, str) else None
    if file is not None and file.suffix.lower() in LOADERS and not file.is_file():
        problems.append(f"data.source: data file {source!r} does not exist")
    return problems


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


def device_problems(trainer: dict[str, Any]) -> list[str]:
    """What `fit` refuses about the devices on this machine (e.g. accelerator gpu where there is none, more
    GPUs than it has), found as `fit` finds it: Lightning's Trainer given the configured accelerator,
    devices and nodes (strategy left to Lightning; `strategy_problems` checks ours). Run `validate` on the
    machine that will train: another machine's GPUs cannot be checked."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    settings = {key: trainer[key] for key in ("accelerator", "devices", "num_nodes") if trainer.get(key) is not None}
    try:
        with quiet_lightning():
            pl.Trainer(**settings, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        message = " ".join(str(err).split())
        return [f"{'trainer.devices' if 'requested' in message.lower() else 'trainer.accelerator'}: {message} (fit refuses this on this machine)"]
    return []


def instantiate(cli: Any, missing: set[str]) -> tuple[Any, Any]:
    """(model, datamodule) of the parsed config, with a CPU trainer standing in for the real one and
    the recipe's path arguments that name a `missing` path passed as None. The recipe's tokenizer_path
    is linked from the data module's at instantiation, so it is nulled where the recipe is built."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_tune.data.base import DEMO, TokenizedDataModule
    from lightning_tune.recipes import FinetuneModule

    for key, value in CPU_TRAINER.items():
        cli.config.trainer[key] = value

    def recipe(class_type: type, *args: Any, **kwargs: Any) -> Any:
        return class_type(*args, **{k: None if k in RECIPE_PATHS and v in missing else v for k, v in kwargs.items()})

    def data(class_type: type, *args: Any, **kwargs: Any) -> Any:
        # A missing local data file is reported by `data_path_problems`; the estimate needs only the
        # module's batch shape, so it is built on the bundled demo records instead.
        return class_type(*args, **{**kwargs, "source": DEMO} if kwargs.get("source") in missing else kwargs)

    cli.parser.add_instantiator(recipe, FinetuneModule, subclasses=True, prepend=True)
    cli.parser.add_instantiator(data, TokenizedDataModule, subclasses=True, prepend=True)
    LightningCLI.instantiate_classes(cli)  # the CLI was made with instantiate=False: this is its own step
    return cli.model, cli.datamodule


@dataclass
class Check:
    """What validate found: the recipe, the run's shape, problems (missing paths, refused strategies)
    and the memory estimate."""

    model: Any  # None when the architecture is unknown (model_name null, checkpoint missing): nothing to build
    data: Any
    trainer: dict[str, Any]  # the resolved `trainer:` section
    settings: dict[str, Any]
    problems: list[str]
    estimate: MemoryEstimate | None


def check(argv: list[str]) -> Check:
    """Resolve and instantiate the config, collect problems, estimate memory (None without an architecture)."""
    import yaml

    from lightning_tune.cli.parser import make_cli
    from lightning_tune.training.memory import estimate_memory

    with quiet_lightning():
        cli = make_cli(argv, run=False, instantiate=False)  # the one parse
    resolved = yaml.safe_load(cli.parser.dump(cli.config))  # the config `fit` would run, as --print_config shows it
    model_args = (resolved.get("model") or {}).get("init_args") or {}
    data_section = resolved.get("data") or {}
    data_section = data_section.get("init_args") or data_section  # `data: {class_path, init_args}` (ChatDataModule)
    checkpoint_dir = model_args.get("checkpoint_dir")
    missing = [f"model.checkpoint_dir: checkpoint directory {checkpoint_dir!r} does not exist{download_hint(checkpoint_dir)}"] if path_missing(checkpoint_dir) else []
    data_problems = data_path_problems(data_section)  # the recipe's tokenizer_path is data's: reported once, under data
    trainer = resolved.get("trainer") or {}
    problems = device_problems(trainer) + strategy_problems(trainer) + data_problems + missing  # the download command last
    if missing and model_args.get("model_name") is None and model_args.get("model") is None:  # no size named (`model:` is its old spelling)
        return Check(None, None, trainer, {}, problems, None)  # no architecture to build the recipe from
    nulled = {p for p in (checkpoint_dir, data_section.get("tokenizer_path")) if path_missing(p)}
    if any(problem.startswith("data.source:") for problem in data_problems):
        nulled.add(data_section.get("source"))  # built on the demo records (see `instantiate`)
    with quiet_lightning():
        model, data = instantiate(cli, nulled)
    config = model.model_config()  # the checkpoint's config.json, else the named size: no weights read
    strategy, wrapped = strategy_of(trainer)
    precision = str(trainer.get("precision") or "32")
    rows, seq_len = data.batch_size * getattr(data, "rows_per_sample", 1), min(data.max_seq_len, config.max_seq_len)  # a DPO pair is two rows
    if hasattr(model, "train_batch_shape"):  # a recipe that trains on what it samples (GRPO: G completions per prompt)
        rows, seq_len = model.train_batch_shape(data.batch_size, data.max_seq_len)
        seq_len = min(seq_len, config.max_seq_len)
    settings = dict(
        batch_size=rows,
        seq_len=seq_len,
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
        rollout=model.train_batch_shape(data.batch_size, data.max_seq_len) if hasattr(model, "train_batch_shape") else None,  # sampled into a KV cache of the same shape
    )
    estimate = estimate_memory(config, model.adapt_model, **settings)
    return Check(model, data, trainer, settings, problems, estimate)


def main(argv: list[str]) -> int:
    """Print the checks and the estimate; return the exit code (see the module docstring)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    import torch

    from lightning_tune.hardware import bf16_emulation_warning, cpu_precision_advice
    from lightning_tune.training.memory import GIB

    result = check(argv)
    for line in result.problems:
        print(f"error: {line}", file=sys.stderr)
    if result.estimate is None:
        print("error: model_name: null needs an existing checkpoint_dir to read the architecture from; cannot estimate memory", file=sys.stderr)
        return 2
    model, s = result.model, result.settings
    unit = "prompts" if hasattr(result.model, "train_batch_shape") else "pairs"  # GRPO's rows are G completions per prompt
    rows = f" {unit} ({s['batch_size']} rows)" if s["batch_size"] != result.data.batch_size else ""
    print(f"recipe                {type(model).__name__} ({model.model_name or model.checkpoint_dir})")
    print(
        f"run                   batch_size {result.data.batch_size}{rows} x max_seq_len {s['seq_len']}, precision {s['precision']}, "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, strategy {s['strategy']}, "
        f"{s['devices']} device(s) x {s['num_nodes']} node(s)"
    )
    device_memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    for line in result.estimate.lines(device_memory):
        print(line)
    if s["accelerator"] in ("cpu", "auto") and device_memory is None:  # the run would use this CPU: is its precision the fast one?
        if s["precision"].startswith("bf16"):
            warning = bf16_emulation_warning(f"precision {s['precision']}")
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
        elif advice := cpu_precision_advice(s["precision"]):
            print(advice, file=sys.stderr)
    if s["strategy"] == "fsdp" and not s["fsdp_wrapped_layers"] and s["devices"] * s["num_nodes"] == 1:
        print("note: FSDP without auto_wrap_policy gathers the whole model for compute (counted above); --trainer.strategy fsdp2 shards each decoder layer", file=sys.stderr)
    if result.problems:
        return 2
    if device_memory is not None and result.estimate.total > device_memory:
        print(
            f"error: estimated peak {result.estimate.total / GIB:.1f} GiB exceeds this GPU's {device_memory / GIB:.1f} GiB; "
            "lower data.batch_size, enable activation_checkpointing, use bf16-true, or use more devices with --trainer.strategy fsdp2",
            file=sys.stderr,
        )
        return 1
    print("config OK")
    return 0
