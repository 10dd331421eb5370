"""Write a PEFT adapter or a Hugging Face directory from any training checkpoint (`python -m lightning_tune export`, lightning_tune/cli/export.py).

The checkpoint carries the recipe's hyper-parameters (`save_hyperparameters`), so the model is rebuilt
exactly as in the run: the recipe class, its architecture and LoRA settings, the base checkpoint (from the
run unless `--checkpoint_dir` is given). The checkpoint's weights (adapters only for LoRA) are loaded over
it, and the same writers as the end of `fit` produce the files.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

import torch

from lightning_tune.checkpoint import from_pretrained, load_training_checkpoint, save_hf_checkpoint, save_peft_adapter
from lightning_tune.checkpoint.gguf import OutType, check_gguf_target, check_outtype, save_gguf
from lightning_tune.io.files import CheckpointError, check_export_target
from lightning_tune.io.gguf import GGUFError
from lightning_tune.io.paths import resolve_path
from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.reward_model import RewardModel

# Hyper-parameters LightningCLI adds beside the recipe's own arguments.
CLI_KEYS = ("_class_path", "_instantiator")


def recipe_class(hparams: dict, ckpt_path: Path) -> type[FinetuneModule]:
    """The recipe that wrote the checkpoint; only classes of this package are imported."""
    class_path = hparams.get("_class_path")
    if class_path is None:  # saved outside LightningCLI: LoRA settings tell the recipes apart
        class_path = "lightning_tune.LoRAFinetune" if "lora_rank" in hparams else "lightning_tune.FullFinetune"
    module_name, _, name = class_path.rpartition(".")
    if module_name != "lightning_tune" and not module_name.startswith("lightning_tune."):
        raise CheckpointError(f"{ckpt_path}: recipe {class_path!r} is not a lightning_tune recipe; refusing to import it")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, FinetuneModule)):
        raise CheckpointError(f"{ckpt_path}: {class_path!r} is not a fine-tuning recipe")
    return cls


def _float_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the run trained in (bf16 under precision bf16-true), read off the saved weights."""
    return next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)


def load_recipe_from_checkpoint(ckpt_path: str | Path, checkpoint_dir: str | None = None, tokenizer_path: str | None = None, need_base: bool = True, need_tokenizer: bool = True) -> FinetuneModule:
    """The run's recipe with the checkpoint's weights, on the CPU, in eval mode.

    Args:
        ckpt_path: Lightning checkpoint (.ckpt) of a fit run.
        checkpoint_dir: Base model directory; default: the run's own.
        tokenizer_path: Tokenizer copied into Hugging Face exports; default: the run's own.
        need_base: The caller uses the base weights (not only the adapters): refuse a LoRA run on a
            random-init base, whose checkpoints store the adapters only, so a rebuilt base would hold
            other weights than the run trained on.
        need_tokenizer: The caller uses the run's tokenizer: a recorded `tokenizer_path` that no longer
            exists (the run was made on another machine or folder) is one line asking for
            `--tokenizer_path`; without this the recipe is rebuilt without it (a PEFT adapter needs none).
    """
    ckpt_path = Path(ckpt_path).expanduser()
    checkpoint = load_training_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state_dict, dict):
        raise CheckpointError(f"{ckpt_path}: no hyper_parameters/state_dict; expected a checkpoint written by a lightning_tune fit")
    cls = recipe_class(hparams, ckpt_path)
    kwargs = {k: v for k, v in hparams.items() if k not in CLI_KEYS}
    if checkpoint_dir is not None:
        kwargs["checkpoint_dir"] = checkpoint_dir
    if tokenizer_path is not None:
        kwargs["tokenizer_path"] = tokenizer_path
    elif isinstance(kwargs.get("tokenizer_path"), str) and not resolve_path(kwargs["tokenizer_path"]).exists():
        if need_tokenizer:
            raise CheckpointError(f"{ckpt_path}: the run's tokenizer_path {kwargs['tokenizer_path']!r} no longer exists; pass --tokenizer_path")
        kwargs["tokenizer_path"] = None
    kwargs["export"] = False
    optimizer = kwargs.get("optimizer")
    if isinstance(optimizer, str) and "." in optimizer and not optimizer.startswith("torch.optim."):
        # An import path read from a file is never imported (the file would choose code to run); the
        # rebuilt recipe only exports or evaluates, so it builds no optimizer and takes the default.
        kwargs.pop("optimizer")
        kwargs.pop("optimizer_args", None)
    try:
        module = cls(**kwargs)
    except TypeError as err:
        raise CheckpointError(f"{ckpt_path}: its hyper-parameters do not fit {cls.__name__} ({err})") from None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_float_dtype(state_dict))  # configure_model builds in the default dtype, as under the Trainer
    try:
        module.configure_model()
    finally:
        torch.set_default_dtype(previous)
    if need_base and module.checkpoint_dir is None and not module.strict_loading:
        raise CheckpointError(
            f"{ckpt_path}: the run trained adapters on a random-init base, which its checkpoints do not store; use the run's merged/ (written at fit end), or --format peft for the adapter alone"
        )
    module.on_load_checkpoint(checkpoint)  # the recipe's own checks (LoRA: every adapter present)
    result = module.load_state_dict(state_dict, strict=module.strict_loading)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"{ckpt_path}: {len(unexpected)} weights do not belong to the model (e.g. {unexpected[0]})")
    return module.eval()


