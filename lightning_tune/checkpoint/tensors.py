"""Tensors into a model: Entry (key, shape, how to read it), every key and shape checked before the first read,
one tensor assigned (a meta parameter materialised, an FSDP2 shard filled, NF4 quantised on arrival)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_tune.families.config import ModelConfig
from lightning_tune.families.hf_config import CONFIG_KEYS
from lightning_tune.io.files import CheckpointError, torch_load_weights_only
from lightning_tune.layers.lora import (
    LazyWeight,
    QLinear,
)
from lightning_tune.model.moe import Experts

# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Entry:
    """One tensor of a checkpoint, not yet read: our key, its shape, where it lives, how to read it."""

    key: str
    shape: tuple[int, ...]
    file: Path
    read: Callable[[], Tensor] | None = None  # None when only the key and shape are being checked
    # The dtype the tensor loads as when the caller names none, where `read` gives a wider one (an FP8 weight's
    # float32 product: the checkpoint's own dtype, as transformers' dtype="auto"); None: what `read` gives.
    dtype: torch.dtype | None = None


class Format(Protocol):
    """What one checkpoint format provides (each is a module of this package: `hf`, `meta`, `gguf`), so
    `load.py` opens any of them through one table (`FORMATS`). A new format is one more such module."""

    def detect(self, path: Path) -> bool:
        """Whether `path` (resolved; maybe missing) is in this format."""

    def read_config(self, path: Path) -> tuple[ModelConfig, bool]:
        """(the model's config, whether its output head is tied to the embedding)."""

    def read_entries(self, path: Path, config: ModelConfig, stack: ExitStack) -> list[Entry]:
        """Every tensor as an `Entry` (read lazily); files opened for them are kept open by `stack`."""


def load_state_dict_file(file: Path) -> dict[str, Tensor]:
    """A .bin/.pth state dict, memory-mapped (tensors are read from disk only when touched)."""
    state = torch_load_weights_only(file, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a flat state dict of tensors, got {type(state).__name__}")
    return state


def first_names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else f" ({len(names)})")


def check_entries(path: Path, entries: list[Entry], expected: dict[str, torch.Size], skip: set[str]) -> None:
    """Every expected key present once with the expected shape, nothing else (before touching the model)."""
    found = {e.key for e in entries} - skip
    unexpected = sorted(found - expected.keys())
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {first_names(unexpected)}")
    missing = sorted(expected.keys() - found)
    if missing:
        raise CheckpointError(f"{path}: missing keys {first_names(missing)}")
    for e in entries:
        if e.key not in skip and e.shape != tuple(expected[e.key]):
            raise CheckpointError(f"{e.file}: {e.key} has shape {list(e.shape)}, the config expects {list(expected[e.key])}")


def load_shard_(param: Tensor, full: Tensor) -> None:
    """Copy this rank's rows of the full tensor `full` into the sharded parameter `param` in place.

    `distribute_tensor(..., src_data_rank=None)` slices locally (no communication): every rank reads
    the same full tensor from the checkpoint and keeps only its own shard.
    """
    shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    with torch.no_grad():
        param.to_local().copy_(shard.to_local())


def assign_tensor(model: nn.Module, key: str, tensor: Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """Put one tensor into the model: materialise a meta parameter (assign), else copy in place.

    A parameter still on the meta device takes the tensor's dtype (or `dtype`) and device (CPU, or
    `device`). A real parameter keeps its dtype and device unless `dtype`/`device` ask otherwise.
    Either way requires_grad is kept, so a frozen base stays frozen. A parameter sharded by FSDP2
    (a DTensor) keeps its dtype and placement and receives only this rank's rows.
    """
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr == "weight" and isinstance(module, QLinear) and module.quantized:
        # QLoRA: quantised to NF4 as it arrives, so only one layer's high-precision weight ever exists
        module.quantize_base_(tensor.to(device if device is not None else tensor.device, dtype or tensor.dtype))
        return
    if isinstance(module, Experts) and attr in module.nf4:  # QLoRA's experts: the same, one stack at a time
        module.quantize_weight_(attr, tensor.to(device if device is not None else tensor.device, dtype or tensor.dtype))
        return
    old = module._parameters[attr]
    if isinstance(old, DTensor):
        load_shard_(old, tensor)
        return
    target_dtype = dtype or (tensor.dtype if old.is_meta else old.dtype)
    target_device = torch.device(device) if device is not None else (tensor.device if old.is_meta else old.device)
    if old.is_meta or old.dtype != target_dtype or old.device != target_device:
        module._parameters[attr] = nn.Parameter(tensor.to(target_device, target_dtype), requires_grad=old.requires_grad)
    else:
        with torch.no_grad():
            old.copy_(tensor)


def check_config_matches(path: Path, model: nn.Module, config: ModelConfig) -> None:
    ours = getattr(model, "config", None)
    if isinstance(ours, ModelConfig):
        diff = [f"{k} {getattr(config, k)} vs model's {getattr(ours, k)}" for k in CONFIG_KEYS if getattr(config, k) != getattr(ours, k)]
        if diff:
            raise CheckpointError(f"{path}: checkpoint config does not match the model: {'; '.join(diff)}")


def tie_embeddings(model: nn.Module) -> None:
    """lm_head's weight becomes the embedding's (the parameter object itself, as transformers ties)."""
    model.get_submodule("lm_head").weight = model.get_submodule("model.embed_tokens").weight


# --------------------------------------------------------------------------------------------------
# Fused projections (Phi-3 / 4): the checkpoint's qkv_proj = [q; k; v] rows and gate_up_proj = [gate; up]
# rows (transformers' Phi3Attention / Phi3MLP slice them so), ours separate, as torchtune and litgpt
# convert them.


def fused_parts(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Fused name (after `layers.N.`) -> its parts in row order: (our name, rows)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {
        "self_attn.qkv_proj.weight": [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv), ("self_attn.v_proj.weight", kv)],
        "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", config.intermediate_dim), ("mlp.up_proj.weight", config.intermediate_dim)],
    }


