"""`export --ckpt_path CKPT --format peft|hf --output DIR [--checkpoint_dir BASE]`: a PEFT adapter or
a Hugging Face directory from any training checkpoint (`lightning_tune.export` does the work).

A bad value (`--format onnx`) is one `error:` line, like `fit`'s.
"""

from __future__ import annotations

from typing import Literal


def export(ckpt_path: str, format: Literal["peft", "hf"], output: str, checkpoint_dir: str | None = None, tokenizer_path: str | None = None):
    """Export a fit checkpoint: a PEFT adapter (LoRA runs) or a Hugging Face directory (adapters merged in).

    Args:
        ckpt_path: Lightning checkpoint (.ckpt) of a fit run, e.g. out/RUN/checkpoints/last.ckpt.
        format: peft (adapter_config.json + adapter_model.safetensors) or hf (transformers-loadable model).
        output: Directory to write.
        checkpoint_dir: Base model directory; default: the one the run was trained from.
        tokenizer_path: Tokenizer copied into an hf export; default: the run's.
    """
    from lightning_tune.export import export_checkpoint

    return export_checkpoint(ckpt_path, format, output, checkpoint_dir, tokenizer_path)


def export_command(argv: list[str]):
    """Parse `argv` into `export`'s arguments and run it; returns the written path. Errors raise
    (the CLI's error policy prints them)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_tune export", description=export.__doc__, exit_on_error=False, default_env=False)
    parser.add_function_arguments(export, as_positional=False)
    cfg = parser.parse_args(argv)
    return export(**cfg.as_dict())


def main(argv: list[str]) -> int:
    print(f"wrote {export_command(argv)}")
    return 0
