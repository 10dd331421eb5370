"""`python -m lightning_tune VERB ...`: LightningCLI for fit and test, small verbs beside it.

Nothing heavy is imported before the verb is known: `--help`, `ls` and `cp` answer without
importing torch or Lightning. User mistakes (a bad key, value or path) end in one `error:` line and
exit code 2; set LIGHTNING_TUNE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from argparse import ArgumentError
import sys
from pathlib import Path
from typing import Literal

CONFIG_DIR = Path(__file__).parent / "configs"
# Lightning's own `validate` loop is replaced by our `validate` (check a config, estimate memory).
LIGHTNING_VERBS = ("fit", "test")
RECIPES = {
    "LoRAFinetune": "lightning_tune.modules.LoRAFinetune: LoRA adapters on a frozen Llama 2; exports adapter/ (PEFT) and merged/ (HF)",
    "FullFinetune": "lightning_tune.modules.FullFinetune: all weights train; exports merged/ (HF)",
}

HELP = """usage: python -m lightning_tune VERB [options]

Fine-tune Llama 2 (LoRA or full) with PyTorch Lightning.

verbs:
  fit|test                   run a recipe through LightningCLI: --config FILE_OR_BUNDLED_NAME,
                             --print_config, --KEY VALUE overrides (VERB --help lists every key);
                             fit --ckpt_path last resumes a run; test: loss on the held-out split
  validate                   check a config without training: paths, parameters, memory per device
  data                       print the first training samples decoded, masked tokens marked
  generate                   generate text from a checkpoint (and a PEFT adapter)
  export                     write a PEFT adapter or a Hugging Face directory from a .ckpt
  download REPO_ID           fetch a Hugging Face checkpoint (weights, config, tokenizer only)
  ls                         list the recipes and the bundled configs
  cp NAME DEST               copy a bundled config to DEST for editing

example:
  python -m lightning_tune fit --config tiny_lora.yaml
"""


class UsageError(Exception):
    """A mistake in the command line; printed as one line, exit code 2."""


# Lines of jsonargparse's nested error reports that say nothing about the user's mistake.
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>", "Given value", "Problem with given class_path", "tip: For details")


def condense_parse_error(message: str) -> str:
    """jsonargparse explains a bad value through every union branch it tried; keep the one line that
    names the key and the problem, e.g. `model.lora_rank: Expected a <class 'int'>. Got value: abc`."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    text = " ".join(kept)
    keys = re.findall(r'Parser key "([^"]+)":\s*', text)
    text = re.sub(r'Parser key "[^"]+":\s*', "", text).strip()
    return f"{'.'.join(keys)}: {text}" if keys else text


def bundled_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str) -> str:
    """An existing path wins; otherwise a bundled config of that name (with or without .yaml)."""
    if Path(name).exists():
        return name
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    raise UsageError(f"--config: no file {name!r} and no bundled config of that name (python -m lightning_tune ls lists them)")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every `--config X` / `--config=X` so bundled names work after a plain pip install."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve_config(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def cmd_ls() -> int:
    print("recipes:")
    for name, text in RECIPES.items():
        print(f"  {name:<14} {text}")
    print(f"bundled configs ({CONFIG_DIR}):")
    for path in bundled_configs():
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"  {path.name:<28} {first}")
    return 0


def cmd_cp(args: list[str]) -> int:
    if len(args) != 2:
        raise UsageError("cp: usage: python -m lightning_tune cp NAME DEST")
    source = Path(resolve_config(args[0]))
    dest = Path(args[1])
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise UsageError(f"cp: {dest} already exists; remove it or choose another destination")
    if not dest.parent.exists():
        raise UsageError(f"cp: directory {dest.parent} does not exist")
    shutil.copyfile(source, dest)
    print(f"copied {source.name} to {dest}")
    return 0