def split_fused(entries: list[Entry], config: ModelConfig) -> list[Entry]:
    """Each fused entry of a Phi-3 checkpoint becomes its parts (read by slicing the fused tensor);
    a fused tensor of the wrong height is left whole, for `check_entries` to name."""
    parts = fused_parts(config)
    out = []
    for entry in entries:
        prefix, _, name = entry.key.partition(".self_attn.") if ".self_attn." in entry.key else entry.key.partition(".mlp.")
        fused = ("self_attn." if ".self_attn." in entry.key else "mlp.") + name
        rows = parts.get(fused)
        if rows is None or len(entry.shape) != 2 or entry.shape[0] != sum(n for _, n in rows):
            out.append(entry)
            continue
        start = 0
        for part, n in rows:
            read = None if entry.read is None else (lambda r=entry.read, a=start, b=start + n: r()[a:b])
            out.append(Entry(f"{prefix}.{part}", (n, entry.shape[1]), entry.file, read, entry.dtype))
            start += n
    return out


def fuse_split(tensors: dict[str, Tensor | LazyWeight], config: ModelConfig) -> dict[str, Tensor | LazyWeight]:
    """Ours -> a Phi-3 checkpoint's: each layer's parts joined into the fused tensor, in the layer's key order.
    Parts that are `LazyWeight`s (QLoRA's merge, read from the base checkpoint when written) stay lazy: the
    fused weight is computed when it is written, one at a time."""
    parts = fused_parts(config)
    first = {names[0][0]: fused for fused, names in parts.items()}
    part_names = {name for names in parts.values() for name, _ in names}
    out = {}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".self_attn.") if ".self_attn." in key else key.partition(".mlp.")
        name = ("self_attn." if ".self_attn." in key else "mlp.") + rest
        if name in first:
            group = [tensors[f"{prefix}.{part}"] for part, _ in parts[first[name]]]
            if any(isinstance(t, LazyWeight) for t in group):
                shape = torch.Size([sum(t.shape[0] for t in group), *group[0].shape[1:]])
                out[f"{prefix}.{first[name]}"] = LazyWeight(shape, group[0].dtype, lambda group=group: torch.cat([t.to(t.dtype) for t in group]))
            else:
                out[f"{prefix}.{first[name]}"] = torch.cat(group)
        elif name not in part_names:
            out[key] = tensor
    return out


