"""ORPO (Odds Ratio Preference Optimisation, arXiv 2403.07691) as TRL 1.16's `ORPOTrainer` computes it.

No reference model: the loss of a micro-batch is the chosen rows' mean next-token cross-entropy over their
whole text (prompt and completion, as TRL's ORPO) minus beta times the mean over pairs of the odds-ratio
term log sigmoid(log-odds(y_w) - log-odds(y_l)), on average per-token completion log-probabilities.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.data import PreferenceDataModule
from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.pairwise import StepMetrics, completion_logprobs, reward_metrics, tuning_for, vocab_mean_logits
from lightning_tune.training.loss import head_sequence_logprobs, orpo_odds_ratio


def whole_text_labels(input_ids: Tensor, labels: Tensor) -> Tensor:
    """Labels that train every token of a row up to its last labelled one, prompt included: the targets of
    TRL's ORPO NLL (every unpadded token). The padding after the completion stays -100."""
    positions = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(labels != IGNORE_INDEX, positions, -1).amax(dim=1, keepdim=True)  # [rows, 1]
    return torch.where(positions <= last, input_ids, IGNORE_INDEX)


class ORPOFinetune(FinetuneModule):
    """ORPO on preference pairs (`PreferenceDataModule`), LoRA adapters or every weight; no reference model.

    Logged each optimiser step with TRL's names (means over the step's pairs): `train_loss`, `nll_loss`,
    `log_odds_ratio`, `log_odds_chosen`, `rewards/chosen`, `rewards/rejected` (beta x average completion
    log-probability), `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`, `logits/chosen`, `logits/rejected` (the mean logit
    over the vocabulary and every position but the last, padding included, as TRL; without the [rows, T, V] logits).
    A micro-batch's loss is TRL's (token mean NLL + pair mean odds-ratio term); the step's is the mean of
    its micro-batches' weighted by their pairs.

    Args:
        method: lora (train adapters) or full (train every weight); no reference model either way.
        beta: ORPO's lambda, the weight of the odds-ratio term against the chosen texts' NLL (TRL's default 0.1).
        lr: Peak learning rate (the ORPO paper's 8e-6; TRL's default is 1e-6).
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
    METRICS = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
        "logits/chosen",
        "logits/rejected",
    )

    def __init__(
        self,
        method: Literal["lora", "full"] = "lora",
        beta: float = 0.1,
        lr: float = 8e-6,
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
        self.beta = beta
        self.step_metrics = StepMetrics(self.METRICS)

    def pair_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss (TRL's: token-mean NLL of the chosen texts - beta x pair-mean odds-ratio term) and `METRICS`."""
        hidden = self.model.hidden_states(batch["input_ids"])  # [rows, T, E]
        summed, tokens = completion_logprobs(self.model, hidden, batch, self.loss_chunk_size)
        average = summed / tokens.clamp(min=1)
        pairs = average.shape[0] // 2
        chosen, rejected = average[:pairs], average[pairs:]
        nll_labels = whole_text_labels(batch["input_ids"][:pairs], batch["labels"][:pairs])
        nll_tokens = (nll_labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        nll = -head_sequence_logprobs(self.model, hidden[:pairs], nll_labels, self.loss_chunk_size).sum() / nll_tokens
        ratio, log_odds = orpo_odds_ratio(chosen, rejected)
        loss = nll - self.beta * ratio.mean()
        metrics = reward_metrics(self.beta * chosen.detach(), self.beta * rejected.detach())
        metrics.update({"logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(), "nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
        logits = vocab_mean_logits(self.model, hidden[:, :-1], self.loss_chunk_size)  # TRL's: every position but the last, padding included
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
