"""SentencePiece `.model` tokenizers (Llama 2, Mistral, the demo), with control tokens split as transformers does."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from lightning_tune.tokenizer.base import ChatTemplateMixin, Offsets, TokenizerError, find_chat_template, generation_eos_ids, read_config_json, unique_ids


class Tokenizer(ChatTemplateMixin):
    """A SentencePiece model (Llama 2's, or the bundled demo one) with the ids a fine-tuning recipe needs.

    `pad_id` is 0, Llama's `<unk>`: Llama 2 has no pad piece and its byte-fallback model never emits
    `<unk>` (unknown characters become `<0x..>` byte pieces). Reusing it for padding is safe because
    padded positions are masked (labels -100; right padding behind causal attention, left padding by
    generation's key mask), so they never influence real tokens or the loss. A `tokenizer_config.json`
    or `chat_template.jinja` beside the model supplies a chat template (HF Llama 2 chat repos ship one).
    """

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path}: no such file (expected a SentencePiece .model file)")
        self.path = str(path)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            hint = ""
            if re.match(rb"[A-Za-z0-9+/=]+ \d+\n", path.read_bytes()[:200]):  # base64 token, space, rank: tiktoken
                hint = "; it looks like Meta's tiktoken tokenizer.model (Llama 3 original/): use the Hugging Face repository's tokenizer.json instead"
            raise TokenizerError(f"tokenizer {path}: not a valid SentencePiece model ({error}){hint}") from None
        self.bos_id: int | None = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.pad_id: int = 0
        self.vocab_size: int = self.processor.vocab_size()
        if self.bos_id is None or self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"tokenizer {path}: the model defines no BOS/EOS pieces (bos={self.bos_id}, eos={self.eos_id})")
        self.special_tokens: dict[str, str] = {
            "bos_token": self.processor.id_to_piece(self.bos_id),
            "eos_token": self.processor.id_to_piece(self.eos_id),
        }
        if self.processor.unk_id() >= 0:
            self.special_tokens["unk_token"] = self.processor.id_to_piece(self.processor.unk_id())
        config = read_config_json(path.parent / "tokenizer_config.json")
        self.chat_template: str | None = find_chat_template(path.parent, config)
        self.eos_ids: tuple[int, ...] = unique_ids([self.eos_id, *generation_eos_ids(path.parent)])
        # SentencePiece prepends a dummy "▁" to every input, so "\n" alone encodes as ["▁", "<0x0A>"]
        # for Llama 2. Those leading ids are what `encode(..., prefix_space=False)` strips off.
        self._newline_ids: list[int] = self.processor.encode("\n")
        self._dummy_prefix = self.processor.id_to_piece(self.processor.encode("a")[0]).startswith("▁")
        self._control = {self.processor.id_to_piece(i): i for i in (self.bos_id, self.eos_id)}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False, prefix_space: bool = True) -> list[int]:
        """Token ids of `text`, optionally framed by BOS/EOS; exactly sentencepiece's (`<s>` in text is text).

        `prefix_space=False` encodes a continuation: the ids `text` gets when it follows other text that
        ends in a newline (e.g. a response after the Alpaca prompt), without the "▁" SentencePiece would
        otherwise put in front. It encodes "\\n" + text and drops the ids of "\\n" alone; this is exact
        because "\\n" is a byte-fallback piece that no merge crosses.
        """
        if prefix_space:
            ids = self.processor.encode(text)
        else:
            ids = self.processor.encode("\n" + text)
            prefix = self._newline_ids
            if ids[: len(prefix)] != prefix:  # would mean a model whose pieces merge across "\n"
                raise TokenizerError(f"tokenizer {self.path}: cannot encode a continuation, '\\n' merges with the text that follows it")
            ids = ids[len(prefix) :]
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str, chat: bool = False) -> tuple[list[int], Offsets]:
        """`encode(text, add_bos=False)` and each token's (start, end) character span in `text`.

        `chat=True` reads text a chat template rendered: the BOS/EOS piece strings in it (`<s>`, `</s>`)
        are those tokens, and the text between them is encoded piece by piece, each with SentencePiece's
        dummy prefix, which is how Meta's Llama 2 chat format (and transformers' legacy Llama tokenizer) encode it.
        """
        if not chat:
            return self._encode_offsets(text, 0)
        ids: list[int] = []
        offsets: Offsets = []
        start = 0
        for position, token in _find_all(text, self._control):
            if position > start:
                chunk_ids, chunk_offsets = self._encode_offsets(text[start:position], start)
                ids += chunk_ids
                offsets += chunk_offsets
            ids.append(self._control[token])
            offsets.append((position, position + len(token)))
            start = position + len(token)
        if start < len(text):
            chunk_ids, chunk_offsets = self._encode_offsets(text[start:], start)
            ids += chunk_ids
            offsets += chunk_offsets
        return ids, offsets

    def _encode_offsets(self, text: str, base: int) -> tuple[list[int], Offsets]:
        """Ids of `text` and their character spans (shifted by `base`), from the pieces' bytes.

        The Llama models' normalizer is the identity (spaces become "▁", nothing else changes), so the
        pieces' bytes concatenate to the dummy-prefixed text; anything else is refused, not guessed."""
        ids = self.processor.encode(text)
        prefixed = (" " if self._dummy_prefix else "") + text
        data = prefixed.encode("utf-8")
        shift = 1 if self._dummy_prefix else 0  # the dummy prefix is character -1 of `text`, clamped to 0
        char_of_byte: list[int] = []  # byte index in `data` -> character index in `text`
        for index, character in enumerate(prefixed):
            char_of_byte += [index - shift] * len(character.encode("utf-8"))
        char_of_byte.append(len(text))
        offsets: Offsets = []
        position = 0
        for token in ids:
            piece = self.processor.id_to_piece(token)
            if self.processor.is_byte(token):
                raw = bytes([int(piece[3:5], 16)])
            elif self.processor.is_control(token):
                raw = b""
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")
            if data[position : position + len(raw)] != raw:
                raise TokenizerError(f"tokenizer {self.path}: pieces do not spell the text back (a normalizing model?); cannot compute offsets")
            start = char_of_byte[position]
            # a byte piece inside a multi-byte character spans that whole character
            end = char_of_byte[position + len(raw) - 1] + 1 if raw else start
            position += len(raw)
            offsets.append((max(start, 0) + base, max(end, 0) + base))
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; sentencepiece itself renders BOS/EOS (control pieces) as nothing. No id is dropped."""
        return self.processor.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        """The id of piece `token`, None if the model has no such piece."""
        index = self.processor.piece_to_id(token)
        return index if self.processor.id_to_piece(index) == token else None

    def id_to_token(self, index: int) -> str:
        """The piece of `index` as the model spells it ("▁the", "<0x0A>", "</s>")."""
        return self.processor.id_to_piece(int(index))


def _find_all(text: str, tokens: Iterable[str]) -> list[tuple[int, str]]:
    """Non-overlapping occurrences of any of `tokens` in `text`, left to right (longest first at a tie)."""
    ordered = sorted(tokens, key=len, reverse=True)
    if not ordered:
        return []
    return [(match.start(), match.group()) for match in re.finditer("|".join(map(re.escape, ordered)), text)]
