"""The tokenizer a .gguf describes (SentencePiece-like or byte-level BPE, rebuilt as transformers rebuilds it),
and the tokenizer fields a GGUF export writes."""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_tune.io.paths import resolve_path

if TYPE_CHECKING:
    import tokenizers
from lightning_tune.io.gguf import GGUFError, check_architecture, import_gguf, is_gguf, open_gguf, read_metadata
from lightning_tune.tokenizer.base import find_chat_template
from lightning_tune.tokenizer.hf import HFTokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type / gguf-py TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Text splits of byte-level vocabularies, by `tokenizer.ggml.pre`, as transformers 5.24 sets them
# (integrations/gguf/gguf_tokenizer_mapping.py: GGUF_PRE_TOKENIZER_SPLITS, the entries a Llama-
# architecture file can carry). Any other name (e.g. SmolLM2's "smollm") keeps GPT-2's ByteLevel
# regex there, so it does here: the reference this reader is tested against is transformers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# OpenAI's o200k (gpt-4o, gpt-oss, Phi-4-mini): llama.cpp's "gpt-4o" (llama-vocab.cpp quotes this regex from tokenizer.json)
_O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "gpt-4o": _O200K_SPLIT,  # not in transformers' table (it reads no gpt-oss GGUF): llama.cpp's split, as its vocab runs it
}
# Writing a byte-level tokenizer: the `tokenizer.ggml.pre` name llama.cpp needs for each split it knows.
SPLIT_TO_PRE = {_LLAMA3_SPLIT: "llama-bpe", _TEKKEN_SPLIT: "tekken", _QWEN2_SPLIT: "qwen2", _O200K_SPLIT: "gpt-4o"}


