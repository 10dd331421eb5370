"""`eval --checkpoint_dir DIR | --ckpt_path CKPT --tasks NAMES ...`: lm-evaluation-harness scores of a checkpoint.

Our model runs inside the harness (`lightning_tune.evaluation.LightningTuneLM`): nothing is converted
or downloaded. `--tasks lightning_tune` is the bundled offline demo; lm-eval's own tasks work too when
their data is in the local datasets cache (or with `--offline false`, which lets them download it).
Checked before the model loads: the arguments, lm-eval's presence and the task names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from lightning_tune.cli.errors import UsageError
from lightning_tune.cli.loading import load_for_eval, resolve_device, use_linear_kernel


def eval_command(
    tasks: str = "lightning_tune",
    checkpoint_dir: str | None = None,
    ckpt_path: str | None = None,
    adapter_dir: str | None = None,
    tokenizer_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    include_path: str | None = None,
    output_path: str | None = None,
    log_samples: bool = False,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    offline: bool = True,
    apply_chat_template: bool = False,
    linear_kernel: Literal["auto", "onednn", "default"] = "auto",
) -> dict:
    """Evaluate a checkpoint with lm-evaluation-harness; print the results table.

    Args:
        tasks: Comma-separated lm-eval task or group names; lightning_tune is the bundled offline demo.
        checkpoint_dir: Hugging Face or Meta model directory (e.g. a fit's merged/), or a .gguf file.
        ckpt_path: A fit's Lightning checkpoint (.ckpt), evaluated as the run's recipe (LoRA adapters included).
        adapter_dir: PEFT LoRA or DoRA adapter directory applied over the model.
        tokenizer_path: Tokenizer (.model, tokenizer.json or a directory); default the checkpoint's.
        num_fewshot: Few-shot examples per prompt; default each task's own.
        limit: At most this many items per task (a fraction below 1: that share of each task).
        batch_size: Requests per forward pass.
        max_gen_toks: New tokens per generation when a task does not say.
        include_path: Directory of your own lm-eval task YAML files.
        output_path: Write the harness's results JSON to this file.
        log_samples: Also keep every item's prompts and responses (in the JSON under samples).
        device: cpu, cuda, cuda:N or auto (a GPU when there is one).
        dtype: Weights' dtype; default the checkpoint's.
        offline: No Hugging Face Hub access: tasks need local data (the bundled ones have it).
        apply_chat_template: Render prompts with the tokenizer's chat template (few-shot examples as turns).
        linear_kernel: fp32 linear layers on a CPU: onednn (oneDNN's kernels), default (torch's, MKL on x86), or auto (onednn on AMD CPUs, where MKL runs its slower generic code).
    """
    if (checkpoint_dir is None) == (ckpt_path is None):
        raise UsageError("eval: give exactly one of --checkpoint_dir DIR (or a .gguf file) and --ckpt_path CKPT")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks: give at least one task name, e.g. --tasks lightning_tune")
    if output_path is not None:
        parent = Path(output_path).expanduser().resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--output_path: directory {parent} does not exist")
        if Path(output_path).is_dir():
            raise UsageError(f"--output_path: {output_path} is a directory; give a file name such as results.json")
    _quiet_harness()

    import torch

    from lightning_tune.evaluation import LightningTuneLM, hub_offline, results_table, run_tasks, task_manager

    device = resolve_device(device)
    with hub_offline(offline):
        manager = task_manager(names, include_path)
    model, tokenizer = load_for_eval(checkpoint_dir or ckpt_path, adapter_dir=adapter_dir, tokenizer_path=tokenizer_path, device=device, dtype=getattr(torch, dtype) if dtype else None)
    use_linear_kernel(model, linear_kernel)
    lm = LightningTuneLM(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)
    results = run_tasks(lm, names, num_fewshot=num_fewshot, limit=limit, manager=manager, log_samples=log_samples, offline=offline, apply_chat_template=apply_chat_template)
    results["config"]["model"] = str(checkpoint_dir or ckpt_path)
    print(results_table(results))
    if output_path is not None:
        _write_json(results, Path(output_path).expanduser())
    return results


def _quiet_harness() -> None:
    """lm-eval logs every step at INFO; keep its warnings."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def _write_json(results: dict, path: Path) -> None:
    """The results as JSON, written to a temporary file beside `path` and renamed: never half-written."""
    from lm_eval.utils import handle_non_serializable

    from lightning_tune.io.files import atomic_write_text  # torch: not on the CLI's start-up path

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write_text(path, text + "\n")
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from lightning_tune.cli.parser import summary_of

    parser = ArgumentParser(prog="python -m lightning_tune eval", description=summary_of(eval_command.__doc__), exit_on_error=False, default_env=False)
    parser.add_function_arguments(eval_command, as_positional=False)
    cfg = parser.parse_args(argv)
    eval_command(**cfg.as_dict())
    return 0
