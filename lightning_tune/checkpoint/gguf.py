"""GGUF weights in and out (llama.cpp's single-file format, Llama architecture): config and tensors read
(dequantised by the gguf package), a model written as llama.cpp names and types it, with its Modelfile."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_tune.checkpoint.meta import meta_to_hf_rotary
from lightning_tune.checkpoint.tensors import Entry
from lightning_tune.families.config import ModelConfig
from lightning_tune.io.files import check_disk_space, existing_parent
from lightning_tune.io.gguf import is_gguf
from lightning_tune.io.paths import resolve_path
from lightning_tune.model.decoder import CausalLM

if TYPE_CHECKING:
    pass
from lightning_tune.io.files import atomic_file, atomic_write_text
from lightning_tune.io.gguf import ARCHITECTURE, GGUFError, check_architecture, import_gguf, metadata_value, open_gguf, read_metadata
from lightning_tune.tokenizer.chat_template import CHATML, ChatTemplateError, render
from lightning_tune.tokenizer.gguf import VocabMetadata, vocab_metadata, write_vocab

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


def gguf_config(path: str | Path) -> tuple[ModelConfig, bool]:
    """(ModelConfig, tied embeddings) from a GGUF file's metadata; tied when it has no output.weight (as transformers decides)."""
    path, reader = open_gguf(path)
    metadata = read_metadata(reader)
    return _config_from_metadata(path, metadata, [t.name for t in reader.tensors])


def _config_from_metadata(path: Path, metadata: dict[str, Any], tensor_names: list[str]) -> tuple[ModelConfig, bool]:
    check_architecture(path, metadata)
    arch = ARCHITECTURE
    rope_scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if rope_scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        what = f"rope scaling {rope_scaling!r}" if rope_scaling not in ("none", None) else "a rope_freqs tensor (Llama 3.1 rotary scaling)"
        raise GGUFError(f"{path}: {what} is not supported; only the default rotary embedding is")
    for key in (f"{arch}.expert_count",):
        if metadata.get(key):
            raise GGUFError(f"{path}: {key} = {metadata[key]}: mixture-of-experts GGUF files are not supported")
    heads = int(metadata_value(path, metadata, f"{arch}.attention.head_count"))
    embed_dim = int(metadata_value(path, metadata, f"{arch}.embedding_length"))
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
        "num_layers": int(metadata_value(path, metadata, f"{arch}.block_count")),
        "num_heads": heads,
        "num_kv_heads": int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        "embed_dim": embed_dim,
        "intermediate_dim": int(metadata_value(path, metadata, f"{arch}.feed_forward_length")),
        "max_seq_len": int(metadata.get(f"{arch}.context_length", 4096)),
        "norm_eps": float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_base": float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "head_dim": head_dim,
        "tie_word_embeddings": tied,
    }
    try:
        return ModelConfig(**values), tied
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


def gguf_entries(path: str | Path, config: ModelConfig) -> list[Entry]:
    """The tensors of a GGUF file as checkpoint entries (our names, shapes), each dequantised to fp32 when read.

    Every tensor's type is checked here, before anything is read, so an unsupported one fails in one
    line and leaves the model untouched.
    """
    gguf = import_gguf()
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

        entries.append(Entry(key, shape, path, read))
    return entries


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise GGUFError(f"--outtype {outtype!r} is not supported; supported: {', '.join(OUTTYPES)}")


def _tensor_plan(state: dict[str, Tensor], config: ModelConfig, outtype: str, path: Path) -> list[tuple[str, str, Any]]:
    """(GGUF name, our key, ggml type) in llama.cpp's order; output.weight left out when it equals the embedding (tied)."""
    gguf = import_gguf()
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
        expected = {k: tuple(v.shape) for k, v in CausalLM(config).state_dict().items()}
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

    gguf = import_gguf()
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


# Written into every GGUF we export: the mark that lets a later export replace the file (llama.cpp ignores it).
EXPORT_KEY = "lightning_tune.export"
MODELFILE_HEADER = "# Ollama: ollama create NAME -f Modelfile && ollama run NAME"


CHATML_OLLAMA_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


# Conversations a chat template must render exactly as ChatML does for the Modelfile to say TEMPLATE ChatML.
CHATML_PROBES = (
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
)


def renders_as_chatml(template: str | None) -> bool:
    """Whether `template` renders the probe conversations (system message given) exactly as ChatML, so
    Ollama's ChatML TEMPLATE reproduces it; a template that only uses ChatML's tokens in another layout does not."""
    if not template or "<|im_start|>" not in template:
        return False
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    try:
        return all(render(template, probe, special, add_generation_prompt=True).text == render(CHATML, probe, special, add_generation_prompt=True).text for probe in CHATML_PROBES)
    except ChatTemplateError:
        return False


