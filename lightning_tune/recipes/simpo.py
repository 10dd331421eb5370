"""SimPO (Simple Preference Optimisation, arXiv 2405.14734) as TRL 1.16's `CPOTrainer(loss_type="simpo")`.

No reference model: the loss of a pair is -log sigmoid(beta (avg logp(y_w) - avg logp(y_l)) - gamma) on
average per-token completion log-probabilities (length-normalised), with TRL's optional label smoothing,
plus `cpo_alpha` times the chosen completions' mean NLL (CPO-SimPO; 0 = SimPO).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.data import PreferenceDataModule
from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.pairwise import StepMetrics, completion_logprobs, reward_metrics, tuning_for, vocab_mean_logits
from lightning_tune.training.loss import simpo_loss


class SimPOFinetune(FinetuneModule):
    """SimPO on preference pairs (`PreferenceDataModule`), LoRA adapters or every weight; no reference model.

    Logged each optimiser step with TRL's names (means over the step's pairs): `train_loss`,
    `rewards/chosen`, `rewards/rejected` (beta x average completion log-probability), `rewards/margins`,
    `rewards/accuracies`, `logps/chosen`, `logps/rejected` (average per token) and `nll_loss`
    (the chosen completions' mean NLL; 0 unless cpo_alpha > 0, as TRL), `logits/chosen`, `logits/rejected` (the mean logit over the
    vocabulary and every position, padding included, as TRL; without the [rows, T, V] logits).

    Args:
        method: lora (train adapters) or full (train every weight); no reference model either way.
        beta: Scale of the length-normalised reward margin (the SimPO paper's 2.0; TRL's CPOConfig default is 0.1).
        gamma: Target reward margin, subtracted inside the sigmoid (TRL's simpo_gamma, default 0.5).
        label_smoothing: Assumed probability that a pair's labels are flipped, in [0, 0.5) (TRL's conservative SimPO).
        cpo_alpha: Weight of the chosen completions' mean NLL added to the loss (CPO-SimPO); 0 = SimPO.
        lr: Peak learning rate.
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
        **kwargs: The parameters of `FinetuneModule` (model_name, checkpoint_dir, ...).
    """

    CHECKPOINT_KEYS = (*FinetuneModule.CHECKPOINT_KEYS, "method")
    DATA_MODULES = (PreferenceDataModule,)  # chosen and rejected completions of one prompt
    METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss", "logits/chosen", "logits/rejected")

    def __init__(
        self,
        method: Literal["lora", "full"] = "lora",
        beta: float = 2.0,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        cpo_alpha: float = 0.0,
        lr: float = 1e-6,
        # LoRAFinetune's arguments, the same names, defaults and docs (tests/recipes/test_modules.py pins them)
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
        super().__init__(lr=lr, **kwargs)
        self.tuning = tuning_for(method, lora_rank, lora_alpha, lora_dropout, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, quantize_base, use_dora, apply_lora_to_experts)
        if beta <= 0:
            raise ValueError(f"beta: must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")
        if cpo_alpha < 0:
            raise ValueError(f"cpo_alpha: must be >= 0, got {cpo_alpha}")
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.cpo_alpha = cpo_alpha
        self.step_metrics = StepMetrics(self.METRICS)

    def pair_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss (pair mean, + cpo_alpha x the chosen completions' token-mean NLL) and `METRICS`."""
        hidden = self.model.hidden_states(batch["input_ids"])  # [rows, T, E]
        summed, tokens = completion_logprobs(self.model, hidden, batch, self.loss_chunk_size)
        average = summed / tokens.clamp(min=1)
        pairs = average.shape[0] // 2
        chosen, rejected = average[:pairs], average[pairs:]
        loss = simpo_loss(chosen, rejected, self.beta, self.gamma, self.label_smoothing).mean()
        nll = -summed[:pairs].sum() / tokens[:pairs].sum().clamp(min=1)
        if self.cpo_alpha:
            loss = loss + self.cpo_alpha * nll
        metrics = reward_metrics(self.beta * chosen.detach(), self.beta * rejected.detach())
        metrics.update({"logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(), "nll_loss": nll if self.cpo_alpha else torch.zeros_like(nll)})
        logits = vocab_mean_logits(self.model, hidden, self.loss_chunk_size)  # TRL's: every position, padding included
        metrics.update({"logits/chosen": logits[:pairs].mean(), "logits/rejected": logits[pairs:].mean()})
        return loss, metrics

    def loss_sum(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The micro-batch's loss times its pairs, and its pairs (the base divides by the step's pairs)."""
        loss, metrics = self.pair_loss(batch)
        pairs = batch["input_ids"].shape[0] // 2
        if self.training:
            self.step_metrics.add(metrics, pairs)
        return loss * pairs, torch.tensor(pairs, device=loss.device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.step_metrics.log(self)
        super().on_before_optimizer_step(optimizer)
