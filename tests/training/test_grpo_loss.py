"""GRPO's loss and advantages (issue 31) against TRL 1.16's own code on the same tensors.

The loss: TRL's `GRPOTrainer._compute_loss` itself, called on a stub trainer whose log-prob function returns
our tensors, for every loss_type x token|sequence x epsilon_high on/off x beta 0 / > 0 (`use_bias_correction_kl`
pinned True, TRL 1.16's default); loss, gradient with respect to the log-probs and the metrics it logs. The
advantages: TRL's `nanstd` and its formula in `_generate_and_score_completions` (the whole path runs in
tests/recipes/test_grpo.py). The chunked per-token log-probs: against a plain log_softmax of the model's logits.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lightning_tune.training.grpo import combine_rewards, completion_token_logprobs, group_advantages, grpo_loss, nanstd

trl = pytest.importorskip("trl")
assert trl.__version__ == "1.16.0", trl.__version__  # the formulas pinned here are 1.16's (use_bias_correction_kl default True)

B, C, MAX_LEN = 6, 5, 7


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Off-policy log-probs (old != current, so clipping is active), a reference, a ragged mask, advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, C, generator=g, dtype=torch.float64).float() * 3
    mask = torch.ones(B, C)
    for row, length in enumerate([5, 3, 1, 4, 5, 2]):
        mask[row, length:] = 0
    return {
        "logps": logps,
        "old": logps + 0.4 * torch.randn(B, C, generator=g),
        "ref": logps + 0.3 * torch.randn(B, C, generator=g),
        "mask": mask,
        "advantages": torch.randn(B, generator=g),
        "entropies": torch.rand(B, C, generator=g),
    }


def trl_loss(t: dict, *, loss_type: str, level: str, epsilon_high: float | None, beta: float, num_items: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """TRL's `_compute_loss` on a stub trainer (one process, no accumulation): loss, d loss / d logps, metrics."""
    from trl import GRPOTrainer

    logps = t["logps"].clone().requires_grad_(True)
    identity = SimpleNamespace(reduce=lambda x, reduction="sum": x, gather=lambda x: x, num_processes=1)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, t["entropies"], None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.2 if epsilon_high is None else epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN,
        accelerator=identity,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, C, dtype=torch.long),
        "completion_mask": t["mask"].long(),
        "advantages": t["advantages"],
        "old_per_token_logps": t["old"],
        "ref_per_token_logps": t["ref"],
        "num_items_in_batch": torch.tensor(num_items),
    }
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.detach(), logps.grad, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_gradient_and_metrics_equal_trl(loss_type: str, level: str, epsilon_high: float | None, beta: float) -> None:
    """Same float32 operations in the same order as TRL's: equal to a few ulps (rtol 1e-6), gradients too."""
    t = tensors()
    num_items = float(t["mask"].sum()) + 3  # dapo: tokens of a generation batch larger than this micro-batch
    want_loss, want_grad, want_metrics = trl_loss(t, loss_type=loss_type, level=level, epsilon_high=epsilon_high, beta=beta, num_items=num_items)
    logps = t["logps"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        logps, t["old"], t["ref"], t["mask"], t["advantages"], beta=beta, epsilon=0.2, epsilon_high=epsilon_high, loss_type=loss_type,
        importance_sampling_level=level, max_completion_len=MAX_LEN, num_items=num_items, entropies=t["entropies"],
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=1e-7)
    assert logps.grad.abs().max() > 0
    torch.testing.assert_close(logps.grad, want_grad, rtol=1e-6, atol=1e-7)
    assert set(metrics) == set(want_metrics), (sorted(metrics), sorted(want_metrics))
    for key, value in metrics.items():
        torch.testing.assert_close(float(value), want_metrics[key], rtol=1e-6, atol=1e-7, msg=key)
    assert want_metrics["clip_ratio/region_mean"] > 0 or level == "sequence"  # clipping is exercised


