"""The recipes: loss normalisation under gradient accumulation, LoRA checkpoints, validation errors."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tune.recipes import DPOFinetune, FullFinetune, LoRAFinetune

TINY = {"vocab_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "intermediate_dim": 48, "max_seq_len": 64}


def sample(length: int, prompt: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (length,), generator=g)
    labels = ids.clone()
    labels[:prompt] = -100
    return {"input_ids": ids, "labels": labels}


def pad(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        labels[i, : len(s["labels"])] = s["labels"]
    return {"input_ids": ids, "labels": labels}


# Very different numbers of trained tokens per micro-batch: a mean of per-micro-batch means
# would weight the 2 short samples' tokens far more than the 2 long ones'.
SAMPLES = [sample(6, 4, 0), sample(5, 3, 1), sample(30, 2, 2), sample(28, 4, 3)]


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


def captured_grads(recipe_cls, batches, accumulate: int, **recipe_kwargs) -> dict[str, torch.Tensor]:
    class Capture(recipe_cls):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    module = Capture(model_name="tiny_llama2", model_args=TINY, export=False, **recipe_kwargs)
    trainer(accumulate_grad_batches=accumulate).fit(module, DataLoader(batches, batch_size=None))
    return module.grads


@pytest.mark.parametrize("recipe_cls,kwargs", [(FullFinetune, {}), (LoRAFinetune, {"lora_dropout": 0.0})])
def test_accumulated_gradient_equals_one_big_batch(recipe_cls, kwargs):
    big = captured_grads(recipe_cls, [pad(SAMPLES)], accumulate=1, **kwargs)
    accumulated = captured_grads(recipe_cls, [pad(SAMPLES[:2]), pad(SAMPLES[2:])], accumulate=2, **kwargs)
    assert big.keys() == accumulated.keys() and big
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-7, msg=name)


class GradientsSeenByACallback(pl.Callback):
    """A user's callback reading the gradients where Lightning users log gradient norms."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_callbacks_see_the_gradients_the_optimiser_steps_with():
    """Lightning runs callbacks' on_before_optimizer_step before the module's; the per-token scaling runs
    first anyway (issue 29: a callback saw gradients times the step's token count), with accumulation."""
    batches = [pad(SAMPLES[:2]), pad(SAMPLES[2:])]
    seen = GradientsSeenByACallback()
    torch.manual_seed(0)
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, export=False, lora_dropout=0.0)
    trainer(accumulate_grad_batches=2, callbacks=[seen]).fit(module, DataLoader(batches, batch_size=None))
    want = captured_grads(LoRAFinetune, batches, accumulate=2, lora_dropout=0.0)
    assert seen.grads.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(seen.grads[name], want[name], rtol=1e-6, atol=0, msg=name)
    tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    assert tokens > 2  # unscaled gradients would differ from these by this factor over accumulate_grad_batches


def test_naive_mean_of_means_would_differ():
    """Guard that the test above can fail: the two micro-batches carry very different token counts."""
    tokens = [int((pad(SAMPLES[:2])["labels"][:, 1:] != -100).sum()), int((pad(SAMPLES[2:])["labels"][:, 1:] != -100).sum())]
    assert max(tokens) > 5 * min(tokens)


def test_lora_checkpoint_holds_only_adapters(tmp_path):
    torch.manual_seed(0)
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, export=False)
    t = trainer(default_root_dir=tmp_path, enable_checkpointing=True, max_steps=2)
    t.fit(module, DataLoader([pad(SAMPLES[:2]), pad(SAMPLES[2:])], batch_size=None))
    path = tmp_path / "saved.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert set(state) == {n for n, p in module.named_parameters() if p.requires_grad}


