"""See what you train on: the first samples decoded, with the masked (untrained) spans marked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.tokenizer import TokenizerProtocol

MASK_OPEN, MASK_CLOSE = "[[", "]]"


def describe_samples(datamodule: Any, n: int = 3) -> str:
    """Counts of samples, tokens, trained tokens and truncated samples, then the first `n` training samples.

    Works for `InstructDataModule` and `ChatDataModule` alike. Tokens whose label is -100 (not
    trained: the prompt, unless `train_on_input`; a chat's system/user turns and template headers) are
    wrapped in `[[...]]`, so a wrong template or mask is visible before any compute is spent. BOS and
    end tokens show as the tokenizer spells them (`<s>`, `</s>`, `<|eot_id|>`).
    """
    if datamodule.train_dataset is None:
        datamodule.setup("fit")
    data = datamodule.train_dataset
    tokenizer = datamodule.tokenizer
    if getattr(datamodule, "streaming", False):  # a stream: its first n samples only, counts unknown until read
        lines = [
            f"{datamodule.source}: streamed (tokenised as read; counts are known only once read through); its first {n} training samples:",
            f"(spans in {MASK_OPEN}...{MASK_CLOSE} are masked from the loss)",
        ]
        for index, sample in zip(range(n), data.stream):
            trained_here = sum(label != IGNORE_INDEX for label in sample["labels"])
            lines.append(f"--- sample {index}: {len(sample['input_ids'])} tokens, {trained_here} trained ---")
            lines.append(_render(tokenizer, sample["input_ids"], sample["labels"]))
        return "\n".join(lines)
    lengths = [len(ids) for ids in data["input_ids"]]
    trained = sum(sum(label != IGNORE_INDEX for label in labels) for labels in data["labels"])
    total = sum(lengths)
    lines = [
        f"{'mixture' if getattr(datamodule, 'mixture', None) else datamodule.source}: {len(data)} training samples"
        + (f" ({len(datamodule.val_dataset)} held out for validation)" if datamodule.val_dataset is not None else "")
        + f", {total} tokens, {trained} trained ({100 * trained / max(total, 1):.1f}%),"
        f" {datamodule.num_truncated} truncated to max_seq_len={datamodule.max_seq_len}",
        f"(spans in {MASK_OPEN}...{MASK_CLOSE} are masked from the loss)",
    ]
    if getattr(datamodule, "template_name", None) is not None:  # chat data: say which template rendered it
        lines.insert(1, f"chat template: {datamodule.template_name}; train_on: {datamodule.train_on}")
    if getattr(datamodule, "mixture_stats", None):  # a mixture: what each source gave, before the validation split
        lines[1:1] = mixture_lines(datamodule.mixture, datamodule.mixture_stats)
    for index in range(min(n, len(data))):
        sample = data[index]
        trained_here = sum(label != IGNORE_INDEX for label in sample["labels"])
        lines.append(f"--- sample {index}: {len(sample['input_ids'])} tokens, {trained_here} trained ---")
        lines.append(_render(tokenizer, sample["input_ids"], sample["labels"]))
    return "\n".join(lines)


def mixture_lines(entries: Sequence[dict[str, Any]], stats: Sequence[dict[str, Any]]) -> list[str]:
    """One line per mixture source: samples drawn of those it has (its share), tokens and trained tokens."""
    drawn = sum(s["drawn"] for s in stats) or 1
    lines = [f"mixture of {len(stats)} sources, {drawn} samples (before any validation split):"]
    for i, (entry, s) in enumerate(zip(entries, stats)):
        how = f"weight {entry['weight']}" if "weight" in entry else (f"count {entry['count']}" if "count" in entry else "all")
        repeats = f", repeated {s['drawn'] / s['available']:.2f}x" if s["drawn"] > s["available"] else ""
        lines.append(f"  [{i}] {s['source']}: {s['drawn']} of {s['available']} samples ({how}; {100 * s['drawn'] / drawn:.1f}% of the mixture{repeats}), {s['tokens']} tokens, {s['trained']} trained")
    return lines


def _render(tokenizer: TokenizerProtocol, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """The sample's text, masked runs wrapped in [[...]]; each run is decoded in context of what precedes it."""
    out: list[str] = []
    start = 0
    while start < len(input_ids):
        masked = labels[start] == IGNORE_INDEX
        end = start
        while end < len(input_ids) and (labels[end] == IGNORE_INDEX) == masked:
            end += 1
        text = _decode_span(tokenizer, input_ids, start, end)
        out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if masked else text)
        start = end
    return "".join(out)


def _decode_span(tokenizer: TokenizerProtocol, ids: Sequence[int], start: int, end: int) -> str:
    """Text of ids[start:end] as it reads inside the whole sample (keeps the spaces a lone decode would drop).

    Each stretch between special tokens is the difference of decoding the sample's prefix with and
    without it; stretches end only at mask or special-token boundaries, never inside a character.
    """
    specials = {i: tokenizer.id_to_token(i) for i in (tokenizer.bos_id, *tokenizer.eos_ids) if i is not None}
    out: list[str] = []
    i = start
    while i < end:
        if ids[i] in specials:
            out.append(specials[ids[i]])
            i += 1
            continue
        j = i
        while j < end and ids[j] not in specials:
            j += 1
        before = tokenizer.decode([t for t in ids[:i] if t not in specials])
        after = tokenizer.decode([t for t in ids[:j] if t not in specials])
        out.append(after[len(before) :])
        i = j
    return "".join(out)
