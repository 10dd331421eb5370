"""The recipes' losses: the output head's cross-entropy (chunked), per-sequence log-probabilities, and DPO's loss.

`head_inputs` holds the one rule for the head: a chunked kernel here applies a plain head itself, anything
else is the model's `CausalLM.logits`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tune.data.collate import label_index
from lightning_tune.model import CausalLM

DPOLoss = Literal["sigmoid", "ipo", "robust"]


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), computed `chunk_size` rows at a time.

    Each chunk's logits [chunk, V] live only inside `forward`: the gradients with respect to
    hidden and weight (softmax - onehot, times the inputs) are computed right there, chunk by
    chunk, and `backward` only scales them by the incoming scalar. So the full [N, V] logits never
    exist and nothing is recomputed: the same three matmuls as an unchunked head, less memory.
    With `softcap` (Gemma 2's final cap), each chunk's logits become cap * tanh(logits / cap) in fp32
    and the gradient through the cap is (softmax - onehot) * (1 - tanh^2).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, softcap: float | None = None) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]  # [n, E], [n]
            logits = h @ weight.T  # [n, V] in the compute dtype
            # [n, V] log-probabilities in fp32 like F.cross_entropy(logits.float()), computed in place:
            # a fresh buffer this large costs its page faults on every chunk (glibc maps allocations
            # over 32 MiB anew each time), more than the kernel itself on a CPU
            log_probs = logits.float()  # the logits themselves when they are fp32
            if softcap is not None:
                slope = (log_probs / softcap).tanh_()  # its own buffer: the logits' is overwritten next
                torch.mul(slope, softcap, out=log_probs)
                slope = 1.0 - slope.square_()  # d capped / d logits
            torch.log_softmax(log_probs, dim=-1, out=log_probs)
            loss -= log_probs.gather(1, t[:, None]).sum()
            if need_hidden or need_weight:
                grad = log_probs.exp_()  # softmax, in place
                grad[torch.arange(len(t), device=t.device), t] -= 1.0  # d(sum CE)/d logits
                if softcap is not None:
                    grad *= slope
                if grad.dtype != logits.dtype:
                    grad = logits.copy_(grad)  # rounded once to the compute dtype, into the logits' buffer
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = grad @ weight
                if need_weight:
                    grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, softcap: float | None = None) -> Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T` ([N, E] x [V, E]) against `targets` [N].

    Equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` in value
    and gradients, but the logits exist `chunk_size` rows at a time (see `_LinearCrossEntropySum`).
    Under autocast both operands are cast to the autocast dtype first, as `F.linear` would do.
    `softcap`: the logits are cap * tanh(logits / cap) (computed in fp32), as `CausalLM.logits` caps them.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk_size, softcap)


def sequence_logprobs(
    logits_or_hidden: Tensor,
    labels: Tensor,
    *,
    weight: Tensor | None = None,
    seq_lens: list[list[int]] | None = None,
    chunk_size: int = 1024,
    label_positions: Tensor | None = None,
) -> Tensor:
    """Summed log p(label) over the labelled positions of each sequence: the completion's log-likelihood.

    Args:
        logits_or_hidden: [B, T, V] logits, or with `weight` the [B, T, E] hidden states before the
            output head; position t predicts token t + 1, as in the training loss.
        labels: [B, T] token ids aligned with the inputs, IGNORE_INDEX where not scored (the prompt).
        weight: The output head's [V, E] weight: logits are then computed only at labelled
            positions, `chunk_size` of them at a time (all of them coexist only under autograd).
        seq_lens: Packed rows (`collate_packed`): each row's sample lengths; one value per sample
            is returned then, rows in order. Each sample's first label must be IGNORE_INDEX (as
            `collate_packed` sets it), so no sample is scored on its neighbour's tokens.
        chunk_size: Labelled positions per log-softmax; > 0.
        label_positions: `label_index(labels)` when the batch brings it (the collate functions
            compute it on the host: no count for a GPU to report); else computed here.

    Returns:
        float32 [B] (or [number of samples] with `seq_lens`), differentiable.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    index = label_index(labels) if label_positions is None else label_positions  # [N] into the [B, T] grid
    inputs = logits_or_hidden.flatten(0, 1).index_select(0, index)  # [N, V] or [N, E]
    kept = labels.flatten().index_select(0, index + 1)  # [N]: position t predicts token t + 1
    pieces = []
    for start in range(0, inputs.shape[0], chunk_size):
        chunk = inputs[start : start + chunk_size]
        logits = chunk if weight is None else chunk @ weight.T  # [n, V]
        pieces.append(logits.float().log_softmax(dim=-1).gather(1, kept[start : start + chunk_size, None]).squeeze(1))
    token_logprobs = torch.cat(pieces) if pieces else inputs.new_zeros(0, dtype=torch.float32)  # [N]
    if seq_lens is None:
        owner, count = index // labels.shape[1], labels.shape[0]  # each labelled position's row
    else:
        if len(seq_lens) != labels.shape[0] or any(sum(row) != labels.shape[1] for row in seq_lens):
            raise ValueError(f"seq_lens: {seq_lens} does not fill the {list(labels.shape)} batch (one list of sample lengths per row, summing to its length)")
        # The sample of every token ([B, T], numbered across rows); a position belongs to its target's sample.
        lengths = torch.tensor([n for row in seq_lens for n in row], device=labels.device)
        sample_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=labels.device), lengths).view(labels.shape)
        owner, count = sample_of_token.flatten().index_select(0, index + 1), len(lengths)  # the sample of each target
    return torch.zeros(count, dtype=torch.float32, device=labels.device).index_add(0, owner, token_logprobs)


