"""LoRA: low-rank adapters on linear layers, and the helpers to apply, freeze, collect and merge them.

`LoRALinear` *is* an `nn.Linear` (same `weight`, same state-dict key), with two extra submodules
`lora_A` [r, in] and `lora_B` [out, r]. So a base checkpoint loads into a LoRA model unchanged, and
the adapter keys are PEFT's (`...q_proj.lora_A.weight`) once prefixed with `base_model.model.`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
OUTPUT_TARGET = "lm_head"
# Meta's and torchtune's names for the same layers, accepted in configs.
TARGET_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "output_proj": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "output": "lm_head"}


class LoRALinear(nn.Linear):
    """y = W x + (alpha / r) * B A dropout(x), with W frozen and A, B trained.

    Initialised as PEFT does: A Kaiming-uniform with a = sqrt(5), B zeros, so a fresh adapter
    leaves the model's output unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0, bias: bool = False, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, apply: Callable[[Tensor, Callable[[Tensor], object]], None] | None = None) -> None:
        """`apply(weight, init)` runs each initialiser (default: `init(weight)`); FSDP2 passes
        `sharding.init_like_unsharded_` so sharded adapters get one process's values."""
        apply = apply or (lambda weight, init: init(weight))
        apply(self.lora_A.weight, lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
        apply(self.lora_B.weight, nn.init.zeros_)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        # Scaled on the rank-r intermediate: r numbers per token instead of out_features (forward
        # and backward); the same product as PEFT's B(A(x)) * scaling up to rounding.
        return out + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def delta_weight(self) -> Tensor:
        """(alpha / r) * B A, the [out, in] update that merging adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B A into W in place; forward then costs one matmul. Idempotent."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def resolve_targets(attn_modules: Iterable[str], apply_to_mlp: bool = False, apply_to_output: bool = False) -> list[str]:
    """Config names (`q_proj` or Meta's `q`, `w1`, ...) -> the module names LoRA wraps."""
    targets = []
    for name in attn_modules:
        canonical = TARGET_ALIASES.get(name, name)
        if canonical not in ATTN_TARGETS:
            raise ValueError(f"lora_attn_modules: unknown module {name!r}; expected some of {list(ATTN_TARGETS)}")
        targets.append(canonical)
    if apply_to_mlp:
        targets += MLP_TARGETS
    if apply_to_output:
        targets.append(OUTPUT_TARGET)
    return list(dict.fromkeys(targets))  # keep order, drop repeats


def apply_lora(model: nn.Module, targets: Iterable[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Replace every `nn.Linear` whose name is in `targets` with a `LoRALinear` sharing its weight.

    The base weight object is reused (not copied), so this works on meta-device models before
    loading and on loaded models alike. Returns the qualified names of the wrapped layers.
    """
    targets = set(targets)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                # Built on meta so no throw-away base weight is allocated, then given the layer's own
                # weight and real A, B on its device.
                lora = LoRALinear(child.in_features, child.out_features, rank, alpha, dropout, bias=child.bias is not None, device="meta", dtype=child.weight.dtype)
                lora.weight, lora.bias = child.weight, child.bias
                lora.lora_A.to_empty(device=child.weight.device)
                lora.lora_B.to_empty(device=child.weight.device)
                lora.reset_lora_parameters()
                setattr(parent, child_name, lora)
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise ValueError(f"LoRA targets {sorted(targets)} match no linear layer of the model")
    return wrapped


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapters: the base then gets no gradients and no optimiser state."""
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_key(name)


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, keyed as in `model.state_dict()`."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and turn each `LoRALinear` back into a plain
    `nn.Linear`, so the state dict is exactly the base model's (ready for a Hugging Face export)."""
    for name, lora in lora_modules(model).items():
        lora.merge()
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        linear.weight, linear.bias = lora.weight, lora.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, linear)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The base model's state dict with every adapter folded in, leaving `model` untouched.

    Only the wrapped weights are new tensors (W + (alpha/r) B A, computed in fp32 then cast back);
    every other entry is the model's own tensor, so exporting a 7B LoRA model costs memory only for
    the few adapted matrices, not a second copy of the model. `state_dict` supplies the tensors
    when the model's own are sharded (gathered by `sharding.gather_state_dict`); the model still
    gives each layer's scaling.
    """
    unmerged = {name: lora.scaling for name, lora in lora_modules(model).items() if not lora.merged}
    state = model.state_dict() if state_dict is None else state_dict
    merged = {}
    for key, value in state.items():
        if is_lora_key(key):
            continue
        module_name, _, param_name = key.rpartition(".")
        if module_name in unmerged and param_name == "weight":
            delta = state[f"{module_name}.lora_B.weight"].float() @ state[f"{module_name}.lora_A.weight"].float()
            # In the wider of the base's and the adapter's dtypes: a base stored in bf16 under
            # bf16-mixed (see FinetuneModule) still gets an fp32 merge of its fp32 adapter.
            dtype = torch.promote_types(value.dtype, state[f"{module_name}.lora_A.weight"].dtype)
            value = (value.float() + delta * unmerged[module_name]).to(dtype)
        merged[key] = value
    return merged
