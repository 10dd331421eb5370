"""`export --ckpt_path CKPT --format peft|hf|gguf --output DIR [--checkpoint_dir BASE]`: a PEFT adapter,
a Hugging Face directory or a GGUF file from any training checkpoint (`lightning_tune.recipes.export` and
`checkpoint/gguf.py` do the work); `--format gguf --checkpoint_dir DIR_OR_GGUF` converts a model alone.

A bad value (`--format onnx`) is one `error:` line, like `fit`'s.
"""

from __future__ import annotations

from typing import Literal


def export(
    format: Literal["peft", "hf", "gguf"],
    output: str,
    ckpt_path: str | None = None,
    checkpoint_dir: str | None = None,
    tokenizer_path: str | None = None,
    outtype: Literal["f32", "f16", "bf16", "q8_0", "mxfp4"] = "f16",
):
    """Export a fit checkpoint: a PEFT adapter (LoRA runs), a Hugging Face directory (adapters merged in)
    or a GGUF file for llama.cpp / Ollama (also from a Hugging Face directory or a .gguf, without a checkpoint).

    Args:
        format: peft (adapter_config.json + adapter_model.safetensors), hf (transformers-loadable model) or gguf (one llama.cpp file + an Ollama Modelfile).
        output: Directory to write (a .gguf file for gguf).
        ckpt_path: Lightning checkpoint (.ckpt) of a fit run, e.g. out/RUN/checkpoints/last.ckpt; gguf can instead convert checkpoint_dir alone.
        checkpoint_dir: Base model directory (or .gguf); default: the one the run was trained from.
        tokenizer_path: Tokenizer copied into an hf export (written into a gguf); default: the run's.
        outtype: gguf only: type of the 2-D weights, f32, f16, bf16 or q8_0; mxfp4 for a mixture of experts (experts in MXFP4, the rest q8_0).
    """
    if format == "gguf":
        from lightning_tune.recipes.export import export_gguf

        return export_gguf(output, outtype, ckpt_path, checkpoint_dir, tokenizer_path)
    if ckpt_path is None:
        from lightning_tune.cli.errors import UsageError

        raise UsageError(f"--ckpt_path is required for --format {format} (only gguf converts a --checkpoint_dir alone)")
    from lightning_tune.recipes.export import export_checkpoint

    return export_checkpoint(ckpt_path, format, output, checkpoint_dir, tokenizer_path)


def export_command(argv: list[str]):
    """Parse `argv` into `export`'s arguments and run it; returns the written path. Errors raise
    (the CLI's error policy prints them)."""
    from jsonargparse import ArgumentParser

    from lightning_tune.cli.parser import summary_of

    parser = ArgumentParser(prog="python -m lightning_tune export", description=summary_of(export.__doc__), exit_on_error=False, default_env=False)
    parser.add_function_arguments(export, as_positional=False)
    cfg = parser.parse_args(argv)
    return export(**cfg.as_dict())


def main(argv: list[str]) -> int:
    print(f"wrote {export_command(argv)}")
    return 0
