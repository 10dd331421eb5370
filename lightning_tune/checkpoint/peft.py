"""PEFT adapter directories (LoRA and DoRA): written as PEFT writes them, read back onto our model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_tune.checkpoint.load import checkpoint_directory
from lightning_tune.checkpoint.tensors import Entry, assign_tensor, check_entries, first_names, fuse_lora_for_peft, load_state_dict_file
from lightning_tune.checkpoint.torchtune import torchtune_adapter_file, torchtune_adapter_to_hf
from lightning_tune.families import hf_mapping
from lightning_tune.families.config import ModelConfig
from lightning_tune.io.files import CheckpointError, atomic_directory, check_disk_space, check_export_target, existing_parent, read_json, require
from lightning_tune.layers.lora import (
    apply_lora,
    is_lora_key,
    lora_modules,
)
from lightning_tune.model.decoder import CausalLM
from lightning_tune.model.moe import ExpertAdapter, add_expert_adapters, expert_adapters

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (ours)

# PEFT options that change an adapter's math or layout; each must be absent or at its plain-LoRA
# value (`use_dora` is read: DoRA adapters load).
PEFT_PLAIN_LORA: dict[str, object] = {
    "bias": "none",
    "use_rslora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "exclude_modules": None,
    "use_bdlora": None,
    "arrow_config": None,
}
# init_lora_weights values that leave the base weights untouched (PiSSA, OLoRA, LoftQ, CorDA rewrite them).
PEFT_PLAIN_INITS = (True, False, None, "gaussian")


# PEFT's `target_parameters` for our expert adapters, in the order PEFT nests them (the first innermost).
EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Our adapter module (under `mlp.experts.`) -> PEFT's wrapper path of that parameter under `mlp.experts.`.
PEFT_WRAPPERS = {"gate_up_lora": "base_layer.", "down_lora": ""}


def expert_adapters_to_peft(state: dict[str, Tensor], adapters: dict[str, ExpertAdapter]) -> dict[str, Tensor]:
    """Adapter tensors keyed as in the model -> the expert ones in PEFT's `ParamWrapper` layout and keys
    (`mlp.experts[.base_layer].lora_A.weight` [r*X, in], whose rows x*r..x*r+r-1 are expert x's A;
    `lora_B.weight` [out, r*X], whose column j*X + x is expert x's B column j); the rest as they are."""
    if not adapters:
        return state
    out = {}
    for key, tensor in state.items():
        prefix, found, rest = key.partition(".mlp.experts.")
        module, _, name = rest.partition(".")
        if found and module in PEFT_WRAPPERS:
            X, a, b = tensor.shape
            flat = tensor.reshape(X * a, b) if name == "lora_A.weight" else tensor.permute(1, 2, 0).reshape(a, b * X)
            out[f"{prefix}.mlp.experts.{PEFT_WRAPPERS[module]}{name}"] = flat
        else:
            out[key] = tensor
    return out


def expert_adapters_from_peft(tensors: dict[str, Tensor], model: nn.Module, rank: int) -> dict[str, Tensor]:
    """`expert_adapters_to_peft` undone for `model`'s experts (keys without PEFT's prefix); tensors of
    another shape keep PEFT's flat shape, for the key and shape check to name."""
    X = model.config.num_experts
    wrapped = {path: module for module, path in PEFT_WRAPPERS.items()}
    out = {}
    for key, tensor in tensors.items():
        prefix, found, rest = key.partition(".mlp.experts.")
        path, name = (rest[: -len("lora_A.weight")], "lora_A.weight") if rest.endswith("lora_A.weight") else (rest[: -len("lora_B.weight")], "lora_B.weight")
        if not found or path not in wrapped or tensor.dim() != 2:
            out[key] = tensor
            continue
        if name == "lora_A.weight" and tensor.shape[0] == X * rank:
            tensor = tensor.reshape(X, rank, tensor.shape[1])
        elif name == "lora_B.weight" and tensor.shape[1] == X * rank:
            tensor = tensor.reshape(tensor.shape[0], rank, X).permute(2, 0, 1).contiguous()
        out[f"{prefix}.mlp.experts.{wrapped[path]}.{name}"] = tensor
    return out


# --------------------------------------------------------------------------------------------------
# PEFT adapters


def save_peft_adapter(model: nn.Module, output_dir: str | Path, *, base_model_name_or_path: str | None = None, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter directory (loadable by `PeftModel.from_pretrained`).

    `state_dict` supplies the tensors when the model's own are sharded (the gathered full state
    dict, see `sharding.gather_state_dict`); the model still gives the layers' rank, alpha and names.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    loras = lora_modules(model)
    if not loras:
        raise CheckpointError(f"{output_dir}: the model has no LoRA layers to save")
    settings = {(m.rank, m.alpha, m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0, m.use_dora) for m in loras.values()}
    if len(settings) > 1:
        raise CheckpointError(f"{output_dir}: PEFT needs one rank/alpha/dropout/use_dora for all LoRA layers, found (rank, alpha, dropout, use_dora) {sorted(settings)}")
    rank, alpha, dropout, use_dora = settings.pop()
    targets = sorted({name.rpartition(".")[2] for name in loras})
    # PEFT wraps every linear named like a target; an adapter on only some of them would not round-trip.
    same_named = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if sorted(same_named) != sorted(loras):
        raise CheckpointError(f"{output_dir}: LoRA covers only some of the layers named {targets}; PEFT's target_modules cannot express that")
    lora_state = {k: v for k, v in (model.state_dict() if state_dict is None else state_dict).items() if is_lora_key(k)}
    meta = [k for k, v in lora_state.items() if v.is_meta]
    if meta:
        raise CheckpointError(f"{output_dir}: {first_names(meta)} are on the meta device (never initialised); nothing to save")
    experts = expert_adapters(model)
    if experts and {(a.rank, a.alpha) for a in experts.values()} != {(rank, alpha)}:
        raise CheckpointError(f"{output_dir}: PEFT needs the experts' adapters to have the linear layers' rank and alpha ({rank}, {alpha})")
    if experts and dropout:
        raise CheckpointError(f"{output_dir}: PEFT's expert adapters (target_parameters) need lora_dropout 0, got {dropout}")
    lora_state = expert_adapters_to_peft(lora_state, experts)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state.items()}
    rank_pattern: dict = {}
    alpha_pattern: dict = {}
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig) and hf_mapping(config.model_type).fused_projections:
        # Phi-3 / 4: transformers holds q/k/v and gate/up as one layer each; PEFT adapts those (rank n x r).
        tensors, targets, rank_pattern, alpha_pattern = fuse_lora_for_peft(tensors, targets, rank, alpha, config)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": use_dora,  # then the tensors include PEFT's `<layer>.lora_magnitude_vector`
        "modules_to_save": None,
        # the stacked expert tensors (PEFT wraps them in this order: gate_up_proj's adapter inside down_proj's)
        "target_parameters": list(EXPERT_TARGETS) if experts else None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model_name_or_path,
    }
    check_export_target(output_dir, "peft")
    check_disk_space(existing_parent(output_dir), sum(t.numel() * t.element_size() for t in tensors.values()) + 2**20)
    with atomic_directory(output_dir, kind="peft") as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return output_dir


