"""`chat --checkpoint_dir DIR`: an interactive multi-turn conversation on the model's own chat template.

Each line read from stdin is a user message (`/reset` starts over, `/exit` or end of input quits);
the reply streams to stdout as it is generated and stops at an end-of-turn token. The conversation
itself, with the KV cache kept across turns, is `lightning_tune.generate.chat.ChatSession`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from lightning_tune.cli.errors import UsageError
from lightning_tune.cli.loading import load_model, resolve_device

if TYPE_CHECKING:
    from lightning_tune.generate.chat import ChatSession


def run_chat(session: ChatSession, lines: Iterable[str], out: Callable[[str], Any], prompt: Callable[[], Any] | None = None) -> int:
    """The read-reply loop over `lines`; returns the exit code (0). A turn that does not fit the
    context is one `error:` line, and the conversation goes on."""
    from lightning_tune.generate.chat import ContextFullError  # imports torch: only once the verb runs (the CLI's torch-free start)

    if prompt is not None:
        prompt()
    for line in lines:
        text = line.rstrip("\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            out("(conversation reset)\n")
        elif command:
            try:
                session.respond(text, print_fn=out)
            except ContextFullError as error:
                print(f"error: {error}", file=sys.stderr)
        if prompt is not None:
            prompt()
    return 0


def chat_command(
    checkpoint_dir: str,
    adapter_dir: str | None = None,
    tokenizer_path: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    max_context: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    quantize: Literal["int8"] | None = None,
    compile: bool = False,
    linear_kernel: Literal["auto", "onednn", "default"] = "auto",
) -> int:
    """Chat with a checkpoint: each stdin line is a user message; /reset starts over, /exit quits.

    Args:
        checkpoint_dir: Hugging Face or Meta checkpoint directory (e.g. a fit's merged/), a .gguf file, or pkg://PACKAGE/FILE.
        adapter_dir: PEFT LoRA or DoRA adapter directory (e.g. a fit's adapter/) applied over checkpoint_dir.
        tokenizer_path: SentencePiece .model, tokenizer.json, or a directory holding either; default: checkpoint_dir's.
        chat_template: The tokenizer's own template if not given; else a built-in (llama2, chatml, alpaca) or a Jinja file.
        system: System message at the start of the conversation (and after /reset).
        max_new_tokens: Most tokens per reply.
        max_context: Tokens the KV cache holds (default: the model's context length).
        temperature: Sampling temperature; 0 = greedy.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only from the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1).
        seed: Random seed for sampling (reproducible replies).
        device: cpu, cuda, cuda:N or auto (a GPU when there is one).
        dtype: Weights' dtype; default: the checkpoint's. bfloat16 is fast only on a CPU with native bf16 (AVX512-BF16, AMX) or a GPU.
        quantize: int8: per-channel int8 weights for every linear layer and the output head (a quarter of fp32's bytes per token).
        compile: Decode with a static-shape step compiled once by torch.compile; it attends over all max_context slots, so set max_context to what the chat needs.
        linear_kernel: fp32 linear layers on a CPU: onednn (oneDNN's kernels), default (torch's, MKL on x86), or auto (onednn on AMD CPUs, where MKL runs its slower generic code).
    """
    from lightning_tune.generate.chat import ChatSession
    from lightning_tune.io.paths import resolve_path
    from lightning_tune.tokenizer import load_tokenizer
    from lightning_tune.tokenizer.chat_template import ChatTemplateError, resolve_template

    if not resolve_path(checkpoint_dir).exists():  # a directory, a .gguf file, or pkg://PACKAGE/FILE
        raise UsageError(f"--checkpoint_dir: {checkpoint_dir} does not exist (give a Hugging Face or Meta checkpoint directory, e.g. a fit's merged/)")
    if max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens: must be at least 1, got {max_new_tokens}")
    device = resolve_device(device)
    tokenizer = load_tokenizer(checkpoint_dir if tokenizer_path is None else tokenizer_path)
    try:
        template, _ = resolve_template(chat_template, tokenizer.chat_template, where="--chat_template")
    except ChatTemplateError as error:
        raise UsageError(str(error)) from None
    model = load_model(checkpoint_dir, adapter_dir, device, dtype, quantize, linear_kernel)
    session = ChatSession(model, tokenizer, template, system, max_new_tokens, temperature, top_k, top_p, seed, max_context, compile)

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset starts over, /exit quits", file=sys.stderr)
    try:
        return run_chat(session, sys.stdin, out, prompt=(lambda: print("> ", end="", file=sys.stderr, flush=True)) if interactive else None)
    finally:
        session.close()


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from lightning_tune.cli.generate import bare_flags
    from lightning_tune.cli.parser import summary_of

    argv = bare_flags(argv)  # `--compile` alone means `--compile=true`
    parser = ArgumentParser(prog="python -m lightning_tune chat", description=summary_of(chat_command.__doc__), exit_on_error=False, default_env=False)
    parser.add_function_arguments(chat_command, as_positional=False)
    cfg = parser.parse_args(argv)
    return chat_command(**cfg.as_dict())
