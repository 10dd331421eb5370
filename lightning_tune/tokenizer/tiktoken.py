"""Meta's Llama 3 `tokenizer.model` (original/ folder): tiktoken BPE ranks plus the special tokens Meta's code adds.

The file is one "base64(token bytes) rank" line per token (128000 for Llama 3.x); Meta's `tokenizer.py`
(llama-models, as torchtune's `llama3_tokenizer` reads it) appends 256 special tokens after them: the
named ones below, then `<|reserved_special_token_N|>` for the rest, and splits text with the regular
expression `PATTERN`. Encoding is tiktoken's byte-pair merge (the lowest-ranked adjacent merge first),
written here over the `regex` package (a transformers dependency) so that the `tiktoken` package is not
needed; ids equal the Hugging Face tokenizer.json of the same model, and `tiktoken` where installed
(tests/checkpoint/test_meta_llama3.py). Llama 3.0's files name five of these ids
`<|reserved_special_token_0..4|>` instead; the ids are the same, the names here are 3.1's.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from pathlib import Path

import regex
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from lightning_tune.tokenizer.base import ChatTemplateMixin, Offsets, TokenizerError, find_chat_template, generation_eos_ids, read_config_json, unique_ids
from lightning_tune.tokenizer.gguf import bytes_to_unicode

# llama-models `models/llama3/tokenizer.py` (Llama 3.1+)
PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
NUM_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
MAX_RANKS = 2**22  # bound on lines read from a file (ModelConfig's vocabulary limit)
_LINE = re.compile(rb"([A-Za-z0-9+/=]+) (\d+)")


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` starts like a tiktoken ranks file ("base64 rank" lines), not a SentencePiece protobuf."""
    try:
        with path.open("rb") as handle:
            head = handle.read(200)
    except OSError:
        return False
    return bool(re.match(rb"[A-Za-z0-9+/=]+ \d+\n", head))


