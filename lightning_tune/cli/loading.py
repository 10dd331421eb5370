"""Opening a model (and its tokenizer) for `generate`, `chat` and `eval`, written once: a Hugging Face or
Meta directory, a .gguf file or a fit's .ckpt; a PEFT adapter over it, int8 weights, the CPU linear kernel.

torch and the model code are imported inside the functions: the CLI's torch-free start (`--help`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_tune.cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from lightning_tune.model import CausalLM
    from lightning_tune.tokenizer import TokenizerProtocol


def resolve_device(device: str) -> str:
    """`auto` -> cuda when there is a GPU, else cpu; refuse a GPU that is not there, in one line."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.partition(":")[2]
        if count == 0:
            raise UsageError(f"--device: {device} asked for, but this machine has no GPU PyTorch can use; use --device cpu (or auto)")
        if index and (not index.isdigit() or int(index) >= count):
            raise UsageError(f"--device: {device} does not exist; this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")
        return device
    if device != "cpu":
        raise UsageError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}")
    return device


def load_model(checkpoint_dir: str, adapter_dir: str | None, device: str, dtype: str | None, quantize: str | None = None, linear_kernel: str = "auto") -> CausalLM:
    """The checkpoint's model on `device` in eval mode (weights in `dtype`, default the checkpoint's),
    with a PEFT adapter applied over it when given, int8 weights with `quantize="int8"` (the
    adapter merged first), and fp32 CPU linear layers computed by `linear_kernel`
    (`lightning_tune.layers.onednn`): what generate and chat both run."""
    import torch

    from lightning_tune.checkpoint import from_pretrained, load_peft_adapter

    if dtype == "bfloat16" and torch.device(device).type == "cpu":
        from lightning_tune.hardware import bf16_emulation_warning

        message = bf16_emulation_warning("--dtype bfloat16")  # printed, not logged: the CLI's one-line style
        if message:
            print(f"warning: {message}", file=sys.stderr)
    model = from_pretrained(checkpoint_dir, device=device, dtype=getattr(torch, dtype) if dtype else None)
    if adapter_dir is not None:
        load_peft_adapter(model, adapter_dir)
        model.to(device).eval()
    if quantize == "int8":
        from lightning_tune.layers.int8 import quantize_int8_

        quantize_int8_(model)
    elif quantize is not None:
        raise UsageError(f"--quantize: expected int8, got {quantize!r}")
    use_linear_kernel(model, linear_kernel)
    return model


def use_linear_kernel(model: Any, linear_kernel: str) -> None:
    """Compute the model's fp32 CPU linear layers with `linear_kernel` (auto, onednn or default); a bad value is one line."""
    from lightning_tune.layers.onednn import use_onednn_linears_

    try:
        use_onednn_linears_(model, linear_kernel)  # type: ignore[arg-type]
    except ValueError as error:
        raise UsageError(f"--{error}") from None


def load_for_eval(
    checkpoint: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[CausalLM, TokenizerProtocol]:
    """The model and tokenizer to evaluate, from a Hugging Face or Meta directory (e.g. a fit's merged/),
    a `.gguf` file, or a fit's `.ckpt` (the run's recipe rebuilt, LoRA adapters included), optionally
    with a PEFT adapter on top. The tokenizer: `tokenizer_path`, else the checkpoint's (the run's, for a .ckpt)."""
    from lightning_tune.checkpoint import from_pretrained, load_config, load_peft_adapter
    from lightning_tune.io.paths import resolve_path
    from lightning_tune.tokenizer import load_tokenizer

    path = resolve_path(checkpoint)  # pkg://PACKAGE/FILE names a file inside an installed package
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint (expected a model directory, a .gguf file or a fit's .ckpt)")
    if path.is_file() and path.suffix == ".ckpt":
        from lightning_tune.recipes.export import load_recipe_from_checkpoint

        module = load_recipe_from_checkpoint(path, tokenizer_path=tokenizer_path)  # refuses a LoRA run on a random-init base (not stored)
        tokenizer_path = tokenizer_path or module.tokenizer_path
        if tokenizer_path is None:
            raise UsageError(f"{path}: the run recorded no tokenizer_path; pass --tokenizer_path")
        tokenizer = load_tokenizer(tokenizer_path)
        model = module.model if dtype is None else module.model.to(dtype)
    else:  # config and tokenizer first: a broken or mismatched one is reported before any weight is read
        vocab_size = load_config(path).vocab_size
        tokenizer_path = tokenizer_path or path
        tokenizer = load_tokenizer(tokenizer_path)
        check_vocab(tokenizer, tokenizer_path, vocab_size)
        model = from_pretrained(path, device=device, dtype=dtype)
    check_vocab(tokenizer, tokenizer_path, model.config.vocab_size)
    if adapter_dir is not None:
        load_peft_adapter(model, adapter_dir)
    return model.to(device).eval(), tokenizer


def check_vocab(tokenizer: Any, path: str | Path, model_vocab: int) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings, in one line."""
    vocab = getattr(tokenizer, "vocab_size", None)
    if isinstance(vocab, int) and vocab > model_vocab:
        raise UsageError(f"{path}: the tokenizer has {vocab} tokens but the model only {model_vocab}")