def test_lora_targets_and_trainable_count():
    torch.manual_seed(0)
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, lora_rank=4, lora_attn_modules=["q", "v"], apply_lora_to_mlp=True)
    module.configure_model()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # per layer: q (32->32) and v (32->16) plus gate/up (32->48) and down (48->32), each r*(in+out)
    per_layer = 4 * ((32 + 32) + (32 + 16) + 2 * (32 + 48) + (48 + 32))
    assert trainable == 2 * per_layer


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lora_rank": 0}, "lora_rank: must be a positive integer, got 0"),
        ({"lora_attn_modules": ["query"]}, "unknown module 'query'"),
        ({"lora_dropout": 1.5}, "lora_dropout: must be in [0, 1)"),
        ({"lr": -1.0}, "lr: must be > 0"),
        ({"model_name": "llama3"}, "model_name: unknown model 'llama3'"),
        ({"checkpoint_dir": "/no/such/dir"}, "checkpoint_dir: checkpoint directory '/no/such/dir' does not exist"),
        ({"tokenizer_path": "/no/such.model"}, "tokenizer_path: tokenizer file '/no/such.model' does not exist"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        LoRAFinetune(**{"model_name": "tiny_llama2", **kwargs})
    assert message in str(err.value)


@pytest.mark.parametrize("recipe_cls", [LoRAFinetune, FullFinetune, DPOFinetune])
def test_saved_hyperparameters_hold_every_parameter(recipe_cls):
    """The recipes pass the base's parameters on with **kwargs: saved hyper-parameters still hold all of
    them, defaults included, exactly as jsonargparse (--help, --print_config) resolves the signature."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    resolved = {p.name: p.default for p in get_signature_parameters(recipe_cls, "__init__")}
    assert {"model_name", "lr", "betas", "optimizer", "lr_schedule", "compile"} <= resolved.keys()
    del resolved["model"]  # the deprecated spelling of model_name: read, never saved
    module = recipe_cls(model_name="tiny_llama2", weight_decay=0.5)
    assert dict(module.hparams) == {**resolved, "model_name": "tiny_llama2", "weight_decay": 0.5}


# The `model:` section `--print_config` shows for the shipped tiny configs, parameter by parameter and in order:
# as before the recipes delegated to a tuning (recipes/tuning.py) and DPO came off LoRAFinetune.
BASE_PRINTED = ["model_name", "model_args", "checkpoint_dir", "optimizer", "optimizer_args"]
BASE_PRINTED_AFTER_LR = ["weight_decay", "betas", "lr_schedule", "warmup_steps", "min_lr_ratio", "activation_checkpointing", "export", "loss_chunk_size", "compile", "model"]
LORA_PRINTED = ["lora_rank", "lora_alpha", "lora_dropout", "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "apply_lora_to_experts", "quantize_base", "use_dora"]
PRINTED_MODEL = {
    "tiny_lora.yaml": ("lightning_tune.LoRAFinetune", [*LORA_PRINTED, *BASE_PRINTED, "lr", *BASE_PRINTED_AFTER_LR]),
    "tiny_full.yaml": ("lightning_tune.FullFinetune", ["lr", "betas", *BASE_PRINTED, "weight_decay", *BASE_PRINTED_AFTER_LR[2:]]),
    "tiny_dpo.yaml": ("lightning_tune.DPOFinetune", ["method", "beta", "loss_type", "label_smoothing", "lr", "precompute_reference", *LORA_PRINTED, *BASE_PRINTED, *BASE_PRINTED_AFTER_LR]),
}


@pytest.mark.parametrize("config", sorted(PRINTED_MODEL))
def test_print_config_shows_the_same_model_parameters(config):
    import yaml

    from lightning_tune.cli.parser import print_config

    printed = yaml.safe_load(print_config(["--config", config]))["model"]
    assert (printed["class_path"], list(printed["init_args"])) == PRINTED_MODEL[config]


def test_dpo_takes_lora_finetunes_arguments_as_they_are():
    """DPOFinetune declares LoRAFinetune's lora_* arguments itself (it is no LoRAFinetune): the same
    names, types, defaults and --help text, and both build the same LoRA from them."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    def lora_parameters(cls):
        return [(p.name, p.annotation, p.default, p.doc) for p in get_signature_parameters(cls, "__init__") if p.name in LORA_PRINTED]

    assert lora_parameters(DPOFinetune) == lora_parameters(LoRAFinetune) and len(lora_parameters(LoRAFinetune)) == len(LORA_PRINTED)
    settings = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_attn_modules=["q", "k"], apply_lora_to_mlp=True, use_dora=True)
    dpo, sft = DPOFinetune(model_name="tiny_llama2", **settings).tuning, LoRAFinetune(model_name="tiny_llama2", **settings).tuning
    assert vars(dpo) == vars(sft) and sft.targets == ["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match="lora_rank: must be a positive integer"):
        DPOFinetune(model_name="tiny_llama2", method="full", lora_rank=0)  # checked whatever the method, as before
    assert DPOFinetune(model_name="tiny_llama2", method="full").tuning.frozen_base is False


def test_full_finetune_keeps_its_own_defaults():
    module = FullFinetune(model_name="tiny_llama2")
    assert (module.lr, module.betas) == (2e-5, (0.9, 0.95))
    assert (module.hparams["lr"], module.hparams["betas"]) == (2e-5, (0.9, 0.95))


def test_model_or_checkpoint_required():
    with pytest.raises(ValueError, match="model_name: give a model size"):
        FullFinetune()


def test_old_model_spelling_still_works_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="lightning_tune.recipes.base"):
        module = LoRAFinetune(model="tiny_llama2", model_args=TINY)
    assert module.model_name == "tiny_llama2" and module.model is None
    assert module.hparams["model_name"] == "tiny_llama2" and "model" not in module.hparams
    assert [r.getMessage() for r in caplog.records] == ["model: is deprecated, write model_name: tiny_llama2 (the size's name; the module is self.model)"]
    with pytest.raises(ValueError, match="model: is the old name of model_name"):
        LoRAFinetune(model="tiny_llama2", model_name="llama2_7b")


