"""KTO (Kahneman-Tversky Optimisation, arXiv 2402.01306) as TRL 1.16's `KTOTrainer`, with LoRA or full fine-tuning.

Each sample is one completion labelled desirable or not (`UnpairedDataModule`). Its reward is beta times
the log-ratio of its summed completion log-probability under the policy and the reference (the model with
its adapters off, or a frozen copy of the starting model with full tuning, as for DPO). The reference point
z is TRL's KL estimate: the batch mean of the same log-ratio on mismatched rows (each prompt with another
sample's completion, built by the collate), detached and clamped at 0 (averaged over ranks). The loss of a
micro-batch is the mean over its samples of `loss.kto_loss`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.data import UnpairedDataModule
from lightning_tune.model import CausalLM
from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.pairwise import StepMetrics, tuning_for
from lightning_tune.recipes.reference import Reference
from lightning_tune.training.loss import KTOLoss, head_sequence_logprobs, kto_loss


class KTOFinetune(FinetuneModule):
    """KTO on unpaired completions labelled desirable or not (`UnpairedDataModule`), LoRA adapters or every weight.

    LoRA's reference is the base with adapters off; full tuning keeps a frozen copy of the starting model
    (one more model's weights in memory). Logged each optimiser step with TRL's names: `train_loss`, `kl`
    (mean over the step's micro-batches), `rewards/chosen`, `logps/chosen` (means over the step's
    desirable samples), `rewards/rejected`, `logps/rejected` (undesirable ones), `rewards/margins`
    (their difference); NaN for a side the step had none of.

    Args:
        method: lora (train adapters; reference = adapters off) or full (train every weight; reference = a frozen copy).
        beta: KTO's beta, the scale of the implicit reward (TRL's default 0.1).
        desirable_weight: Weight of the desirable samples' losses (TRL's lambda_D); raise it when desirable samples are fewer.
        undesirable_weight: Weight of the undesirable samples' losses (TRL's lambda_U).
        loss_type: kto (the KL reference point from mismatched rows) or apo_zero_unpaired (APO-zero, no KL estimate: the mismatched rows are not scored).
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
    DATA_MODULES = (UnpairedDataModule,)  # completions with a desirable / undesirable label, and the KL rows
    METRICS = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")

    def __init__(
        self,
        method: Literal["lora", "full"] = "lora",
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: KTOLoss = "kto",
        lr: float = 5e-6,
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
        for key, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if weight <= 0:
                raise ValueError(f"{key}: must be > 0, got {weight}")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.loss_type = loss_type
        self.reference = Reference(self.completion_logprobs, self.tuning, precompute=False)
        self.step_metrics = StepMetrics(self.METRICS)

    # ---- model -------------------------------------------------------------------------------

    def adapt_model(self, model: CausalLM) -> None:
        """The tuning's adaptation; full KTO then keeps a frozen copy of the starting model as the reference."""
        super().adapt_model(model)
        if not self.reference.keeps_copy:
            return
        if self.sharding_mesh() is not None:
            raise ValueError("method: full KTO keeps a whole frozen reference copy; FSDP2 sharding is not supported (use method: lora)")
        self.reference.keep_copy(model)

    @property
    def keeps_reference_copy(self) -> bool:
        """Whether a frozen copy of the model is held as the reference (memory estimates count it)."""
        return self.reference.keeps_copy

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.trainer.datamodule
        if self.loss_type == "kto" and data is not None and getattr(data, "batch_size", 2) < 2:
            raise ValueError(
                "data.batch_size: KTO estimates its KL reference point from mismatched rows of a batch; with 1 sample a batch it is the sample itself: use 2 or more (or loss_type: apo_zero_unpaired)"
            )

    # ---- loss --------------------------------------------------------------------------------

    def completion_logprobs(self, model: CausalLM, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-probabilities of each row's labelled (completion) tokens, [rows], float32."""
        hidden = model.hidden_states(batch["input_ids"])  # [rows, T, E]
        return head_sequence_logprobs(model, hidden, batch["labels"], self.loss_chunk_size, batch.get("label_index"))

    def kl_estimate(self, batch: dict[str, Tensor]) -> Tensor:
        """TRL's reference point: mean over the batch's mismatched rows of policy - reference log-probabilities,
        without gradient, averaged over ranks, clamped at 0."""
        rows = {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"], "label_index": batch.get("kl_label_index")}
        with torch.no_grad():
            kl = (self.completion_logprobs(self.model, rows) - self.reference.logprobs(self.model, rows)).mean()
        if self._trainer is not None and self.trainer.world_size > 1:
            kl = self.trainer.strategy.reduce(kl, reduce_op="mean")
        return kl.clamp(min=0)

    def sample_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Per-sample losses [B], the metrics' sums (chosen = desirable, rejected = undesirable) and the KL estimate."""
        rows = {key: batch[key] for key in ("input_ids", "labels", "label_index") if key in batch}
        policy = self.completion_logprobs(self.model, rows)
        logratios = policy - self.reference.logprobs(self.model, rows)
        kl = self.kl_estimate(batch) if self.loss_type == "kto" else torch.zeros((), device=policy.device)
        desirable = batch["label"].bool()
        losses = kto_loss(logratios, desirable, kl, self.beta, self.loss_type, self.desirable_weight, self.undesirable_weight)
        rewards, logps = self.beta * logratios.detach(), policy.detach()
        zero = torch.zeros_like(rewards)
        sums = {
            "rewards/chosen": torch.where(desirable, rewards, zero).sum(),
            "logps/chosen": torch.where(desirable, logps, zero).sum(),
            "rewards/rejected": torch.where(desirable, zero, rewards).sum(),
            "logps/rejected": torch.where(desirable, zero, logps).sum(),
        }
        return losses, sums, kl

    def loss_sum(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The samples' summed losses and their count: the step's loss is the mean over its samples (TRL's
        per micro-batch mean, when micro-batches hold equal numbers of samples)."""
        losses, sums, kl = self.sample_losses(batch)
        if self.training:
            desirable = batch["label"].bool().sum()
            self.step_metrics.add({"kl": kl}, 1)
            self.step_metrics.add_sums({k: v for k, v in sums.items() if k.endswith("chosen")}, desirable)
            self.step_metrics.add_sums({k: v for k, v in sums.items() if k.endswith("rejected")}, losses.shape[0] - desirable)
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        means = self.step_metrics.reduce(self)
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        self.log_dict(means, on_step=True, on_epoch=False, batch_size=1)
        super().on_before_optimizer_step(optimizer)