def read_ranks(path: Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file; one line naming the file and line for anything else.
    Ranks must be 0..n-1 in order, so that ids are dense and the special tokens follow them."""
    ranks: dict[bytes, int] = {}
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            match = _LINE.fullmatch(line.rstrip(b"\r\n"))
            if match is None or int(match.group(2)) != len(ranks) or len(ranks) >= MAX_RANKS:
                raise TokenizerError(f"tokenizer {path}: line {number} is not '<base64 token> {len(ranks)}' (a tiktoken ranks file with at most {MAX_RANKS} lines)")
            try:
                token = base64.b64decode(match.group(1), validate=True)
            except binascii.Error:
                raise TokenizerError(f"tokenizer {path}: line {number}: the token is not valid base64") from None
            ranks[token] = len(ranks)
    if not ranks:
        raise TokenizerError(f"tokenizer {path}: no tokens (expected '<base64 token> <rank>' lines)")
    return ranks


def byte_pair_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The ids of one pre-tokenized piece: merge the adjacent pair whose joined bytes rank lowest (leftmost
    on a tie) until no joined pair is a token, as tiktoken's `_byte_pair_merge`."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[part] for part in parts]


class TiktokenTokenizer(ChatTemplateMixin):
    """Llama 3's tiktoken `tokenizer.model` with Meta's special tokens, behind `TokenizerProtocol`.

    BOS `<|begin_of_text|>`, EOS `<|end_of_text|>`; `eos_ids` also hold `<|eom_id|>` and `<|eot_id|>`
    (the stop tokens of Meta's `Tokenizer`), plus any generation_config.json beside the file; pad is
    `<|finetune_right_pad_id|>` (torchtune's). Special-token strings in the text are their tokens, as
    in transformers. A chat template comes from a tokenizer_config.json / chat_template.jinja beside the
    file when there is one (Meta's folders have none: give one, e.g. the Hugging Face repository's).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer {path}: no such file (expected Meta's tiktoken tokenizer.model)")
        self.path = str(path)
        self.ranks = read_ranks(path)
        if any(bytes([b]) not in self.ranks for b in range(256)):
            raise TokenizerError(f"tokenizer {path}: not every single byte is a token, so some text could not be encoded")
        names = [*NAMED_SPECIAL_TOKENS, *(f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)))]
        self.specials = {name: len(self.ranks) + i for i, name in enumerate(names)}
        self._bytes = {i: token for token, i in self.ranks.items()} | {i: name.encode() for name, i in self.specials.items()}
        self._names = {i: name for name, i in self.specials.items()}
        self._pieces = regex.compile(PATTERN)
        self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")
        self._cache: dict[bytes, list[int]] = {}
        self.vocab_size: int = len(self.ranks) + NUM_SPECIAL_TOKENS
        self.bos_id: int | None = self.specials["<|begin_of_text|>"]
        self.eos_id: int = self.specials["<|end_of_text|>"]
        self.pad_id: int = self.specials["<|finetune_right_pad_id|>"]
        stops = [self.eos_id, self.specials["<|eom_id|>"], self.specials["<|eot_id|>"]]
        self.eos_ids: tuple[int, ...] = unique_ids([*stops, *generation_eos_ids(path.parent)])
        self.special_tokens: dict[str, str] = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad_id|>"}
        self.chat_template: str | None = find_chat_template(path.parent, read_config_json(path.parent / "tokenizer_config.json"))

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, segment in enumerate(self._special_split.split(text)):
            if index % 2:  # a special token's string
                ids.append(self.specials[segment])
                continue
            for piece in self._pieces.findall(segment):
                data = piece.encode("utf-8")
                if data in self.ranks:
                    ids.append(self.ranks[data])
                    continue
                if data not in self._cache:
                    if len(self._cache) > 100_000:  # bounded: a long run's distinct words
                        self._cache.clear()
                    self._cache[data] = byte_pair_merge(data, self.ranks)
                ids += self._cache[data]
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings become their ids), optionally framed by BOS / EOS."""
        ids = self._encode(text)
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str, chat: bool = False) -> tuple[list[int], Offsets]:
        """`encode(text, add_bos=False)` and each token's (start, end) character span in `text`, from its
        bytes (a token inside a multi-byte character spans that character; special strings are tokens
        either way, so `chat` changes nothing)."""
        ids = self._encode(text)
        char_of_byte = [index for index, character in enumerate(text) for _ in character.encode("utf-8")]
        offsets: Offsets = []
        position = 0
        for token in ids:
            n = len(self._bytes[token])
            offsets.append((char_of_byte[position], char_of_byte[position + n - 1] + 1))
            position += n
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, every token kept (special tokens as their strings); invalid UTF-8 as U+FFFD."""
        try:
            return b"".join(self._bytes[int(i)] for i in ids).decode("utf-8", errors="replace")
        except KeyError as error:
            raise TokenizerError(f"tokenizer {self.path}: id {error.args[0]} is outside the vocabulary of {self.vocab_size}") from None

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token, or of a token whose UTF-8 bytes are one BPE token; else None."""
        return self.specials.get(token, self.ranks.get(token.encode("utf-8")))

    def id_to_token(self, index: int) -> str:
        """A special token's name, else the token's bytes as text (invalid UTF-8 as U+FFFD)."""
        return self._bytes[int(index)].decode("utf-8", errors="replace")

    def hf_tokenizer(self) -> Tokenizer:
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (write it as tokenizer.json for an
        export that transformers reads): byte-level BPE over the ranks, with the merges they imply as
        transformers' `TikTokenConverter` derives them (every split of a token into two tokens, the
        token's rank first, then the halves' ranks), whole-token matches first (`ignore_merges`), the
        same split pattern and the special tokens."""
        spell = bytes_to_unicode()

        def text(token: bytes) -> str:
            return "".join(spell[b] for b in token)

        merges = []
        for token, rank in self.ranks.items():
            splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in self.ranks and token[i:] in self.ranks]
            splits.sort(key=lambda pair: (self.ranks[pair[0]], self.ranks[pair[1]]))
            merges += [(rank, left, right) for left, right in splits]
        merges.sort(key=lambda merge: merge[0])
        model = BPE(vocab={text(token): rank for token, rank in self.ranks.items()}, merges=[(text(left), text(right)) for _, left, right in merges], fuse_unk=False, ignore_merges=True)
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in self.specials])
        return tokenizer