def _read_adapter_weights(path: Path, config: ModelConfig) -> tuple[Path, dict[str, Tensor]]:
    # torchtune's own adapter_model.pt first (only torchtune writes it): torchtune 0.6's PEFT copy beside
    # it has Qwen 2's q/k lora_B rows permuted as if Llama's (checkpoint/torchtune.py)
    torchtune_file = torchtune_adapter_file(path)
    if torchtune_file is not None:
        tensors = torchtune_adapter_to_hf(load_state_dict_file(torchtune_file), config, torchtune_file)
        return torchtune_file, {PEFT_PREFIX + k: v for k, v in tensors.items()}
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        file = path / name
        if file.is_file():
            if file.suffix == ".bin":
                return file, load_state_dict_file(file)
            try:
                with safe_open(file, framework="pt", device="cpu") as handle:
                    return file, {k: handle.get_tensor(k) for k in handle.keys()}  # adapters are small
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"{file}: cannot read as safetensors ({err})") from None
    raise CheckpointError(f"{path}: no adapter weights (expected adapter_model.safetensors, adapter_model.bin, or torchtune's adapter_model.pt)")


def load_peft_adapter(model: CausalLM, adapter_dir: str | Path) -> list[str]:
    """Wrap `model`'s target layers with LoRA (or DoRA, `use_dora`) as a PEFT adapter directory says,
    and load its A/B weights (and DoRA's `lora_magnitude_vector`).

    Everything is checked before the model is touched: unsupported options, target modules absent
    from the model, keys and shapes. Returns the names of the wrapped layers.
    """
    path = checkpoint_directory(adapter_dir)
    file = path / "adapter_config.json"
    cfg = read_json(file)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    target_parameters = cfg.get("target_parameters")
    if target_parameters is not None and list(target_parameters) != list(EXPERT_TARGETS):
        raise CheckpointError(f"{file}: target_parameters {target_parameters!r} is not supported (expected {list(EXPERT_TARGETS)}: a mixture of experts' stacked projections, or none)")
    if target_parameters and not model.config.num_experts:
        raise CheckpointError(f"{file}: target_parameters adapts experts, but the model has none (model_type {model.config.model_type!r})")
    for option, plain in PEFT_PLAIN_LORA.items():
        if option == "target_parameters":
            continue
        value = cfg.get(option)
        if value not in (None, plain) and (bool(value) or bool(plain)):
            raise CheckpointError(f"{file}: {option}={value!r} is not supported (plain LoRA needs {plain!r})")
    if cfg.get("init_lora_weights", True) not in PEFT_PLAIN_INITS:
        raise CheckpointError(f"{file}: init_lora_weights={cfg['init_lora_weights']!r} rewrites the base weights; not supported")
    use_dora = cfg.get("use_dora") or False
    if not isinstance(use_dora, bool):
        raise CheckpointError(f"{file}: use_dora must be true or false, got {use_dora!r}")
    rank, alpha = require(cfg, "r", file), require(cfg, "lora_alpha", file)
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{file}: r must be a positive integer and lora_alpha a number, got r={rank!r}, lora_alpha={alpha!r}")
    targets = require(cfg, "target_modules", file)
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and "." not in t for t in targets):
        raise CheckpointError(f"{file}: target_modules must be a list of layer names like ['q_proj', 'v_proj'], got {targets!r}")
    if lora_modules(model):
        raise CheckpointError(f"{path}: the model already has LoRA layers; load the adapter into the base model")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] in targets}
    absent = sorted(set(targets) - {n.rpartition(".")[2] for n in linears})
    if absent:
        raise CheckpointError(f"{file}: target_modules {absent} are not linear layers of the model")

    weights_file, tensors = _read_adapter_weights(path, model.config)
    if target_parameters:  # into our stacked layout (shapes checked below)
        tensors = {PEFT_PREFIX + k: v for k, v in expert_adapters_from_peft({k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}, model, rank).items()}
    expected = {}
    for name, m in linears.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.Size([rank, m.in_features])
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.Size([m.out_features, rank])
        if use_dora:
            expected[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = torch.Size([m.out_features])
    if target_parameters:
        with torch.device("meta"):
            probe = CausalLM(model.config)
            add_expert_adapters(probe, rank, alpha)
        expected |= {PEFT_PREFIX + k: v.shape for k, v in probe.state_dict().items() if "_lora." in k}
    entries = [Entry(k, tuple(v.shape), weights_file) for k, v in tensors.items()]
    check_entries(weights_file, entries, expected, skip=set())

    wrapped = apply_lora(model, targets, rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), use_dora=use_dora)
    if target_parameters:
        wrapped += add_expert_adapters(model, rank, alpha)
    for key, tensor in tensors.items():
        assign_tensor(model, key.removeprefix(PEFT_PREFIX), tensor, None, None)
    return wrapped