def head_inputs(model: CausalLM, hidden: Tensor, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """What a loss kernel here takes for `model`'s output head on `hidden` [..., E]: the one rule for the head.

    `(hidden, W)` when a chunked kernel may apply the head itself, `chunk_size` rows at a time: a chunk
    size > 0 and a plain [V, E] head (`CausalLM.plain_head_weight`). Else `(model.logits(hidden), None)`:
    the logits [..., V] as the model computes them (an adapted head, whatever a family applies after it).
    """
    weight = model.plain_head_weight() if chunk_size > 0 else None
    return (hidden, weight) if weight is not None else (model.logits(hidden), None)


def head_cross_entropy_sum(model: CausalLM, hidden: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """Summed cross-entropy of `model`'s head on `hidden` [N, E] against `targets` [N]: the training loss.

    A plain head runs chunked (`linear_cross_entropy_sum`: the [N, V] logits never exist at once);
    `chunk_size` 0 or an adapted head: `F.cross_entropy` on the model's logits. Same loss and gradients.
    """
    capped = model.capped_head() if chunk_size > 0 else None
    if capped is not None:  # a plain head with a final soft-cap (Gemma 2): the cap inside the chunks
        return linear_cross_entropy_sum(hidden, capped[0], targets, chunk_size, capped[1])
    inputs, weight = head_inputs(model, hidden, chunk_size)
    if weight is not None:
        return linear_cross_entropy_sum(inputs, weight, targets, chunk_size)
    return F.cross_entropy(inputs.float(), targets, reduction="sum")


def head_sequence_logprobs(model: CausalLM, hidden: Tensor, labels: Tensor, chunk_size: int, label_positions: Tensor | None = None) -> Tensor:
    """Summed log-probabilities of each row's labelled tokens under `model`'s head, float32 [B]
    (`sequence_logprobs` of the [B, T, E] `hidden`).

    A plain head is applied only at labelled positions, `chunk_size` of them at a time (0: all at
    once); an adapted head (the model's logits) at every position."""
    rows = max(1, hidden.shape[0] * hidden.shape[1])
    chunk = chunk_size or rows
    inputs, weight = head_inputs(model, hidden, chunk)
    return sequence_logprobs(inputs, labels, weight=weight, chunk_size=chunk if weight is not None else rows, label_positions=label_positions)


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


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (branch at -ln 2, as TRL's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_avg: Tensor, rejected_avg: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO's per-pair odds-ratio term log sigmoid(log-odds(y_w) - log-odds(y_l)) and the log odds ratio
    itself, on average per-token log-probabilities, log-odds(y) = logp - log(1 - exp(logp)) (TRL 1.16's
    `ORPOTrainer.odds_ratio_loss`, arXiv 2403.07691 eqs. 4 and 7). The loss subtracts beta times the first."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return F.logsigmoid(log_odds), log_odds


def simpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float, label_smoothing: float = 0.0) -> Tensor:
    """SimPO's per-pair loss -log sigmoid(beta (avg logp_w - avg logp_l) - gamma), with TRL's conservative
    label smoothing (`CPOTrainer(loss_type="simpo").cpo_loss`, AlphaPO off)."""
    margin = beta * (chosen_avg - rejected_avg - gamma / beta)  # TRL's order of operations
    return -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, center_coefficient: float | None = None) -> Tensor:
    """A reward model's loss on a batch of pairs' scores, as TRL 1.16's `RewardTrainer.compute_loss`:
    mean(-log sigmoid(r_c - r_r - margin)) + c * mean((r_c + r_r)^2) (centring, arXiv 2312.09244) when given."""
    delta = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(delta).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


KTOLoss = Literal["kto", "apo_zero_unpaired"]


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    loss_type: KTOLoss = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Per-sample losses of unpaired completions, as TRL 1.16's `KTOTrainer`: with the log-ratio
    r = log pi(y|x) - log ref(y|x) and the (detached, clamped) KL estimate z, kto gives desirable
    w_d (1 - sigmoid(beta (r - z))) and undesirable w_u (1 - sigmoid(beta (z - r))) (arXiv 2402.01306
    eq. 7); apo_zero_unpaired gives w_d (1 - sigmoid(beta r)) and w_u sigmoid(beta r) (arXiv 2408.06266).
    `desirable` is a bool [B]."""
    if loss_type == "kto":
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * (logratios - kl)), 1 - torch.sigmoid(beta * (kl - logratios)))
    else:
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios))
    return losses * torch.where(desirable, desirable_weight, undesirable_weight)
