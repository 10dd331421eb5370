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

import copy
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tune.lora import disable_adapters
from lightning_tune.loss import IGNORE_INDEX, sequence_logprobs
from lightning_tune.modules.base import CheckpointMismatchError, FinetuneModule
from lightning_tune.modules.lora import LoRAFinetune

DPOLoss = Literal["sigmoid", "ipo", "robust"]
REFERENCE_KEY = "dpo_reference_logprobs"  # the checkpoint's [pairs, 2] precomputed reference (precompute_reference)


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
        precompute_reference: Score every training and validation pair with the starting model once, before the first step (and its sanity check), instead of per batch: full DPO then keeps no frozen copy (one model's weights less), LoRA skips the reference forward of every step. Needs PreferenceDataModule's pair_index; the scores travel in the checkpoints.
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
        precompute_reference: bool = False,
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
        self.precompute_reference = precompute_reference
        self.strict_loading = method == "full"  # full checkpoints hold every weight; LoRA ones adapters only
        self._reference: list[torch.nn.Module] = []  # full: the frozen copy, in a list so it is no submodule (not saved, not trained)
        # precompute_reference: [pairs, 2] (chosen, rejected) summed log-probabilities by pair_index, NaN where none
        self._reference_table: Tensor | None = None
        self._step_rewards = torch.zeros(4)  # sums over the step's pairs: chosen, rejected, margin, accuracy

    # ---- model -------------------------------------------------------------------------------

    def adapt_model(self, model) -> None:
        if self.method == "lora":
            return super().adapt_model(model)
        self.lora_layers = []
        if self.precompute_reference:
            return  # the starting model scores the pairs itself before training: no copy
        if self.sharding_mesh() is not None:
            raise ValueError("method: full DPO keeps a whole frozen reference copy; FSDP2 sharding is not supported without precompute_reference: true (or use method: lora)")
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
        self._reference = [reference]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.method == "full":
            return FinetuneModule.state_dict(self, *args, **kwargs)
        return super().state_dict(*args, **kwargs)

    @property
    def keeps_reference_copy(self) -> bool:
        """Whether a frozen copy of the model is held as the reference (memory estimates count it)."""
        return self.method == "full" and not self.precompute_reference

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._reference_table is not None:  # the starting model's scores: a resumed run cannot recompute them
            checkpoint[REFERENCE_KEY] = self._reference_table.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.precompute_reference:
            table = checkpoint.get(REFERENCE_KEY)
            if not isinstance(table, Tensor) or table.ndim != 2 or table.shape[1] != 2:
                raise CheckpointMismatchError(
                    "precompute_reference: the checkpoint holds no precomputed reference (it was written with precompute_reference: false), "
                    "and the model it resumes is no longer the starting one; resume with precompute_reference: false"
                )
            self._reference_table = table.float()
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
        positions = batch.get("label_index")  # from the collate, on the host
        if type(head) is torch.nn.Linear and head.bias is None:
            return sequence_logprobs(hidden, batch["labels"], weight=head.weight, chunk_size=self.loss_chunk_size or hidden.shape[1] * hidden.shape[0], label_positions=positions)
        return sequence_logprobs(head(hidden), batch["labels"], chunk_size=max(1, hidden.shape[0] * hidden.shape[1]), label_positions=positions)

    def reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """The reference model's summed completion log-probabilities: adapters off (LoRA) or the
        frozen copy (full), or the precomputed ones (`precompute_reference`, looked up by pair)."""
        if not self.precompute_reference:
            return self._reference_forward(batch)
        if self._reference_table is None:
            raise ValueError("precompute_reference: the reference is scored when fit, validate or test starts (the Trainer's hooks); none is computed yet")
        return self.precomputed_reference(batch)

    def _reference_forward(self, batch: dict[str, Tensor]) -> Tensor:
        """The reference's forward: adapters off (LoRA) or the frozen copy (full; before training
        with `precompute_reference`, the model itself); no graph (and so no activation checkpointing)."""
        with torch.no_grad():
            if self.method == "full":
                return self.completion_logprobs(self._reference[0] if self._reference else self.model, batch)
            with disable_adapters(self.model):
                return self.completion_logprobs(self.model, batch)

    def precomputed_reference(self, batch: dict[str, Tensor]) -> Tensor:
        """[chosen rows; rejected rows] reference log-probabilities of the batch's pairs, looked up by pair_index."""
        index = batch.get("pair_index")
        if index is None:
            raise ValueError("precompute_reference: the batches carry no pair_index (PreferenceDataModule's collate adds it)")
        table = self._reference_table
        if table.device != index.device:
            table = self._reference_table = table.to(index.device)
        known = (index < table.shape[0]).all()
        rows = table[index.clamp(max=table.shape[0] - 1)]  # [pairs, 2]
        if not bool(known & ~rows.isnan().any()):  # one host sync per step; a wrong reference would train silently
            raise ValueError(
                "precompute_reference: a pair of this batch has no precomputed reference log-probability "
                "(the data changed since the checkpoint's reference was computed); resume with the same data, or start a new run"
            )
        return torch.cat([rows[:, 0], rows[:, 1]])

    def _ensure_reference_table(self) -> None:
        """Score every training and validation pair with the model as it is now (the starting model),
        adapters off, in eval mode and the Trainer's precision, each rank a share of the pairs."""
        if not self.precompute_reference or self._reference_table is not None:
            return
        data = self.trainer.datamodule
        datasets = [d for d in (getattr(data, "train_dataset", None), getattr(data, "val_dataset", None)) if d is not None]
        if not datasets or not hasattr(data, "_collate"):
            raise ValueError("precompute_reference: needs the data as a PreferenceDataModule (its train and validation pairs are scored before training)")
        items = [(d, i) for d in datasets for i in range(len(d))]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # Every rank the same count, padded with a repeat of the first pair (scored, then dropped):
        # the same number of forwards everywhere (FSDP2's gathers are collective) and of rows to gather.
        share = -(-len(items) // world)
        mine = items[rank * share : (rank + 1) * share]
        real_count = len(mine)
        mine += [items[0]] * (share - real_count)
        collate, size = data._collate(), max(1, int(data.batch_size))
        keys = torch.full((share,), -1, dtype=torch.long, device=self.device)
        values = torch.full((share, 2), float("nan"), dtype=torch.float32, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(mine), size):
                batch = collate([d[i] for d, i in mine[start : start + size]])
                if "pair_index" not in batch:
                    raise ValueError("precompute_reference: the pairs carry no pair_index (PreferenceDataModule's collate adds it)")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.trainer.precision_plugin.forward_context():
                    scores = self._reference_forward(batch).float()
                pairs = scores.shape[0] // 2
                keys[start : start + pairs] = batch["pair_index"]
                values[start : start + pairs] = torch.stack([scores[:pairs], scores[pairs:]], dim=1)
        finally:
            self.model.train(was_training)
        keys[real_count:] = -1  # the padding
        if world > 1:
            keys = self.trainer.strategy.all_gather(keys).reshape(-1)
            values = self.trainer.strategy.all_gather(values).reshape(-1, 2)
        real = keys >= 0
        table = torch.full((int(keys.max()) + 1, 2), float("nan"), dtype=torch.float32, device=self.device)
        table[keys[real]] = values[real]
        self._reference_table = table

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
