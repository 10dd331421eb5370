"""LoRA fine-tuning: the base model is frozen, low-rank adapters train."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.lora import (
    apply_lora,
    lora_modules,
    mark_only_lora_trainable,
    merged_state_dict,
    quantize_linears,
    resolve_targets,
)
from lightning_tune.model import Llama
from lightning_tune.modules.base import FinetuneModule


class LoRAFinetune(FinetuneModule):
    """Fine-tune low-rank adapters on a frozen base model; exports `adapter/` (PEFT) and `merged/` (HF).

    Checkpoints hold only the adapters and their optimiser state: the frozen base is reloaded from
    checkpoint_dir on resume, never stored a second time.

    Every parameter of `FinetuneModule` applies; these are LoRA's own.

    Args:
        lora_rank: Rank r of the adapters.
        lora_alpha: Scale numerator: the adapter's output is multiplied by lora_alpha / lora_rank.
        lora_dropout: Dropout on the adapter's input.
        lora_attn_modules: Attention projections to adapt: q_proj, k_proj, v_proj, o_proj.
        apply_lora_to_mlp: Also adapt the MLP (gate_proj, up_proj, down_proj).
        apply_lora_to_output: Also adapt the output head (lm_head).
        quantize_base: nf4 = QLoRA: store the adapted layers' frozen weights in 4-bit NF4 (bitsandbytes'
            format, blocks of 64, double-quantised absmax), dequantised per forward; needs
            lightning_tune[qlora]. null = keep them in the compute dtype.
        use_dora: DoRA: also train a magnitude per output row of each adapted layer (PEFT's formula).
        **kwargs: The parameters of `FinetuneModule` (model_name, checkpoint_dir, lr, ...).
    """

    def __init__(
        self,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_attn_modules: list[str] = ["q_proj", "v_proj"],  # noqa: B006 (read only; a list reads best in --help)
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        quantize_base: Literal["nf4"] | None = None,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if quantize_base is not None:
            from lightning_tune.quantize import require_bitsandbytes

            require_bitsandbytes()  # fail now, in one line, not after loading the model
        if lora_rank <= 0:
            raise ValueError(f"lora_rank: must be a positive integer, got {lora_rank}")
        if lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {lora_alpha}")
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {lora_dropout}")
        self.lora_targets = resolve_targets(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output)  # validates names
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.quantize_base = quantize_base
        self.use_dora = use_dora
        # LoRA checkpoints lack the frozen base weights on purpose: load them non-strictly and
        # check in on_load_checkpoint that every adapter tensor is there.
        self.strict_loading = False

    def adapt_model(self, model: Llama) -> None:
        if self.quantize_base and self.sharding_mesh() is not None:
            raise ValueError("quantize_base: not supported with FSDP2 sharding; train QLoRA on one device (or DDP)")
        if not lora_modules(model):  # QLoRA from a checkpoint wrapped the layers before loading (materialize)
            self.lora_layers = self._apply_lora(model)
        mark_only_lora_trainable(model)

    def _apply_lora(self, model: Llama) -> list[str]:
        if self.quantize_base:
            from lightning_tune.quantize import check_dtype

            check_dtype(torch.get_default_dtype())  # the dtype the Trainer's precision builds in
        wrapped = apply_lora(model, self.lora_targets, self.lora_rank, self.lora_alpha, self.lora_dropout, use_dora=self.use_dora, quantize_base=self.quantize_base is not None)
        if self.quantize_base:
            quantize_linears(model)  # the frozen linears without an adapter too (not lm_head), as transformers' 4-bit loading
        return wrapped

    def materialize(self, model: Llama, device: torch.device, dtype: torch.dtype, init_apply=None) -> None:
        """QLoRA from a checkpoint: wrap the targets first (on meta), so `load_weights` quantises each
        base weight as it arrives and the high-precision base never exists whole; then initialise
        the adapters (A, B, DoRA's magnitude from the NF4 weight) with `apply_lora`'s draws in its order."""
        if self.quantize_base is None or self.checkpoint_dir is None or init_apply is not None:
            return super().materialize(model, device, dtype, init_apply)
        self.lora_layers = self._apply_lora(model)
        super().materialize(model, device, dtype)
        for name in self.lora_layers:
            model.get_submodule(name).materialize_adapters_(device)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the trainable tensors (the adapters): the frozen base is reloaded from checkpoint_dir,
        never stored a second time. Lightning's checkpoints, plain or sharded (FSDP2 saves and loads
        exactly the keys this returns), hold adapters only."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith(prefix) and k not in trainable]:
            del state[key]
        return state

    CHECKPOINT_KEYS = (*FinetuneModule.CHECKPOINT_KEYS, "lora_rank", "lora_alpha", "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "use_dora", "quantize_base")

    def checkpoint_settings(self, hparams: dict[str, Any]) -> dict[str, Any]:
        settings = super().checkpoint_settings(hparams)
        if "lora_attn_modules" in settings:  # Meta's names (q) and ours (q_proj) are the same target
            settings["lora_attn_modules"] = sorted(resolve_targets(settings["lora_attn_modules"]))
        return settings

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # other LoRA settings: refused in one line naming them
        if "state_dict" not in checkpoint:  # a sharded (FSDP2) checkpoint: the strategy loaded the weights itself
            return
        missing = sorted(set(self.state_dict()) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]}): it was saved with other LoRA settings")

    def reset_adapters(self, model: Llama) -> None:
        """Initialise sharded adapters with one process's values (the same draws in the same order
        as `apply_lora` on an unsharded model)."""
        from lightning_tune.sharding import init_like_unsharded_

        for name in self.lora_layers:
            model.get_submodule(name).reset_lora_parameters(apply=init_like_unsharded_)

    def export_to(self, output_dir: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write `adapter/` (PEFT format) and `merged/` (Hugging Face, adapters folded in)."""
        from lightning_tune.checkpoint import save_peft_adapter

        save_peft_adapter(self.model, output_dir / "adapter", base_model_name_or_path=self.checkpoint_dir, state_dict=state_dict)
        super().export_to(output_dir, state_dict)

    def export_state_dict(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The base weights with every adapter folded in: W + (alpha / r) B A (DoRA: rescaled per row).

        QLoRA: merged into the original high-precision weights, read again from checkpoint_dir one
        layer at a time as they are written, not into the dequantised NF4 ones."""
        base_weights = None
        if self.quantize_base is not None:
            if self.checkpoint_dir is not None:
                from lightning_tune.checkpoint import weight_reader

                base_weights = weight_reader(self.checkpoint_dir)
            else:
                logging.getLogger(__name__).warning("merged/: random-init base, never stored in high precision: the adapters are merged into the dequantised NF4 weights")
        return merged_state_dict(self.model, state_dict, base_weights)