def test_max_seq_len_beyond_the_context_is_refused_when_built(tmp_path):
    """Named size: its config; checkpoint: its config.json. Nothing is built or loaded."""
    with pytest.raises(ValueError, match=r"max_seq_len: 65 exceeds the model's context length 64 \(tiny_llama2\)"):
        LoRAFinetune(model_name="tiny_llama2", model_args=TINY, max_seq_len=65)
    LoRAFinetune(model_name="tiny_llama2", model_args=TINY, max_seq_len=64)
    from lightning_tune.checkpoint import save_hf_checkpoint
    from lightning_tune.model import Llama, llama2_config

    model = Llama(llama2_config("tiny_llama2", **TINY))
    save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()  # the check reads config.json only
    with pytest.raises(ValueError, match="max_seq_len: 100 exceeds the model's context length 64"):
        FullFinetune(checkpoint_dir=str(tmp_path / "hf"), max_seq_len=100)


def test_validate_refuses_a_too_long_max_seq_len_like_fit(tmp_path, capsys):
    from lightning_tune.cli import main

    for verb in ("validate", "fit"):
        assert main([verb, "--config", "tiny_lora.yaml", "--data.max_seq_len", "2048", "--trainer.default_root_dir", str(tmp_path / verb)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == ["error: max_seq_len: 2048 exceeds the model's context length 1024 (tiny_llama2); lower data.max_seq_len"], verb
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def rank4_checkpoint(tmp_path_factory):
    """A LoRA checkpoint (rank 4, alpha 16, q/v) after one step."""
    root = tmp_path_factory.mktemp("rank4")
    torch.manual_seed(0)
    t = trainer(default_root_dir=root, max_steps=1)
    t.fit(LoRAFinetune(**LORA4), DataLoader([pad(SAMPLES[:2])], batch_size=None))
    t.save_checkpoint(root / "rank4.ckpt")
    return root / "rank4.ckpt"


LORA4 = dict(model_name="tiny_llama2", model_args=TINY, export=False, lora_rank=4, lora_dropout=0.0)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lora_rank": 8}, "lora_rank 4 in the checkpoint, 8 here"),  # was: a size mismatch traceback
        ({"lora_attn_modules": ["q_proj", "k_proj"]}, "lora_attn_modules ['q_proj', 'v_proj'] in the checkpoint, ['k_proj', 'q_proj'] here"),
        ({"apply_lora_to_mlp": True, "lora_alpha": 8.0}, "lora_alpha 16.0 in the checkpoint, 8.0 here; apply_lora_to_mlp False in the checkpoint, True here"),
        ({"model_args": {**TINY, "num_layers": 1}}, "model_args {"),
        ({"use_dora": True}, "use_dora False in the checkpoint, True here"),  # DoRA adds magnitude vectors
    ],
)
def test_resume_with_other_lora_settings_is_refused_in_one_line(rank4_checkpoint, tmp_path, change, message):
    from lightning_tune.recipes.base import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError) as err:
        trainer(default_root_dir=tmp_path, max_steps=2).fit(LoRAFinetune(**{**LORA4, **change}), DataLoader([pad(SAMPLES[2:])], batch_size=None), ckpt_path=rank4_checkpoint)
    text = str(err.value)
    assert text.startswith("checkpoint: saved with other settings than this run: ") and message in text and "\n" not in text


def test_resume_with_the_same_lora_settings_in_other_words_passes(rank4_checkpoint, tmp_path):
    same = LoRAFinetune(**{**LORA4, "lora_attn_modules": ["v", "q"]})  # Meta's names, another order: the same targets
    t = trainer(default_root_dir=tmp_path, max_steps=2)
    t.fit(same, DataLoader([pad(SAMPLES[2:])], batch_size=None), ckpt_path=rank4_checkpoint)
    assert t.global_step == 2