# --------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class GGUFVocab:
    """A tokenizer rebuilt from a GGUF file: the `tokenizers` object plus what a chat recipe needs around it."""

    tokenizer: tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every byte as one character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies (GGUF files of Llama 2 store scores, not merges).

    transformers' `generate_merges` with scores: every split of a piece into two pieces that exist,
    best score first (ties: shorter left, then shorter right), each piece's splits in vocabulary order.
    """
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _special(metadata: dict[str, Any], tokens: list[str], name: str) -> str | None:
    index = metadata.get(f"tokenizer.ggml.{name}_token_id")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def vocab_from_metadata(path: Path, metadata: dict[str, Any]) -> GGUFVocab:
    """Rebuild the tokenizer as transformers' `get_gguf_tokenizer` + `convert_gguf_tokenizer` do."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model not in ("gpt2", "llama") or tokens is None:
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}; supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)")
    token_types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]] if "tokenizer.ggml.merges" in metadata else None
    alphabet = None
    if model == "gpt2":
        merges = merges or []  # no merges (an empty list is not stored): every byte stays its own token
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
        if split is None:
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        add_bos_default = False
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges is None:
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None:
                raise GGUFError(f"{path}: a SentencePiece tokenizer needs tokenizer.ggml.scores or tokenizer.ggml.merges")
            merges = merges_from_scores(vocab, dict(zip(tokens, scores)))
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        # llama.cpp's add_space_prefix (default true): a "▁" before the text, as sentencepiece's add_dummy_prefix;
        # Gemma's tokenizers have none (convert_hf_to_gguf writes false for them)
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] if prefix else steps)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise

    # Control tokens stay whole and are special; user-defined ones stay whole (llama.cpp matches them
    # in the text). A "control" token outside the byte alphabet of a byte-level vocabulary is a
    # llama.cpp mislabel that transformers skips, and so does this.
    control = [t for t, k in zip(tokens, token_types) if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    specials = {name: _special(metadata, tokens, name) for name in ("bos", "eos", "padding", "unknown")}
    extra_special = [t for t in specials.values() if t is not None and t not in control]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + extra_special])
    user = [t for t, k in zip(tokens, token_types) if k == USER_DEFINED and t in vocab]
    if user:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and specials["bos"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and specials["eos"] is not None
    single = " ".join(([f"{specials['bos']}:0"] if add_bos else []) + ["$A:0"] + ([f"{specials['eos']}:0"] if add_eos else []))
    pair = " ".join([single] + ([f"{specials['bos']}:1"] if add_bos else []) + ["$B:1"] + ([f"{specials['eos']}:1"] if add_eos else []))
    ids = [(specials[n], vocab[specials[n]]) for n, on in (("bos", add_bos), ("eos", add_eos)) if on]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    return GGUFVocab(
        tokenizer=tokenizer,
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        pad_token=specials["padding"],
        unk_token=specials["unknown"],
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def gguf_vocab(path: str | Path) -> GGUFVocab:
    """The tokenizer a GGUF file describes (see `vocab_from_metadata`)."""
    path, reader = open_gguf(path)
    metadata = read_metadata(reader)
    check_architecture(path, metadata)
    return vocab_from_metadata(path, metadata)


def load_gguf_tokenizer(path: str | Path):
    """A `lightning_tune.tokenizer.HFTokenizer` for a GGUF file: the rebuilt tokenizer, its special tokens and chat template.

    `bos_id` is the BOS the file says to prepend (None for SmolLM2, whose `add_bos_token` is false);
    the template still sees every named special token, as transformers passes them.
    """
    resolved = resolve_path(path)
    vocab = gguf_vocab(resolved)
    if vocab.eos_token is None:
        raise GGUFError(f"{resolved}: no tokenizer.ggml.eos_token_id; a tokenizer needs an end-of-sequence token")
    named = {"bos_token": vocab.bos_token, "eos_token": vocab.eos_token, "unk_token": vocab.unk_token, "pad_token": vocab.pad_token}
    return HFTokenizer(
        vocab.tokenizer,
        eos_id=vocab.token_id(vocab.eos_token),
        bos_id=vocab.token_id(vocab.bos_token) if vocab.add_bos else None,
        pad_id=vocab.token_id(vocab.pad_token),
        chat_template=vocab.chat_template,
        special_tokens={name: token for name, token in named.items() if token is not None},
        path=str(resolved),
    )


def write_hf_tokenizer(path: str | Path, folder: str | Path) -> Path:
    """`tokenizer.json` + `tokenizer_config.json` for the tokenizer a GGUF file describes, in `folder`.

    What a Hugging Face export of a model that came from a GGUF carries instead of the GGUF itself:
    the rebuilt tokenizer (as `vocab_from_metadata`), its special tokens, BOS/EOS flags and chat template.
    """
    resolved = resolve_path(path)
    vocab = gguf_vocab(resolved)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab.tokenizer.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for name, token in (("bos_token", vocab.bos_token), ("eos_token", vocab.eos_token), ("unk_token", vocab.unk_token), ("pad_token", vocab.pad_token)):
        if token is not None:
            config[name] = token
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


@functools.lru_cache(maxsize=4)
def hf_tokenizer_dir(path: Path) -> Path:
    """A temporary directory holding `write_hf_tokenizer(path)` (removed at exit), for exports to copy from."""
    import atexit
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="lightning_tune_gguf_tokenizer_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_hf_tokenizer(path, folder)


# --------------------------------------------------------------------------------------------------
# Writing


@dataclass
class VocabMetadata:
    """The `tokenizer.*` fields of a GGUF file, as llama.cpp reads them."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] | None = None  # bos / eos / unknown / padding -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    raw_fields: list[tuple[str, Any, Any, Any]] | None = None  # copied verbatim from a source GGUF

    @property
    def eos_token(self) -> str | None:
        eos = (self.special_ids or {}).get("eos")
        return self.tokens[eos] if eos is not None and eos < len(self.tokens) else None


def _vocab_from_gguf(path: Path) -> VocabMetadata:
    """A source GGUF's tokenizer fields, copied with their exact value types."""
    path, reader = open_gguf(path)
    metadata = read_metadata(reader)
    gguf = import_gguf()
    raw = []
    for key, (kind, item) in reader.types.items():
        if key.startswith("tokenizer."):
            raw.append((key, metadata[key], gguf.GGUFValueType(kind), None if item is None else gguf.GGUFValueType(item)))
    ids = {n: metadata[f"tokenizer.ggml.{n}_token_id"] for n in ("bos", "eos", "unknown", "padding") if f"tokenizer.ggml.{n}_token_id" in metadata}
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens to copy into the export")
    return VocabMetadata(
        model=metadata.get("tokenizer.ggml.model", "llama"),
        tokens=tokens,
        token_types=metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens),
        special_ids=ids,
        chat_template=metadata.get("tokenizer.chat_template"),
        raw_fields=raw,
    )


def _vocab_from_sentencepiece(path: Path, chat_template: str | None) -> VocabMetadata:
    """llama.cpp's `_set_vocab_sentencepiece`: pieces, scores and piece types from the model itself."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise GGUFError(f"{path}: not a valid SentencePiece model ({err})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        kind = NORMAL
        if sp.is_unknown(i):
            kind = UNKNOWN
        elif sp.is_control(i):
            kind = CONTROL
        elif sp.is_unused(i):
            kind = UNUSED
        elif sp.is_byte(i):
            kind = BYTE
        types.append(kind)
    ids = {name: i for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id()), ("padding", sp.pad_id())) if i >= 0}
    # The model's add_dummy_prefix (Llama 2: true; Gemma: false, which convert_hf_to_gguf writes as
    # add_space_prefix false): with it, the normalised text of "a" starts with "▁", so its first piece does.
    space_prefix = "".join(sp.encode("a", out_type=str)).startswith("▁")
    return VocabMetadata(
        model="llama", tokens=tokens, token_types=types, pre="default", scores=scores, special_ids=ids,
        add_bos=True, add_eos=False, add_space_prefix=space_prefix, chat_template=chat_template,
    )  # fmt: skip


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf's `does_token_look_special`: an added token it writes as CONTROL though tokenizer.json does not
    mark it special (Qwen's <|fim_prefix|> ... <|file_sep|>, Gemma's <unused0>, <pad>, <mask>)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _vocab_from_tokenizer_json(path: Path) -> VocabMetadata:
    """A byte-level BPE `tokenizer.json` (+ `tokenizer_config.json` beside it) as llama.cpp's `_set_vocab_gpt2` writes it."""
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    pre_list = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pre_list):
        raise GGUFError(f"{path}: only byte-level BPE tokenizer.json files can be written to GGUF (for SentencePiece give the tokenizer.model)")
    splits = [p.get("pattern", {}).get("Regex") for p in pre_list if p.get("type") == "Split"]
    digits = any(p.get("type") == "Digits" for p in pre_list)
    if splits:
        name = SPLIT_TO_PRE.get(splits[0])
        if name is None:
            raise GGUFError(f"{path}: its pre-tokenizer split is not one llama.cpp knows by name; supported: Llama 3, Qwen 2, Tekken, o200k (gpt-4o) and GPT-2 splits")
    else:
        # SmolLM: digits split one by one before GPT-2's regex; GPT-2 itself is llama.cpp's "gpt-2" (llama-vocab.cpp and the
        # converter's get_vocab_base_pre: a "gpt2" pre-tokenizer is refused as unknown when the file loads)
        name = "smollm" if digits else "gpt-2"
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (CONTROL if added[token].get("special") or looks_special(token) else USER_DEFINED) if token in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    # Special ids, the BOS flag and the chat template as lightning_tune reads this tokenizer (and
    # transformers: BOS is what the post-processor prepends unless tokenizer_config.json says otherwise).
    reader = HFTokenizer.from_file(path)
    ids = {"eos": reader.eos_id}
    for name_, key in (("bos", "bos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        token = reader.special_tokens.get(key)
        if token is not None and token in vocab:
            ids[name_] = vocab[token]
    if reader.bos_id is not None:
        ids["bos"] = reader.bos_id
    return VocabMetadata(
        model="gpt2", tokens=tokens, token_types=types, pre=name, merges=merges, special_ids=ids,
        add_bos=reader.bos_id is not None, add_eos=False, chat_template=reader.chat_template,
    )  # fmt: skip


def vocab_metadata(source: str | Path) -> VocabMetadata:
    """Tokenizer fields for the export from a .gguf, a SentencePiece .model, a tokenizer.json, or a directory holding one."""
    path = resolve_path(source)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise GGUFError(f"{path}: no tokenizer.json or tokenizer.model to write into the GGUF")
    if not path.is_file():
        raise GGUFError(f"{path}: tokenizer file not found")
    if is_gguf(path):
        return _vocab_from_gguf(path)
    if path.suffix == ".json":
        return _vocab_from_tokenizer_json(path)
    config_file = path.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return _vocab_from_sentencepiece(path, find_chat_template(path.parent, config if isinstance(config, dict) else {}))  # chat_template.jinja first, as transformers


CHAT_TEMPLATE_FIELD = "tokenizer.chat_template"


def write_vocab(writer: Any, vocab: VocabMetadata, vocab_size: int, path: Path) -> None:
    """The tokenizer fields, the token list padded to the model's vocabulary (llama.cpp needs one token per embedding row)."""
    if len(vocab.tokens) > vocab_size:
        raise GGUFError(f"{path}: the tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size} embedding rows")
    padding = [f"[PAD{i}]" for i in range(len(vocab.tokens), vocab_size)]
    if vocab.raw_fields is not None:  # a GGUF source: its fields copied (the lists padded to the rows), the chat template ours
        copied = {key: (value, vtype, sub_type) for key, value, vtype, sub_type in vocab.raw_fields if key != CHAT_TEMPLATE_FIELD}
        for key, (value, vtype, sub_type) in copied.items():
            if padding and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                extra = padding if key.endswith("tokens") else [UNUSED] * len(padding) if key.endswith("type") else [-1000.0] * len(padding)
                value = list(value) + extra
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        if vocab.chat_template is not None:
            writer.add_chat_template(vocab.chat_template)
        return
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens + padding)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores + [-1000.0] * len(padding))
    writer.add_token_types(vocab.token_types + [UNUSED] * len(padding))
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    ids = vocab.special_ids or {}
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("unknown", writer.add_unk_token_id), ("padding", writer.add_pad_token_id)):
        if name in ids:
            add(ids[name])
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
