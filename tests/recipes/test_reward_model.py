"""Reward model (issue 33): one step against TRL 1.16's `RewardTrainer` (LoRA with the head trained, and full;
margin and centring), fp32, and the export that transformers' `AutoModelForSequenceClassification` loads
with equal scores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from hf_helpers import tiny_hf_llama, write_tiny_tokenizer  # noqa: E402
from preference_helpers import PAIRS, assert_close_grads, assert_close_metrics, lora_grads, peft_name, set_lora, write_jsonl  # noqa: E402

from lightning_tune.data import PreferenceDataModule  # noqa: E402
from lightning_tune.model.score import last_token_positions  # noqa: E402
from lightning_tune.recipes import RewardModel  # noqa: E402

METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


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


def our_module(base: Path, method: str, **kwargs) -> RewardModel:
    module = RewardModel(checkpoint_dir=str(base), tokenizer_path=str(base), method=method, lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False, **kwargs)
    module.configure_model()
    with torch.no_grad():  # a score far from 0, so the rewards differ enough to matter
        module.head.score.weight.copy_(0.5 * torch.randn(module.head.score.weight.shape, generator=torch.Generator().manual_seed(5)))
    return module


def trl_step(base: Path, tmp_path: Path, batch: dict, module: RewardModel, lora: dict | None, **config) -> tuple[dict, dict[str, torch.Tensor]]:
    """One RewardTrainer step (learning rate 0, fp32) on our batch's ids (pre-tokenised: TRL's `chosen_ids` /
    `rejected_ids`, so both see the same tokens), the same weights and score head."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, attn_implementation="eager")
    with torch.no_grad():
        model.score.weight.copy_(module.head.score.weight)
    pairs = batch["input_ids"].shape[0] // 2
    lengths = last_token_positions(batch["input_ids"], 0) + 1  # the tokenizer's pad id is 0 and no real token is
    rows = [batch["input_ids"][i, : lengths[i]].tolist() for i in range(2 * pairs)]
    records = [{"chosen_ids": rows[i], "rejected_ids": rows[pairs + i]} for i in range(pairs)]
    if "margin" in batch:
        records = [{**r, "margin": float(m)} for r, m in zip(records, batch["margin"], strict=True)]
    grads: dict[str, torch.Tensor] = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({peft_name(name).replace("score.modules_to_save", "head.score.weight"): p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})

    args = RewardConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=pairs, max_steps=1, learning_rate=0.0, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, max_grad_norm=0.0, gradient_checkpointing=False, bf16=False, **config,
    )  # fmt: skip
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]) if lora is not None else None
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(records), processing_class=transformers.AutoTokenizer.from_pretrained(base), peft_config=peft_config, callbacks=[Grab()]
    )
    if lora is not None:
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_" in name:
                    param.copy_(lora[peft_name(name)])
    trainer.train()
    return next(entry for entry in trainer.state.log_history if "accuracy" in entry), grads


@pytest.mark.parametrize("method, margin, center", [("lora", False, None), ("full", True, 0.01)], ids=["lora", "full-margin-centred"])
def test_one_step_equals_trl(base: Path, tmp_path: Path, method: str, margin: bool, center: float | None) -> None:
    """Loss, TRL's metrics and every trainable gradient (the score head's included) equal RewardTrainer's.

    Tolerance: float32 both, different operation orders (our decoder vs transformers' eager Llama); the
    scores are one dot product of hidden states that agree to ~1e-6 relative; gradients to ~1e-5."""
    module = our_module(base, method, center_rewards_coefficient=center)
    lora = set_lora(module.model) if method == "lora" else None
    batch = pair_batch(base, tmp_path)
    if margin:
        batch["margin"] = torch.tensor([0.5, 0.0, 1.0, 0.25])
    with torch.no_grad():
        loss, metrics = module.pair_loss(batch)
    loss_sum, pairs = module.loss_sum(batch)
    (loss_sum / pairs).backward()
    logged, trl_grads = trl_step(base, tmp_path, batch, module, lora, center_rewards_coefficient=center)

    assert float(metrics["max_reward"] - metrics["min_reward"]) > 0.1 and 0 < float(metrics["accuracy"]) < 1  # a real comparison
    assert_close_metrics({"loss": loss, **{key: metrics[key] for key in METRICS}}, logged)
    ours = lora_grads(module.model) if method == "lora" else {name: p.grad for name, p in module.model.named_parameters() if p.grad is not None}
    ours["head.score.weight"] = module.head.score.weight.grad
    assert len(ours) >= (9 if method == "lora" else 20)
    assert_close_grads(ours, trl_grads if method == "lora" else {k.replace("score.weight", "head.score.weight") if k == "score.weight" else k: v for k, v in trl_grads.items()})


