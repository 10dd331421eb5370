"""Chat templates: a model's own Jinja template rendered exactly as transformers renders it, plus built-ins.

The environment is transformers' (`utils/chat_template_utils.py`): an `ImmutableSandboxedEnvironment`
(templates come from the Hub and are untrusted code) with `trim_blocks`, `lstrip_blocks`, loop controls,
the `{% generation %}` tag, `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, and
the variables `messages`, `tools`, `documents`, `add_generation_prompt` and the special tokens
(`bos_token`, `eos_token`, ...). Messages lose their None-valued keys first, as there. So the rendered
text, and with it the ids, equal `apply_chat_template` (tests compare on the real templates of Llama 3.1,
Qwen 3, Gemma 2 and 3, Phi-3.5, Phi-4-mini, OLMo 2, gpt-oss and Mistral Small 3.2).

`render` also returns the character spans of `{% generation %}` blocks, from the one rendering, for masks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """A chat template that cannot be found, compiled or rendered; the message says which and why."""


# Llama 2 chat, as Meta's reference code formats a dialog (llama/generation.py `chat_completion`):
# each user/assistant pair is BOS "[INST] user [/INST] answer " EOS, both stripped, the system prompt
# wrapped in <<SYS>> into the first user turn; this is also the template of HF's Llama-2-chat repos.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('llama2: unsupported role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
)

# ChatML (OpenAI's format; Qwen's and SmolLM2's templates without their extras).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Alpaca (Stanford Alpaca's prompt) as a chat: the system message replaces the preamble; each user turn
# is an "### Instruction:" and each reply a "### Response:" ending in EOS. A one-turn conversation is
# character for character the Alpaca prompt (no input) followed by the output.
ALPACA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% else %}{{ raise_exception('alpaca: unsupported role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"llama2": LLAMA2, "chatml": CHATML, "alpaca": ALPACA}


@dataclass
class Rendered:
    """A rendered conversation: its text and the (start, end) character spans of `{% generation %}` blocks."""

    text: str
    generation_spans: list[tuple[int, int]] = field(default_factory=list)


def resolve_template(spec: str | None, own: str | None, where: str = "chat_template") -> tuple[str, str]:
    """(template source, a name for it): `spec` None means the tokenizer's own template `own`; else a
    built-in name, a path to a Jinja file, or a Jinja string (anything containing "{%" or "{{").

    The template is compiled here, so a syntax error is reported once, naming the template (its file),
    before any record is rendered with it."""
    source, name = _template_source(spec, own, where)
    try:
        _compile(source)
    except ChatTemplateError as error:
        raise ChatTemplateError(f"{where}: {name}: {error}") from None
    return source, name


def _template_source(spec: str | None, own: str | None, where: str) -> tuple[str, str]:
    if spec is None:
        if own is None:
            raise ChatTemplateError(f"{where}: the tokenizer has no chat template; set it to a built-in ({', '.join(sorted(BUILTIN_TEMPLATES))}) or a Jinja file")
        return own, "the tokenizer's own"
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"built-in {spec!r}"
    if "{%" in spec or "{{" in spec:
        return spec, "the given Jinja string"
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as error:
            raise ChatTemplateError(f"{where}: cannot read {path} ({error})") from None
    raise ChatTemplateError(f"{where}: {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN_TEMPLATES))}) nor an existing Jinja file")


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Mapping[str, str] | None = None,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs: Any,
) -> Rendered:
    """Render `messages` with `template` as transformers' `apply_chat_template(..., tokenize=False)` does.

    Raises `ChatTemplateError` (one line) when the template does not compile or fails to render
    (e.g. its own `raise_exception`)."""
    import jinja2

    compiled = _compile(template)
    chat = [{key: value for key, value in dict(message).items() if value is not None} for message in messages]
    for message in chat:  # transformers aliases older reasoning field names to the one templates read
        reasoning = next((message[key] for key in ("reasoning_content", "thinking", "reasoning") if message.get(key) is not None), None)
        if reasoning is not None:
            message.setdefault("thinking", reasoning)
            message["reasoning_content"] = reasoning
    variables = {**dict(special_tokens or {}), **kwargs}
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((blocks, spans))
    try:
        for block in compiled.generate(messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables):
            blocks.append(block)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template failed to render: {_first_line(error)}") from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, ArithmeticError, RecursionError) as error:  # the template's own arithmetic too (1 / 0, the sandbox's range limit)
        raise ChatTemplateError(f"the chat template failed to render: {type(error).__name__}: {_first_line(error)}") from None
    finally:
        _TRACKING.reset(token)
    return Rendered("".join(blocks), spans)


def has_generation_blocks(template: str) -> bool:
    """Whether the template marks assistant text with `{% generation %}` (transformers' own regex)."""
    return re.search(r"\{\%-?\s*generation\s*-?\%\}", template) is not None


def with_defaults(template: str, system: str | None = None, variables: Mapping[str, Any] | None = None) -> str:
    """`template` with a run's defaults written in front of it, so that a consumer that renders it without them
    (transformers' `apply_chat_template` and our `chat`, tested; llama.cpp's Jinja has the same `set` and
    `is defined`, not run here) renders what the run rendered: `system`
    becomes the first message of a conversation that has no system message, and each of `variables` (e.g.
    Qwen 3's `enable_thinking: false`) is set unless the caller sets it. A conversation that brings its own
    system message, or a caller that sets the variable, renders as with `template` alone."""
    preamble = []
    for name, value in (variables or {}).items():
        if not name.isidentifier():
            raise ChatTemplateError(f"chat_template_kwargs: {name!r} is not a template variable name")
        preamble.append(f"{{%- if {name} is not defined %}}{{%- set {name} = {json.dumps(value)} %}}{{%- endif %}}")
    if system is not None:
        message = json.dumps({"role": "system", "content": system})
        preamble.append(f"{{%- if not messages or messages[0]['role'] != 'system' %}}{{%- set messages = [{message}] + messages %}}{{%- endif %}}")
    return "".join(preamble) + template


# The rendering in progress: (blocks so far, generation spans); `{% generation %}` appends to it.
_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("chat_template_tracking", default=None)


@lru_cache(maxsize=32)
def _compile(template: str):
    """The template compiled in transformers' sandboxed environment (cached: datasets render thousands)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records where the block's output lands in the text."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller) -> str:
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateNamespace(jinja2.utils.Namespace):
        """Namespaces that refuse underscore attributes, as transformers' do (no reach into CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template does not compile (line {error.lineno}: {error.message})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
