"""GGUF in and out: llama.cpp's single-file format, for Llama-architecture models.

Reading: a `.gguf` file works wherever a checkpoint directory does (`checkpoint_dir`, `from_pretrained`,
`generate`, `export`). Tensors are dequantised to fp32 by the `gguf` package itself (the same call
transformers makes, so the weights are bit-identical to `from_pretrained(dir, gguf_file=...)`), q/k
are permuted back from Meta's interleaved rotary layout (llama.cpp keeps it) to Hugging Face's
rotate-half one, the config comes from the `llama.*` metadata, and the tokenizer is rebuilt from
`tokenizer.ggml.*` as transformers rebuilds it (byte-level BPE "gpt2", SentencePiece "llama").

Writing: `save_gguf` writes what llama.cpp's `convert_hf_to_gguf.py` writes for a Llama (tensor names,
the rotary permutation, architecture metadata, tokenizer, special ids, chat template), with the
`gguf` package's `GGUFWriter`, to a temporary file that is renamed into place, plus an Ollama
`Modelfile` beside it.

The `gguf` package is optional: it is imported inside the functions (install lightning_tune[gguf]).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_tune.checkpoint import (
    CheckpointError,
    _check_disk_space,
    _Entry,
    _existing_parent,
    _fsync_directory,
    meta_to_hf_rotary,
)
from lightning_tune.model import Llama, LlamaConfig
from lightning_tune.paths import resolve_path

if TYPE_CHECKING:
    import tokenizers
    from gguf import GGUFReader

ARCHITECTURE = "llama"
# Tensor types read (dequantised by the gguf package). Issue 17 asks for F32 F16 BF16 Q8_0 Q4_0 Q4_1
# Q4_K Q5_K Q6_K; the other classic and K quants go through the same call and are tested the same way.
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
OutType = Literal["f32", "f16", "bf16", "q8_0"]

# llama.cpp's tensor names (gguf-py `constants.py`, MODEL_ARCH.LLAMA) -> ours (Hugging Face's).
TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

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
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# Writing a byte-level tokenizer: the `tokenizer.ggml.pre` name llama.cpp needs for each split it knows.
SPLIT_TO_PRE = {_LLAMA3_SPLIT: "llama-bpe", _TEKKEN_SPLIT: "tekken", _QWEN2_SPLIT: "qwen2"}


class GGUFError(CheckpointError):
    """One line naming the GGUF file (or option) and what is supported."""


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading or writing GGUF needs the gguf package: install lightning_tune[gguf] (pip install 'gguf>=0.19')") from None
    return gguf


def is_gguf(path: str | Path) -> bool:
    """True for a path named *.gguf (existing or not: a missing one should say 'GGUF file not found') or a file with GGUF's magic."""
    path = resolve_path(path)
    if path.suffix.lower() == ".gguf":
        return True
    if path.is_file():
        with open(path, "rb") as file:
            return file.read(4) == b"GGUF"
    return False


# --------------------------------------------------------------------------------------------------
# Reading


