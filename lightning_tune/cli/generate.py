"""`generate --checkpoint_dir DIR --prompt TEXT ...`: text from a fine-tuned (or base) checkpoint.

The arguments are `generate_command`'s signature (jsonargparse); a bad value is one `error:` line,
like `fit`'s. Checked before anything loads: the prompts, the checkpoint directory, the tokenizer,
and that the device exists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from lightning_tune.cli.errors import UsageError
from lightning_tune.cli.loading import load_model, resolve_device


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[dict[str, str]]:
    """Prompts from the command line and/or a file: JSON lines with `instruction` (and optional
    `input`), or plain text lines; returned as records with `instruction` and `input`."""
    import json

    records = [{"instruction": p, "input": ""} for p in prompt or []]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts_file: {prompts_file} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"--prompts_file: {prompts_file}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save the file as UTF-8") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"--prompts_file: {prompts_file} line {number} is not valid JSON ({err.msg})") from None
                if not isinstance(record.get("instruction"), str) or not isinstance(record.get("input", ""), str):
                    raise UsageError(f"--prompts_file: {prompts_file} line {number}: expected a string 'instruction' and optional string 'input'")
                records.append({"instruction": record["instruction"], "input": record.get("input", "")})
            else:
                records.append({"instruction": line, "input": ""})
    if not records:
        raise UsageError("generate: give --prompt TEXT (repeatable) or --prompts_file FILE")
    for i, record in enumerate(records):
        if not record["instruction"].strip():
            raise UsageError(f"generate: prompt {i} is empty")
    return records


def generate_command(
    checkpoint_dir: str,
    prompt: list[str] | None = None,
    prompts_file: str | None = None,
    adapter_dir: str | None = None,
    tokenizer_path: str | None = None,
    template: str = "alpaca",
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    quantize: Literal["int8"] | None = None,
    compile: bool = False,
    linear_kernel: Literal["auto", "onednn", "default"] = "auto",
) -> None:
    """Generate text from a fine-tuned (or base) checkpoint: a Hugging Face or Meta directory, or a .gguf.

    Args:
        checkpoint_dir: Hugging Face or Meta checkpoint directory, e.g. a fit's merged/.
        prompt: Prompt text (an instruction when template is alpaca); repeat for a batch.
        prompts_file: File of prompts: JSON lines with instruction (and optional input), or plain text lines.
        adapter_dir: PEFT LoRA or DoRA adapter directory (e.g. a fit's adapter/) applied over checkpoint_dir.
        tokenizer_path: SentencePiece .model, tokenizer.json, or a directory holding either; default: checkpoint_dir's.
        template: Prompt template: alpaca (the fine-tuning format), none (raw text), or chat (the tokenizer's chat template, with the generation prompt).
        system: System message for template chat.
        max_new_tokens: Most tokens to generate per prompt.
        temperature: Sampling temperature; 0 = greedy.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only from the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1).
        seed: Random seed for sampling (reproducible output).
        device: cpu, cuda, cuda:N or auto (a GPU when there is one).
        dtype: Weights' dtype; default: the checkpoint's. bfloat16 is fast only on a CPU with native bf16 (AVX512-BF16, AMX) or a GPU.
        quantize: int8: per-channel int8 weights for every linear layer and the output head (a quarter of fp32's bytes per token).
        compile: Decode with a static-shape step compiled once by torch.compile (the first call compiles: tens of seconds).
        linear_kernel: fp32 linear layers on a CPU: onednn (oneDNN's kernels), default (torch's, MKL on x86), or auto (onednn on AMD CPUs, where MKL runs its slower generic code).
    """
    from lightning_tune.data.templates import get_template
    from lightning_tune.generate import GenerationTimer, TextStreamer, generate
    from lightning_tune.io.gguf import is_gguf
    from lightning_tune.tokenizer import load_tokenizer

    records = read_prompts(prompt, prompts_file)
    fmt = None if template == "chat" else get_template(template)
    if system is not None and fmt is not None:
        raise UsageError("--system: only with --template chat (the other templates have no system message)")
    gguf_file = is_gguf(checkpoint_dir)  # a llama.cpp .gguf holds its own tokenizer (lightning_tune.tokenizer reads it)
    if not gguf_file and not Path(checkpoint_dir).is_dir():
        raise UsageError(f"--checkpoint_dir: {checkpoint_dir} is not a directory (give a Hugging Face or Meta checkpoint directory, e.g. a fit's merged/, or a .gguf file)")
    device = resolve_device(device)
    if tokenizer_path is None:
        tokenizer_path = checkpoint_dir
        if not gguf_file and not any((Path(checkpoint_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            raise UsageError(f"--tokenizer_path: {checkpoint_dir} has no tokenizer.json or tokenizer.model; pass --tokenizer_path")
    tokenizer = load_tokenizer(tokenizer_path)
    if fmt is None:
        if tokenizer.chat_template is None:
            raise UsageError(f"--template chat: the tokenizer {tokenizer.path} has no chat template")
        head = [] if system is None else [{"role": "system", "content": system}]
        conversations = [[*head, {"role": "user", "content": "\n".join(filter(None, (r["instruction"], r["input"])))}] for r in records]
        prompt_ids = [tokenizer.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    else:
        prompt_ids = [tokenizer.encode(fmt.format(r["instruction"], r["input"])) for r in records]
    model = load_model(checkpoint_dir, adapter_dir, device, dtype, quantize, linear_kernel)
    if compile and max_new_tokens > 1:
        compile_decode_step(model, prompt_ids, max_new_tokens, tokenizer.pad_id)
    if len(prompt_ids) == 1:  # stream one completion as it is produced
        streamer = TextStreamer(tokenizer, prompt_ids[0])
        generate(
            model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id, seed=seed, on_tokens=streamer, compile=compile
        )
        streamer.finish()
        stats = streamer.stats()
    else:  # one batched pass; print each completion after its prompt
        timer = GenerationTimer()
        outputs = generate(
            model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id, seed=seed, on_tokens=timer, compile=compile
        )
        for record, ids in zip(records, outputs):
            print(f"### {record['instruction']}\n{tokenizer.decode([i for i in ids if i not in tokenizer.eos_ids])}\n")
        stats = timer.stats()
    rate = f"{stats.decode_tokens_per_s:.1f} tokens/s" if stats.new_tokens > 1 else "n/a (one token)"
    print(f"time to first token {stats.prefill_s * 1000:.0f} ms, decode {rate}", file=sys.stderr)


def compile_decode_step(model, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int | None) -> None:
    """Compile the decode step before the timed run, and say how long that took: the speed line then
    measures decoding, not a one-time compilation (#30: a compiled one-prompt run read 0.3 tokens/s).

    `generate` compiles one step per (batch size, cache length), the cache length being prompt + new
    tokens rounded up: two new tokens after a dummy prompt of the same batch and cache length build it."""
    import time

    from lightning_tune.generate import generate

    filler = prompt_ids[0][0]
    longest = max(len(ids) for ids in prompt_ids)
    dummy = [[filler] * (longest + max_new_tokens - 2) for _ in prompt_ids]
    start = time.perf_counter()
    generate(model, dummy, 2, pad_id=pad_id, compile=True)
    print(f"compile {time.perf_counter() - start:.1f} s (the decode step, once per batch size and cache length; it pays over many tokens)", file=sys.stderr)


def bare_flags(argv: list[str], flags: tuple[str, ...] = ("--compile",)) -> list[str]:
    """`--compile` alone (no value after it) means `--compile=true`; jsonargparse wants a value."""
    return [f"{a}=true" if a in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else a for i, a in enumerate(argv)]


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from lightning_tune.cli.parser import summary_of

    argv = bare_flags(argv)
    # `--prompt A --prompt B` builds a list: jsonargparse spells appending `--prompt+`.
    argv = ["--prompt+" if a == "--prompt" else "--prompt+=" + a[9:] if a.startswith("--prompt=") else a for a in argv]
    parser = ArgumentParser(prog="python -m lightning_tune generate", description=summary_of(generate_command.__doc__), exit_on_error=False, default_env=False)
    parser.add_function_arguments(generate_command, as_positional=False)
    cfg = parser.parse_args(argv)
    generate_command(**cfg.as_dict())
    return 0