def modelfile_text(gguf_name: str, vocab: VocabMetadata) -> str:
    """An Ollama Modelfile for the export: FROM the file beside it, a ChatML TEMPLATE when the chat template renders as ChatML, stop at EOS.

    Ollama's TEMPLATE is a Go template, not Jinja. For a ChatML model (SmolLM2, Qwen) it is written
    out; for any other, Ollama matches the Jinja `tokenizer.chat_template` in the GGUF (the one the
    run trained with, for a fit's export) to its own templates when the model is created.
    """
    lines = [MODELFILE_HEADER, f"FROM ./{gguf_name}"]
    if renders_as_chatml(vocab.chat_template):
        lines.append(f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    else:
        if vocab.chat_template:
            lines.append("# TEMPLATE: Ollama derives it from the chat template in the .gguf; check it with: ollama show NAME --template")
        if vocab.eos_token:
            lines.append(f"PARAMETER stop {json.dumps(vocab.eos_token)}")
    return "\n".join(lines) + "\n"


def check_gguf_target(output: Path, modelfile: bool) -> None:
    """One line unless `output` (and, with `modelfile`, the Modelfile beside it) may be written: absent, or
    an export of ours (a GGUF carrying `EXPORT_KEY`, a Modelfile starting with our header). An export
    never replaces a file it did not write. A directory that is a file, or one we may not write in, is
    one line too."""
    where = existing_parent(output.parent)
    if not where.is_dir():
        raise GGUFError(f"{output}: {where} is a file, not a directory; name a .gguf in a directory")
    if not os.access(where, os.W_OK):
        raise GGUFError(f"{output}: cannot write in {where} (permission denied); name a .gguf in a directory you can write")
    if output.exists():
        try:
            ours = is_gguf(output) and EXPORT_KEY in read_metadata(open_gguf(output)[1])
        except GGUFError:
            ours = False
        if not ours:
            raise GGUFError(f"{output}: exists and is not a GGUF export of lightning_tune; name a new file (an export replaces only a file it wrote)")
    target = output.parent / "Modelfile"
    if modelfile and target.exists():
        try:
            ours = target.is_file() and target.read_text(encoding="utf-8").splitlines()[:1] == [MODELFILE_HEADER]
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise GGUFError(f"{target}: exists and was not written by lightning_tune; move it, or export into another directory (the export writes a Modelfile beside the .gguf)")


def save_gguf(
    state_dict: dict[str, Tensor],
    config: ModelConfig,
    output: str | Path,
    *,
    outtype: OutType = "f32",
    tokenizer: str | Path | None = None,
    name: str | None = None,
    modelfile: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Write a llama.cpp-loadable GGUF of a (merged) Llama state dict; returns its path.

    `tokenizer` is a .gguf, a SentencePiece .model, a tokenizer.json or a directory with one; its
    special token ids and chat template go into the file too (`chat_template`, when given, replaces
    the tokenizer's: the one a run's chat data used). The file is written to a temporary
    sibling, fsynced and renamed into place, then the Ollama `Modelfile` beside it the same way:
    a reader sees the previous export or the complete new one.
    """
    check_outtype(outtype)
    gguf = import_gguf()
    import numpy as np

    output = resolve_path(output).absolute()
    if output.suffix.lower() != ".gguf":
        raise GGUFError(f"{output}: the output must be a .gguf file name")
    if output.is_dir():
        raise GGUFError(f"{output}: exists and is a directory")
    check_gguf_target(output, modelfile)
    if tokenizer is None:
        raise GGUFError(f"{output}: a GGUF needs its tokenizer: give the tokenizer (a .gguf, tokenizer.model or tokenizer.json)")
    vocab = vocab_metadata(tokenizer)
    if chat_template is not None:
        vocab = dataclasses.replace(vocab, chat_template=chat_template)
    plan = _tensor_plan(state_dict, config, outtype, output)
    sizes = {key: state_dict[key].numel() * {"F32": 4, "F16": 2, "BF16": 2}.get(kind.name, 34 / 32) for _, key, kind in plan}
    output.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(existing_parent(output.parent), int(sum(sizes.values())) + 2**24)

    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=ARCHITECTURE)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or output.stem)
        writer.add_string(EXPORT_KEY, "1")  # ours: a later export may replace this file (check_gguf_target)
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
        write_vocab(writer, vocab, config.vocab_size, output)
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
        writer.close()
    if modelfile:
        atomic_write_text(output.parent / "Modelfile", modelfile_text(output.name, vocab))
    return output


# The format interface (`tensors.Format`), for `load.FORMATS`.

detect = is_gguf  # a *.gguf path (a missing one then says "GGUF file not found") or a file with GGUF's magic
read_config = gguf_config


def read_entries(path: Path, config: ModelConfig, stack: ExitStack) -> list[Entry]:
    return gguf_entries(path, config)  # the reader is memory-mapped and cached: nothing to close
