"""DPO (issue 19): one step against TRL's DPOTrainer, the adapters-off reference, resume, the demo, bad pairs.

The reference implementation is TRL 1.16 (`trl.DPOTrainer`, PEFT LoRA, `ref_model=None`: the
reference is the PEFT model with its adapter disabled), run offline on CPU on a tiny transformers
Llama and a word-level tokenizer; our recipe loads the same weights and the same LoRA A/B.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from hf_helpers import tiny_hf_llama, write_tiny_tokenizer  # noqa: E402
from kill_helpers import run_fit, run_fits  # noqa: E402

from lightning_tune.data import DataError, PreferenceDataModule  # noqa: E402
from lightning_tune.layers.lora import disable_adapters, lora_modules  # noqa: E402
from lightning_tune.recipes import DPOFinetune  # noqa: E402

# Pairs over the word-level tokenizer's words (w3 ... w95); completions of different lengths, so
# padding and the completion masks matter. Completions start with a space: the prompt's text is
# followed directly by the completion's (template "none").
PAIRS = [
    {"prompt": "w3 w4 w5", "chosen": " w6 w7", "rejected": " w8 w9 w10 w11"},
    {"prompt": "w12 w13", "chosen": " w14 w15 w16", "rejected": " w17"},
    {"prompt": "w20 w21 w22 w23", "chosen": " w24", "rejected": " w25 w26"},
    {"prompt": "w30", "chosen": " w31 w32 w33 w34", "rejected": " w35 w36 w37"},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random transformers Llama and its word-level tokenizer, saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("base")
    tiny_hf_llama().save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return path


def set_lora(module: DPOFinetune, seed: int = 1) -> dict[str, torch.Tensor]:
    """Nonzero A and B in every adapter (B = 0 would make policy = reference); returns them by our names."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, layer in lora_modules(module.model).items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part).weight
                weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
                values[f"{name}.{part}"] = weight.detach().clone()
    return values


def our_module(base: Path, **kwargs) -> DPOFinetune:
    module = DPOFinetune(checkpoint_dir=str(base), tokenizer_path=str(base), lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False, **kwargs)
    module.configure_model()
    return module


