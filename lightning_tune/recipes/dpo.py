"""Direct Preference Optimisation (DPO) as TRL 1.x computes it, with LoRA or full fine-tuning.

Each batch holds the chosen and the rejected completion of every pair as rows of one batch
(`PreferenceDataModule`: chosen rows first, then rejected), so one forward scores both. A completion's
score is its summed (not averaged) log-probability; the loss of a pair is TRL's
`-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`. The reference is the same model with its
adapters switched off (LoRA: no second copy) or a frozen copy made at the start (full: one more
model's weights in memory, no optimiser state or gradients for it), or, with `precompute_reference`,
every pair's reference log-probabilities computed once before the first step by the starting model
itself (TRL's `precompute_ref_log_probs`: full DPO then holds one model), kept in the checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.data import PreferenceDataModule
from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.model import CausalLM
from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.reference import Reference
from lightning_tune.recipes.tuning import Full, LoRA
from lightning_tune.training.loss import DPOLoss, dpo_loss, head_sequence_logprobs


class DPOFinetune(FinetuneModule):
    """DPO on preference pairs (`PreferenceDataModule`), LoRA adapters or every weight.

    LoRA (`method: lora`) takes the lora_* settings of `LoRAFinetune` and exports `adapter/` and
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
        precompute_reference: Score every training and validation pair with the starting model once, before the first step (and its sanity check), instead of per batch: full DPO then keeps no frozen copy (one model's weights less), LoRA skips the reference forward of every step. Needs PreferenceDataModule's pair_index; the scores travel in the checkpoints.
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
    DATA_MODULES = (PreferenceDataModule,)  # chosen and rejected completions of one prompt; a ChatDataModule's samples would train silently

    def __init__(
        self,
        method: Literal["lora", "full"] = "lora",
        beta: float = 0.1,
        loss_type: DPOLoss = "sigmoid",
        label_smoothing: float = 0.0,
        lr: float = 5e-6,
        precompute_reference: bool = False,
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
        lora = LoRA.from_arguments(
            lora_rank, lora_alpha, lora_dropout, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, quantize_base, use_dora, apply_lora_to_experts
        )  # validated whatever the method
        if beta <= 0:
            raise ValueError(f"beta: must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type != "robust":
            raise ValueError(f"label_smoothing: only loss_type robust uses it (TRL >= 0.29), got {label_smoothing} with loss_type {loss_type!r}; set it to 0")
        if method == "full" and (quantize_base or use_dora):
            raise ValueError("method: full trains every weight; quantize_base and use_dora are LoRA settings (set method: lora)")
        self.tuning = lora if method == "lora" else Full()
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference = Reference(self.completion_logprobs, self.tuning, precompute_reference)
        self._step_rewards = torch.zeros(4)  # sums over the step's pairs: chosen, rejected, margin, accuracy

    # ---- model -------------------------------------------------------------------------------

    def adapt_model(self, model: CausalLM) -> None:
        """The tuning's adaptation; full DPO without `precompute_reference` then keeps a frozen copy as the reference."""
        super().adapt_model(model)
        if not self.reference.keeps_copy:
            return
        if self.sharding_mesh() is not None:
            raise ValueError("method: full DPO keeps a whole frozen reference copy; FSDP2 sharding is not supported without precompute_reference: true (or use method: lora)")
        self.reference.keep_copy(model)

    @property
    def keeps_reference_copy(self) -> bool:
        """Whether a frozen copy of the model is held as the reference (memory estimates count it)."""
        return self.reference.keeps_copy

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.reference.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference.on_load_checkpoint(checkpoint)
        super().on_load_checkpoint(checkpoint)

    # ---- loss --------------------------------------------------------------------------------

    def completion_logprobs(self, model: CausalLM, batch: dict[str, Tensor]) -> Tensor:
        """Summed log-probabilities of each row's labelled (completion) tokens, [rows], float32.

        A plain bias-free head is applied only at labelled positions, `loss_chunk_size` of them at a
        time; an adapted (LoRA) head is applied to every position (`loss.head_sequence_logprobs`)."""
        hidden = model.hidden_states(batch["input_ids"])  # [rows, T, E]
        return head_sequence_logprobs(model, hidden, batch["labels"], self.loss_chunk_size, batch.get("label_index"))  # label_index: from the collate, on the host

    def reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """The reference model's summed completion log-probabilities: adapters off (LoRA) or the
        frozen copy (full), or the precomputed ones (`precompute_reference`, looked up by pair)."""
        return self.reference.logprobs(self.model, batch)

    def _ensure_reference_table(self) -> None:
        """Score every training and validation pair with the model as it is now (the starting model),
        adapters off, in eval mode and the Trainer's precision, each rank a share of the pairs."""
        if not self.reference.precompute or self.reference.table is not None:
            return
        data = self.trainer.datamodule
        datasets = [d for d in (getattr(data, "train_dataset", None), getattr(data, "val_dataset", None)) if d is not None]
        if not datasets or not hasattr(data, "collate_fn"):
            raise ValueError("precompute_reference: needs the data as a PreferenceDataModule (its train and validation pairs are scored before training)")
        pairs = [(d, i) for d in datasets for i in range(len(d))]
        self.reference.score(self.model, pairs, data.collate_fn(), max(1, int(data.batch_size)), self.trainer, self.device)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._ensure_reference_table()  # before the sanity check's validation batches

    def on_validation_start(self) -> None:
        self._ensure_reference_table()  # `validate` without fit: the model given is the reference

    def on_test_start(self) -> None:
        self._ensure_reference_table()

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