def test_export_loads_in_transformers_with_equal_scores(base: Path, tmp_path: Path) -> None:
    """merged/ is a LlamaForSequenceClassification directory (score.weight, no lm_head, pad_token_id) whose
    scores, adapters folded in, equal ours on a right-padded batch (tolerance: fp32, ~1e-6 relative)."""
    import transformers

    module = our_module(base, "lora")
    set_lora(module.model)
    batch = pair_batch(base, tmp_path)
    module.export_to(tmp_path / "out")
    merged = tmp_path / "out" / "merged"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id == 0 and model.config.num_labels == 1
    with torch.no_grad():
        ours = module.rewards(batch)
        theirs = model(batch["input_ids"], attention_mask=(batch["input_ids"] != 0).long()).logits.squeeze(-1)
    assert (ours.max() - ours.min()) > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not (merged / "adapter").exists() and not (tmp_path / "out" / "adapter").exists()
    # Read back by our own loader (what a GRPO reward function would use): the same scores (the adapters now
    # folded into the weights: fp32 rounding of W + sBA, ~1e-7 relative).
    from lightning_tune.checkpoint.sequence_classification import load_sequence_classification

    decoder, head = load_sequence_classification(merged)
    with torch.no_grad():
        torch.testing.assert_close(head(decoder.hidden_states(batch["input_ids"]), batch["input_ids"]), ours, rtol=1e-5, atol=1e-5)


def test_last_token_positions_follow_transformers() -> None:
    """The rightmost non-pad token; with EOS as the pad (no pad token), the token before the trailing EOS, as transformers."""
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 5, 6, 7, 8, 2]])
    assert last_token_positions(ids, 0).tolist() == [3, 5]
    assert last_token_positions(ids, 2).tolist() == [5, 4]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="apply_lora_to_output: a reward model reads its score head"):
        RewardModel(model_name="tiny_llama2", apply_lora_to_output=True)
    with pytest.raises(ValueError, match="center_rewards_coefficient: must be >= 0"):
        RewardModel(model_name="tiny_llama2", center_rewards_coefficient=-1.0)


TINY_SHAPE = {"vocab_size": 512, "num_layers": 2, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 128}


def test_fit_learns_exports_and_a_checkpoint_exports_the_same(tmp_path: Path) -> None:
    """A full reward model fit on the demo pairs (8 steps, in process): TRL's metrics are logged every step
    and the margin grows; merged/ (written at fit end) scores as our model does in transformers; `export`
    of the last checkpoint writes the same tensors; an adapter-only or GGUF export is refused in one line."""
    import csv

    import lightning
    import transformers
    from safetensors.torch import load_file

    from lightning_tune.io.files import CheckpointError
    from lightning_tune.io.gguf import GGUFError
    from lightning_tune.recipes.export import export_checkpoint, export_gguf

    torch.manual_seed(0)
    module = RewardModel(model_name="tiny_llama2", model_args=TINY_SHAPE, method="full", lr=3e-3, warmup_steps=0)
    module.hparams["_class_path"] = "lightning_tune.RewardModel"  # as LightningCLI records the recipe (export reads it)
    data = PreferenceDataModule(source="demo", batch_size=4, max_seq_len=40, cache_dir=str(tmp_path / "cache"))
    trainer = lightning.Trainer(
        max_steps=8, logger=lightning.pytorch.loggers.CSVLogger(tmp_path, name="logs"), log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    with (tmp_path / "logs" / "version_0" / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("accuracy")]
    assert len(rows) == 8 and all(row[key] for row in rows for key in ("train_loss", *METRICS))
    margins = [float(row["margin"]) for row in rows]
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.5, margins  # chosen pulled above rejected

    merged = tmp_path / "run" / "merged"
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    batch = next(iter(data.train_dataloader()))
    module.eval()
    with torch.no_grad():
        ours = module.rewards(batch)
        theirs = classifier(batch["input_ids"], attention_mask=(batch["input_ids"] != classifier.config.pad_token_id).long()).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # fp32 both; a dot product of hidden states equal to ~1e-6

    exported = export_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), "hf", str(tmp_path / "exported"))
    want, got = load_file(merged / "model.safetensors"), load_file(exported / "model.safetensors")
    assert want.keys() == got.keys() and "score.weight" in got and "lm_head.weight" not in got and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(CheckpointError, match="a reward model's adapter alone would lack its score head"):
        export_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), "peft", str(tmp_path / "peft"))
    with pytest.raises(GGUFError, match="a reward model exports as a transformers sequence classifier"):
        export_gguf(tmp_path / "model.gguf", ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
