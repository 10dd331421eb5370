"""`python -m lightning_tune VERB ...`: LightningCLI for fit and test, small verbs beside it.

Layout: `verbs.py` is the table of verbs (one line each), `parser.py` builds the recipes'
LightningCLI parser and finds config files (it imports no verb), `errors.py` is the error policy
(one `error:` line; exit 2 for user mistakes, 1 for a diverged run; LIGHTNING_TUNE_DEBUG=1 re-raises
for the traceback), and each verb has its own module. Nothing heavy is imported before the verb is
known: `--help`, `ls` and `cp` answer without importing torch or Lightning.
"""

from __future__ import annotations

import sys
import textwrap

from lightning_tune.cli.errors import UsageError, condense_parse_error, run_with_policy
from lightning_tune.cli.noise import filter_known_noise
from lightning_tune.cli.parser import CONFIG_DIR, bundled_configs, make_cli, resolve_config
from lightning_tune.cli.verbs import VERBS, load

__all__ = ["CONFIG_DIR", "UsageError", "bundled_configs", "condense_parse_error", "main", "make_cli", "resolve_config"]


def help_text() -> str:
    width = max(len(v.usage) for v in VERBS.values()) + 4
    lines = []
    for verb in VERBS.values():
        wrapped = textwrap.wrap(verb.help, 100 - width) or [""]
        lines.append(f"  {verb.usage:<{width - 2}}{wrapped[0]}")
        lines.extend(" " * width + more for more in wrapped[1:])
    return "\n".join(
        [
            "usage: python -m lightning_tune VERB [options]",
            "",
            "Fine-tune language models (Llama, Qwen, Mistral, SmolLM2; LoRA or full) with PyTorch Lightning.",
            "",
            "verbs:",
            *lines,
            "",
            "example:",
            "  python -m lightning_tune fit --config tiny_lora.yaml",
            "",
            "A mistake ends in one error: line and exit code 2; LIGHTNING_TUNE_DEBUG=1 shows the traceback.",
        ]
    )


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise UsageError(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
    return load(verb)(rest)


def main(argv: list[str] | None = None) -> int:
    """The `lightning-tune` script and `python -m lightning_tune`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    filter_known_noise()  # before any verb imports the libraries that print it
    return run_with_policy(lambda: dispatch(argv))
