"""Direct Preference Optimisation (DPO) as TRL 1.x computes it, with LoRA or full fine-tuning.

Each batch holds the chosen and the rejected completion of every pair as rows of one batch
(`PreferenceDataModule`: chosen rows first, then rejected), so one forward scores both. A completion's
score is its summed (not averaged) log-probability; the loss of a pair is TRL's
`-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`. The reference is the same model with its
adapters switched off (LoRA: no second copy) or a frozen copy made at the start (full: one more
model's weights in memory, no optimiser state or gradients for it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tune.lora import disable_adapters
from lightning_tune.loss import IGNORE_INDEX, sequence_logprobs
from lightning_tune.modules.base import FinetuneModule
from lightning_tune.modules.lora import LoRAFinetune

DPOLoss = Literal["sigmoid", "ipo", "robust"]


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: DPOLoss = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the rewards beta * (pi - ref) of chosen and rejected, as TRL 1.16's
    `DPOTrainer._compute_loss` (reverse KL, one loss type): sigmoid (DPO), ipo (IPO on the
    per-token average log-ratios: needs the completions' token counts), robust (rDPO, the only one
    of these where label_smoothing enters, as in TRL >= 0.29)."""
    chosen_logratios, rejected_logratios = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "ipo":
        ipo_delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:  # robust
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class DPOFinetune(LoRAFinetune):
    """DPO on preference pairs (`PreferenceDataModule`), LoRA adapters or every weight.

    LoRA (`method: lora`) takes all of `LoRAFinetune`'s settings and exports `adapter/` and
    `merged/`; the reference model is the base with adapters switched off. Full (`method: full`)
    ignores the lora_* settings, keeps a frozen copy of the starting model as the reference (its
    weights once more in memory) and exports `merged/`. Logged each optimiser step with TRL's names:
    `train_loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`
    (means over the step's pairs), plus tokens/s and peak memory.

    Args:
        method: lora (train adapters; reference = adapters off) or full (train every weight; reference = a frozen copy).
        beta: DPO's beta, the strength of the implicit KL penalty towards the reference (TRL's default 0.1).
        loss_type: sigmoid (DPO), ipo (IPO, per-token average log-ratios) or robust (rDPO, uses label_smoothing); TRL's formulas.
        label_smoothing: Assumed probability that a pair's labels are flipped, in [0, 0.5); only the robust loss uses it (as TRL >= 0.29).
        lr: Peak learning rate (DPO moves the policy by small steps).
        **kwargs: The parameters of `LoRAFinetune` and `FinetuneModule` (model_name, checkpoint_dir, lora_rank, ...).
    """

    CHECKPOINT_KEYS = (*LoRAFinetune.CHECKPOINT_KEYS, "method")

    def __init__(
        self,
        method: Literal["lora", "full"] = "lora",
        beta: float = 0.1,
        loss_type: DPOLoss = "sigmoid",
        label_smoothing: float = 0.0,
        lr: float = 5e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        if beta <= 0:
            raise ValueError(f"beta: must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type != "robust":
            raise ValueError(f"label_smoothing: only loss_type robust uses it (TRL >= 0.29), got {label_smoothing} with loss_type {loss_type!r}; set it to 0")
        if method == "full" and (self.quantize_base or self.use_dora):
            raise ValueError("method: full trains every weight; quantize_base and use_dora are LoRA settings (set method: lora)")
        self.method = method
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.strict_loading = method == "full"  # full checkpoints hold every weight; LoRA ones adapters only
        self._reference: list[torch.nn.Module] = []  # full: the frozen copy, in a list so it is no submodule (not saved, not trained)
        self._step_rewards = torch.zeros(4)  # sums over the step's pairs: chosen, rejected, margin, accuracy

    # ---- model -------------------------------------------------------------------------------

    def adapt_model(self, model) -> None:
        if self.method == "lora":
            return super().adapt_model(model)
        if self.sharding_mesh() is not None:
            raise ValueError("method: full DPO keeps a whole frozen reference copy; FSDP2 sharding is not supported, use method: lora")
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
        self._reference = [reference]
        self.lora_layers = []

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.method == "full":
            return FinetuneModule.state_dict(self, *args, **kwargs)
        return super().state_dict(*args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.method == "full":
            return FinetuneModule.on_load_checkpoint(self, checkpoint)
        return super().on_load_checkpoint(checkpoint)

    def export_to(self, output_dir: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """LoRA: `adapter/` and `merged/`; full: `merged/`."""
        if self.method == "full":
            return FinetuneModule.export_to(self, output_dir, state_dict)
        return super().export_to(output_dir, state_dict)

    def export_state_dict(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if self.method == "full":
            return FinetuneModule.export_state_dict(self, state_dict)
        return super().export_state_dict(state_dict)

    # ---- loss --------------------------------------------------------------------------------

    def completion_logprobs(self, model, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-probabilities of each row's labelled (completion) tokens, [rows], float32.

        A plain bias-free head is applied only at labelled positions, `loss_chunk_size` of them at a
        time; an adapted (LoRA) head is applied to every position."""
        hidden = model.hidden_states(batch["input_ids"])  # [rows, T, E]
        head = model.lm_head
        if type(head) is torch.nn.Linear and head.bias is None:
            return sequence_logprobs(hidden, batch["labels"], weight=head.weight, chunk_size=self.loss_chunk_size or hidden.shape[1] * hidden.shape[0])
        return sequence_logprobs(head(hidden), batch["labels"], chunk_size=max(1, hidden.shape[0] * hidden.shape[1]))

    def reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """The reference model's summed completion log-probabilities: adapters off (LoRA) or the
        frozen copy (full); no graph (and so no activation checkpointing)."""
        with torch.no_grad():
            if self.method == "full":
                return self.completion_logprobs(self._reference[0], batch)
            with disable_adapters(self.model):
                return self.completion_logprobs(self.model, batch)

    def pair_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair losses and rewards (chosen, rejected) of a batch of [chosen; rejected] rows."""
        policy = self.completion_logprobs(self.model, batch)
        reference = self.reference_logprobs(batch)
        pairs = policy.shape[0] // 2
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
        return dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta, self.loss_type, self.label_smoothing, tokens[:pairs], tokens[pairs:])

    def loss_sum(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed per-pair DPO loss and the number of pairs: the base recipe divides the step's
        gradient by the step's pairs (over accumulation and ranks), so the step's loss is TRL's
        mean over pairs. In training, the step's reward sums are kept for logging."""
        losses, chosen, rejected = self.pair_losses(batch)
        if self.training:
            margins = chosen - rejected
            sums = torch.stack([chosen.sum(), rejected.sum(), margins.sum(), (chosen > rejected).float().sum()])
            self._step_rewards = self._step_rewards.to(sums.device) + sums
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pairs = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum").clamp(min=1)
        sums = self.trainer.strategy.reduce(self._step_rewards.float(), reduce_op="sum") / pairs
        names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
        self.log_dict(dict(zip(names, sums, strict=True)), on_step=True, on_epoch=False, batch_size=1)
        self._step_rewards = torch.zeros_like(self._step_rewards)
        super().on_before_optimizer_step(optimizer)
