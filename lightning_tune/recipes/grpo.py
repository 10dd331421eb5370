"""Group Relative Policy Optimisation (GRPO) with verifiable rewards, as TRL 1.16's `GRPOTrainer` computes it.

Each training batch is `batch_size` prompts (`PromptDataModule`). The policy itself samples `num_generations`
(G) completions of each through our decoder (`generate/rollout.py`: batched prefill and KV-cache sampling; no
vLLM, no second model), the reward functions score them, each completion's advantage is its reward against its
group's (`training/grpo.py: group_advantages`), and the loss is TRL's clipped surrogate with an optional KL to
the reference (`grpo_loss`), the log-probabilities through the chunked head with the sampling temperature
dividing the logits. The reference (beta > 0) is the model with its adapters off (LoRA) or a frozen copy of
the starting model (full), as DPO's (`recipes/reference.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tune.data.prompts import PromptDataModule
from lightning_tune.generate.rollout import Rollouts, rollout
from lightning_tune.model import CausalLM
from lightning_tune.recipes.base import FinetuneModule
from lightning_tune.recipes.reference import Reference
from lightning_tune.recipes.tuning import Full, LoRA
from lightning_tune.tokenizer import TokenizerProtocol, load_tokenizer
from lightning_tune.tokenizer.base import end_of_turn_ids
from lightning_tune.training.grpo import GRPOLossType, ImportanceSamplingLevel, ScaleRewards, combine_rewards, completion_token_logprobs, group_advantages, grpo_loss, nanstd
from lightning_tune.training.optim import LRSchedule
from lightning_tune.training.rewards import BUILTIN, resolve_reward_funcs, score
from lightning_tune.training.sharding import gathered_for_decoding


class GRPOFinetune(FinetuneModule):
    """GRPO on prompts (`PromptDataModule`) with programmatic rewards, LoRA adapters (QLoRA, DoRA) or every weight.

    One training step: G completions of each of the batch's prompts are sampled with the policy, scored by
    `reward_funcs` (weighted by `reward_weights`), turned into group-normalised advantages, and the policy
    is moved by TRL's loss. Logged each optimiser step with TRL's names: `train_loss`, `reward`,
    `reward_std`, `rewards/<func>/mean`, `frac_reward_zero_std`, `completions/mean_length`,
    `completions/clipped_ratio`, `kl` (beta > 0), `entropy`, `clip_ratio/region_mean` (and `low_mean`,
    `high_mean`); validation logs `val_reward`, the mean reward of sampled completions of held-out prompts.

    Defaults are TRL 1.16's `GRPOConfig` where they mean the same (num_generations 8, max_completion_length 512,
    temperature 1, top_p 1, top_k off, beta 0, epsilon 0.2, loss_type dapo, scale_rewards group, lr 1e-6,
    weight decay 0, linear schedule without warm-up). Ours differ in: precision (the Trainer's, fp32 unless
    set; TRL trains bf16), `batch_size` counting prompts (TRL's per_device_train_batch_size counts completions),
    rollouts in eval mode (no dropout while sampling), and with `num_iterations` > 1 each sampled batch is
    trained on for that many consecutive optimiser steps while the prompt batches fetched meanwhile are skipped
    (TRL repeats the batch in its sampler instead: the same updates, 1/μ of an epoch's prompts).

    Args:
        method: lora (train adapters; reference = adapters off) or full (every weight; reference = a frozen copy, kept only when beta > 0).
        num_generations: G, completions sampled per prompt (>= 2: advantages compare a completion with its group).
        max_completion_len: Most tokens per completion (TRL's max_completion_length).
        temperature: Sampling temperature; the same temperature divides the logits in the loss. 0: greedy (testing only: a group of equal completions has no advantage).
        top_p: Nucleus sampling (1.0: off).
        top_k: Sample among the k most likely tokens (0: off).
        beta: Weight of the KL penalty to the reference (0: no reference forward at all, TRL's default).
        epsilon: Lower clip of the importance ratio: 1 - epsilon.
        epsilon_high: Upper clip: 1 + epsilon_high (null: epsilon; DAPO uses 0.28).
        loss_type: dapo (token sum / the step's tokens), grpo (mean of per-sequence means), bnpo (token mean of each micro-batch), dr_grpo (token sum / (completions x max_completion_len)); TRL 1.16's normalisers.
        importance_sampling_level: token (a ratio per token) or sequence (GSPO: one ratio per completion, exp of the mean log-ratio).
        scale_rewards: group (divide by the group's std), batch (the batch's std, Lite-PPO) or none (Dr. GRPO).
        num_iterations: μ, optimiser steps per sampled batch; > 1 keeps the sampling policy's log-probabilities as the old policy.
        mask_truncated_completions: Leave completions without an end token out of the loss (DAPO).
        reward_funcs: Reward functions: built-ins (accuracy, format, overlong, numeric), reward model directories (a RewardModel export or a transformers sequence classifier) or import paths (my_rewards.correct) of f(prompts, completions, completion_ids, **columns) -> list[float | None]. Imported when training starts, only from the config or command line, never from a checkpoint.
        reward_weights: One weight per reward function (null: all 1.0).
        sampling_seed: Seeds the rollouts; each step's generator is derived from it and the step, so a resumed run samples what the uninterrupted run sampled.
        lr: Peak learning rate (TRL's 1e-6).
        weight_decay: As TRL: 0.
        warmup_steps: As TRL: 0.
        lr_schedule: As TRL: linear decay.
        lora_rank: Rank r of the adapters.
        lora_alpha: Scale numerator: the adapter's output is multiplied by lora_alpha / lora_rank.
        lora_dropout: Dropout on the adapter's input.
        lora_attn_modules: Attention projections to adapt: q_proj, k_proj, v_proj, o_proj.
        apply_lora_to_mlp: Also adapt the MLP (gate_proj, up_proj, down_proj).
        apply_lora_to_output: Also adapt the output head (lm_head).
        apply_lora_to_experts: Also adapt the experts of a mixture-of-experts model (their stacked
            gate_up_proj and down_proj: one low-rank pair per expert, PEFT's target_parameters); needs lora_dropout 0.
        quantize_base: nf4 = QLoRA (the frozen linears in 4-bit NF4; needs bitsandbytes (pip install bitsandbytes; in a checkout pip install -e ".[qlora]")); null = the compute dtype.
        use_dora: DoRA: also train a magnitude per output row of each adapted layer (PEFT's formula).
        **kwargs: The parameters of `FinetuneModule` (model_name, checkpoint_dir, ...).
    """

    CHECKPOINT_KEYS = (*FinetuneModule.CHECKPOINT_KEYS, "method")
    DATA_MODULES = (PromptDataModule,)

    def __init__(
        self,
        method: Literal["lora", "full"] = "lora",
        num_generations: int = 8,
        max_completion_len: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: GRPOLossType = "dapo",
        importance_sampling_level: ImportanceSamplingLevel = "token",
        scale_rewards: ScaleRewards = "group",
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        reward_funcs: list[str] = ["accuracy"],  # noqa: B006 (read only; a list reads best in --help)
        reward_weights: list[float] | None = None,
        sampling_seed: int = 42,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "linear",
        # LoRAFinetune's arguments, the same names, defaults and docs
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_attn_modules: list[str] = ["q_proj", "v_proj"],  # noqa: B006
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        apply_lora_to_experts: bool = False,
        quantize_base: Literal["nf4"] | None = None,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, lr_schedule=lr_schedule, **kwargs)
        lora = LoRA.from_arguments(lora_rank, lora_alpha, lora_dropout, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, quantize_base, use_dora, apply_lora_to_experts)
        if method == "full" and (quantize_base or use_dora):
            raise ValueError("method: full trains every weight; quantize_base and use_dora are LoRA settings (set method: lora)")
        if num_generations < 2:
            raise ValueError(f"num_generations: must be >= 2 (a completion's advantage is relative to its group), got {num_generations}")
        if max_completion_len < 1:
            raise ValueError(f"max_completion_len: must be >= 1, got {max_completion_len}")
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {top_k}")
        if beta < 0:
            raise ValueError(f"beta: must be >= 0, got {beta}")
        if not 0 <= epsilon < 1:
            raise ValueError(f"epsilon: must be in [0, 1), got {epsilon}")
        if epsilon_high is not None and epsilon_high < 0:
            raise ValueError(f"epsilon_high: must be >= 0, got {epsilon_high}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations: must be >= 1, got {num_iterations}")
        if not reward_funcs:
            raise ValueError("reward_funcs: give at least one reward function (a built-in such as accuracy, or an import path)")
        for name in reward_funcs:
            if name not in BUILTIN and "." not in name:
                raise ValueError(f"reward_funcs: {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor an import path such as my_rewards.correct")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(f"reward_weights: {len(reward_weights)} weights for {len(reward_funcs)} reward_funcs; give one per function")
        self.tuning = lora if method == "lora" else Full()
        self.method = method
        self.num_generations = num_generations
        self.max_completion_len = max_completion_len
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.beta = beta
        self.epsilon = epsilon
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.importance_sampling_level = importance_sampling_level
        self.scale_rewards = scale_rewards
        self.num_iterations = num_iterations
        self.mask_truncated_completions = mask_truncated_completions
        self.reward_names = list(reward_funcs)
        self.reward_weights = torch.tensor(reward_weights if reward_weights is not None else [1.0] * len(reward_funcs), dtype=torch.float32)
        self.sampling_seed = sampling_seed
        self.reference = Reference(self._reference_logprobs_of, self.tuning, precompute=False)
        self._reward_funcs: list | None = None  # imported in `setup`, never in __init__ (a checkpoint's hyper-parameters rebuild this class)
        self._tokenizer: TokenizerProtocol | None = None
        self._buffer: dict[int, dict[str, Tensor]] = {}  # num_iterations > 1: each micro-batch's sampled batch, reused μ steps
        self._step_metrics: dict[str, list[Tensor]] = {}
        self.check_context_length()  # again, now with max_completion_len

    # ---- model, reference, rewards -----------------------------------------------------------

    def check_context_length(self) -> None:
        """Prompts (max_seq_len) plus completions must fit the model's context."""
        super().check_context_length()
        completion = getattr(self, "max_completion_len", None)
        if completion is None or self.max_seq_len is None or (self.checkpoint_dir is not None and not Path(self.checkpoint_dir).exists()):
            return
        context = self.model_config().max_seq_len
        if self.max_seq_len + completion > context:
            raise ValueError(f"max_completion_len: prompts of up to {self.max_seq_len} tokens (data.max_seq_len) plus {completion} completion tokens exceed the model's context length {context}")

    def adapt_model(self, model: CausalLM) -> None:
        """The tuning's adaptation; full GRPO with beta > 0 then keeps a frozen copy as the reference."""
        super().adapt_model(model)
        if self.beta == 0 or not self.reference.keeps_copy:
            return
        if self.sharding_mesh() is not None:
            raise ValueError("method: full GRPO with beta > 0 keeps a whole frozen reference copy; FSDP2 sharding is not supported (use method: lora or beta: 0)")
        self.reference.keep_copy(model)

    @property
    def keeps_reference_copy(self) -> bool:
        """Whether a frozen copy of the model is held as the reference (memory estimates count it)."""
        return self.beta > 0 and self.reference.keeps_copy

    def train_batch_shape(self, batch_size: int, max_seq_len: int) -> tuple[int, int]:
        """(rows, tokens per row) of the largest training forward, for memory estimates (`validate`): each
        prompt's num_generations completions, as long as the longest prompt plus max_completion_len; also the
        shape of the rollouts' KV cache, which the estimate counts in its own phase (under FSDP2 with the
        model gathered for decoding)."""
        return batch_size * self.num_generations, max_seq_len + self.max_completion_len

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.load_reward_funcs()

    def load_reward_funcs(self) -> list:
        """Import the configured reward functions (once)."""
        if self._reward_funcs is None:
            self._reward_funcs = resolve_reward_funcs(self.reward_names, self.max_completion_len)
        return self._reward_funcs

    @property
    def tokenizer(self) -> TokenizerProtocol:
        """The data module's tokenizer (or tokenizer_path's): decodes completions, knows the end tokens."""
        if self._tokenizer is None:
            data = self.trainer.datamodule if self._trainer is not None else None
            if data is not None and hasattr(data, "tokenizer"):
                self._tokenizer = data.tokenizer
            elif self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                raise ValueError("tokenizer_path: GRPO decodes completions for the rewards; give a tokenizer (or a PromptDataModule)")
        return self._tokenizer

    # ---- rollouts ----------------------------------------------------------------------------

    def sample(self, prompt_ids: list[list[int]], seed: int | None) -> Rollouts:
        """G completions of each prompt, sampled by the policy as it is now (under FSDP2 with its parameters
        gathered for the rollout: `sharding.gathered_for_decoding`)."""
        tokenizer = self.tokenizer
        with gathered_for_decoding(self.model):
            return rollout(
                self.model,
                prompt_ids,
                self.num_generations,
                self.max_completion_len,
                temperature=self.temperature,
                top_p=self.top_p if self.top_p < 1 else None,
                top_k=self.top_k or None,
                eos_id=end_of_turn_ids(tokenizer),
                pad_id=max(tokenizer.pad_id, 0),
                seed=seed,
            )

    def rollout_tensors(self, rollouts: Rollouts) -> dict[str, Tensor]:
        """Rows `prompt + completion` right-padded [B, L], the completions [B, C], their loss mask (end token
        included; truncated ones zeroed with mask_truncated_completions) and the prompts' lengths."""
        pad = max(self.tokenizer.pad_id, 0)
        B = len(rollouts.completion_ids)
        L = max(len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True))
        C = max(1, max(len(c) for c in rollouts.completion_ids))
        rows = torch.full((B, L), pad, dtype=torch.long)
        completion_ids = torch.full((B, C), pad, dtype=torch.long)
        mask = torch.zeros(B, C)
        for b, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)):
            rows[b, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            completion_ids[b, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[b, : len(c)] = 1.0
        truncated = torch.tensor(rollouts.truncated)
        if self.mask_truncated_completions:
            mask = mask * (~truncated)[:, None].float()
        device = self.device
        return {
            "input_ids": rows.to(device),
            "completion_ids": completion_ids.to(device),
            "completion_mask": mask.to(device),
            "prompt_lens": torch.tensor([len(p) for p in rollouts.prompt_ids], device=device),
            "lengths": torch.tensor([len(c) for c in rollouts.completion_ids], dtype=torch.float32, device=device),
            "truncated": truncated.to(device),
        }

    def completion_texts(self, rollouts: Rollouts, prompts: list) -> list:
        """The completions as the reward functions get them: text without the end token (chat prompts: one
        assistant message), as TRL's `batch_decode(skip_special_tokens=True)`."""
        stop = set(end_of_turn_ids(self.tokenizer))
        texts = [self.tokenizer.decode([t for t in c if t not in stop]) for c in rollouts.completion_ids]
        if prompts and not isinstance(prompts[0], str):
            return [[{"role": "assistant", "content": text}] for text in texts]
        return texts

    def score_rollouts(self, rollouts: Rollouts, prompts: list, columns: dict[str, list]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Advantages [B] of the rollouts (prompts and columns per prompt, repeated G times here), TRL's reward
        metrics and the rewards [B] (NaN: unscorable)."""
        G = self.num_generations
        prompts_b = [p for p in prompts for _ in range(G)]
        columns_b = {name: [v for v in values for _ in range(G)] for name, values in columns.items()}
        table = score(self.load_reward_funcs(), prompts_b, self.completion_texts(rollouts, prompts), rollouts.completion_ids, columns_b)
        per_func = torch.tensor(table, dtype=torch.float32)  # [B, F], NaN for None
        rewards = combine_rewards(per_func, self.reward_weights)
        advantages, std = group_advantages(rewards, G, self.scale_rewards)
        metrics = {f"rewards/{name}/mean": torch.nanmean(per_func[:, f]) for f, (name, _) in enumerate(self.load_reward_funcs())}
        metrics.update({f"rewards/{name}/std": nanstd(per_func[:, f]) for f, (name, _) in enumerate(self.load_reward_funcs())})
        metrics["reward"] = torch.nanmean(rewards)
        metrics["reward_std"] = nanstd(rewards)
        metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean()
        lengths = torch.tensor([len(c) for c in rollouts.completion_ids], dtype=torch.float32)
        truncated = torch.tensor(rollouts.truncated)
        metrics["completions/mean_length"] = lengths.mean()
        metrics["completions/min_length"] = lengths.min()
        metrics["completions/max_length"] = lengths.max()
        metrics["completions/clipped_ratio"] = truncated.float().mean()
        return advantages.to(self.device), metrics, rewards

    def prepare(self, batch: dict[str, Any], rollouts: Rollouts) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Everything one loss needs for `rollouts` of `batch`'s prompts: tensors, advantages, the reference's
        (beta > 0) and, with num_iterations > 1, the sampling policy's per-token log-probabilities."""
        tensors = self.rollout_tensors(rollouts)
        tensors["advantages"], metrics, rewards = self.score_rollouts(rollouts, batch["prompts"], batch.get("columns", {}))
        if self.beta > 0:
            tensors["ref_logprobs"] = self.reference.forward(self.model, tensors)
        if self.num_iterations > 1:
            with torch.no_grad():
                tensors["old_logprobs"] = self._reference_logprobs_of(self.model, tensors)
        return tensors, metrics, rewards

    # ---- loss --------------------------------------------------------------------------------

    def token_logprobs(self, model: CausalLM, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token log-probabilities and entropies [B, C] of the completions under `model`."""
        hidden = model.hidden_states(tensors["input_ids"])
        return completion_token_logprobs(model, hidden, tensors["completion_ids"], tensors["prompt_lens"], tensors["completion_mask"], self.temperature or 1.0, self.loss_chunk_size)

    def _reference_logprobs_of(self, model: CausalLM, tensors: dict[str, Tensor]) -> Tensor:
        return self.token_logprobs(model, tensors)[0]

    def grpo_loss_sum(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch as a sum and its count, and TRL's loss metrics: the base recipe divides
        the step's gradient by the step's count, so the step is TRL's with steps_per_generation = gradient
        accumulation (its default): dapo sums tokens and counts them (the step's token mean); grpo, bnpo and
        dr_grpo give each micro-batch's normalised loss and count 1 (their mean over micro-batches)."""
        logprobs, entropies = self.token_logprobs(self.model, tensors)
        mask = tensors["completion_mask"]
        loss, metrics = grpo_loss(
            logprobs,
            tensors.get("old_logprobs"),
            tensors.get("ref_logprobs"),
            mask,
            tensors["advantages"],
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_len=self.max_completion_len,
            num_items=1.0 if self.loss_type == "dapo" else None,
            entropies=entropies,
        )
        count = mask.sum().long() if self.loss_type == "dapo" else torch.ones((), dtype=torch.long, device=loss.device)
        return loss, count, metrics

    def step_seed(self, batch_idx: int) -> int:
        """The rollout seed of this micro-batch: a function of sampling_seed, the optimiser step, the micro-batch's
        place in the step and the rank (all restored on resume; ints hash alike in every process)."""
        trainer = self._trainer
        if trainer is None:
            return hash((self.sampling_seed, 0, batch_idx, 0)) & 0x7FFF_FFFF_FFFF_FFFF
        micro = batch_idx % trainer.accumulate_grad_batches
        return hash((self.sampling_seed, trainer.global_step, micro, trainer.global_rank)) & 0x7FFF_FFFF_FFFF_FFFF

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Sample (every num_iterations steps), score, then the summed loss (see `grpo_loss_sum`)."""
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        micro = batch_idx % trainer.accumulate_grad_batches if trainer is not None else 0
        if self.num_iterations == 1 or step % self.num_iterations == 0 or micro not in self._buffer:
            # A run resumed within a cycle has no buffer: it samples anew, as TRL does.
            rollouts = self.sample(batch["prompt_ids"], self.step_seed(batch_idx))
            tensors, reward_metrics, _ = self.prepare(batch, rollouts)
            if self.num_iterations > 1:
                self._buffer[micro] = tensors
            self._add_metrics(reward_metrics)
        else:
            tensors = self._buffer[micro]
        loss, count, metrics = self.grpo_loss_sum(tensors)
        self._add_metrics(metrics)
        self._step_loss_sum = self._step_loss_sum.to(loss.device) + loss.detach()
        self._step_tokens = self._step_tokens.to(count.device) + count
        self._step_seen_tokens += int(tensors["input_ids"].numel())
        return loss

    def _add_metrics(self, metrics: dict[str, Tensor]) -> None:
        for name, value in metrics.items():
            self._step_metrics.setdefault(name, []).append(value.detach().float().to(self.device))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """TRL's metrics of the step (each the mean of its micro-batches' values, then over ranks), then the base's."""
        names = sorted(self._step_metrics)
        if names:
            values = torch.stack([torch.stack(self._step_metrics[n]).nanmean() for n in names])
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
            self.log_dict(dict(zip(names, values, strict=True)), on_step=True, on_epoch=False, batch_size=1)
        self._step_metrics = {}
        super().on_before_optimizer_step(optimizer)

    # ---- evaluation: the mean reward of sampled completions of held-out prompts ----------------

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = torch.zeros(2, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollouts = self.sample(batch["prompt_ids"], hash((self.sampling_seed, -1, batch_idx)) & 0x7FFF_FFFF_FFFF_FFFF)  # ints: hashed alike in every process
        _, _, rewards = self.score_rollouts(rollouts, batch["prompts"], batch.get("columns", {}))
        scored = rewards[~rewards.isnan()]
        self._eval_sums += torch.tensor([float(scored.sum()), float(scored.numel())], device=self.device)

    def on_validation_epoch_end(self) -> None:
        self.log("val_reward", self._eval_reward(), prog_bar=True, sync_dist=True)

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.log("test_reward", self._eval_reward(), sync_dist=True)

    def _eval_reward(self) -> Tensor:
        total, count = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum")
        return total / count.clamp(min=1)
