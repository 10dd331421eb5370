"""ORPO (issue 33): one step against TRL 1.16's `trl.experimental.orpo.ORPOTrainer`, LoRA and full, fp32.

TRL runs offline on CPU on a tiny transformers Llama and a word-level tokenizer; our recipe loads the same
weights (and, for LoRA, the same A and B). Its NLL trains the chosen rows' whole text (prompt included).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from hf_helpers import tiny_hf_llama, write_tiny_tokenizer  # noqa: E402
from preference_helpers import PAIRS, assert_close_grads, assert_close_metrics, lora_grads, set_lora, trl_step, write_jsonl  # noqa: E402

from lightning_tune.data import PreferenceDataModule  # noqa: E402
from lightning_tune.recipes import ORPOFinetune  # noqa: E402
from lightning_tune.recipes.orpo import whole_text_labels  # noqa: E402

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_hf_llama().save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def pair_batch(base: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    data = PreferenceDataModule(
        source=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)), tokenizer_path=str(base), max_seq_len=32, batch_size=len(PAIRS), shuffle=False, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_step_equals_trl(base: Path, tmp_path: Path, method: str) -> None:
    """Loss, every TRL metric but logits/* and every trainable gradient equal ORPOTrainer's (beta 0.5).

    Tolerance: float32 both, different operation orders (our decoder vs transformers' eager Llama, the
    head at labelled positions only); per-token log-probs agree to ~1e-6 relative, the averages, NLL and
    loss to the same, gradients (sums over the batch of such products) to ~1e-5 relative.
    logits/chosen and logits/rejected are compared on unpadded pairs (test_logits_metrics_equal_trl_on_unpadded_pairs):
    TRL's means include the padding positions, which it computes under an attention mask and we without."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    module = ORPOFinetune(checkpoint_dir=str(base), tokenizer_path=str(base), method=method, beta=0.5, lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False)
    module.configure_model()
    lora = set_lora(module.model) if method == "lora" else None
    batch = pair_batch(base, tmp_path)
    with torch.no_grad():
        loss, metrics = module.pair_loss(batch)
    loss_sum, pairs = module.loss_sum(batch)
    (loss_sum / pairs).backward()  # the base recipe's step: summed loss / the step's pairs
    logged, trl_grads = trl_step(ORPOTrainer, ORPOConfig, PAIRS, base, tmp_path, lora, "log_odds_ratio", beta=0.5)

    assert abs(float(metrics["rewards/margins"])) > 1e-3 and float(metrics["log_odds_ratio"]) < -0.1  # both terms matter: a real comparison
    assert_close_metrics({"loss": loss, **{key: metrics[key] for key in METRICS}}, logged)
    ours = lora_grads(module.model) if method == "lora" else {name: p.grad for name, p in module.model.named_parameters()}
    assert len(ours) >= (8 if method == "lora" else 20)
    assert_close_grads(ours, trl_grads)


def test_whole_text_labels_train_the_prompt_but_not_the_padding() -> None:
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    labels = torch.tensor([[-100, -100, 6, 7, 2, -100], [-100, -100, -100, 2, -100, -100]])
    assert whole_text_labels(ids, labels).tolist() == [[1, 5, 6, 7, 2, -100], [1, 8, 9, 2, -100, -100]]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="beta: must be > 0"):
        ORPOFinetune(model_name="tiny_llama2", beta=0)
    with pytest.raises(ValueError, match="method: full trains every weight"):
        ORPOFinetune(model_name="tiny_llama2", method="full", use_dora=True)
    from lightning_tune.data import ChatDataModule

    with pytest.raises(ValueError, match="ORPOFinetune trains on the batches of lightning_tune.PreferenceDataModule"):
        ORPOFinetune(model_name="tiny_llama2", model_args={"vocab_size": 512}).check_data_module(ChatDataModule(source="demo"))


@pytest.mark.parametrize("recipe", ["ORPOFinetune", "SimPOFinetune", "KTOFinetune", "RewardModel"])
def test_takes_lora_finetunes_arguments_as_they_are(recipe: str) -> None:
    """The preference recipes beside DPO declare LoRAFinetune's lora_* arguments themselves: the same names,
    types, defaults and --help text (so a DPO config's LoRA block works unchanged), and they build the same LoRA."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    import lightning_tune
    from lightning_tune.recipes import LoRAFinetune

    names = ("lora_rank", "lora_alpha", "lora_dropout", "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "quantize_base", "use_dora")
    cls = getattr(lightning_tune, recipe)

    def lora_parameters(cls):
        return [(p.name, p.annotation, p.default, p.doc) for p in get_signature_parameters(cls, "__init__") if p.name in names]

    assert lora_parameters(cls) == lora_parameters(LoRAFinetune) and len(lora_parameters(cls)) == len(names)
    ours = cls(model_name="tiny_llama2", lora_rank=4, lora_alpha=8.0, lora_attn_modules=["q", "k"], apply_lora_to_mlp=True).tuning
    theirs = LoRAFinetune(model_name="tiny_llama2", lora_rank=4, lora_alpha=8.0, lora_attn_modules=["q", "k"], apply_lora_to_mlp=True).tuning
    assert vars(ours) == vars(theirs)


def test_logits_metrics_equal_trl_on_unpadded_pairs(base: Path, tmp_path: Path) -> None:
    """logits/chosen and logits/rejected equal ORPOTrainer's where no row is padded (TRL's means include the
    padding positions, which it computes under an attention mask). Tolerance: each is a mean of ~1e4 float32
    logits of size ~0.1 summed in another order (h . sum_v W_v), so absolute ~1e-6 x their scale."""
    from preference_helpers import UNPADDED_PAIRS
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    module = ORPOFinetune(checkpoint_dir=str(base), tokenizer_path=str(base), beta=0.5, lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False)
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
    logged, _ = trl_step(ORPOTrainer, ORPOConfig, UNPADDED_PAIRS, base, tmp_path, lora, "log_odds_ratio", beta=0.5)
    assert_close_metrics({key: metrics[key] for key in ("logits/chosen", "logits/rejected")}, logged, rtol=1e-5, atol=1e-5 * scale)
