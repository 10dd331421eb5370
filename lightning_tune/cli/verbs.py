"""The verbs of `python -m lightning_tune`: one table, one line per verb.

A verb is a function `f(argv: list[str]) -> int` (argv without the verb; returns the exit code;
raises for errors, which `lightning_tune.cli.errors` turns into one `error:` line). The table names
it as "module:function" so its module, and torch, are imported only when that verb runs. To add a
verb, write its module under lightning_tune/cli/ and add one line here; `--help` lists it.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple


class Verb(NamedTuple):
    target: str  # "module:function", imported when the verb runs
    usage: str  # what follows `python -m lightning_tune` in the help
    help: str  # one line (wrapped in --help)


VERBS: dict[str, Verb] = {
    "fit": Verb(
        "lightning_tune.cli.fit:fit",
        "fit",
        "run a recipe through LightningCLI: --config FILE_OR_NAME, --print_config, --KEY VALUE overrides (fit --help lists the trainer and data keys, fit --model.help lightning_tune.LoRAFinetune a recipe's); --ckpt_path last resumes a run",
    ),
    "test": Verb("lightning_tune.cli.fit:test", "test", "the recipe's loss on the held-out split (LightningCLI, like fit)"),
    "validate": Verb("lightning_tune.cli.validate:main", "validate", "check a config without training: paths, parameters, memory per device"),
    "check-config": Verb("lightning_tune.cli.check:main", "check-config FILE", "parse a config, round-trip --print_config and train two shrunk steps (for your own configs and recipes)"),
    "data": Verb("lightning_tune.cli.data:main", "data", "print the first training samples decoded, masked tokens marked"),
    "generate": Verb("lightning_tune.cli.generate:main", "generate", "generate text from a checkpoint (and a PEFT adapter)"),
    "chat": Verb("lightning_tune.cli.chat:main", "chat", "talk to a checkpoint on its chat template: one stdin line per message, streamed replies, /reset, /exit"),
    "export": Verb("lightning_tune.cli.export:main", "export", "write a PEFT adapter, a Hugging Face directory or a GGUF file from a .ckpt"),
    "eval": Verb("lightning_tune.cli.eval:main", "eval", "lm-evaluation-harness scores of a checkpoint (--tasks lightning_tune: the bundled offline demo)"),
    "download": Verb("lightning_tune.cli.download:main", "download REPO_ID", "fetch a Hugging Face checkpoint (weights, config, tokenizer only)"),
    "import-config": Verb(
        "lightning_tune.cli.import_config:main",
        "import-config torchtune FILE",
        "translate a torchtune 0.6 recipe config into ours (-o OUT.yaml); what has no equivalent is listed, one line per key",
    ),
    "ls": Verb("lightning_tune.cli.files:ls", "ls", "list the recipes and the configs (bundled, $LIGHTNING_TUNE_CONFIG_PATH, installed packages)"),
    "cp": Verb("lightning_tune.cli.files:cp", "cp NAME DEST", "copy a config to DEST for editing"),
}


def load(verb: str):
    """The function of `verb` (imports its module)."""
    module, _, function = VERBS[verb].target.partition(":")
    return getattr(importlib.import_module(module), function)
