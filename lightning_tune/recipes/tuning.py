"""How a recipe's weights train: every weight (`Full`) or low-rank adapters on a frozen base (`LoRA`, with
DoRA and QLoRA). The base recipe holds one tuning and delegates to it everything that differs between them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from lightning_tune.checkpoint import save_peft_adapter, weight_reader
from lightning_tune.layers.lora import MLP_TARGETS, apply_lora, disable_adapters, is_lora_key, lora_modules, mark_only_lora_trainable, merged_state_dict, quantize_linears, resolve_targets
from lightning_tune.layers.nf4 import check_dtype, require_bitsandbytes
from lightning_tune.model import CausalLM
from lightning_tune.model.moe import add_expert_adapters, disable_expert_adapters, expert_adapters, merged_expert_tensors, quantize_experts
from lightning_tune.training.sharding import init_like_unsharded_

log = logging.getLogger(__name__)


class Tuning(Protocol):
    """What the base recipe (`FinetuneModule`) asks of a tuning.

    `frozen_base`: the base weights never change, so checkpoints hold only what trains (and load
    non-strictly) and `reference` gives the starting model back. `checkpoint_keys`: the recipe's
    hyper-parameters that shape what trains; a checkpoint resumes only a run with the same values.
    """

    frozen_base: bool
    checkpoint_keys: tuple[str, ...]

    def adapt(self, model: CausalLM, sharded: bool) -> None:
        """Choose what trains (wrap, freeze), once the model is built (`sharded`: under FSDP2, still on meta)."""

    def loading(self, model: CausalLM, device: torch.device) -> AbstractContextManager[None]:
        """The context the base weights are loaded from a checkpoint in."""

    def checkpoint_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """`settings` (of `checkpoint_keys`) written so that equal settings compare equal."""

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any], expected: Iterable[str]) -> None:
        """Refuse a checkpoint that lacks tensors this run trains (`expected`: the recipe's state-dict keys)."""

    def reset_adapters(self, model: CausalLM) -> None:
        """Initialise what `adapt` added once it has real storage (FSDP2: after sharding)."""

    def export_to(self, model: CausalLM, output_dir: Path, state_dict: dict[str, Tensor] | None, checkpoint_dir: str | None) -> None:
        """Write what this tuning exports besides `merged/` (LoRA: `adapter/`)."""

    def export_state_dict(self, model: CausalLM, state_dict: dict[str, Tensor] | None, checkpoint_dir: str | None) -> dict[str, Tensor]:
        """The base model's weights to export, from the model's full state dict (None: the model's own)."""

    def reference(self, model: CausalLM) -> AbstractContextManager[None]:
        """Inside, `model` computes the starting model where it can (adapters off); a trained full model stays itself."""

    def describe(self, model: CausalLM) -> str | None:
        """One line for the log at setup saying what trains (None: nothing worth saying)."""


class Full:
    """Every weight trains; checkpoints and exports hold the whole model."""

    frozen_base = False
    checkpoint_keys: tuple[str, ...] = ()

    def adapt(self, model: CausalLM, sharded: bool) -> None:
        pass

    def loading(self, model: CausalLM, device: torch.device) -> AbstractContextManager[None]:
        return nullcontext()

    def checkpoint_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        return settings

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any], expected: Iterable[str]) -> None:
        pass  # loaded strictly: a missing weight is Lightning's error

    def reset_adapters(self, model: CausalLM) -> None:
        pass

    def export_to(self, model: CausalLM, output_dir: Path, state_dict: dict[str, Tensor] | None, checkpoint_dir: str | None) -> None:
        pass

    def export_state_dict(self, model: CausalLM, state_dict: dict[str, Tensor] | None, checkpoint_dir: str | None) -> dict[str, Tensor]:
        return model.state_dict() if state_dict is None else state_dict

    def reference(self, model: CausalLM) -> AbstractContextManager[None]:
        return nullcontext()

    def describe(self, model: CausalLM) -> str | None:
        return None