def open_gguf(path: str | Path) -> tuple[Path, GGUFReader]:
    """Memory-map a GGUF file (nothing is read until a tensor is touched); one-line errors for anything else.

    The parsed header is cached per (file, size, mtime): parsing a 49k-token vocabulary takes seconds
    in pure Python, and config, tokenizer and weights each ask for it.
    """
    path = resolve_path(path).absolute()
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    stat = path.stat()
    return path, _open_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    gguf = _import_gguf()
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); expected a llama.cpp .gguf model")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt header fails in many ways; one answer
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt ({reason})") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFError(f"{path}: truncated: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes}, the file has {size}")
    return reader


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key-value field as a Python value (strings decoded, arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _check_architecture(path: Path, metadata: dict[str, Any]) -> None:
    arch = metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; only {ARCHITECTURE!r} GGUF files (Llama 2/3, SmolLM2, TinyLlama, Mistral 7B) can be read")


def _meta(path: Path, metadata: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise GGUFError(f"{path}: missing metadata key {key!r}")
    return default


def gguf_config(path: str | Path) -> tuple[LlamaConfig, bool]:
    """(LlamaConfig, tied embeddings) from a GGUF file's metadata; tied when it has no output.weight (as transformers decides)."""
    path, reader = open_gguf(path)
    metadata = read_metadata(reader)
    return _config_from_metadata(path, metadata, [t.name for t in reader.tensors])


def _config_from_metadata(path: Path, metadata: dict[str, Any], tensor_names: list[str]) -> tuple[LlamaConfig, bool]:
    _check_architecture(path, metadata)
    arch = ARCHITECTURE
    rope_scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if rope_scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        what = f"rope scaling {rope_scaling!r}" if rope_scaling not in ("none", None) else "a rope_freqs tensor (Llama 3.1 rotary scaling)"
        raise GGUFError(f"{path}: {what} is not supported; only the default rotary embedding is")
    for key in (f"{arch}.expert_count",):
        if metadata.get(key):
            raise GGUFError(f"{path}: {key} = {metadata[key]}: mixture-of-experts GGUF files are not supported")
    heads = int(_meta(path, metadata, f"{arch}.attention.head_count"))
    embed_dim = int(_meta(path, metadata, f"{arch}.embedding_length"))
    # The head size: key_length where the file gives it, else rope.dimension_count (as transformers reads
    # it for llama), else embedding_length / head_count. The rotary must span the whole head.
    head_dim = int(metadata.get(f"{arch}.attention.key_length", metadata.get(f"{arch}.rope.dimension_count", embed_dim // heads if heads else 0)))
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.value_length"):
        if key in metadata and int(metadata[key]) != head_dim:
            raise GGUFError(f"{path}: {key} = {metadata[key]}, but the head size is {head_dim}; only a rotary over the whole head, and values of the keys' size, are supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = metadata.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens tells the vocabulary size")
    tied = "output.weight" not in tensor_names
    values = {
        "vocab_size": int(vocab_size),
        "num_layers": int(_meta(path, metadata, f"{arch}.block_count")),
        "num_heads": heads,
        "num_kv_heads": int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        "embed_dim": embed_dim,
        "intermediate_dim": int(_meta(path, metadata, f"{arch}.feed_forward_length")),
        "max_seq_len": int(metadata.get(f"{arch}.context_length", 4096)),
        "norm_eps": float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_base": float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "head_dim": head_dim,
        "tie_word_embeddings": tied,
    }
    try:
        return LlamaConfig(**values), tied
    except (ValueError, TypeError) as err:
        raise GGUFError(f"{path}: {err}") from None


def gguf_to_hf_key(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; KeyError if not a Llama tensor."""
    base, _, suffix = name.rpartition(".")
    if suffix != "weight":
        raise KeyError(name)
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"
    return f"{TOP_LEVEL_NAMES[base]}.weight"


def hf_to_gguf_key(key: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (the inverse of `gguf_to_hf_key`)."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if match:
        inverse = {v: k for k, v in LAYER_NAMES.items()}
        return f"blk.{match.group(1)}.{inverse[match.group(2)]}.weight"
    inverse = {v: k for k, v in TOP_LEVEL_NAMES.items()}
    return f"{inverse[key.removesuffix('.weight')]}.weight"


def hf_to_meta_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Hugging Face's rotate-half rows -> Meta's interleaved ones (what llama.cpp expects); inverse of `meta_to_hf_rotary`.

    llama.cpp's `LlamaModel.permute`: w [n_heads * D, E] viewed [n_heads, 2, D/2, E], the two middle axes swapped.
    """
    dim1, dim2 = w.shape
    return w.reshape(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def gguf_entries(path: str | Path, config: LlamaConfig) -> list[_Entry]:
    """The tensors of a GGUF file as checkpoint entries (our names, shapes), each dequantised to fp32 when read.

    Every tensor's type is checked here, before anything is read, so an unsupported one fails in one
    line and leaves the model untouched.
    """
    gguf = _import_gguf()
    path, reader = open_gguf(path)
    entries = []
    for tensor in reader.tensors:
        try:
            key = gguf_to_hf_key(tensor.name)
        except KeyError:
            raise GGUFError(f"{path}: unexpected tensor {tensor.name!r} (not part of a Llama model)") from None
        type_name = tensor.tensor_type.name
        if type_name not in READ_TYPES:
            raise GGUFError(f"{path}: tensor {tensor.name} has type {type_name}, which is not supported; supported: {', '.join(READ_TYPES)}")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml lists the fastest axis first
        heads = config.num_heads if ".attn_q." in tensor.name else config.num_kv_heads if ".attn_k." in tensor.name else None

        def read(tensor=tensor, shape=shape, heads=heads) -> Tensor:
            # gguf.dequantize gives float32 for every type; np.array copies out of the read-only memory map.
            import numpy as np

            w = torch.from_numpy(np.array(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)).reshape(shape)
            return meta_to_hf_rotary(w, heads) if heads else w

        entries.append(_Entry(key, shape, path, read))
    return entries


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
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)])
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
    _check_architecture(path, metadata)
    return vocab_from_metadata(path, metadata)


def load_gguf_tokenizer(path: str | Path):
    """A `lightning_tune.tokenizer.HFTokenizer` for a GGUF file: the rebuilt tokenizer, its special tokens and chat template.

    `bos_id` is the BOS the file says to prepend (None for SmolLM2, whose `add_bos_token` is false);
    the template still sees every named special token, as transformers passes them.
    """
    from lightning_tune.tokenizer import HFTokenizer

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
    raw = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if len(field.types) > 1 else None
            raw.append((key, field.contents(), field.types[0], sub_type))
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
    return VocabMetadata(
        model="llama", tokens=tokens, token_types=types, pre="default", scores=scores, special_ids=ids,
        add_bos=True, add_eos=False, add_space_prefix=True, chat_template=chat_template,
    )  # fmt: skip


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
            raise GGUFError(f"{path}: its pre-tokenizer split is not one llama.cpp knows by name; supported: Llama 3, Qwen 2, Tekken and GPT-2 splits")
    else:
        name = "smollm" if digits else "gpt2"  # SmolLM: digits split one by one before GPT-2's regex
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (CONTROL if added[token].get("special") else USER_DEFINED) if token in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    # Special ids, the BOS flag and the chat template as lightning_tune reads this tokenizer (and
    # transformers: BOS is what the post-processor prepends unless tokenizer_config.json says otherwise).
    from lightning_tune.tokenizer import HFTokenizer

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
    template = json.loads(config_file.read_text()).get("chat_template") if config_file.is_file() else None
    return _vocab_from_sentencepiece(path, template if isinstance(template, str) else None)


def _write_vocab(writer: Any, vocab: VocabMetadata, vocab_size: int, path: Path) -> None:
    """The tokenizer fields, the token list padded to the model's vocabulary (llama.cpp needs one token per embedding row)."""
    if len(vocab.tokens) > vocab_size:
        raise GGUFError(f"{path}: the tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size} embedding rows")
    padding = [f"[PAD{i}]" for i in range(len(vocab.tokens), vocab_size)]
    if vocab.raw_fields is not None and not padding:
        for key, value, vtype, sub_type in vocab.raw_fields:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        return
    if vocab.raw_fields is not None:  # a GGUF source with fewer tokens than rows: rewrite the list fields
        copied = {key: (value, vtype, sub_type) for key, value, vtype, sub_type in vocab.raw_fields}
        for key, (value, vtype, sub_type) in copied.items():
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                extra = padding if key.endswith("tokens") else [UNUSED] * len(padding) if key.endswith("type") else [-1000.0] * len(padding)
                value = list(value) + extra
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
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


def _check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise GGUFError(f"--outtype {outtype!r} is not supported; supported: {', '.join(OUTTYPES)}")


def _tensor_plan(state: dict[str, Tensor], config: LlamaConfig, outtype: str, path: Path) -> list[tuple[str, str, Any]]:
    """(GGUF name, our key, ggml type) in llama.cpp's order; output.weight left out when it equals the embedding (tied)."""
    gguf = _import_gguf()
    # What llama.cpp's "llama" architecture cannot express (other families have their own GGUF architectures).
    unsupported = [
        what
        for what, present in (
            (f"model_type {config.model_type!r}", config.model_type not in ("llama", "mistral")),
            (f"attention_bias {config.attention_bias!r}", config.attention_bias != "none"),
            ("mlp_bias", config.mlp_bias),
            ("qk_norm", config.qk_norm),
            (f"rope_type {config.rope_type!r}", config.rope_type != "default"),
            (f"sliding_window {config.sliding_window}", config.sliding_window is not None),
        )
        if present
    ]
    if unsupported:
        raise GGUFError(f"{path}: GGUF export writes llama.cpp's 'llama' architecture, which has no {', '.join(unsupported)}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GGUFError(f"{path}: the weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]}); LoRA weights must be merged first")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise GGUFError(f"{path}: {key} has shape {list(state[key].shape)}, the config expects {list(shape)}")
    q = gguf.GGMLQuantizationType
    wanted = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
    tied = torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    plan = []
    for key in expected:
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        t = state[key]
        kind = wanted if t.dim() == 2 else q.F32  # llama.cpp keeps 1-D norms in F32 for every file type
        if kind == q.Q8_0 and t.shape[-1] % block:
            kind = q.F16  # as convert_hf_to_gguf: a row that is not whole blocks cannot be Q8_0
        plan.append((hf_to_gguf_key(key), key, kind))
    return plan


def _gguf_array(t: Tensor, kind: Any, heads: int | None) -> Any:
    """One tensor as the bytes GGUF stores: Meta's rotary layout for q/k, then cast or quantised."""
    import numpy as np

    gguf = _import_gguf()
    q = gguf.GGMLQuantizationType
    t = t.detach().to("cpu")
    if heads is not None:
        t = hf_to_meta_rotary(t, heads)
    if kind == q.BF16:  # torch's own rounding to bf16, then its 16-bit patterns as bytes
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    if kind == q.F16:
        return t.to(torch.float16).contiguous().numpy()
    x = t.to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(x, q.Q8_0) if kind == q.Q8_0 else x


CHATML_OLLAMA_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile_text(gguf_name: str, vocab: VocabMetadata) -> str:
    """An Ollama Modelfile for the export: FROM the file beside it, a ChatML TEMPLATE when the chat template is ChatML, stop at EOS.

    Ollama's TEMPLATE is a Go template, not Jinja. For a ChatML model (SmolLM2, Qwen) it is written
    out; for any other, Ollama matches the Jinja `tokenizer.chat_template` in the GGUF to its own
    templates when the model is created.
    """
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    template = vocab.chat_template or ""
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    elif vocab.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(vocab.eos_token)}")
    return "\n".join(lines) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_gguf(
    state_dict: dict[str, Tensor],
    config: LlamaConfig,
    output: str | Path,
    *,
    outtype: OutType = "f32",
    tokenizer: str | Path | None = None,
    name: str | None = None,
    modelfile: bool = True,
) -> Path:
    """Write a llama.cpp-loadable GGUF of a (merged) Llama state dict; returns its path.

    `tokenizer` is a .gguf, a SentencePiece .model, a tokenizer.json or a directory with one; its
    special token ids and chat template go into the file too. The file is written to a temporary
    sibling, fsynced and renamed into place, then the Ollama `Modelfile` beside it the same way:
    a reader sees the previous export or the complete new one.
    """
    _check_outtype(outtype)
    gguf = _import_gguf()
    import numpy as np

    output = resolve_path(output).absolute()
    if output.suffix.lower() != ".gguf":
        raise GGUFError(f"{output}: the output must be a .gguf file name")
    if output.is_dir():
        raise GGUFError(f"{output}: exists and is a directory")
    if tokenizer is None:
        raise GGUFError(f"{output}: a GGUF needs its tokenizer: give the tokenizer (a .gguf, tokenizer.model or tokenizer.json)")
    vocab = vocab_metadata(tokenizer)
    plan = _tensor_plan(state_dict, config, outtype, output)
    sizes = {key: state_dict[key].numel() * {"F32": 4, "F16": 2, "BF16": 2}.get(kind.name, 34 / 32) for _, key, kind in plan}
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_disk_space(_existing_parent(output.parent), int(sum(sizes.values())) + 2**24)

    for stale in output.parent.glob(f".{output.name}.tmp-*"):  # left by a writer killed mid-export
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch=ARCHITECTURE)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or output.stem)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.embed_dim)
        writer.add_block_count(config.num_layers)
        writer.add_feed_forward_length(config.intermediate_dim)
        writer.add_head_count(config.num_heads)
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_rope_dimension_count(config.head_dim)
        if config.head_dim * config.num_heads != config.embed_dim:  # llama.cpp assumes embed / heads otherwise
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        writer.add_rope_freq_base(config.rope_base)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
        writer.add_file_type(file_type)
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_vocab(writer, vocab, config.vocab_size, output)
        # Tensor infos first (shapes and types), then the data one tensor at a time: memory stays
        # at one converted tensor, not a second copy of the model.
        for gguf_name, key, kind in plan:
            rows_cols = tuple(state_dict[key].shape)
            if kind.name in ("F32", "F16"):
                dtype = np.dtype(np.float32 if kind.name == "F32" else np.float16)
                writer.add_tensor_info(gguf_name, rows_cols, dtype, math.prod(rows_cols) * dtype.itemsize)
            else:  # BF16 and Q8_0 are written as bytes: [rows, bytes per row]
                byte_shape = gguf.quants.quant_shape_to_byte_shape(rows_cols, kind)
                writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, key, kind in plan:
            heads = config.num_heads if gguf_name.endswith("attn_q.weight") else config.num_kv_heads if gguf_name.endswith("attn_k.weight") else None
            writer.write_tensor_data(_gguf_array(state_dict[key], kind, heads))
        for fout in writer.fout or []:
            fout.flush()
            os.fsync(fout.fileno())
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if modelfile:
        _atomic_write_text(output.parent / "Modelfile", modelfile_text(output.name, vocab))
    _fsync_directory(output.parent)
    return output