def data_tokenizer_path(source: str, tokenizer_path: str | None) -> str | None:
    """The tokenizer the data module will use: its own, or the bundled one of the demo data."""
    from lightning_tune.data.datamodule import DEMO, DEMO_TOKENIZER

    return str(DEMO_TOKENIZER) if tokenizer_path is None and source == DEMO else tokenizer_path


def make_cli(argv: list[str], run: bool = True):
    """The LightningCLI of the recipes. With `run=False`, argv holds no verb and the CLI only parses
    and instantiates (model, data, trainer): what `validate` and notebooks-from-configs need."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_tune.data import InstructDataModule
    from lightning_tune.modules import FinetuneModule

    from lightning_tune.callbacks import DivergenceGuard, StepSeed

    class TuneCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # One value, one place: the model learns the tokenizer and length from the data.
            parser.link_arguments(("data.source", "data.tokenizer_path"), "model.init_args.tokenizer_path", compute_fn=data_tokenizer_path)
            parser.link_arguments("data.max_seq_len", "model.init_args.max_seq_len")
            # Always on, whatever callbacks a config lists: exact resume and a clear stop on NaN/inf.
            parser.add_lightning_class_args(StepSeed, "step_seed")
            parser.add_lightning_class_args(DivergenceGuard, "divergence_guard")

    # We pass argv explicitly (to resolve bundled config names); Lightning warns about that.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return TuneCLI(
        FinetuneModule,
        InstructDataModule,
        subclass_mode_model=True,
        args=resolve_config_args(argv),
        run=run,
        save_config_kwargs={"overwrite": True},
        # Checkpoints are written to a temporary file and renamed into place, after a disk-space check.
        trainer_defaults={"plugins": {"class_path": "lightning_tune.callbacks.AtomicCheckpointIO"}},
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": False, "prog": "python -m lightning_tune", "exit_on_error": False},
    )


def split_configs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config X` / `--config=X` (in order) from the other arguments."""
    configs, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            configs.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--config="):
            configs.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    return configs, rest


