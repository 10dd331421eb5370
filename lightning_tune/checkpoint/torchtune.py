"""torchtune's own checkpoint files, read weights-only: its LoRA adapters in torchtune's key names
(`adapter_model.pt`, older `adapter_0.pt`) and its `recipe_state.pt`.

What torchtune 0.6's checkpointers write and how each loads here:
- FullModelHFCheckpointer: `epoch_N/` is a Hugging Face directory (`model-0000x-of-0000y.safetensors`
  or `.bin` with their index and the base's config.json): any loader reads it (`load.from_pretrained`,
  `checkpoint_dir:`). Its adapters come twice: `adapter_model.safetensors` (or `.bin`) in PEFT's
  format with `adapter_config.json`, and `adapter_model.pt` in torchtune's names, which
  `peft.load_peft_adapter` reads first (through `torchtune_adapter_to_hf` here): for Qwen 2 only it
  is right. A PEFT file alone loads as any PEFT adapter.
- FullModelMetaCheckpointer: `epoch_N/model-00001-of-00001.bin` beside a copy of params.json holds
  Meta's key names under torchtune's file name; `meta.py` reads that folder as a Meta directory.
- `recipe_state.pt` (`recipe_state/` beside `epoch_N/`) holds the optimiser state and counters, no
  weights: `read_recipe_state` says which epoch's weights a run resumes from; the optimiser state is
  not carried over (a new run here starts its own).

torchtune keeps the q/k projections of Llama-style models in Meta's interleaved RoPE row order; their
`lora_B` rows (and DoRA's magnitudes) are permuted back to Hugging Face's order, as torchtune's own
`tune_to_peft_adapter_weights` does for lora_B (which it also does, wrongly, for Qwen 2, whose rows
torchtune keeps in Hugging Face's order: see `INTERLEAVED`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_tune.families.config import ModelConfig
from lightning_tune.io.files import CheckpointError, torch_load_weights_only

# torchtune's module names -> Hugging Face's (the names our models and PEFT use)
MODULES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
PARTS = {"lora_a.weight": "lora_A.weight", "lora_b.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
# Model types whose q/k rows torchtune keeps in Meta's interleaved RoPE order (its hf_to_tune permutes
# them: Llama, Mistral, Gemma); Qwen 2 and Phi-3 keep Hugging Face's order, so nothing is reordered.
INTERLEAVED = ("llama", "mistral", "gemma", "gemma2")
ADAPTER_FILES = ("adapter_model.pt", "adapter_0.pt")
RECIPE_STATE_COUNTERS = ("seed", "epochs_run", "total_epochs", "max_steps_per_epoch", "steps_run")
KEY = re.compile(r"layers\.(\d+)\.(attn\.\w+|mlp\.w[123])\.(lora_a\.weight|lora_b\.weight|magnitude)|output\.(lora_a\.weight|lora_b\.weight|magnitude)")


def torchtune_adapter_file(path: Path) -> Path | None:
    """torchtune's own adapter file in `path` (adapter_model.pt, or adapter_0.pt of torchtune before 0.3), if any."""
    return next((path / name for name in ADAPTER_FILES if (path / name).is_file()), None)


def torchtune_adapter_key(key: str) -> str:
    """torchtune's `layers.0.attn.output_proj.lora_a.weight` -> `model.layers.0.self_attn.o_proj.lora_A.weight`."""
    match = KEY.fullmatch(key)
    if match is None or (match.group(2) and match.group(2) not in MODULES):
        raise KeyError(key)
    if match.group(4):
        return f"lm_head.{PARTS[match.group(4)]}"
    return f"model.layers.{match.group(1)}.{MODULES[match.group(2)]}.{PARTS[match.group(3)]}"


def interleaved_to_halves(rows: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """Rows of a q/k projection output in Meta's (torchtune's) interleaved RoPE order -> Hugging Face's halves order."""
    rest = rows.shape[1:]
    return rows.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(num_heads * head_dim, *rest)


def torchtune_adapter_to_hf(tensors: dict[str, Any], config: ModelConfig, file: Path) -> dict[str, Tensor]:
    """torchtune-named adapter tensors -> our (Hugging Face module) names, q/k output rows reordered;
    one line naming the file and key for anything that is not a LoRA/DoRA tensor of a Llama-style layer."""
    out = {}
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{file}: {key!r} is not a tensor (expected torchtune's adapter weights)")
        try:
            new = torchtune_adapter_key(key)
        except KeyError:
            raise CheckpointError(f"{file}: unexpected key {key!r} (expected torchtune's LoRA keys, e.g. layers.0.attn.q_proj.lora_a.weight)") from None
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(new.split(".")[-3]) if config.model_type in INTERLEAVED else None
        if heads and not new.endswith("lora_A.weight"):
            if value.shape[0] != heads * config.head_dim:
                raise CheckpointError(f"{file}: {key} has {value.shape[0]} rows, expected {heads} heads x {config.head_dim}")
            value = interleaved_to_halves(value, heads, config.head_dim)
        out[new] = value
    return out


def read_recipe_state(path: str | Path) -> dict[str, Any]:
    """torchtune's `recipe_state.pt` (a file, or the output_dir / recipe_state/ folder holding it), read
    weights-only: its counters (seed, epochs_run, total_epochs, ...) and `resume_from`, the epoch_N
    folder of the weights it goes with (epochs_run - 1), when that folder is beside it.

    torchtune 0.6 keeps the optimiser state here and the weights in epoch_N/ (HF or Meta files, and
    adapters); the optimiser state is not carried over."""
    path = Path(path)
    for candidate in (path / "recipe_state" / "recipe_state.pt", path / "recipe_state.pt"):
        if path.is_dir() and candidate.is_file():
            path = candidate
            break
    if not path.is_file():
        raise CheckpointError(f"{path}: no recipe_state.pt (torchtune writes it to OUTPUT_DIR/recipe_state/ for an unfinished run)")
    state = torch_load_weights_only(path)
    if not isinstance(state, dict) or "epochs_run" not in state:
        raise CheckpointError(f"{path}: not torchtune's recipe state (expected a mapping with epochs_run)")
    out = {key: state[key] for key in RECIPE_STATE_COUNTERS if key in state}
    epochs_run = state["epochs_run"]
    if not isinstance(epochs_run, int) or epochs_run < 0:
        raise CheckpointError(f"{path}: epochs_run must be a count, got {epochs_run!r}")
    output_dir = path.parent.parent if path.parent.name == "recipe_state" else path.parent
    weights = output_dir / f"epoch_{epochs_run - 1}"
    out["resume_from"] = weights if epochs_run > 0 and weights.is_dir() else None
    return out