def export_gguf(
    output: str | Path,
    outtype: OutType = "f16",
    ckpt_path: str | Path | None = None,
    checkpoint_dir: str | None = None,
    tokenizer_path: str | None = None,
) -> Path:
    """`export --format gguf`: a fit's checkpoint (adapters merged in) or a model directory / .gguf, as one GGUF file.

    Args:
        output: The .gguf file to write (an Ollama Modelfile is written beside it).
        outtype: Tensor type of the 2-D weights: f32, f16, bf16 or q8_0 (norms stay f32, as llama.cpp writes them).
        ckpt_path: Lightning checkpoint (.ckpt) of a fit run; its base model comes from the run (or checkpoint_dir).
        checkpoint_dir: Without ckpt_path: the model to convert, a Hugging Face directory (e.g. a fit's merged/) or a .gguf.
        tokenizer_path: Tokenizer to write into the file; default: the run's, else the one in or of checkpoint_dir.
    """
    _check_outtype(outtype)
    if ckpt_path is not None:
        from lightning_tune.export import load_recipe_from_checkpoint

        module = load_recipe_from_checkpoint(ckpt_path, checkpoint_dir, tokenizer_path)
        state, config = module.export_state_dict(), module.model.config
        tokenizer = tokenizer_path or module.tokenizer_path or module.checkpoint_dir
    elif checkpoint_dir is not None:
        from lightning_tune.checkpoint import from_pretrained

        model = from_pretrained(checkpoint_dir)
        state, config = model.state_dict(), model.config
        tokenizer = tokenizer_path or checkpoint_dir
    else:
        raise GGUFError("export --format gguf: give --ckpt_path (a fit's checkpoint) or --checkpoint_dir (a Hugging Face directory or a .gguf)")
    if tokenizer is None:
        raise GGUFError(f"{output}: the run has no tokenizer to write into the GGUF; pass --tokenizer_path")
    return save_gguf(state, config, output, outtype=outtype, tokenizer=tokenizer)
