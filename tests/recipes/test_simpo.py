"""SimPO (issue 33): one step against TRL 1.16's `trl.experimental.cpo.CPOTrainer(loss_type="simpo")`,
LoRA and full, fp32; the full case also with label smoothing and CPO's NLL term (cpo_alpha)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from hf_helpers import tiny_hf_llama, write_tiny_tokenizer  # noqa: E402
from preference_helpers import PAIRS, assert_close_grads, assert_close_metrics, lora_grads, set_lora, trl_step, write_jsonl  # noqa: E402

from lightning_tune.data import PreferenceDataModule  # noqa: E402
from lightning_tune.recipes import SimPOFinetune  # noqa: E402

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_hf_llama().save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


@pytest.mark.parametrize(
    "method, settings",
    [("lora", {"beta": 2.0, "gamma": 0.5}), ("full", {"beta": 1.0, "gamma": 0.3, "label_smoothing": 0.1, "cpo_alpha": 0.5})],
    ids=["lora-simpo", "full-cpo-simpo"],
)
def test_one_step_equals_trl(base: Path, tmp_path: Path, method: str, settings: dict) -> None:
    """Loss, every TRL metric but logits/* and every trainable gradient equal CPOTrainer(loss_type="simpo")'s.

    Tolerance as for DPO: float32 both, different operation orders; per-token log-probs agree to ~1e-6
    relative, so do their averages and the loss, gradients to ~1e-5. logits/* are compared on unpadded
    pairs (test_logits_metrics_equal_trl_on_unpadded_pairs): TRL's means include the padding positions."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    module = SimPOFinetune(checkpoint_dir=str(base), tokenizer_path=str(base), method=method, lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False, **settings)
    module.configure_model()
    lora = set_lora(module.model) if method == "lora" else None
    data = PreferenceDataModule(
        source=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)), tokenizer_path=str(base), max_seq_len=32, batch_size=len(PAIRS), shuffle=False, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        loss, metrics = module.pair_loss(batch)
    loss_sum, pairs = module.loss_sum(batch)
    (loss_sum / pairs).backward()  # the base recipe's step: summed loss / the step's pairs
    trl_settings = {"beta": settings["beta"], "simpo_gamma": settings["gamma"], "label_smoothing": settings.get("label_smoothing", 0.0), "cpo_alpha": settings.get("cpo_alpha", 0.0)}
    logged, trl_grads = trl_step(CPOTrainer, CPOConfig, PAIRS, base, tmp_path, lora, "logps/chosen", loss_type="simpo", **trl_settings)

    assert abs(float(metrics["rewards/margins"])) > 1e-3 and float(loss) > 0.1  # a real comparison
    assert_close_metrics({"loss": loss, **{key: metrics[key] for key in METRICS}}, logged)
    ours = lora_grads(module.model) if method == "lora" else {name: p.grad for name, p in module.model.named_parameters()}
    assert len(ours) >= (8 if method == "lora" else 20)
    assert_close_grads(ours, trl_grads)


def test_simpo_loss_is_the_papers_formula() -> None:
    """-log sigmoid(beta (avg_w - avg_l) - gamma), per pair (arXiv 2405.14734 eq. 6)."""
    from lightning_tune.training.loss import simpo_loss

    chosen, rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5])
    expected = -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 0.5)
    torch.testing.assert_close(simpo_loss(chosen, rejected, beta=2.0, gamma=0.5), expected)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="beta: must be > 0"):
        SimPOFinetune(model_name="tiny_llama2", beta=0)
    with pytest.raises(ValueError, match=r"label_smoothing: must be in \[0, 0.5\)"):
        SimPOFinetune(model_name="tiny_llama2", label_smoothing=0.5)
    with pytest.raises(ValueError, match="cpo_alpha: must be >= 0"):
        SimPOFinetune(model_name="tiny_llama2", cpo_alpha=-1)


def test_logits_metrics_equal_trl_on_unpadded_pairs(base: Path, tmp_path: Path) -> None:
    """logits/chosen and logits/rejected equal CPOTrainer(loss_type="simpo")'s where no row is padded (TRL's
    means include the padding positions, which it computes under an attention mask). Tolerance as for ORPO's."""
    from preference_helpers import UNPADDED_PAIRS
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    module = SimPOFinetune(checkpoint_dir=str(base), tokenizer_path=str(base), lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False)
    module.configure_model()
    lora = set_lora(module.model)
    data = PreferenceDataModule(
        source=str(write_jsonl(tmp_path / "pairs.jsonl", UNPADDED_PAIRS)), tokenizer_path=str(base), max_seq_len=32, batch_size=2, shuffle=False, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        _, metrics = module.pair_loss(batch)
        scale = float(module.model.logits(module.model.hidden_states(batch["input_ids"])).abs().mean())
    logged, _ = trl_step(CPOTrainer, CPOConfig, UNPADDED_PAIRS, base, tmp_path, lora, "logps/chosen", loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert_close_metrics({key: metrics[key] for key in ("logits/chosen", "logits/rejected")}, logged, rtol=1e-5, atol=1e-5 * scale)
