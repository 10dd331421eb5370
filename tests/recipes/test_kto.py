"""KTO (issue 33): one step against TRL 1.16's `KTOTrainer` (kto with its KL estimate from mismatched rows,
and apo_zero_unpaired; LoRA with the adapters-off reference, full with a frozen copy), fp32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from hf_helpers import tiny_hf_llama, write_tiny_tokenizer  # noqa: E402
from preference_helpers import PAIRS, assert_close_grads, assert_close_metrics, lora_grads, set_lora, trl_step, write_jsonl  # noqa: E402

from lightning_tune.data import UnpairedDataModule  # noqa: E402
from lightning_tune.recipes import KTOFinetune  # noqa: E402

# The pairs unpaired (chosen: desirable, rejected: not), in an order that mixes the labels.
RECORDS = [
    {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"} for p, side in zip([*PAIRS, *PAIRS[:2]], ["chosen", "rejected", "rejected", "chosen", "chosen", "rejected"], strict=True)
]
METRICS = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_hf_llama().save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


@pytest.mark.parametrize(
    "method, loss_type, weights",
    [("lora", "kto", (1.0, 1.5)), ("lora", "apo_zero_unpaired", (1.0, 1.0)), ("full", "kto", (1.33, 1.0))],
    ids=["lora-kto", "lora-apo-zero", "full-kto"],
)
def test_one_step_equals_trl(base: Path, tmp_path: Path, method: str, loss_type: str, weights: tuple[float, float]) -> None:
    """Loss, TRL's kl, rewards/* and logps/* and every trainable gradient equal KTOTrainer's on the same
    records in order (its KL rows rotate completions by one within the batch, as our collate does).

    Tolerance as for DPO: float32 both, different operation orders; per-token log-probs agree to ~1e-6
    relative, the summed ones, log-ratios and loss to the same, gradients to ~1e-5. Not computed: TRL's
    entropy and logits/* (they need every vocabulary logit of every completion token)."""
    from trl import KTOConfig, KTOTrainer

    module = KTOFinetune(
        checkpoint_dir=str(base), tokenizer_path=str(base), method=method, beta=0.5, loss_type=loss_type, desirable_weight=weights[0], undesirable_weight=weights[1],
        lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False,
    )  # fmt: skip
    module.configure_model()
    lora, policy_state = None, None
    if method == "lora":
        lora = set_lora(module.model)
    else:  # move the policy away from its reference copy (the copy keeps the base)
        generator = torch.Generator().manual_seed(2)  # a seed whose KL estimate is > 0 (not clamped)
        with torch.no_grad():
            for param in module.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        policy_state = {name: p.detach().clone() for name, p in module.model.state_dict().items()}
    data = UnpairedDataModule(
        source=str(write_jsonl(tmp_path / "records.jsonl", RECORDS)), tokenizer_path=str(base), max_seq_len=32, batch_size=len(RECORDS), shuffle=False, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        losses, sums, kl = module.sample_losses(batch)
    loss_sum, count = module.loss_sum(batch)
    (loss_sum / count).backward()  # the base recipe's step: summed loss / the step's samples
    # TRL appends EOS to a completion's text: written here as a word of its own, since this word-level
    # tokenizer would read "w7<eos>" as one unknown word.
    trl_records = [{**r, "completion": r["completion"] + " <eos>"} for r in RECORDS]
    logged, trl_grads = trl_step(
        KTOTrainer, KTOConfig, trl_records, base, tmp_path, lora, "rewards/chosen", policy_state=policy_state,
        beta=0.5, loss_type=loss_type, desirable_weight=weights[0], undesirable_weight=weights[1],
    )  # fmt: skip

    desirable = batch["label"]
    ours = {
        "loss": losses.mean(), "kl": kl,
        "rewards/chosen": sums["rewards/chosen"] / desirable.sum(), "logps/chosen": sums["logps/chosen"] / desirable.sum(),
        "rewards/rejected": sums["rewards/rejected"] / (~desirable).sum(), "logps/rejected": sums["logps/rejected"] / (~desirable).sum(),
    }  # fmt: skip
    ours["rewards/margins"] = ours["rewards/chosen"] - ours["rewards/rejected"]
    assert desirable.tolist() == [r["label"] for r in RECORDS]
    assert (float(kl) > 1e-3) == (loss_type == "kto")  # the KL estimate is real (and unused by APO-zero)
    assert_close_metrics(ours, logged)
    grads = lora_grads(module.model) if method == "lora" else {name: p.grad for name, p in module.model.named_parameters()}
    assert len(grads) >= (8 if method == "lora" else 20)
    assert_close_grads(grads, trl_grads)


def test_kto_loss_formulas() -> None:
    """kto: desirable 1 - sigmoid(beta (r - z)), undesirable 1 - sigmoid(beta (z - r)), weighted; apo-zero: z unused."""
    from lightning_tune.training.loss import kto_loss

    r, desirable, z = torch.tensor([0.5, -1.0]), torch.tensor([True, False]), torch.tensor(0.2)
    kto = kto_loss(r, desirable, z, beta=2.0, desirable_weight=1.5, undesirable_weight=0.5)
    torch.testing.assert_close(kto, torch.stack([1.5 * (1 - torch.sigmoid(2.0 * (r[0] - z))), 0.5 * (1 - torch.sigmoid(2.0 * (z - r[1])))]))
    apo = kto_loss(r, desirable, z, beta=2.0, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(apo, torch.stack([1 - torch.sigmoid(2.0 * r[0]), torch.sigmoid(2.0 * r[1])]))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="beta: must be > 0"):
        KTOFinetune(model_name="tiny_llama2", beta=0)
    with pytest.raises(ValueError, match="undesirable_weight: must be > 0"):
        KTOFinetune(model_name="tiny_llama2", undesirable_weight=0)
    from lightning_tune.data import PreferenceDataModule

    with pytest.raises(ValueError, match="KTOFinetune trains on the batches of lightning_tune.UnpairedDataModule"):
        KTOFinetune(model_name="tiny_llama2", model_args={"vocab_size": 512}).check_data_module(PreferenceDataModule(source="demo"))


TINY_SHAPE = {"vocab_size": 512, "num_layers": 2, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 128}


def fit_demo_kto(tmp_path: Path, cache: Path, ckpt_path: Path | None = None) -> list[tuple[str, ...]]:
    """Full KTO on the demo records (shuffled, 4 a batch), 4 steps, a checkpoint every 2: each step's logged
    train_loss, kl, rewards/chosen and rewards/rejected, as their repr (NaN: a batch with no record of a side)."""
    import lightning

    torch.manual_seed(0)
    module = KTOFinetune(model_name="tiny_llama2", model_args=TINY_SHAPE, method="full", export=False, lr=1e-3, warmup_steps=0)
    data = UnpairedDataModule(source="demo", batch_size=4, max_seq_len=48, cache_dir=str(cache))
    logged: list[tuple[str, ...]] = []

    class Grab(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(tuple(repr(float(trainer.callback_metrics[k])) for k in ("train_loss", "kl", "rewards/chosen", "rewards/rejected")))

    every_2 = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    trainer = lightning.Trainer(
        max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), callbacks=[Grab(), every_2]
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return logged


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    """Resumed from step 2's checkpoint, full KTO logs the same steps 3 and 4 as the run that went on: the same
    batches (the resumable sampler), weights, optimiser state, and reference (the frozen copy is the starting
    model again, rebuilt before the checkpoint's weights load)."""
    expected = fit_demo_kto(tmp_path / "straight", tmp_path / "cache")
    assert len(expected) == 4 and float(expected[3][1]) > 0 and expected[3][2] != expected[1][2]  # the policy moved; a real KL estimate
    resumed = fit_demo_kto(tmp_path / "resumed", tmp_path / "cache", ckpt_path=tmp_path / "straight" / "checkpoints" / "epoch=0-step=2.ckpt")
    assert resumed == expected[2:]
