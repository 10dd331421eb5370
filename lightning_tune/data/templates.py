"""Prompt templates: how an instruction record becomes the prompt text the response follows.

A template is chosen by name in a config (`template: alpaca`), see `get_template`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_tune.data.errors import DataError


@dataclass(frozen=True)
class PromptTemplate:
    """Two format strings: one for records with an `input`, one for records without.

    Only `{instruction}` and `{input}` are substituted; braces inside the record text are kept as is.
    """

    name: str
    with_input: str
    without_input: str

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt text for one record; the response is appended to it verbatim."""
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


# Stanford Alpaca's PROMPT_DICT (github.com/tatsu-lab/stanford_alpaca, train.py), character for character;
# tests check it against the `text` field of real Alpaca records.
ALPACA = PromptTemplate(
    name="alpaca",
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    without_input=("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
)

# Raw text: the instruction alone (and the input on the next line when there is one), no headers.
# The response follows it directly, so records should carry their own separator if they need one.
NONE = PromptTemplate(name="none", with_input="{instruction}\n{input}", without_input="{instruction}")

TEMPLATES: dict[str, PromptTemplate] = {template.name: template for template in (ALPACA, NONE)}


def get_template(name: str) -> PromptTemplate:
    """The registered template called `name`; an unknown name lists the choices."""
    if name not in TEMPLATES:
        raise DataError(f"unknown prompt template {name!r}; choose one of: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
