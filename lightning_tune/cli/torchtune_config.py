"""A torchtune 0.6.x recipe config, translated into a lightning_tune config (`import-config torchtune`).

torchtune configs name components (`_component_: torchtune.models.llama3_1.lora_llama3_1_8b`) with
their arguments beside them, and top-level recipe settings (`epochs`, `gradient_accumulation_steps`,
`dtype`, ...). Each known key has one rule below, from the component or key to the `__init__`
parameter of our recipe, data module or Lightning's Trainer that means the same thing; a value that
differs in meaning is converted (torchtune's `max_steps_per_epoch` counts optimiser steps, Lightning's
`limit_train_batches` batches) and torchtune's defaults are written out where ours differ (its Alpaca
builders train on the prompt by default, ours do not). Every key without an equivalent is reported,
one line each, in the result's `notes`, which the verb prints and writes into the output as comments:
nothing is dropped silently.

The file is read as data (YAML, `${key}` interpolations resolved here): nothing it names is imported.
Pure Python, no torch: the verb answers fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_tune.families import SIZES


class TranslationError(ValueError):
    """A config that cannot be translated (not a torchtune fine-tuning config, an unsupported model); one line."""


# torchtune model builders whose architecture is one of our sizes under another name.
SIZE_ALIASES = {"phi3_mini": "phi3_mini_4k", "mistral_7b": "mistral_7b_v0_1"}  # None: no equivalent
# torchtune's data set builders -> (our data module, its fixed arguments, torchtune's train_on_input default).
DATASETS = {
    "alpaca_dataset": ("lightning_tune.InstructDataModule", {"source": "tatsu-lab/alpaca", "template": "alpaca"}, True),
    "alpaca_cleaned_dataset": ("lightning_tune.InstructDataModule", {"source": "yahma/alpaca-cleaned", "template": "alpaca"}, True),
    "instruct_dataset": ("lightning_tune.InstructDataModule", {"template": "none"}, False),
    "slimorca_dataset": ("lightning_tune.ChatDataModule", {"source": "Open-Orca/SlimOrca-Dedup", "column_map": {"messages": "conversations", "role": "from", "content": "value"}}, False),
    "chat_dataset": ("lightning_tune.ChatDataModule", {}, False),
    "stack_exchange_paired_dataset": (
        "lightning_tune.PreferenceDataModule",
        {"source": "lvwerra/stack-exchange-paired", "column_map": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}},
        False,
    ),
    "preference_dataset": ("lightning_tune.PreferenceDataModule", {}, False),
}
LORA_ARGS = ("lora_rank", "lora_alpha", "lora_dropout", "apply_lora_to_mlp", "apply_lora_to_output", "use_dora")
TORCHTUNE_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
# torchtune tokenizers whose prompt_template defaults to a chat template (the others' default is none).
DEFAULT_PROMPT_TEMPLATES = {"llama2_tokenizer": "Llama2ChatTemplate", "mistral_tokenizer": "MistralChatTemplate"}
PRECISIONS = {"bf16": "bf16-true", "fp32": "32", "float32": "32", "bfloat16": "bf16-true"}
# Top-level keys that only steer torchtune's own bookkeeping, each with what takes its place here.
REPLACED = {
    "log_peak_memory_stats": "peak memory is always logged (peak_memory_gib)",
    "resume_from_checkpoint": "resume with --ckpt_path last",
    "save_adapter_weights_only": "a LoRA fit always writes adapter/ (PEFT) and merged/ (a Hugging Face directory)",
    "profiler": "not translated; profile with Lightning's --trainer.profiler",
    "output_dir": None,  # handled
}


@dataclass
class Translation:
    """Our config (LightningCLI's layout) and the lines that say what was not carried over."""

    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    recipe: str = ""

    def to_yaml(self, source: str) -> str:
        """The config as YAML, headed by where it came from and by the notes, as comments."""
        lines = [f"# Translated from the torchtune config {source} by `python -m lightning_tune import-config torchtune`."]
        lines += [f"# Recipe: {self.recipe}."] if self.recipe else []
        if self.notes:
            lines.append("# Not carried over (no equivalent here, or a default that differs):")
            lines += [f"#   - {note}" for note in self.notes]
        return "\n".join(lines) + "\n" + yaml.safe_dump(self.config, sort_keys=False, default_flow_style=False)


def read_torchtune_config(path: Path) -> dict[str, Any]:
    """The YAML of `path` with torchtune's `${key}` / `${a.b}` interpolations resolved (OmegaConf's
    syntax, the forms torchtune's configs use); one-line errors for what is not such a config."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TranslationError(f"{path}: cannot read ({error})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise TranslationError(f"{path}: {'line ' + str(mark.line + 1) + ': ' if mark else ''}not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(config, dict):
        raise TranslationError(f"{path}: expected a torchtune config (a mapping of keys), got {type(config).__name__}")
    return _resolve(config, config, path)


def _resolve(value: Any, root: dict[str, Any], path: Path, depth: int = 0) -> Any:
    if depth > 20:
        raise TranslationError(f"{path}: interpolations nest more than 20 deep (a cycle?)")
    if isinstance(value, dict):
        return {key: _resolve(item, root, path, depth) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, root, path, depth) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(dotted: str) -> Any:
        node: Any = root
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise TranslationError(f"{path}: ${{{dotted}}} names no key of the config")
            node = node[part]
        return _resolve(node, root, path, depth + 1)

    whole = re.fullmatch(r"\$\{([\w.]+)\}", value)
    if whole:  # a whole-value interpolation keeps the referenced value's type
        return lookup(whole.group(1))
    return re.sub(r"\$\{([\w.]+)\}", lambda match: str(lookup(match.group(1))), value)


def _component(section: Any) -> tuple[str, dict[str, Any]]:
    """(the builder's last name, its arguments) of a `{_component_: a.b.name, ...}` section."""
    if not isinstance(section, dict) or not isinstance(section.get("_component_"), str):
        return "", {}
    args = {key: value for key, value in section.items() if key != "_component_"}
    return section["_component_"].rsplit(".", 1)[-1], args


def model_size(builder: str) -> tuple[str, str | None]:
    """(our size name, "lora" / "qlora" / None) for a torchtune model builder, e.g. qlora_llama3_1_8b -> (llama3_1_8b, qlora)."""
    kind = next((prefix for prefix in ("qlora", "lora") if builder.startswith(prefix + "_")), None)
    name = builder.removeprefix(f"{kind}_") if kind else builder
    name = name.removesuffix("_instruct")  # the same architecture; the weights are checkpoint_dir's
    if name in SIZE_ALIASES:
        alias = SIZE_ALIASES[name]
        if alias is None:
            raise TranslationError(f"model: torchtune's {builder} has no equivalent size here (sizes: {', '.join(sorted(SIZES))})")
        name = alias
    if name not in SIZES:
        raise TranslationError(f"model: torchtune's {builder} ({name}) is not a size lightning_tune supports yet (sizes: {', '.join(sorted(SIZES))})")
    return name, kind


def recipe_from_file_name(stem: str) -> str | None:
    """The torchtune recipe a shipped config's file name implies (8B_lora_single_device, 8B_full,
    7B_full_low_memory, 8B_lora_dpo, ...); None when the name says nothing (the content decides)."""
    if "lora" not in stem and "full" not in stem:
        return None
    device = "single_device" if "single_device" in stem or "low_memory" in stem else "distributed"
    return f"{'lora' if 'lora' in stem else 'full'}_{'dpo' if 'dpo' in stem else 'finetune'}_{device}"


def translate(torchtune: dict[str, Any], recipe: str | None = None) -> Translation:
    """Our config for a torchtune config; `recipe` is the torchtune recipe it was written for
    (e.g. lora_finetune_single_device; default: inferred from the model builder and the loss)."""
    config = dict(torchtune)
    notes: list[str] = []
    if recipe and not re.fullmatch(r"(lora|full)_(finetune|dpo)_(single_device|distributed)", recipe):
        raise TranslationError(
            f"recipe: {recipe} is not a recipe lightning_tune translates (lora/full finetune or DPO, single device or distributed; not QAT, distillation, PPO, generation or evaluation)"
        )
    builder, model_args = _component(config.pop("model", None))
    if not builder:
        raise TranslationError("model: no `_component_` model builder; expected a torchtune recipe config (e.g. llama3_1/8B_lora_single_device.yaml)")
    size, kind = model_size(builder)
    loss_name, loss_args = _component(config.pop("loss", None))
    dpo = loss_name == "DPOLoss" or "dpo" in (recipe or "")
    if loss_name not in ("", "CEWithChunkedOutputLoss", "DPOLoss"):
        raise TranslationError(f"loss: torchtune's {loss_name} has no recipe here (supported: CEWithChunkedOutputLoss fine-tuning, DPOLoss)")
    lora = kind is not None
    distributed = recipe.endswith("_distributed") if recipe else None

    model: dict[str, Any] = {"model_name": size}
    if dpo:
        model["method"] = "lora" if lora else "full"
        recipe_class = "lightning_tune.DPOFinetune"
    else:
        recipe_class = "lightning_tune.LoRAFinetune" if lora else "lightning_tune.FullFinetune"
    if lora:
        if kind == "qlora":
            model["quantize_base"] = "nf4"
        for key in LORA_ARGS:
            if key in model_args:
                model[key] = model_args.pop(key)
        if "lora_attn_modules" in model_args:
            targets = model_args.pop("lora_attn_modules")
            model["lora_attn_modules"] = [TORCHTUNE_TARGETS.get(t, t) for t in targets]
    for key in ("quantize_base",):
        model_args.pop(key, None)
    notes += [f"model.{key}: {value!r} (an argument of torchtune's {builder} with no equivalent)" for key, value in model_args.items()]

    trainer: dict[str, Any] = {"accelerator": "auto", "devices": 1}
    data: dict[str, Any] = {}
    checkpointer_name, checkpointer = _component(config.pop("checkpointer", None))
    checkpoint_dir = checkpointer.pop("checkpoint_dir", None)
    if checkpoint_dir is not None:
        model["checkpoint_dir"] = str(checkpoint_dir)
    files = checkpointer.pop("checkpoint_files", None)
    if files:
        notes.append(f"checkpointer.checkpoint_files: {len(files) if isinstance(files, list) else files!r} file(s); every weight file of checkpoint_dir is read (its index names them)")
    output_dir = checkpointer.pop("output_dir", None) or config.get("output_dir")
    for key in ("model_type", "recipe_checkpoint", "adapter_checkpoint"):
        value = checkpointer.pop(key, None)
        if value not in (None, False) and key != "model_type":
            notes.append(f"checkpointer.{key}: {value!r}; resume a run of ours with --ckpt_path last (torchtune's recipe state is not resumed)")
    notes += [f"checkpointer.{key}: {value!r} (no equivalent)" for key, value in checkpointer.items()]
    if checkpointer_name not in ("", "FullModelHFCheckpointer", "FullModelMetaCheckpointer"):
        notes.append(f"checkpointer: {checkpointer_name} (read as a Hugging Face or Meta directory by its files)")
    if output_dir is not None:
        trainer["default_root_dir"] = str(output_dir)
    config.pop("output_dir", None)

    tokenizer_name, tokenizer = _component(config.pop("tokenizer", None))
    tokenizer_path = tokenizer.pop("path", None)
    if tokenizer_path is not None and not (checkpoint_dir is not None and str(tokenizer_path).startswith(str(checkpoint_dir).rstrip("/") + "/")):
        data["tokenizer_path"] = str(tokenizer_path)
    elif tokenizer_path is not None:
        notes.append(f"tokenizer.path: {tokenizer_path} left out: the tokenizer of model.checkpoint_dir is used (tokenizer.json, with its special tokens and chat template)")
    max_seq_len = tokenizer.pop("max_seq_len", None)
    if max_seq_len is not None:
        data["max_seq_len"] = int(max_seq_len)
        notes.append(
            f"tokenizer.max_seq_len: {max_seq_len}: a longer sample keeps its first {max_seq_len} tokens on both sides, but torchtune then replaces the last one with EOS (and trains it); here a cut sample ends without EOS"
        )
    else:
        notes.append("tokenizer.max_seq_len: null (torchtune: no limit); data.max_seq_len keeps its default (512 for instructions and chats, 1024 for pairs): raise it for longer samples")
    if tokenizer_name in DEFAULT_PROMPT_TEMPLATES and "prompt_template" not in tokenizer:
        notes.append(
            f"tokenizer.prompt_template: absent, so torchtune's {tokenizer_name} wraps each user message in {DEFAULT_PROMPT_TEMPLATES[tokenizer_name]}'s `[INST] ... [/INST]` (also around an Alpaca prompt); not carried over: data.template alone shapes the prompt here"
        )
    prompt_template = tokenizer.pop("prompt_template", None)
    if prompt_template is not None:
        notes.append(f"tokenizer.prompt_template: {prompt_template!r} (set data.template or data.chat_template)")
    notes += [f"tokenizer.{key}: {value!r} (no equivalent)" for key, value in tokenizer.items()]

    dataset = config.pop("dataset", None)
    if isinstance(dataset, list):
        raise TranslationError(f"dataset: a list of {len(dataset)} data sets (torchtune's ConcatDataset); one source per run is supported today")
    dataset_name, dataset_args = _component(dataset)
    if dataset_name not in DATASETS:
        raise TranslationError(f"dataset: torchtune's {dataset_name or '(none)'} has no data module here (supported: {', '.join(DATASETS)})")
    data_class, fixed, train_on_input_default = DATASETS[dataset_name]
    data.update(fixed)
    train_on_input = bool(dataset_args.pop("train_on_input", train_on_input_default))
    for key in ("source", "split"):
        if key in dataset_args:
            data[key] = dataset_args.pop(key)
    files = dataset_args.get("data_files")
    files = files[0] if isinstance(files, list) and len(files) == 1 else files
    if data.get("source") in ("json", "csv", "parquet") and isinstance(files, str):
        # torchtune's local files (`source: json, data_files: x.json`) are our `source: x.json`
        data["source"] = files
        dataset_args.pop("data_files")
    if data_class.endswith("InstructDataModule"):
        data["train_on_input"] = train_on_input
        column_map = dataset_args.pop("column_map", None)
        if column_map:
            # torchtune's instruct columns are input (the prompt) and output; ours instruction, input, output.
            data["column_map"] = {("instruction" if key == "input" else key): value for key, value in column_map.items()}
    elif data_class.endswith("ChatDataModule"):
        data["train_on"] = "all" if train_on_input else "assistant"
        style = dataset_args.pop("conversation_style", None)
        column = dataset_args.pop("conversation_column", None)
        if style == "sharegpt" or (style is None and "column_map" in data):
            data["column_map"] = {"messages": column or "conversations", "role": "from", "content": "value"}
        elif style == "openai":
            data["column_map"] = {"messages": column or "messages"}
        elif style is not None:
            raise TranslationError(f"dataset.conversation_style: {style!r}; expected sharegpt or openai")
    else:
        if train_on_input:
            notes.append("dataset.train_on_input: true; DPO scores the completions only")
        column_map = dataset_args.pop("column_map", None)
        if column_map:
            data["column_map"] = dict(column_map)
    packed = dataset_args.pop("packed", None)
    if not data_class.endswith("PreferenceDataModule"):
        data["pack"] = bool(packed)  # torchtune's default is unpacked, ours packed
    elif packed:
        notes.append("dataset.packed: preference pairs are never packed")
    for key, value in dataset_args.items():
        notes.append(f"dataset.{key}: {value!r} (an argument of torchtune's {dataset_name} with no equivalent)")

    seed = config.pop("seed", None)
    out: dict[str, Any] = {"seed_everything": int(seed) if seed is not None else 42}
    if seed is None:
        notes.append("seed: null (torchtune: a random seed); seed_everything: 42 here, so runs repeat")
    if "shuffle" in config:
        data["shuffle"] = bool(config.pop("shuffle"))
    if "batch_size" in config:
        data["batch_size"] = int(config.pop("batch_size"))

    optimizer_name, optimizer = _component(config.pop("optimizer", None))
    optimizer_path = (torchtune.get("optimizer") or {}).get("_component_") if isinstance(torchtune.get("optimizer"), dict) else None
    if optimizer_path and optimizer_path != "torch.optim.AdamW":
        model["optimizer"] = optimizer_path
    for key in ("lr", "weight_decay"):
        if key in optimizer:
            model[key] = float(optimizer.pop(key))
    if "betas" in optimizer:
        model["betas"] = [float(b) for b in optimizer.pop("betas")]
    elif "Adam" in optimizer_name:  # torch's and bitsandbytes' Adam default; FullFinetune's own is (0.9, 0.95)
        model["betas"] = [0.9, 0.999]
    decay = model.get("weight_decay", 0.01)  # AdamW's default (torch's and bitsandbytes')
    if decay > 0 and not lora and "Adam" in optimizer_name:
        notes.append(f"optimizer.weight_decay: {decay}: torchtune decays every parameter; here norm weights and biases are not decayed")
    if optimizer:
        model["optimizer_args"] = dict(optimizer)
    scheduler_name, scheduler = _component(config.pop("lr_scheduler", None))
    if scheduler_name == "get_cosine_schedule_with_warmup":
        model["lr_schedule"] = "cosine"
        model["warmup_steps"] = int(scheduler.pop("num_warmup_steps", 0))
        cycles = scheduler.pop("num_cycles", 0.5)
        if cycles != 0.5:
            notes.append(f"lr_scheduler.num_cycles: {cycles} (our cosine schedule is a half cycle)")
        notes += [f"lr_scheduler.{key}: {value!r} (no equivalent)" for key, value in scheduler.items()]
    elif scheduler_name:
        notes.append(f"lr_scheduler: torchtune's {scheduler_name} has no equivalent; lr_schedule: constant (warmup_steps: 0)")
        model["lr_schedule"] = "constant"
        model["warmup_steps"] = 0
    else:
        model["lr_schedule"] = "constant"  # torchtune without a scheduler keeps the learning rate
        model["warmup_steps"] = 0
    if dpo:
        beta = loss_args.pop("beta", None)
        if beta is not None:
            model["beta"] = float(beta)
        smoothing = loss_args.pop("label_smoothing", 0.0)
        if smoothing:
            notes.append(f"loss.label_smoothing: {smoothing} (torchtune's conservative DPO); set model.loss_type: robust with label_smoothing for the robust variant")
    else:
        chunks = loss_args.pop("num_output_chunks", None)
        if chunks is not None:
            notes.append(f"loss.num_output_chunks: {chunks}; the loss is chunked by tokens here (model.loss_chunk_size)")
    notes += [f"loss.{key}: {value!r} (no equivalent)" for key, value in loss_args.items()]

    accumulate = int(config.pop("gradient_accumulation_steps", 1) or 1)
    if accumulate != 1:
        trainer["accumulate_grad_batches"] = accumulate
    if "epochs" in config:
        trainer["max_epochs"] = int(config.pop("epochs"))
    steps = config.pop("max_steps_per_epoch", None)
    if steps is not None:
        trainer["limit_train_batches"] = int(steps) * accumulate  # torchtune counts optimiser steps, Lightning batches
    clip = config.pop("clip_grad_norm", None)
    if clip is not None:
        trainer["gradient_clip_val"] = float(clip)
    if "compile" in config:
        model["compile"] = bool(config.pop("compile"))
    if "enable_activation_checkpointing" in config:
        model["activation_checkpointing"] = bool(config.pop("enable_activation_checkpointing"))
    offload = config.pop("enable_activation_offloading", False)
    if offload:
        notes.append("enable_activation_offloading: true (no equivalent; activation checkpointing is on)")
    dtype = config.pop("dtype", None)
    if dtype is not None:
        if str(dtype) not in PRECISIONS:
            raise TranslationError(f"dtype: {dtype!r}; expected bf16 or fp32")
        trainer["precision"] = PRECISIONS[str(dtype)]
    device = config.pop("device", None)
    if device == "cpu":
        trainer["accelerator"] = "cpu"
    elif device not in (None, "cuda"):
        notes.append(f"device: {device!r}; trainer.accelerator: auto")
    if distributed or (distributed is None and "distributed" in str(recipe or "")):
        trainer["devices"] = "auto"
        trainer["strategy"] = "fsdp2"
    if "log_every_n_steps" in config:
        trainer["log_every_n_steps"] = int(config.pop("log_every_n_steps"))
    logger_name, logger = _component(config.pop("metric_logger", None))
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}}
    if logger_name == "WandBLogger":
        trainer["logger"] = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {k: v for k, v in logger.items() if k in ("project", "entity", "group", "name")}}
    elif logger_name not in ("", "DiskLogger"):
        notes.append(f"metric_logger: torchtune's {logger_name}; CSV metrics in default_root_dir/logs (set trainer.logger to another Lightning logger)")
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": 500, "save_last": True}}]
    for key, reason in REPLACED.items():
        if key in config:
            value = config.pop(key)
            silent = (key == "profiler" and isinstance(value, dict) and not value.get("enabled")) or (key == "log_peak_memory_stats") == bool(value)
            if reason is not None and not silent:  # False/default values mean what ours do
                notes.append(f"{key}: {value!r}: {reason}")
    notes += [f"{key}: {value!r} (no equivalent)" for key, value in config.items()]

    out["trainer"] = trainer
    out["model"] = {"class_path": recipe_class, "init_args": model}
    out["data"] = {"class_path": data_class, "init_args": data}
    inferred = recipe or f"{'lora' if lora else 'full'}_{'dpo' if dpo else 'finetune'}_single_device"
    return Translation(out, notes, inferred)