def fuse_lora_for_peft(tensors: dict[str, Tensor], targets: list[str], rank: int, alpha: float, config: ModelConfig) -> tuple[dict[str, Tensor], list[str], dict, dict]:
    """A PEFT adapter of our split q/k/v and gate/up LoRA layers -> one on Phi-3's fused layers:
    (tensors, target_modules, rank_pattern, alpha_pattern).

    Per layer, A_fused = [A_q; A_k; A_v] and B_fused = blockdiag(B_q, B_k, B_v), so B_fused A_fused
    stacks the parts' B A exactly; a part without an adapter contributes zero blocks. The fused rank
    is n * rank with n * alpha (rank_pattern / alpha_pattern), so PEFT's scale alpha / r is unchanged.
    DoRA's magnitude is per output row: the parts' magnitudes stacked (every part must then be adapted).
    `tensors` are keyed as PEFT's (`...layers.N.self_attn.q_proj.lora_A.weight`).
    """
    parts = fused_parts(config)
    out = dict(tensors)
    fused_targets = set(targets)
    for fused, names in parts.items():
        short = fused.split(".")[-2]
        part_shorts = [name.split(".")[-2] for name, _ in names]
        if not set(part_shorts) & set(targets):
            continue
        fused_targets -= set(part_shorts)
        fused_targets.add(short)
        layers = sorted({k.rpartition(f".{p}.")[0] for k in tensors for p in part_shorts if f".{p}.lora_A." in k})
        for layer in layers:
            a_parts, b_parts, magnitudes = [], [], []
            for (_, rows), p in zip(names, part_shorts):
                a, b = out.pop(f"{layer}.{p}.lora_A.weight", None), out.pop(f"{layer}.{p}.lora_B.weight", None)
                magnitude = out.pop(f"{layer}.{p}.lora_magnitude_vector", None)
                if a is None:
                    a, b = torch.zeros(rank, config.embed_dim), torch.zeros(rows, rank)
                a_parts.append(a)
                b_parts.append(b.to(a.dtype))
                magnitudes.append(magnitude)
            out[f"{layer}.{short}.lora_A.weight"] = torch.cat(a_parts)
            out[f"{layer}.{short}.lora_B.weight"] = torch.block_diag(*b_parts)
            if any(m is not None for m in magnitudes):
                if any(m is None for m in magnitudes):
                    raise CheckpointError(f"{layer}.{short}: DoRA on only some of {', '.join(part_shorts)} cannot be fused for PEFT; adapt all of them")
                out[f"{layer}.{short}.lora_magnitude_vector"] = torch.cat(magnitudes)
    fused_ranks = {fused.split(".")[-2]: len(names) for fused, names in parts.items() if fused.split(".")[-2] in fused_targets}
    return out, sorted(fused_targets), {k: n * rank for k, n in fused_ranks.items()}, {k: n * alpha for k, n in fused_ranks.items()}


# --------------------------------------------------------------------------------------------------
# Experts (Qwen3-MoE, Mixtral): the Hub stores each expert's projections as its own 2-D tensor, transformers 5
# and we one stacked tensor per projection (`model/moe.py`); Mixtral's Hub names the layer block_sparse_moe.

# HFMapping.experts -> (the layer's name on the Hub, per-expert names of gate, up, down)
EXPERT_NAMES = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")), "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}


