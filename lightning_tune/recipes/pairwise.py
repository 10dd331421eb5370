"""What the preference recipes beside DPO (ORPO, SimPO, KTO, the reward model) share: the tuning their
`method` names, each row's completion log-probability, and TRL-named metrics averaged over a step's samples.

Each recipe declares its own (flat, LoRAFinetune-named) parameters, as DPO does, so `--help` lists them;
these are plain functions and objects, not a recipe base (`ls` lists every `FinetuneModule` subclass).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.model import CausalLM
from lightning_tune.recipes.tuning import Full, LoRA, Tuning
from lightning_tune.training.loss import head_sequence_logprobs


def tuning_for(
    method: Literal["lora", "full"],
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    quantize_base: Literal["nf4"] | None,
    use_dora: bool,
    apply_lora_to_experts: bool = False,
) -> Tuning:
    """`LoRA` of the lora_* settings (validated whatever the method) or `Full`; one line for a LoRA-only setting with full."""
    lora = LoRA.from_arguments(lora_rank, lora_alpha, lora_dropout, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, quantize_base, use_dora, apply_lora_to_experts)
    if method == "full" and (quantize_base or use_dora):
        raise ValueError("method: full trains every weight; quantize_base and use_dora are LoRA settings (set method: lora)")
    return lora if method == "lora" else Full()


def completion_logprobs(model: CausalLM, hidden: Tensor, batch: dict[str, Tensor], chunk_size: int) -> tuple[Tensor, Tensor]:
    """Each row's summed log-probability of its labelled (completion) tokens, float32 [rows], and their count [rows]."""
    summed = head_sequence_logprobs(model, hidden, batch["labels"], chunk_size, batch.get("label_index"))
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    return summed, tokens


def vocab_mean_logits(model: CausalLM, hidden: Tensor, chunk_size: int) -> Tensor:
    """Each position's mean logit over the vocabulary, float32 [rows, T], without gradient: what TRL's
    logits/* metrics average. A plain head never builds the [rows, T, V] logits (the sum over v of
    h . W_v is h . sum_v W_v); any other head (adapted, soft-capped) gives its logits `chunk_size`
    positions at a time (0: all at once)."""
    with torch.no_grad():
        weight = model.plain_head_weight()
        if weight is not None:
            return (hidden.float() @ weight.float().sum(dim=0)) / weight.shape[0]
        flat = hidden.reshape(-1, hidden.shape[-1])
        means = [model.logits(part).float().mean(dim=-1) for part in flat.split(chunk_size or max(1, flat.shape[0]))]
        return torch.cat(means).view(hidden.shape[:-1])


def reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """TRL's rewards/* of per-pair rewards (means over the pairs)."""
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


class StepMetrics:
    """Named metrics of an optimiser step, each a sum and a count over the step (and ranks when reduced):
    a micro-batch adds its means weighted by its sample count (`add`), or sums over some of its samples
    (`add_sums`, e.g. the desirable ones); the step logs sum / count with TRL's names (NaN where none counted)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names))
        self.counts = torch.zeros(len(self.names))

    def add(self, means: dict[str, Tensor], count: int | Tensor) -> None:
        """Add a micro-batch's means over `count` samples."""
        self.add_sums({name: value * count for name, value in means.items()}, count)

    def add_sums(self, sums: dict[str, Tensor], count: int | Tensor) -> None:
        """Add sums over `count` samples (a tensor count: no host sync) to the named metrics."""
        rows = torch.tensor([self.names.index(name) for name in sums])
        values = torch.stack([value.detach().float() for value in sums.values()])
        self.sums = self.sums.to(values.device).index_add(0, rows.to(values.device), values)
        self.counts = self.counts.to(values.device).index_add(0, rows.to(values.device), torch.as_tensor(count, dtype=torch.float32, device=values.device).expand(len(rows)))

    def reduce(self, module: pl.LightningModule) -> dict[str, Tensor]:
        """The step's means, reduced over ranks; the sums start again for the next step."""
        strategy = module.trainer.strategy
        sums = strategy.reduce(self.sums.float(), reduce_op="sum")
        counts = strategy.reduce(self.counts.float(), reduce_op="sum")
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        self.sums, self.counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        return dict(zip(self.names, means, strict=True))

    def log(self, module: pl.LightningModule) -> None:
        """Log the step's means (`reduce`) on the step."""
        module.log_dict(self.reduce(module), on_step=True, on_epoch=False, batch_size=1)