def our_batch(base: Path, tmp_path: Path, pairs: list[dict]) -> dict[str, torch.Tensor]:
    data = PreferenceDataModule(
        source=str(write_pairs(tmp_path / "pairs.jsonl", pairs)), tokenizer_path=str(base), template="none", max_seq_len=32, batch_size=len(pairs), shuffle=False, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def trl_step(base: Path, tmp_path: Path, lora: dict[str, torch.Tensor], beta: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """One TRL DPO step (learning rate 0) on PAIRS: its logged metrics and the LoRA gradients by our names."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    # TRL tokenizes prompt and completion apart and appends EOS; this tokenizer adds no BOS itself,
    # so it is written into the prompt: the ids are then ours, BOS + prompt + completion + EOS.
    train = datasets.Dataset.from_list([{**pair, "prompt": "<bos> " + pair["prompt"]} for pair in PAIRS])
    grads: dict[str, torch.Tensor] = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                if param.grad is not None:
                    grads[name.removeprefix("base_model.model.").replace(".default.weight", "")] = param.grad.detach().clone()

    config = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(PAIRS),
        max_steps=1,
        learning_rate=0.0,
        beta=beta,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        max_grad_norm=0.0,
        gradient_checkpointing=False,  # 0: no clipping (gradients compared raw)
        bf16=False,  # TRL defaults to bf16 autocast even on a CPU; the comparison is fp32 against fp32
    )
    # A new adapter (peft_config), so TRL's reference is the base with the adapter disabled (given an
    # existing PeftModel, TRL would copy its adapter as a "ref" adapter instead); then our A and B.
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config, callbacks=[Grab()])
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
                param.copy_(lora[name.removeprefix("base_model.model.").replace(".default.weight", "")])
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "rewards/chosen" in entry)
    return logged, grads


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_one_step_equals_trl(base: Path, tmp_path: Path, beta: float) -> None:
    """Loss, rewards/* and every LoRA gradient of one step equal TRL's DPOTrainer on the same pairs and weights.

    Tolerance: both run float32 with different but exact-in-exact-arithmetic operation orders (our
    decoder vs transformers' eager Llama, chunked vs fused head); per-token log-probs agree to a few
    ulps of their size (~1e-6 relative), the summed log-probs of <= 6 tokens and the loss / rewards
    then to ~1e-6 relative, and gradients (sums over the batch of such products) to ~1e-5 relative."""
    module = our_module(base, beta=beta)
    lora = set_lora(module)
    batch = our_batch(base, tmp_path, PAIRS)
    losses, chosen, rejected = module.pair_losses(batch)
    loss_sum, pairs = module.loss_sum(batch)
    (loss_sum / pairs).backward()  # the base recipe's step: summed loss / the step's pairs
    logged, trl_grads = trl_step(base, tmp_path, lora, beta)

    ours = {
        "loss": losses.mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }
    assert 0 < float(ours["rewards/accuracies"]) < 1 or abs(float(ours["loss"]) - 0.6931) > 1e-3  # policy != reference: a real test
    for key, value in ours.items():
        torch.testing.assert_close(value.double(), torch.tensor(logged[key], dtype=torch.float64), rtol=1e-5, atol=1e-6, msg=key)
    our_grads = {f"{name}.{part}": getattr(layer, part).weight.grad for name, layer in lora_modules(module.model).items() for part in ("lora_A", "lora_B")}
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name, grad in our_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reference_with_adapters_off_is_the_base_model(base: Path, tmp_path: Path) -> None:
    """The reference log-probs (adapters off, no copy) equal the transformers base model's summed completion log-probs."""
    import transformers

    module = our_module(base)
    set_lora(module)
    batch = our_batch(base, tmp_path, PAIRS)
    reference = module.reference_logprobs(batch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits[:, :-1].double()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = (token * keep).sum(1)
    # fp32 logits within 1e-5 relative of transformers' (the project's bar); summed over <= 6 tokens.
    torch.testing.assert_close(reference.double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        policy = module.completion_logprobs(module.model, batch)
    assert (policy - reference).abs().max() > 1e-3  # the adapters were on outside the context
    with disable_adapters(module.model), torch.no_grad():
        assert torch.equal(module.completion_logprobs(module.model, batch), reference)


def test_identical_weights_give_ln2() -> None:
    """At LoRA init (B = 0) policy equals reference: every pair's sigmoid loss is ln 2, rewards 0."""
    from lightning_tune.training.loss import dpo_loss

    logps = torch.tensor([-3.0, -7.5])
    losses, chosen, rejected = dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), 0.6931471805599453))
    assert torch.equal(chosen, torch.zeros(2)) and torch.equal(rejected, torch.zeros(2))


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


DEMO_ARGS = [
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--model.model_args", "{vocab_size: 512, num_layers: 2, embed_dim: 64, num_heads: 4, num_kv_heads: 2, intermediate_dim: 128}",
    "--model.lora_rank", "4", "--data.batch_size", "8", "--data.max_seq_len", "48",
]  # fmt: skip


def test_cpu_demo_accuracy_rises(tmp_path: Path) -> None:
    """tiny_dpo.yaml, shrunk: rewards/accuracies is 0 at the first step (policy = reference) and high after 20 steps;
    the LoRA exports are written."""
    root = tmp_path / "run"
    run_fit(["fit", "--config", "tiny_dpo.yaml", "--trainer.max_steps", "20", "--trainer.default_root_dir", str(root), *DEMO_ARGS], cwd=tmp_path)
    rows = [row for row in read_metrics(root / "logs" / "version_0" / "metrics.csv") if row.get("rewards/accuracies")]
    accuracy = [float(row["rewards/accuracies"]) for row in rows]
    assert len(accuracy) == 20
    assert accuracy[0] == 0.0 and float(rows[0]["rewards/margins"]) == 0.0
    assert sum(accuracy[-5:]) / 5 >= 0.6, accuracy  # 8 pairs a step: each step is coarse (0.625, 0.75, ...); chance would be ~0.5
    assert all(float(row["tokens_per_s"]) > 0 and float(row["peak_memory_gib"]) > 0 for row in rows)
    assert (root / "adapter" / "adapter_model.safetensors").is_file() and (root / "merged" / "config.json").is_file()


@pytest.mark.slow  # a whole run in subprocesses (kill and resume, several processes, a notebook)
def test_killed_and_resumed_dpo_run_equals_uninterrupted(tmp_path: Path) -> None:
    """Killed (SIGKILL) after step 3 and resumed with --ckpt_path last: the same per-step losses and rewards and adapter."""
    from safetensors.torch import load_file

    def args(root: Path, *extra: str) -> list[str]:
        return [
            "fit", "--config", "tiny_dpo.yaml", "--trainer.max_steps", "6", "--trainer.default_root_dir", str(root), *DEMO_ARGS,
            "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(root), "--trainer.logger.name", "logs", "--trainer.logger.flush_logs_every_n_steps", "1",
            "--trainer.callbacks", "ModelCheckpoint", "--trainer.callbacks.dirpath", str(root / "checkpoints"),
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_last", "true", *extra,
        ]  # fmt: skip

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_fits(
        ([*args(straight), "--trainer.logger.version", "run"], False),
        ([*args(broken), "--trainer.logger.version", "a", "--trainer.callbacks+", "kill_helpers.KillAtStep", "--trainer.callbacks.step", "3"], True),
        cwd=tmp_path,
    )
    run_fit([*args(broken), "--trainer.logger.version", "b", "--ckpt_path", "last"], cwd=tmp_path)
    keys = ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies")

    def steps(root: Path, version: str) -> dict[int, tuple[str, ...]]:
        return {int(row["step"]): tuple(row[k] for k in keys) for row in read_metrics(root / "logs" / version / "metrics.csv") if row.get("train_loss")}

    expected = steps(straight, "run")
    assert sorted(expected) == list(range(6))
    first, after = steps(broken, "a"), steps(broken, "b")
    assert sorted(first) == [0, 1, 2] and sorted(after) == [3, 4, 5]
    assert {**first, **after} == expected
    want, got = load_file(straight / "adapter" / "adapter_model.safetensors"), load_file(broken / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    "pair, message",
    [
        ({"prompt": "w3", "chosen": " w4"}, r"record 1 \(counting from 0\): 'rejected' is missing"),
        ({"prompt": "w3", "chosen": None, "rejected": " w4"}, r"record 1 \(counting from 0\): 'chosen' is missing"),
        ({"prompt": "w3", "chosen": " w4 w5", "rejected": " w4 w5"}, r"record 1 \(counting from 0\): 'chosen' and 'rejected' are identical"),
        ({"prompt": " ".join(f"w{i}" for i in range(3, 40)), "chosen": " w4", "rejected": " w5"}, r"record 1 \(counting from 0\): the prompt fills all max_seq_len=16"),
    ],
    ids=["no-rejected", "no-chosen", "identical", "long-prompt"],
)
def test_bad_pair_is_one_line_naming_the_record(base: Path, tmp_path: Path, pair: dict, message: str) -> None:
    path = write_pairs(tmp_path / "bad.jsonl", [PAIRS[0], pair])
    data = PreferenceDataModule(source=str(path), tokenizer_path=str(base), max_seq_len=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message) as error:
        data.setup("fit")
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_conversational_pairs_mask_the_prompt_and_train_the_reply(tmp_path: Path) -> None:
    """TRL's conversational format (prompt a message list, chosen/rejected one assistant message each) through the
    chat template: one row per side, the prompt masked, the reply and its end-of-turn token trained."""
    from lightning_tune.data.conversation import encode_conversation

    pairs = [
        {"prompt": [{"role": "user", "content": "Add 2 and 3."}], "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "I do not know."}]},
        {"prompt": [{"role": "user", "content": "Repeat red."}], "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]},
    ]
    from lightning_tune.data.base import DEMO_TOKENIZER

    data = PreferenceDataModule(
        source=str(write_pairs(tmp_path / "chat.jsonl", pairs)),
        tokenizer_path=str(DEMO_TOKENIZER),
        chat_template="llama2",
        max_seq_len=64,
        batch_size=2,
        shuffle=False,
        cache_dir=str(tmp_path / "cache"),
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4  # [chosen 0, chosen 1, rejected 0, rejected 1]
    for row, (pair, side) in enumerate([(pairs[0], "chosen"), (pairs[1], "chosen"), (pairs[0], "rejected"), (pairs[1], "rejected")]):
        want = encode_conversation(data.tokenizer, [*pair["prompt"], *pair[side]], _llama2(), 64, "completion")
        n = len(want["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == want["input_ids"]
        assert batch["labels"][row, :n].tolist() == want["labels"]
        assert want["labels"][: len(want["labels"]) // 2].count(-100) > 0 and any(label != -100 for label in want["labels"])


def _llama2() -> str:
    from lightning_tune.tokenizer.chat_template import resolve_template

    return resolve_template("llama2", None)[0]


def test_loss_options_are_checked() -> None:
    with pytest.raises(ValueError, match="label_smoothing: only loss_type robust uses it"):
        DPOFinetune(model_name="tiny_llama2", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta: must be > 0"):
        DPOFinetune(model_name="tiny_llama2", beta=0)


def test_full_dpo_step_equals_trl_with_a_reference_copy(base: Path, tmp_path: Path) -> None:
    """Full DPO: the reference is a frozen copy of the starting model. One step from a policy that has
    moved away from it (every weight perturbed) gives TRL's loss, rewards and every weight's gradient,
    TRL given the same policy and `ref_model` the unperturbed base. Tolerances as for LoRA above."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    module = our_module(base, method="full")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # after configure_model: the reference copy keeps the base's weights
        for param in module.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    policy_state = {name: p.detach().clone() for name, p in module.model.state_dict().items()}
    batch = our_batch(base, tmp_path, PAIRS)
    losses, chosen, rejected = module.pair_losses(batch)
    loss_sum, pairs = module.loss_sum(batch)
    (loss_sum / pairs).backward()

    policy = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    policy.load_state_dict(policy_state, strict=False)  # a tied head is one tensor in both
    reference = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    grads: dict[str, torch.Tensor] = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})

    config = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), max_steps=1, learning_rate=0.0, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, max_grad_norm=0.0, gradient_checkpointing=False, bf16=False,
    )  # fmt: skip
    train = datasets.Dataset.from_list([{**pair, "prompt": "<bos> " + pair["prompt"]} for pair in PAIRS])
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=train, processing_class=transformers.AutoTokenizer.from_pretrained(base), callbacks=[Grab()])
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "rewards/chosen" in entry)

    assert abs(float(losses.mean()) - 0.6931) > 1e-3  # the policy differs from the reference: a real test
    for key, value in {"loss": losses.mean(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean()}.items():
        torch.testing.assert_close(value.double(), torch.tensor(logged[key], dtype=torch.float64), rtol=1e-5, atol=1e-6, msg=key)
    ours = {name: p.grad for name, p in module.model.named_parameters() if p.grad is not None}
    assert ours.keys() <= grads.keys() and len(ours) > 10
    for name, grad in ours.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


TINY_SHAPE = {"vocab_size": 512, "num_layers": 2, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 128}


def fit_demo_dpo(tmp_path: Path, steps: int = 4, ckpt_path: Path | None = None, **kwargs) -> tuple[DPOFinetune, list[tuple[float, ...]]]:
    """DPO on the demo pairs in file order (4 pairs a batch, 4 held out), in process, a checkpoint
    every 2 steps in tmp_path/checkpoints; each step's logged (train_loss, rewards/chosen,
    rewards/rejected), then the validation loss after step 4."""
    import lightning

    torch.manual_seed(0)
    module = DPOFinetune(model_name="tiny_llama2", model_args=TINY_SHAPE, export=False, lr=1e-3, warmup_steps=0, lora_rank=4, lora_dropout=0.0, **kwargs)
    data = PreferenceDataModule(source="demo", batch_size=4, max_seq_len=48, shuffle=False, val_size=4, cache_dir=str(tmp_path / "cache"))
    logged: list[tuple[float, ...]] = []

    class Grab(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(tuple(float(trainer.callback_metrics[k]) for k in ("train_loss", "rewards/chosen", "rewards/rejected")))

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                logged.append((float(trainer.callback_metrics["val_loss"]),))

    every_2 = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    trainer = lightning.Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        default_root_dir=str(tmp_path / "run"), val_check_interval=4, callbacks=[Grab(), every_2],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, logged


@pytest.mark.parametrize("method", ["full", "lora"])
def test_precomputed_reference_trains_as_the_reference_model(tmp_path: Path, method: str) -> None:
    """precompute_reference: the same losses, rewards and validation loss as the per-batch reference
    (same batches: file order), full DPO holds no frozen copy, and a run resumed from a checkpoint
    (the scores travel in it: the resumed model is no longer the starting one) continues the same."""
    plain, expected = fit_demo_dpo(tmp_path / "plain", method=method)
    module, got = fit_demo_dpo(tmp_path / "pre", method=method, precompute_reference=True)
    assert len(got) == 5 and got == expected  # 4 steps, then the validation loss
    assert abs(got[3][1] - got[3][2]) > 1e-4  # the policy moved: rewards differ, a real comparison
    assert (plain.reference.copy is not None, module.reference.copy is not None) == ((True, False) if method == "full" else (False, False))
    assert plain.keeps_reference_copy == (method == "full") and not module.keeps_reference_copy
    table = module.reference.table
    assert table.shape == (400, 2) and not table.isnan().any()  # every demo pair, training and held out

    step_2 = tmp_path / "pre" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert torch.equal(torch.load(step_2, weights_only=True)["dpo_reference_logprobs"], table)
    _, after = fit_demo_dpo(tmp_path / "resumed", ckpt_path=step_2, method=method, precompute_reference=True)
    assert after == expected[2:]

    # A checkpoint of a run without precomputed scores: its model is not the starting one any more.
    with pytest.raises(ValueError, match="the checkpoint holds no precomputed reference"):
        fit_demo_dpo(tmp_path / "refused", ckpt_path=tmp_path / "plain" / "checkpoints" / "epoch=0-step=2.ckpt", method=method, precompute_reference=True)


def test_precomputed_reference_refuses_a_pair_it_has_not_scored() -> None:
    module = DPOFinetune(model_name="tiny_llama2", model_args=TINY_SHAPE, method="full", precompute_reference=True)
    with pytest.raises(ValueError, match="none is computed yet"):
        module.reference_logprobs({"pair_index": torch.tensor([0])})
    module.reference.table = torch.tensor([[-1.0, -2.0], [float("nan"), float("nan")], [-3.0, -4.0]])
    assert module.reference_logprobs({"pair_index": torch.tensor([2, 0])}).tolist() == [-3.0, -1.0, -4.0, -2.0]
    for unknown in ([1], [3]):
        with pytest.raises(ValueError, match="the data changed"):
            module.reference_logprobs({"pair_index": torch.tensor(unknown)})
    with pytest.raises(ValueError, match="carry no pair_index"):
        module.reference_logprobs({})


def test_memory_estimate_counts_both_rows_of_a_pair_and_the_reference_copy() -> None:
    """validate: a DPO batch of B pairs is 2B rows; full DPO holds a frozen copy unless precomputed."""
    from lightning_tune.cli.validate import check
    from lightning_tune.training.memory import estimate_memory

    lora = check(["--config", "tiny_dpo.yaml"])
    assert lora.settings["batch_size"] == 2 * lora.data.batch_size
    rows = estimate_memory(lora.model.model_config(), lora.model.adapt_model, **{**lora.settings, "batch_size": lora.data.batch_size})
    assert lora.estimate.activations > 1.9 * rows.activations  # twice the rows (less the fixed part)
    full = check(["--config", "tiny_dpo.yaml", "--model.init_args.method=full"])
    precomputed = check(["--config", "tiny_dpo.yaml", "--model.init_args.method=full", "--model.init_args.precompute_reference=true"])
    parameters = full.estimate.parameters
    assert full.estimate.weights - precomputed.estimate.weights == parameters * 4  # fp32: the copy's every parameter


def test_dpo_refuses_data_that_is_not_preference_pairs() -> None:
    """#29: DPO on a ChatDataModule trained silently on single samples. The check runs in `setup` (a plain
    Trainer) and in the CLI before anything is written (tests/cli/test_bad_input.py)."""
    from lightning_tune.data import ChatDataModule, InstructDataModule, PreferenceDataModule
    from lightning_tune.recipes import DPOFinetune, LoRAFinetune

    dpo = DPOFinetune(model_name="tiny_llama2", model_args={"vocab_size": 512})
    for data in (ChatDataModule(source="demo"), InstructDataModule(source="demo")):
        with pytest.raises(ValueError, match=rf"^data: DPOFinetune trains on the batches of lightning_tune.PreferenceDataModule; {type(data).__name__} gives other ones"):
            dpo.check_data_module(data)
    dpo.check_data_module(PreferenceDataModule(source="demo"))
    LoRAFinetune(model_name="tiny_llama2", model_args={"vocab_size": 512}).check_data_module(ChatDataModule(source="demo"))  # SFT takes any
