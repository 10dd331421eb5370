"""Conversations to training samples: one rendering of the whole chat, masks from its character offsets.
Chat and preference data share it (`normalize_messages`, then `encode_conversation`).

Why one rendering: templates are not prefix-stable (Qwen 3 drops earlier turns' reasoning), so masks
found by re-rendering growing prefixes of a conversation give ids the model never sees at inference.
Here the conversation is rendered once with its template, encoded once, and a token is trained when its
character span overlaps a trained span of the rendered text:

- templates with `{% generation %}` blocks: the blocks' spans (as transformers' assistant masks);
- otherwise: each assistant reply, found in order in the rendered text, through the first end-of-turn
  token after it (so the stop token is trained, and whatever the template writes between reply and
  stop token, e.g. Llama 2's " "), with any `<think>...</think>` block rendered right before it, or the
  message's own reasoning field where the template renders it before the reply (gpt-oss's analysis channel)
  (train as rendered: Qwen 3 keeps only the last turn's reasoning), and whatever the template writes between
  its generation prompt and the reply (gpt-oss's `<|channel|>final<|message|>` after `<|start|>assistant`):
  what the model writes at inference. The header up to the generation prompt stays masked. An assistant
  turn of `tool_calls` only (its content empty) is what follows its generation prompt, through the
  end-of-turn token: the calls as the template writes them.

Record formats: OpenAI `messages: [{role, content}]` and ShareGPT `conversations: [{from, value}]`
(`human`/`gpt`/`system`), both normalised to OpenAI messages first, so they give identical samples.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.data.errors import DataError
from lightning_tune.tokenizer import TokenizerProtocol, end_of_turn_ids
from lightning_tune.tokenizer.chat_template import ChatTemplateError, render

# "completion": every token after the prompt, i.e. after where the conversation without its last
# message, rendered with the generation prompt, stops matching the whole (TRL's rule for conversational
# prompt/completion and preference data, which also trains what a template writes after the last
# end-of-turn token, e.g. Qwen's "\n" after <|im_end|>).
TrainOn = Literal["assistant", "last_assistant", "completion", "all"]
# How a sample longer than max_seq_len is cut: "keep_start" keeps its first max_seq_len tokens (as
# torchtune, TRL and axolotl do), "keep_end" keeps BOS and the last tokens (the latest turns), "drop"
# leaves the sample out. Each is reported once with a count.
ChatTruncation = Literal["keep_start", "keep_end", "drop"]

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's role names (torchtune's ShareGPTToMessages, axolotl) and the OpenAI ones, to ours.
DEFAULT_ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "tool": "tool"}
# Record fields: where the message list is, and each message's role and text.
CHAT_FIELDS = ("messages", "role", "content")
OPENAI_COLUMNS = {"messages": "messages", "role": "role", "content": "content"}
SHAREGPT_COLUMNS = {"messages": "conversations", "role": "from", "content": "value"}


def normalize_messages(raw: Any, role_map: Mapping[str, str], columns: Mapping[str, str], where: str) -> list[dict]:
    """One record's message list as OpenAI messages [{role, content, ...}], checked.

    `where` names the record ("data.jsonl: record 3") in the one-line `DataError` a bad record raises:
    no messages, an unknown role, a non-string content (none is "" for an assistant turn of `tool_calls`
    only, as OpenAI writes it), no assistant turn."""
    role_key, content_key = columns["role"], columns["content"]
    if raw is None or (isinstance(raw, (list, tuple)) and not raw):
        raise DataError(f"{where}: no messages (expected a non-empty list in column {columns['messages']!r})")
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"{where}: column {columns['messages']!r} is a {type(raw).__name__}, expected a list of messages")
    messages = []
    for position, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}, message {position}: expected an object with {role_key!r} and {content_key!r}, got {type(message).__name__}")
        role = message.get(role_key)
        if role not in role_map:
            known = ", ".join(sorted(role_map))
            raise DataError(f"{where}, message {position}: unknown role {role!r} (known: {known}; add it to role_map)")
        content = message.get(content_key)
        if content is None and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{where}, message {position} ({role}): content must be a string, got {'nothing' if content is None else type(content).__name__}")
        extra = {key: value for key, value in message.items() if key not in (role_key, content_key, "role", "content") and value is not None}
        messages.append({**extra, "role": role_map[role], "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    return messages


def record_tools(record: Mapping[str, Any], where: str) -> list[dict] | None:
    """A record's function definitions (its `tools`: a list of JSON schemas, or that list as a JSON string, as Hub
    data sets often store it) for templates that list them, as transformers' `apply_chat_template(tools=...)`;
    None where it has none."""
    tools = record.get("tools")
    if tools is None or tools == "" or (isinstance(tools, list) and not tools):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: tools is not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
        raise DataError(f"{where}: tools must be a list of function definitions (JSON objects), got {type(tools).__name__}")
    return [dict(tool) for tool in tools]


def encode_conversation(
    tokenizer: TokenizerProtocol,
    messages: Sequence[Mapping[str, Any]],
    template: str,
    max_seq_len: int,
    train_on: TrainOn = "assistant",
    truncation: ChatTruncation = "keep_start",
    where: str = "conversation",
    tools: list[dict] | None = None,
) -> dict:
    """Render, encode and mask one conversation (with the function definitions `tools` its template may list, as
    transformers' `apply_chat_template(tools=...)`); check it; cut it to `max_seq_len`.

    Returns `input_ids`, `labels` (aligned, -100 where masked), `truncated` (it was longer than
    `max_seq_len`) and `keep` (False only for `truncation="drop"` of a long sample, or when a cut left
    no trained token). Checks on the whole (uncut) sample, each failure a `DataError` naming `where`:
    exactly one BOS, at the start (where the tokenizer has one; see `_check_bos` for Llama 2's one per
    turn), and at least one trained end-of-turn token.
    """
    try:
        rendered = render(template, messages, special_tokens=tokenizer.special_tokens, tools=tools)
    except ChatTemplateError as error:
        raise DataError(f"{where}: {error}") from None
    text = rendered.text
    ids, offsets = tokenizer.encode_with_offsets(text, chat=True)
    if train_on == "all":
        labels = list(ids)
    elif train_on == "completion":
        start = completion_start(tokenizer, messages, template, ids, where, tools)
        labels = [IGNORE_INDEX] * start + list(ids[start:])
    else:
        spans = rendered.generation_spans or _reply_spans(text, messages, tokenizer, where, generation_prompt(template, tokenizer.special_tokens))
        if train_on == "last_assistant":
            spans = spans[-1:]
        labels = _mask(ids, offsets, spans)
    eot = end_of_turn_ids(tokenizer)
    if tokenizer.bos_id is not None:
        _check_bos(ids, tokenizer.bos_id, text.count(tokenizer.special_tokens.get("bos_token") or "\0"), tokenizer.id_to_token(tokenizer.bos_id), where)
    if not any(label in eot for label in labels if label != IGNORE_INDEX):
        names = ", ".join(repr(tokenizer.id_to_token(i)) for i in eot)
        raise DataError(
            f"{where}: no end-of-turn token ({names}) is trained, so the model would not learn to stop; the template does not end assistant replies with one (choose another chat_template)"
        )
    truncated = len(ids) > max_seq_len
    keep = True
    if truncated:
        if truncation == "keep_start":
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        elif truncation == "keep_end":
            head = 1 if tokenizer.bos_id is not None else 0
            ids, labels = ids[:head] + ids[len(ids) - (max_seq_len - head) :], labels[:head] + labels[len(labels) - (max_seq_len - head) :]
        else:
            keep = False
        keep = keep and any(label != IGNORE_INDEX for label in labels)
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "keep": keep}


def completion_start(tokenizer: TokenizerProtocol, messages: Sequence[Mapping[str, Any]], template: str, ids: Sequence[int], where: str = "conversation", tools: list[dict] | None = None) -> int:
    """Where the completion (the last message and what the template writes after it) starts in `ids`, the
    encoded whole conversation: the length of the common prefix of `ids` and the ids of the conversation
    without its last message rendered with the generation prompt, as TRL 1.16's DPO/SFT tokenisation
    finds it (the two usually agree up to the whole prompt; a template that renders the prompt alone
    differently moves the start back to where they diverge)."""
    try:
        prompt = render(template, messages[:-1], special_tokens=tokenizer.special_tokens, add_generation_prompt=True, tools=tools).text
    except ChatTemplateError as error:
        raise DataError(f"{where}: {error}") from None
    prompt_ids = tokenizer.encode_with_offsets(prompt, chat=True)[0]
    start = 0
    for ours, theirs in zip(ids, prompt_ids):
        if ours != theirs:
            break
        start += 1
    return start


def _check_bos(ids: Sequence[int], bos_id: int, written: int, name: str, where: str) -> None:
    """One BOS, at the start (litgpt #1682 trained Llama 3 on two); a template that opens every turn with
    BOS (Llama 2 chat, as Meta's own code) may have more, but never two in a row nor any it did not write."""
    count = ids.count(bos_id)
    if not ids or ids[0] != bos_id:
        raise DataError(f"{where}: the rendered conversation does not start with BOS ({name!r}); the template must write bos_token first")
    doubled = next((i for i in range(1, len(ids)) if ids[i] == bos_id and ids[i - 1] == bos_id), None)
    if doubled is not None:
        raise DataError(f"{where}: {count} BOS tokens ({name!r}), two in a row at token {doubled}; expected exactly one at the start")
    if count != max(written, 1):
        raise DataError(f"{where}: {count} BOS tokens ({name!r}) but the template wrote {written}; expected exactly one at the start")


def _mask(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Labels: a token is trained when its character span overlaps a trained span (transformers' rule for
    assistant masks, so a token straddling a span edge is trained); one pass, both are in order."""
    labels = [IGNORE_INDEX] * len(ids)
    spans = sorted(spans)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0] and start < spans[k][1]:
            labels[i] = ids[i]
    return labels


def generation_prompt(template: str, special_tokens: Mapping[str, str]) -> str | None:
    """What `template` writes after a conversation to open the assistant's turn (`add_generation_prompt`), found
    on a one-message probe: what the model is given, so what a turn holds after it is the model's to write.
    None where the template writes nothing there or renders the probe some other way."""
    return _generation_prompt(template, tuple(sorted(special_tokens.items())))


@functools.lru_cache(maxsize=16)
def _generation_prompt(template: str, special_tokens: tuple[tuple[str, str], ...]) -> str | None:
    probe = [{"role": "user", "content": "Hi"}]
    try:
        plain = render(template, probe, special_tokens=dict(special_tokens)).text
        opened = render(template, probe, special_tokens=dict(special_tokens), add_generation_prompt=True).text
    except ChatTemplateError:
        return None
    return opened[len(plain) :] if opened.startswith(plain) and len(opened) > len(plain) else None


def _reply_spans(text: str, messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerProtocol, where: str, prompt: str | None = None) -> list[tuple[int, int]]:
    """Character spans of each assistant reply in the rendered `text`, through its end-of-turn token, from
    where the template's generation `prompt` (`generation_prompt`) ends in the turn's header, if it is there.

    Messages are found in order (a cursor moves past each one found), so a reply is never matched
    inside an earlier turn. Templates may trim a reply or drop an earlier turn's reasoning: the reply
    as given, then stripped, then its part after `</think>` is looked for; an occurrence followed by an
    end-of-turn token is preferred (a reply "user" is not the "user" of a later header)."""
    eot_strings = [tokenizer.id_to_token(i) for i in end_of_turn_ids(tokenizer)]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for position, message in enumerate(messages):
        found = _find_reply(text, message["content"], cursor, eot_strings if message["role"] == "assistant" else [])
        if found is None and message["role"] == "assistant" and message.get("tool_calls") and prompt:
            # A turn of tool calls: the template writes them in its own form, so the model's part of the turn is
            # what follows the next generation prompt, through the end-of-turn token after it (as for a reply).
            at = text.find(prompt, cursor)
            if at >= 0:
                found = (at + len(prompt), at + len(prompt))
        if found is None:
            if message["role"] == "assistant":
                raise DataError(
                    f"{where}, message {position} (assistant): its text does not appear in the rendered conversation"
                    " (the template rewrites it), so its tokens cannot be found; use a chat_template with {% generation %} blocks"
                )
            continue
        start, end = found
        if message["role"] == "assistant":
            # Reasoning the template rendered just before the reply (Qwen 3's final turn, with an empty
            # <think></think> when there is none) is model output too: train it as rendered.
            think = re.search(r"<think>.*?</think>\s*$", text[cursor:start], re.S)
            if think is not None:
                start = cursor + think.start()
            # Reasoning given as a field and rendered before the reply in a channel of its own (gpt-oss renders
            # the last turn's `thinking` as an analysis message, then the final one): from there on.
            reasoning = _reasoning(message)
            at = text.find(reasoning, cursor, start) if reasoning else -1
            if at >= 0:
                start = min(start, at)
            # What the template writes after its generation prompt (gpt-oss's channel header) the model writes too.
            at = text.rfind(prompt, cursor, start) if prompt else -1
            if at >= 0:
                start = min(start, at + len(prompt))
        cursor = end
        if message["role"] == "assistant":
            stops = [found_at + len(s) for s in eot_strings if (found_at := text.find(s, end)) >= 0]
            if stops:
                end = min(stops)
                cursor = end
            spans.append((start, end))
    return spans


def _reasoning(message: Mapping[str, Any]) -> str | None:
    """The message's reasoning text under any of the names templates read (as `render` aliases them)."""
    value = next((message[key] for key in ("reasoning_content", "thinking", "reasoning") if message.get(key) is not None), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _find_reply(text: str, content: str, cursor: int, eot_strings: Sequence[str]) -> tuple[int, int] | None:
    """The first place at or after `cursor` where `content` (or its trimmed forms) is rendered."""
    candidates = [content, content.strip()]
    if "</think>" in content:
        candidates.append(content.split("</think>")[-1].strip())
    for candidate in dict.fromkeys(c for c in candidates if c):
        first = None
        start = text.find(candidate, cursor)
        while start >= 0:
            end = start + len(candidate)
            if first is None:
                first = (start, end)
            rest = text[end : end + 16].lstrip(" \n")
            if not eot_strings or any(rest.startswith(s) for s in eot_strings):
                return start, end
            start = text.find(candidate, start + 1)
        if first is not None:
            return first
    return None
