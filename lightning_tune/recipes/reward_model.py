"""Reward model training (Bradley-Terry on preference pairs) as TRL 1.16's `RewardTrainer`, exported as a
transformers `*ForSequenceClassification` directory (one label).

The decoder's final hidden state at each row's last non-pad token (transformers' rule, `model/score.py`)
goes through a bias-free [1, E] `score` layer; a pair's loss is -log sigmoid(r_chosen - r_rejected
[- margin]), plus `center_rewards_coefficient` x mean((r_chosen + r_rejected)^2) when set. The output head
(`lm_head`) is unused: frozen with full tuning (unless tied to the embedding), never adapted with LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.checkpoint.sequence_classification import save_sequence_classification
from lightning_tune.data import PreferenceDataModule
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.model import CausalLM
from lightning_tune.model.score import ScoreHead
from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.pairwise import StepMetrics, tuning_for
from lightning_tune.tokenizer import load_tokenizer
from lightning_tune.training.loss import bradley_terry_loss


class RewardModel(FinetuneModule):
    """A reward model on preference pairs (`PreferenceDataModule`): LoRA adapters or every weight, plus a scalar head.

    The score head always trains (as TRL's PEFT recipe with `modules_to_save=["score"]`). Logged each
    optimiser step with TRL's names (means over the step's micro-batches, weighted by their pairs):
    `train_loss`, `accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`. Exports `merged/`, a
    transformers sequence-classification directory (adapters folded in, `score.weight`, `pad_token_id`)
    that `AutoModelForSequenceClassification` loads with equal scores; no `adapter/` (it would lack the head).
    A batch may carry a per-pair `margin` [pairs] (TRL's optional "margin" column), subtracted inside the sigmoid.

    Args:
        method: lora (train adapters and the head) or full (train every weight and the head).
        center_rewards_coefficient: Weight of mean((r_chosen + r_rejected)^2), which centres the rewards on 0
            (TRL's option, 0.01 in arXiv 2312.09244); null = off.
        lr: Peak learning rate (TRL's RewardConfig default).
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
    METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")

    def __init__(
        self,
        method: Literal["lora", "full"] = "lora",
        center_rewards_coefficient: float | None = None,
        lr: float = 1e-4,
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
        if apply_lora_to_output:
            raise ValueError("apply_lora_to_output: a reward model reads its score head, not the output head (lm_head); set it to false")
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient: must be >= 0 or null, got {center_rewards_coefficient}")
        self.center_rewards_coefficient = center_rewards_coefficient
        self.head: ScoreHead | None = None
        self.step_metrics = StepMetrics(self.METRICS)

    # ---- model -------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """The decoder (the base recipe's), then the score head, drawn as transformers initialises it
        (normal, std 0.02), in the Trainer's device and dtype."""
        if self.sharding_mesh() is not None:
            raise ValueError("trainer.strategy: the reward model's score head is not sharded; train it on one device or with DDP")
        super().configure_model()
        if self.head is None:
            pad_id = load_tokenizer(self.tokenizer_path or DEMO_TOKENIZER).pad_id
            self.head = ScoreHead(self.model.config.embed_dim, pad_id)
            torch.nn.init.normal_(self.head.score.weight, std=0.02)

    def adapt_model(self, model: CausalLM) -> None:
        """The tuning's adaptation; the unused output head is frozen (a tied one is the embedding and trains as it)."""
        super().adapt_model(model)
        if not model.config.tie_word_embeddings:
            model.lm_head.requires_grad_(False)

    def rewards(self, batch: dict[str, Tensor]) -> Tensor:
        """Each row's score, float32 [rows]: the head at its last non-pad token."""
        hidden = self.model.hidden_states(batch["input_ids"])  # [rows, T, E]
        return self.head(hidden, batch["input_ids"])

    # ---- loss --------------------------------------------------------------------------------

    def pair_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss (TRL's: a mean over its pairs) and `METRICS`."""
        rewards = self.rewards(batch)
        pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.center_rewards_coefficient)
        detached = rewards.detach()
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "min_reward": detached.min(),
            "mean_reward": detached.mean(),
            "max_reward": detached.max(),
        }
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

    # ---- exports -----------------------------------------------------------------------------

    def export_to(self, output_dir: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write `merged/` (`save_merged`); no `adapter/`: a PEFT adapter of the decoder would lack the score head."""
        self.save_merged(output_dir / "merged", state_dict)

    def save_merged(self, output_dir: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write `output_dir` as transformers' sequence classifier of the model's family (adapters folded in,
        `score.weight`, config.json's `pad_token_id` the one the scores are read by); `state_dict` is the
        decoder's full state dict (default: the model's own)."""
        return save_sequence_classification(
            self.export_state_dict(state_dict), self.head.score.weight, self.model.config, output_dir,
            pad_token_id=self.head.pad_id, tokenizer_path=self.tokenizer_path, chat_template=self.chat_template,
        )  # fmt: skip