def test_on_policy_ratio_is_one_with_the_policy_gradient() -> None:
    """old_logprobs None: the ratio is exactly 1 and (beta 0) the loss is -mean A, its gradient -A / tokens (dapo)."""
    t = tensors()
    logps = t["logps"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, None, None, t["mask"], t["advantages"])
    loss.backward()
    tokens = t["mask"].sum()
    torch.testing.assert_close(loss.detach(), -(t["advantages"][:, None] * t["mask"]).sum() / tokens)
    torch.testing.assert_close(logps.grad, -t["advantages"][:, None] * t["mask"] / tokens)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16's `sum_then_normalize` branch of `_generate_and_score_completions`, with its own `nanstd`."""
    from trl.trainer.utils import nanstd as trl_nanstd

    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = trl_nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    else:
        std = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(scale_rewards: str) -> None:
    """Bessel-corrected group (or batch) std + 1e-4; an unscorable completion (every function None) gets 0;
    a group of equal rewards gets 0 everywhere."""
    per_func = torch.tensor([[1.0, 0.5], [0.0, float("nan")], [1.0, 1.0], [float("nan"), float("nan")], [2.0, 2.0], [2.0, 2.0], [0.3, 0.1], [0.9, 0.2]])
    weights = torch.tensor([1.0, 0.5])
    rewards = combine_rewards(per_func, weights)
    assert rewards[3].isnan() and float(rewards[1]) == 0.0 and float(rewards[0]) == 1.25
    advantages, _ = group_advantages(rewards, 2, scale_rewards)
    torch.testing.assert_close(advantages, trl_advantages(rewards, 2, scale_rewards), rtol=1e-6, atol=1e-7)
    assert float(advantages[3]) == 0.0 and advantages[4:6].abs().max() == 0
    assert torch.isclose(nanstd(torch.tensor([1.0, 2.0, 3.0, float("nan")])), torch.tensor(1.0))


def test_chunked_completion_logprobs_equal_log_softmax_of_the_logits() -> None:
    """Per-token log-probs and entropies of the completions (logits / temperature), chunked and checkpointed,
    equal an unchunked log_softmax of the model's logits; their gradients too."""
    from lightning_tune.families import model_config
    from lightning_tune.model import CausalLM

    torch.manual_seed(0)
    model = CausalLM(model_config("tiny_llama2", vocab_size=64, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, intermediate_dim=64))
    model.init_weights()
    prompts, completions = [[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 11, 12, 13]]
    L = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    rows = torch.zeros(2, L, dtype=torch.long)
    completion_ids, mask = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        rows[b, : len(p) + len(c)] = torch.tensor(p + c)
        completion_ids[b, : len(c)], mask[b, : len(c)] = torch.tensor(c), 1
    hidden = model.hidden_states(rows)
    got, entropy = completion_token_logprobs(model, hidden, completion_ids, torch.tensor([3, 2]), mask, temperature=0.7, chunk_size=2)
    log_probs = (model.logits(hidden).float() / 0.7).log_softmax(-1)
    want, want_entropy = torch.zeros(2, 4), torch.zeros(2, 4)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        for j, token in enumerate(c):
            want[b, j] = log_probs[b, len(p) + j - 1, token]
            want_entropy[b, j] = -(log_probs[b, len(p) + j - 1].exp() * log_probs[b, len(p) + j - 1]).sum()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(entropy, want_entropy.detach())
    weight = model.plain_head_weight()
    (grad,) = torch.autograd.grad(got.sum(), weight, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want.sum(), weight)
    torch.testing.assert_close(grad, want_grad)


def test_nothing_scored_still_gives_a_zero_loss_with_a_graph() -> None:
    """Every completion masked (e.g. all truncated with mask_truncated_completions): loss 0, backward works, zero gradients."""
    from lightning_tune.families import model_config
    from lightning_tune.model import CausalLM

    model = CausalLM(model_config("tiny_llama2", vocab_size=64, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, intermediate_dim=64))
    model.init_weights()
    rows = torch.tensor([[1, 5, 6, 7]])
    logprobs, _ = completion_token_logprobs(model, model.hidden_states(rows), rows[:, 2:], torch.tensor([2]), torch.zeros(1, 2))
    loss, _ = grpo_loss(logprobs, None, None, torch.zeros(1, 2), torch.ones(1))
    loss.backward()
    assert float(loss) == 0.0 and all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)
