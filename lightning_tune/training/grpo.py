"""GRPO's arithmetic as TRL 1.16's `GRPOTrainer` does it: rewards to group-normalised advantages, per-token
log-probabilities of completions through the (chunked) output head, and the clipped policy loss with its KL
term and each `loss_type`'s normaliser (`trl/trainer/grpo_trainer.py`: `_generate_and_score_completions`,
`_compute_loss`). Tensors in, tensors out: rollouts and rewards are the recipe's (`recipes/grpo.py`).

Shapes: B completions (G per prompt, consecutive), C completion positions (right-padded), F reward functions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_tune.model import CausalLM
from lightning_tune.training.loss import head_inputs

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
ScaleRewards = Literal["group", "batch", "none"]

ADVANTAGE_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


def nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected (n - 1) standard deviation ignoring NaNs, as `trl.trainer.utils.nanstd`."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    variance = variance * count / (count - 1)
    std = variance.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def combine_rewards(rewards_per_func: Tensor, weights: Tensor) -> Tensor:
    """[B] total reward: the weighted sum over functions of [B, F] rewards, skipping NaN (a function's None);
    NaN where every function returned None (an unscorable completion), as TRL's `sum_then_normalize`."""
    rewards = (rewards_per_func * weights.to(rewards_per_func)[None]).nansum(dim=1)
    return rewards.masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group") -> tuple[Tensor, Tensor]:
    """Per-completion advantages of [B] rewards (G = `num_generations` consecutive completions per prompt)
    and the std they were scaled by, [B] each.

    `A = r - mean of the group`, divided by `std + 1e-4` with the std of the group (`group`, Bessel-corrected)
    or of the whole batch (`batch`, Lite-PPO); `none` (Dr. GRPO) does not divide (the group std is still
    returned: `frac_reward_zero_std` reads it). NaN rewards stay out of the means and get advantage 0.
    """
    if rewards.ndim != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards: expected [B] with B a multiple of num_generations={num_generations}, got {list(rewards.shape)}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations) if num_generations > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards: expected group, batch or none, got {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def _chunk_logprobs(inputs: Tensor, weight: Tensor | None, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log softmax(logits / T)[target] and the entropy of softmax(logits / T) of one chunk (entropy without a graph)."""
    logits = inputs if weight is None else inputs @ weight.T
    log_probs = (logits.float() / temperature).log_softmax(dim=-1)
    token = log_probs.gather(1, targets[:, None]).squeeze(1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return token, entropy


def completion_token_logprobs(
    model: CausalLM,
    hidden: Tensor,
    completion_ids: Tensor,
    prompt_lens: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities and entropies [B, C] (float32; 0 where `completion_mask` is 0) of each row's
    completion under `model`'s head, the logits divided by the sampling `temperature` as TRL does.

    `hidden` [B, L, E] is the decoder's output on rows laid out `prompt + completion`, right-padded (row b's
    completion starts at `prompt_lens[b]`). Only the completion positions go through the head; a plain head in
    chunks of `chunk_size` positions, each chunk recomputed in backward (`torch.utils.checkpoint`), so no
    [B, L, V] or [N, V] logits are kept for the gradient; an adapted head (the model's logits) at once.
    """
    B, C = completion_ids.shape
    L = hidden.shape[1]
    keep = completion_mask.bool()
    rows, cols = keep.nonzero(as_tuple=True)  # [N]: the scored positions
    source = rows * L + prompt_lens.to(rows.device)[rows] + cols - 1  # position t - 1 predicts token t
    selected = hidden.flatten(0, 1).index_select(0, source)  # [N, E]
    targets = completion_ids[rows, cols]
    chunk = chunk_size or max(1, selected.shape[0])
    inputs, weight = head_inputs(model, selected, chunk)
    if weight is None:
        chunk = max(1, inputs.shape[0])  # the model's logits, already whole
    tokens, entropies = [], []
    for start in range(0, inputs.shape[0], chunk):
        piece, target = inputs[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and weight is not None:
            token, entropy = checkpoint(_chunk_logprobs, piece, weight, target, temperature, use_reentrant=False)
        else:
            token, entropy = _chunk_logprobs(piece, weight, target, temperature)
        tokens.append(token)
        entropies.append(entropy)
    flat = torch.cat(tokens) if tokens else hidden.new_zeros(0, dtype=torch.float32)
    flat_entropy = torch.cat(entropies) if entropies else hidden.new_zeros(0, dtype=torch.float32)
    logprobs = torch.zeros(B, C, dtype=torch.float32, device=hidden.device).index_put((rows, cols), flat)
    entropy = torch.zeros(B, C, dtype=torch.float32, device=hidden.device).index_put((rows, cols), flat_entropy)
    if rows.numel() == 0 and hidden.requires_grad:  # nothing scored (e.g. every completion masked as truncated):
        logprobs = logprobs + 0.0 * hidden.sum()  # a zero loss that still has a graph (and gradients, all zero)
    return logprobs, entropy


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """TRL's `global_masked_mean` on one process: a [B, 1] (sequence-level) tensor is one value per sequence."""
    if values.shape[1] == 1:
        return values.sum() / max(values.shape[0], 1)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """TRL's `masked_seq_mean`: [B] per-sequence means (already one value for a [B, 1] tensor)."""
    if values.shape[1] == 1:
        return values.squeeze(1)
    return (values * mask).sum(-1) / mask.sum(-1)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    mask: Tensor,
    advantages: Tensor,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: GRPOLossType = "dapo",
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_len: int | None = None,
    num_items: Tensor | float | None = None,
    use_bias_correction_kl: bool = True,
    entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss of one batch of completions and its metrics, as TRL 1.16's `GRPOTrainer._compute_loss`
    computes them on one process without gradient accumulation.

    Args:
        logprobs: [B, C] per-token log-probabilities of the policy (with the graph).
        old_logprobs: [B, C] of the policy that sampled the completions; None: `logprobs.detach()` (on-policy:
            the ratio is 1, its gradient the policy gradient).
        ref_logprobs: [B, C] of the reference; needed when `beta` > 0.
        mask: [B, C] 1 on the scored completion tokens (up to and including the first end token).
        advantages: [B] per-completion advantages (`group_advantages`).
        beta: Weight of the k3 KL estimate `exp(ref - pi) - (ref - pi) - 1` per token.
        epsilon, epsilon_high: The ratio is clipped to [1 - epsilon, 1 + epsilon_high] (epsilon_high None: epsilon).
        loss_type: grpo (mean over sequences of each one's token mean), bnpo (token mean of the batch), dr_grpo
            (token sum / (B x max_completion_len)), dapo (token sum / `num_items`).
        importance_sampling_level: token (a ratio per token) or sequence (GSPO: exp of the mean log-ratio).
        max_completion_len: dr_grpo's constant denominator.
        num_items: dapo's denominator: the active tokens of the whole generation batch (TRL: over every
            process, divided by the number of processes); None: this batch's `mask.sum()`.
        use_bias_correction_kl: Multiply the KL term by the (differentiable) ratio (TRL 1.16's default).
        entropies: [B, C] per-token entropies, for the `entropy` metric (no gradient).

    Returns:
        The scalar loss and TRL's metrics of this batch: `kl` (beta > 0), `entropy`, `clip_ratio/low_mean`,
        `clip_ratio/high_mean`, `clip_ratio/region_mean`, `clip_ratio/low_min`, `clip_ratio/high_max`.
    """
    if epsilon_high is None:
        epsilon_high = epsilon
    mask = mask.to(logprobs.dtype)
    advantages = advantages[:, None] if advantages.ndim == 1 else advantages
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    log_ratio = logprobs - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    else:
        raise ValueError(f"importance_sampling_level: expected token or sequence, got {importance_sampling_level!r}")
    coef_1 = torch.exp(log_weights)
    per_token_kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs: needed when beta > 0 (the KL term)")
        delta = ref_logprobs - logprobs
        per_token_kl = torch.exp(delta) - delta - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_len is None:
            raise ValueError("max_completion_len: dr_grpo divides by batch size x max_completion_len; give it")
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_len)
    elif loss_type == "dapo":
        items = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype, device=mask.device)
        loss = (per_token_loss * mask).sum() / items.clamp(min=1.0)
    else:
        raise ValueError(f"loss_type: expected grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")

    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        if per_token_kl is not None:
            metrics["kl"] = _masked_mean(per_token_kl, mask)
        if entropies is not None:
            metrics["entropy"] = _masked_mean(entropies, mask)
        low = ((coef_1 < 1 - epsilon) & (advantages < 0)).float()
        high = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _masked_mean(((low + high) > 0).float(), mask)
        metrics["clip_ratio/low_min"] = _nan_reduce(_sequence_mean(low, mask), torch.min)
        metrics["clip_ratio/high_max"] = _nan_reduce(_sequence_mean(high, mask), torch.max)
    return loss, metrics


def _nan_reduce(values: Tensor, reduce) -> Tensor:
    """min / max ignoring NaN (an empty sequence's 0 / 0), NaN if all are: TRL's `nanmin` / `nanmax`."""
    finite = values[~values.isnan()]
    return reduce(finite) if finite.numel() else values.new_tensor(float("nan"))