# Of the recipes' flat LoRA arguments (`LoRA.from_arguments`), those that shape the adapters: a LoRA
# checkpoint resumes only a run with the same values.
LORA_CHECKPOINT_KEYS = ("lora_rank", "lora_alpha", "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "apply_lora_to_experts", "use_dora", "quantize_base")


class LoRA:
    """Low-rank adapters on a frozen base; exports `adapter/` (PEFT) and `merged/` (adapters folded in).

    Checkpoints hold only the adapters and their optimiser state: the frozen base is reloaded from
    checkpoint_dir on resume, never stored a second time. Errors name the recipes' flat arguments
    (lora_rank, ...), which are what a config sets.

    Args:
        rank: Rank r of the adapters.
        alpha: Scale numerator: the adapter's output is multiplied by alpha / rank.
        dropout: Dropout on the adapter's input.
        targets: The module names to adapt (`layers.lora.resolve_targets`: q_proj ... down_proj, lm_head).
        use_dora: DoRA: also train a magnitude per output row of each adapted layer (PEFT's formula).
        quantize_base: nf4 = QLoRA: the frozen linear weights in 4-bit NF4; needs bitsandbytes.
        experts: Also adapt the stacked expert tensors of a mixture-of-experts model (one low-rank pair
            per expert and projection, `model/moe.py`; PEFT's `target_parameters`).
    """

    frozen_base = True
    checkpoint_keys = LORA_CHECKPOINT_KEYS

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        targets: Sequence[str] = ("q_proj", "v_proj"),
        use_dora: bool = False,
        quantize_base: Literal["nf4"] | None = None,
        experts: bool = False,
    ) -> None:
        if experts and dropout:
            raise ValueError(f"apply_lora_to_experts: PEFT's expert adapters (target_parameters) have no dropout; set lora_dropout 0, got {dropout}")
        if experts and use_dora:
            raise ValueError("apply_lora_to_experts: DoRA is not defined for expert tensors (nor in PEFT); set use_dora false")
        if quantize_base is not None:
            require_bitsandbytes()  # fail now, in one line, not after loading the model
        if rank <= 0:
            raise ValueError(f"lora_rank: must be a positive integer, got {rank}")
        if alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {alpha}")
        if not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {dropout}")
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.targets = list(targets)
        self.use_dora = use_dora
        self.quantize_base = quantize_base
        self.experts = experts
        self.layers: list[str] = []  # the wrapped layers' names, once `adapt` (or QLoRA's `loading`) wrapped them

    @classmethod
    def from_arguments(
        cls,
        lora_rank: int,
        lora_alpha: float,
        lora_dropout: float,
        lora_attn_modules: Sequence[str],
        apply_lora_to_mlp: bool,
        apply_lora_to_output: bool,
        quantize_base: Literal["nf4"] | None,
        use_dora: bool,
        apply_lora_to_experts: bool = False,
    ) -> LoRA:
        """The LoRA of the recipes' flat arguments (LoRAFinetune's and DPOFinetune's, documented there)."""
        targets = resolve_targets(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output)  # validates the names
        return cls(lora_rank, lora_alpha, lora_dropout, targets, use_dora, quantize_base, apply_lora_to_experts)

    def adapt(self, model: CausalLM, sharded: bool) -> None:
        if self.quantize_base and sharded:
            raise ValueError("quantize_base: not supported with FSDP2 sharding; train QLoRA on one device (or DDP)")
        if not lora_modules(model):  # QLoRA from a checkpoint wrapped the layers before loading (`loading`)
            self.layers = self.wrap(model)
        mark_only_lora_trainable(model)

    def wrap(self, model: CausalLM) -> list[str]:
        """Wrap the targets with adapters (QLoRA: and quantise every frozen linear); the wrapped names."""
        if self.quantize_base:
            check_dtype(torch.get_default_dtype())  # the dtype the Trainer's precision builds in
        if model.config.num_experts and set(self.targets) & set(MLP_TARGETS):
            # PEFT reads gate_proj / up_proj / down_proj on a mixture of experts as the experts' (transformers 4) names
            raise ValueError("apply_lora_to_mlp: the MLPs of a mixture-of-experts model are its experts; set apply_lora_to_experts true and apply_lora_to_mlp false")
        wrapped = apply_lora(model, self.targets, self.rank, self.alpha, self.dropout, use_dora=self.use_dora, quantize_base=self.quantize_base is not None)
        if self.quantize_base:
            quantize_linears(model)  # the frozen linears without an adapter too (not lm_head), as transformers' 4-bit loading
            quantize_experts(model)  # and the experts, most of a mixture's weights
        if self.experts:
            if not model.config.num_experts:
                raise ValueError(f"apply_lora_to_experts: the model has no experts (model_type {model.config.model_type!r}, num_experts 0); set it false")
            add_expert_adapters(model, self.rank, self.alpha)
        return wrapped

    def describe(self, model: CausalLM) -> str:
        """One line: which kinds of layers carry adapters and how many numbers train."""
        kinds = sorted({name.rpartition(".")[2] for name in lora_modules(model)})
        experts = expert_adapters(model)
        if experts:
            kinds.append(f"experts ({len(experts) // 2} layers x {model.config.num_experts} experts x gate_up_proj, down_proj)")
        elif model.config.num_experts:
            kinds.append(f"not the experts (apply_lora_to_experts: false; they hold most of the {model.config.num_experts}-expert model's weights)")
        trained = sum(p.numel() for n, p in model.named_parameters() if is_lora_key(n))
        return f"LoRA: rank {self.rank} adapters on {', '.join(kinds)}: {trained:,} trained parameters"

    @contextmanager
    def loading(self, model: CausalLM, device: torch.device) -> Iterator[None]:
        """QLoRA: wrap the targets first (on meta), so `load_weights` quantises each base weight as it
        arrives and the high-precision base never exists whole; then initialise the adapters (A, B,
        DoRA's magnitude from the NF4 weight) with `apply_lora`'s draws in its order."""
        if self.quantize_base is None:
            yield
            return
        self.layers = self.wrap(model)
        yield
        for name in self.layers:
            model.get_submodule(name).materialize_adapters_(device)
        for adapter in expert_adapters(model).values():
            adapter.materialize_(device)

    def checkpoint_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        if "lora_attn_modules" in settings:  # Meta's names (q) and ours (q_proj) are the same target
            settings["lora_attn_modules"] = sorted(resolve_targets(settings["lora_attn_modules"]))
        return settings

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any], expected: Iterable[str]) -> None:
        if "state_dict" not in checkpoint:  # a sharded (FSDP2) checkpoint: the strategy loaded the weights itself
            return
        missing = sorted(set(expected) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]}): it was saved with other LoRA settings")

    def reset_adapters(self, model: CausalLM) -> None:
        """Initialise sharded adapters with one process's values (the same draws in the same order
        as `apply_lora` on an unsharded model)."""
        for name in self.layers:
            model.get_submodule(name).reset_lora_parameters(apply=init_like_unsharded_)
        for adapter in expert_adapters(model).values():
            adapter.reset_lora_parameters(apply=init_like_unsharded_)

    def export_to(self, model: CausalLM, output_dir: Path, state_dict: dict[str, Tensor] | None, checkpoint_dir: str | None) -> None:
        """Write `adapter/` (PEFT format)."""
        save_peft_adapter(model, output_dir / "adapter", base_model_name_or_path=checkpoint_dir, state_dict=state_dict)

    def export_state_dict(self, model: CausalLM, state_dict: dict[str, Tensor] | None, checkpoint_dir: str | None) -> dict[str, Tensor]:
        """The base weights with every adapter folded in: W + (alpha / r) B A (DoRA: rescaled per row).

        QLoRA: merged into the original high-precision weights, read again from checkpoint_dir one
        layer at a time as they are written, not into the dequantised NF4 ones."""
        base_weights = None
        if self.quantize_base is not None:
            if checkpoint_dir is not None:
                base_weights = weight_reader(checkpoint_dir)
            else:
                log.warning("merged/: random-init base, never stored in high precision: the adapters are merged into the dequantised NF4 weights")
        merged = merged_state_dict(model, state_dict, base_weights)
        return merged | merged_expert_tensors(model, model.state_dict() if state_dict is None else state_dict, base_weights)

    @contextmanager
    def reference(self, model: CausalLM) -> Iterator[None]:
        """The adapters off: the frozen base, which is the starting model (no second copy)."""
        with disable_adapters(model), disable_expert_adapters(model):
            yield
