"""`chat --checkpoint_dir DIR`: an interactive multi-turn conversation on the model's own chat template.

Each line read from stdin is a user message (`/reset` starts over, `/exit` or end of input quits);
the reply streams to stdout as it is generated and stops at an end-of-turn token. The whole
conversation is rendered with the template every turn (so the model sees exactly what it was trained
on), and the KV cache is kept across turns: only the tokens after the longest prefix already in the
cache are computed. Templates that rewrite earlier turns (Qwen 3 drops past reasoning) just reuse
less. Greedy replies equal `generate` on the whole rendered conversation (tests/test_chat_cli.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from lightning_tune.cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from lightning_tune.tokenizer import TokenizerProtocol


class ChatSession:
    """One conversation with a model: the messages so far and the token ids whose K/V the cache holds."""

    def __init__(
        self,
        model: Any,
        tokenizer: TokenizerProtocol,
        template: str,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_context: int | None = None,
        compile: bool = False,
        compile_backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        import torch

        from lightning_tune.data.chat import end_of_turn_ids
        from lightning_tune.decode import activation_dtype_device, decode_step, install_kv_caches, new_kv_caches

        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.stop = set(end_of_turn_ids(tokenizer))
        self.device = activation_dtype_device(model)[1]  # not the head's: an int8 head holds codes
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        self.max_context = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        # compile: one-token steps run the static-shape step (attention over all max_context slots,
        # compiled once); prompts still run eagerly, causal over the slots in use.
        self.step = decode_step(model, 1, self.max_context, compile=True, backend=compile_backend) if compile else None
        if self.step is not None:
            self.step.install()
            self.real = torch.ones(1, self.max_context, dtype=torch.bool, device=self.device)  # no padding in a chat
        else:
            install_kv_caches(model, new_kv_caches(model, 1, self.max_context))
        self.cached: list[int] = []  # ids whose keys/values sit in cache slots 0..len-1
        self.reused = 0  # tokens of the last turn's prompt that came from the cache
        self.reply_ids: list[int] = []  # the last reply's tokens (without the end-of-turn token)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the cache is overwritten from slot 0 on the next turn)."""
        self.messages: list[dict[str, str]] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.cached = []

    def close(self) -> None:
        self.model.reset_kv_cache()

    def prompt_ids(self) -> list[int]:
        """The conversation so far rendered with the generation prompt, as ids."""
        from lightning_tune.chat_template import render

        text = render(self.template, self.messages, special_tokens=self.tokenizer.special_tokens, add_generation_prompt=True).text
        return self.tokenizer.encode_with_offsets(text, chat=True)[0]

    def respond(self, user: str, print_fn: Callable[[str], Any] | None = None) -> str:
        """Add the user's message, generate the reply (streamed through `print_fn`), add it; return its text."""
        import torch

        from lightning_tune.generate import TextStreamer, sample_next

        self.messages.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        if len(ids) + self.max_new_tokens > self.max_context:
            self.messages.pop()
            raise UsageError(f"chat: the conversation ({len(ids)} tokens) plus max_new_tokens ({self.max_new_tokens}) exceeds the context of {self.max_context}; /reset to start over")
        common = 0
        while common < min(len(ids), len(self.cached)) and ids[common] == self.cached[common]:
            common += 1
        common = min(common, len(ids) - 1)  # at least one new token gives the next logits
        self.reused = common
        streamer = TextStreamer(self.tokenizer, ids, print_fn=print_fn or (lambda text: None))
        new: list[int] = []
        with torch.no_grad():
            logits = self._forward(ids[common:], common)
            position = len(ids)
            self.cached = list(ids)
            for _ in range(self.max_new_tokens):
                token = int(sample_next(logits, self.temperature, self.top_k, self.top_p, self.generator).item())
                if token in self.stop:
                    break
                new.append(token)
                streamer(torch.tensor([token]))
                logits = self._forward([token], position)
                self.cached.append(token)
                position += 1
        streamer.finish()
        self.reply_ids = new
        reply = self.tokenizer.decode(new)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits [1, V] after feeding `tokens` into cache slots start, start + 1, ... (causal over the cache)."""
        import torch

        slots = torch.arange(start, start + len(tokens), device=self.device)
        if self.step is not None and len(tokens) == 1:
            return self.step.step(torch.tensor(tokens, device=self.device), slots[None], slots, self.real)
        return self.model(torch.tensor([tokens], device=self.device), cache_pos=slots)[:, -1]


def run_chat(session: ChatSession, lines: Iterable[str], out: Callable[[str], Any], prompt: Callable[[], Any] | None = None) -> int:
    """The read-reply loop over `lines`; returns the exit code (0)."""
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
            except UsageError as error:
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

    from lightning_tune.chat_template import ChatTemplateError, resolve_template
    from lightning_tune.cli.generate import load_model, resolve_device
    from lightning_tune.paths import resolve_path
    from lightning_tune.tokenizer import load_tokenizer

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

    argv = bare_flags(argv)  # `--compile` alone means `--compile=true`
    parser = ArgumentParser(prog="python -m lightning_tune chat", description=chat_command.__doc__, exit_on_error=False, default_env=False)
    parser.add_function_arguments(chat_command, as_positional=False)
    cfg = parser.parse_args(argv)
    return chat_command(**cfg.as_dict())