def data_command(argv: list[str]) -> int:
    """`data --config X.yaml [--data.KEY VALUE ...] [--n 3]`: print the first training samples
    decoded with the masked spans marked, and the token counts. Reads only the config's `data:`."""
    import yaml
    from jsonargparse import ArgumentParser

    from lightning_tune.data import InstructDataModule
    from lightning_tune.data.inspect import describe_samples

    parser = ArgumentParser(prog="python -m lightning_tune data", description=data_command.__doc__)
    parser.add_argument("--config", help="Recipe config(s) whose data: section is read; repeatable, later wins.")
    parser.add_argument("--n", type=int, default=3, help="How many samples to print.")
    parser.add_class_arguments(InstructDataModule, "data")
    configs, args = split_configs(resolve_config_args(argv))
    for path in configs:
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
        unknown = sorted(set(section) - set(vars(parser.get_defaults().data)))
        if unknown:
            raise UsageError(f"{path}: data: unknown key(s) {unknown}")
        parser.set_defaults({f"data.{key}": value for key, value in section.items()})
    cfg = parser.parse_args(args)
    datamodule = parser.instantiate_classes(cfg).data
    print(describe_samples(datamodule, cfg.n))
    return 0


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[dict[str, str]]:
    """Prompts from the command line and/or a file: JSON lines with `instruction` (and optional
    `input`), or plain text lines; returned as records with `instruction` and `input`."""
    import json

    records = [{"instruction": p, "input": ""} for p in prompt or []]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts_file: {prompts_file} does not exist")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
) -> None:
    """Generate text from a fine-tuned (or base) Llama 2 checkpoint.

    Args:
        checkpoint_dir: Hugging Face or Meta checkpoint directory, e.g. a fit's merged/.
        prompt: Prompt text (an instruction when template is alpaca); repeat for a batch.
        prompts_file: File of prompts: JSON lines with instruction (and optional input), or plain text lines.
        adapter_dir: PEFT LoRA adapter directory (e.g. a fit's adapter/) applied over checkpoint_dir.
        tokenizer_path: SentencePiece tokenizer; default checkpoint_dir/tokenizer.model.
        template: Prompt template: alpaca (the fine-tuning format) or none (raw text).
        max_new_tokens: Most tokens to generate per prompt.
        temperature: Sampling temperature; 0 = greedy.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only from the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1).
        seed: Random seed for sampling (reproducible output).
        device: cpu, cuda, cuda:N or auto (a GPU when there is one).
        dtype: Weights' dtype; default: the checkpoint's.
    """
    import torch

    from lightning_tune.checkpoint import from_pretrained, load_peft_adapter
    from lightning_tune.data.templates import get_template
    from lightning_tune.generate import TextStreamer, generate
    from lightning_tune.tokenizer import Tokenizer

    records = read_prompts(prompt, prompts_file)
    fmt = get_template(template)
    if tokenizer_path is None:
        tokenizer_path = str(Path(checkpoint_dir) / "tokenizer.model")
        if not Path(tokenizer_path).is_file():
            raise UsageError(f"--tokenizer_path: {checkpoint_dir} has no tokenizer.model; pass --tokenizer_path")
    tokenizer = Tokenizer(tokenizer_path)
    texts = [fmt.format(r["instruction"], r["input"]) for r in records]
    prompt_ids = [tokenizer.encode(t) for t in texts]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(checkpoint_dir, device=device, dtype=getattr(torch, dtype) if dtype else None)
    if adapter_dir is not None:
        load_peft_adapter(model, adapter_dir)
        model.to(device).eval()
    if len(prompt_ids) == 1:  # stream one completion as it is produced
        streamer = TextStreamer(tokenizer, prompt_ids[0])
        generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed, on_tokens=streamer)
        streamer.finish()
        stats = streamer.stats()
    else:  # one batched pass; print each completion after its prompt
        from lightning_tune.generate import GenerationTimer

        timer = GenerationTimer()
        outputs = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed, on_tokens=timer)
        for record, ids in zip(records, outputs):
            print(f"### {record['instruction']}\n{tokenizer.decode([i for i in ids if i != tokenizer.eos_id])}\n")
        stats = timer.stats()
    rate = f"{stats.decode_tokens_per_s:.1f} tokens/s" if stats.new_tokens > 1 else "n/a (one token)"
    print(f"time to first token {stats.prefill_s * 1000:.0f} ms, decode {rate}", file=sys.stderr)


def run_generate(argv: list[str]) -> int:
    from jsonargparse import CLI

    # `--prompt A --prompt B` builds a list: jsonargparse spells appending `--prompt+`.
    argv = ["--prompt+" if a == "--prompt" else "--prompt+=" + a[9:] if a.startswith("--prompt=") else a for a in argv]
    CLI(generate_command, args=resolve_config_args(argv), as_positional=False, prog="python -m lightning_tune generate")
    return 0


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "ls":
        return cmd_ls()
    if verb == "cp":
        return cmd_cp(rest)
    if verb in LIGHTNING_VERBS:
        make_cli(argv)
        return 0
    if verb == "data":
        return data_command(rest)
    if verb == "validate":
        from lightning_tune.validate import validate_command

        return validate_command(rest)
    if verb == "export":
        from lightning_tune.export import export_command

        return export_command(rest)
    if verb == "download":
        from lightning_tune.download import download_command

        return download_command(rest)
    if verb == "generate":
        return run_generate(rest)
    raise UsageError(f"unknown verb {verb!r}; expected one of fit, test, validate, generate, data, export, download, ls, cp")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ArgumentError as err:  # jsonargparse / argparse: a bad key, type or value
        print(f"error: {condense_parse_error(str(err))}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # our validation errors (config values, paths, data, checkpoints)
        if os.environ.get("LIGHTNING_TUNE_DEBUG"):
            raise
        print(f"error: {condense_parse_error(str(err))}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a diverged run: say where, exit 1 (not a usage error)
        if type(err).__name__ != "DivergenceError" or os.environ.get("LIGHTNING_TUNE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