def export_checkpoint(ckpt_path: str, format: Literal["peft", "hf"], output: str, checkpoint_dir: str | None = None, tokenizer_path: str | None = None) -> Path:
    """Export a fit checkpoint: a PEFT adapter (LoRA runs) or a Hugging Face directory (adapters merged in).

    Args:
        ckpt_path: Lightning checkpoint (.ckpt) of a fit run, e.g. out/RUN/checkpoints/last.ckpt.
        format: peft (adapter_config.json + adapter_model.safetensors) or hf (transformers-loadable Llama).
        output: Directory to write: a new or empty one, or a previous export of the same format (replaced whole, atomically); any other existing path is refused.
        checkpoint_dir: Base model directory; default: the one the run was trained from.
        tokenizer_path: Tokenizer copied into an hf export; default: the run's.
    """
    check_export_target(output, format)  # before the model is built: a refused output costs nothing
    module = load_recipe_from_checkpoint(ckpt_path, checkpoint_dir, tokenizer_path, need_base=format != "peft", need_tokenizer=format != "peft")
    if isinstance(module, RewardModel):  # a sequence classifier (score head), not a causal LM
        if format == "peft":
            raise CheckpointError(f"{ckpt_path}: a reward model's adapter alone would lack its score head; use --format hf (a sequence-classification directory)")
        return module.save_merged(output)
    if format == "peft":
        if not module.tuning.frozen_base:  # full fine-tuning (and full DPO): no adapters
            raise CheckpointError(f"{ckpt_path}: a full fine-tuning checkpoint has no adapters; use --format hf")
        return save_peft_adapter(module.model, output, base_model_name_or_path=module.checkpoint_dir)
    return save_hf_checkpoint(module.export_state_dict(), module.model.config, output, tokenizer_path=module.tokenizer_path, chat_template=module.chat_template)


def export_gguf(
    output: str | Path,
    outtype: OutType = "f16",
    ckpt_path: str | Path | None = None,
    checkpoint_dir: str | None = None,
    tokenizer_path: str | None = None,
) -> Path:
    """`export --format gguf`: a fit's checkpoint (adapters merged in) or a model directory / .gguf, as one GGUF file.

    Args:
        output: The .gguf file to write (an Ollama Modelfile is written beside it).
        outtype: Tensor type of the 2-D weights: f32, f16, bf16 or q8_0 (norms stay f32, as llama.cpp writes them);
            mxfp4 for a mixture of experts: its experts in MXFP4, every other matrix in q8_0 (llama.cpp's MXFP4_MOE).
        ckpt_path: Lightning checkpoint (.ckpt) of a fit run; its base model comes from the run (or checkpoint_dir).
        checkpoint_dir: Without ckpt_path: the model to convert, a Hugging Face directory (e.g. a fit's merged/) or a .gguf.
        tokenizer_path: Tokenizer to write into the file; default: the run's, else the one in or of checkpoint_dir.
    """
    check_outtype(outtype)
    check_gguf_target(resolve_path(output).absolute(), modelfile=True)  # before the model is built: a refused output costs nothing
    chat_template = None  # the tokenizer's own (a fit's merged/ holds the run's)
    if ckpt_path is not None:
        module = load_recipe_from_checkpoint(ckpt_path, checkpoint_dir, tokenizer_path)
        if isinstance(module, RewardModel):
            raise GGUFError(f"{ckpt_path}: a reward model exports as a transformers sequence classifier (--format hf), not as GGUF")
        state, config = module.export_state_dict(), module.model.config
        tokenizer = tokenizer_path or module.tokenizer_path or module.checkpoint_dir
        chat_template = module.chat_template  # the one the run's chat data used
    elif checkpoint_dir is not None:
        model = from_pretrained(checkpoint_dir)
        state, config = model.state_dict(), model.config
        tokenizer = tokenizer_path or checkpoint_dir
    else:
        raise GGUFError("export --format gguf: give --ckpt_path (a fit's checkpoint) or --checkpoint_dir (a Hugging Face directory or a .gguf)")
    if tokenizer is None:
        raise GGUFError(f"{output}: the run has no tokenizer to write into the GGUF; pass --tokenizer_path")
    return save_gguf(state, config, output, outtype=outtype, tokenizer=tokenizer, chat_template=chat_template)