def stack_experts(entries: list[Entry], kind: str, num_experts: int) -> list[Entry]:
    """The per-expert entries of each layer become its stacked `mlp.experts.gate_up_proj` ([gate_x; up_x]
    rows per expert x) and `mlp.experts.down_proj` (read and stacked when read, one layer at a time);
    Mixtral's `block_sparse_moe.gate` becomes `mlp.gate`. Entries already stacked pass as they are.
    A layer whose experts are incomplete or of unequal shapes is left per expert, for `check_entries` to name."""
    hub, (gate, up, down) = EXPERT_NAMES[kind]
    marker = f".{hub}.experts."
    groups: dict[str, dict[tuple[str, int], Entry]] = {}
    out = []
    for entry in entries:
        key = entry.key
        if hub != "mlp" and f".{hub}.gate." in key:
            key = key.replace(f".{hub}.gate.", ".mlp.gate.")
            out.append(Entry(key, entry.shape, entry.file, entry.read, entry.dtype))
            continue
        prefix, found, rest = key.partition(marker)
        index, _, name = rest.partition(".")
        if found and index.isdigit() and name in (f"{gate}.weight", f"{up}.weight", f"{down}.weight") and len(entry.shape) == 2:
            groups.setdefault(prefix, {})[name.removesuffix(".weight"), int(index)] = entry
        else:
            out.append(entry)
    for prefix, parts in groups.items():
        complete = all((n, x) in parts for n in (gate, up, down) for x in range(num_experts)) and len(parts) == 3 * num_experts
        shapes = {n: {parts[n, x].shape for x in range(num_experts) if (n, x) in parts} for n in (gate, up, down)}
        if not complete or any(len(s) != 1 for s in shapes.values()) or shapes[gate] != shapes[up]:
            out.extend(parts.values())
            continue
        (rows, cols), down_shape = next(iter(shapes[gate])), next(iter(shapes[down]))

        def gate_up(parts=parts) -> Tensor:
            return torch.stack([torch.cat([parts[gate, x].read(), parts[up, x].read()]) for x in range(num_experts)])

        def down_proj(parts=parts) -> Tensor:
            return torch.stack([parts[down, x].read() for x in range(num_experts)])

        reads = all(e.read is not None for e in parts.values())
        file, dtype = parts[gate, 0].file, parts[gate, 0].dtype
        out.append(Entry(f"{prefix}.mlp.experts.gate_up_proj", (num_experts, 2 * rows, cols), file, gate_up if reads else None, dtype))
        out.append(Entry(f"{prefix}.mlp.experts.down_proj", (num_experts, *down_shape), file, down_proj if reads else None, dtype))
    return out


class LazySlices:
    """Slices of a `LazyWeight` that stay lazy: `stack[x, a:b]` is a `LazyWeight` too. The stack is computed
    for the first slice written and kept in `cache` (shared by one export's stacks, one entry) until another
    stack is asked for, so an export writing a layer's experts in order computes each stack once and holds
    one at a time."""

    def __init__(self, lazy: LazyWeight, cache: dict) -> None:
        self.lazy, self.shape, self.cache = lazy, lazy.shape, cache

    def values(self) -> Tensor:
        if self.cache.get("stack") is not self:
            self.cache.clear()  # the previous stack's values go first
            self.cache["values"] = self.lazy.to(self.lazy.dtype)
            self.cache["stack"] = self
        return self.cache["values"]

    def __getitem__(self, index) -> LazyWeight:
        shape = torch.empty(self.shape, device="meta")[index].shape
        return LazyWeight(shape, self.lazy.dtype, lambda: self.values()[index])


def unstack_experts(tensors: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """Ours -> the Hub's per-expert keys (what transformers' `save_pretrained` writes, and what vLLM and
    llama.cpp's converter read), in each layer's place."""
    hub, (gate, up, down) = EXPERT_NAMES[kind]
    out = {}
    cache: dict = {}
    for key, tensor in tensors.items():
        prefix, found, name = key.partition(".mlp.experts.")
        if isinstance(tensor, LazyWeight) and found:  # QLoRA's merge: each expert's slice computed when written
            tensor = LazySlices(tensor, cache)
        if found and name == "gate_up_proj":
            rows = tensor.shape[1] // 2
            for x in range(tensor.shape[0]):
                out[f"{prefix}.{hub}.experts.{x}.{gate}.weight"] = tensor[x, :rows]
                out[f"{prefix}.{hub}.experts.{x}.{up}.weight"] = tensor[x, rows:]
        elif found and name == "down_proj":
            for x in range(tensor.shape[0]):
                out[f"{prefix}.{hub}.experts.{x}.{down}.weight"] = tensor[x]
        elif ".mlp.gate." in key and hub != "mlp":
            out[key.replace(".mlp.gate.", f".{hub}.gate.")] = tensor
        else:
            out[key] = tensor
    return out
