"""Supervised fine-tuning (next-token cross-entropy): every weight (`FullFinetune`) or LoRA adapters on a
frozen base (`LoRAFinetune`)."""

from __future__ import annotations

from typing import Any, Literal

from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.tuning import LoRA


class LoRAFinetune(FinetuneModule):
    """Fine-tune low-rank adapters on a frozen base model; exports `adapter/` (PEFT) and `merged/` (HF).

    Checkpoints hold only the adapters and their optimiser state: the frozen base is reloaded from
    checkpoint_dir on resume, never stored a second time.

    Every parameter of `FinetuneModule` applies; these are LoRA's own (they build the recipe's
    `tuning`, a `recipes.tuning.LoRA`).

    Args:
        lora_rank: Rank r of the adapters.
        lora_alpha: Scale numerator: the adapter's output is multiplied by lora_alpha / lora_rank.
        lora_dropout: Dropout on the adapter's input.
        lora_attn_modules: Attention projections to adapt: q_proj, k_proj, v_proj, o_proj.
        apply_lora_to_mlp: Also adapt the MLP (gate_proj, up_proj, down_proj).
        apply_lora_to_output: Also adapt the output head (lm_head).
        apply_lora_to_experts: Also adapt the experts of a mixture-of-experts model (their stacked
            gate_up_proj and down_proj: one low-rank pair per expert, PEFT's target_parameters); needs lora_dropout 0.
        quantize_base: nf4 = QLoRA: store the adapted layers' frozen weights in 4-bit NF4 (bitsandbytes'
            format, blocks of 64, double-quantised absmax), dequantised per forward; needs
            bitsandbytes (pip install bitsandbytes; in a checkout pip install -e ".[qlora]"). null = keep them in the compute dtype.
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
        apply_lora_to_experts: bool = False,
        quantize_base: Literal["nf4"] | None = None,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tuning = LoRA.from_arguments(lora_rank, lora_alpha, lora_dropout, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, quantize_base, use_dora, apply_lora_to_experts)


class FullFinetune(FinetuneModule):
    """Fine-tune all weights of the model; exports a Hugging Face directory to `merged/`.

    Every parameter of `FinetuneModule` applies; only two defaults differ, the usual ones for
    updating all weights of a pretrained model.

    Args:
        lr: Peak learning rate; small, since every pretrained weight moves.
        betas: Adam betas; beta2 0.95 damps the loss spikes of full fine-tuning.
        **kwargs: The other parameters of `FinetuneModule`.
    """

    def __init__(self, lr: float = 2e-5, betas: tuple[float, float] = (0.9, 0.95), **kwargs: Any) -> None:
        super().__init__(lr=lr, betas=betas, **kwargs)
