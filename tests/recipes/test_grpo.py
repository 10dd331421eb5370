"""GRPO (issue 31): one step against TRL 1.16's GRPOTrainer on the same prompts and completions, the CPU demo,
the options' checks and the reward functions' errors.

The reference implementation is TRL 1.16 (`trl.GRPOTrainer`), run offline on CPU on a tiny transformers Llama
and a word-level tokenizer. Sampling is taken out of the comparison: TRL's `rollout_func` hook returns the same
prompt ids and completions our side is given, so both score, normalise and differentiate the same tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from hf_helpers import tiny_hf_llama, write_tiny_tokenizer  # noqa: E402

from lightning_tune.generate.rollout import Rollouts  # noqa: E402
from lightning_tune.layers.lora import lora_modules  # noqa: E402
from lightning_tune.recipes import GRPOFinetune  # noqa: E402

G, MAX_COMPLETION = 4, 5
PROMPTS = ["w3 w4 w5", "w12 w13"]
ANSWERS = ["w6", ""]
# Per prompt, G completions (token ids of w<id>): ending in <eos> (2) at different lengths, or truncated at MAX_COMPLETION.
COMPLETIONS = [
    [[6, 7, 2], [8, 9, 10, 11, 12], [6, 2], [13, 14, 15, 2]],
    [[20, 2], [21, 22, 23, 24, 25], [20, 21, 2], [2]],
]


def length_reward(prompts, completions, **columns):
    """Words in the completion / 4."""
    return [len(c.split()) / 4 for c in completions]


def answer_reward(prompts, completions, answer, **columns):
    """1 when the answer word appears; None (unscorable) where there is no answer."""
    return [None if not a else float(a in c.split()) for c, a in zip(completions, answer, strict=True)]


REWARDS = [("length_reward", length_reward), ("answer_reward", answer_reward)]
WEIGHTS = [1.0, 0.5]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_hf_llama().save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def set_lora(module: GRPOFinetune, seed: int = 1) -> dict[str, torch.Tensor]:
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


def our_step(module: GRPOFinetune, base: Path) -> tuple[torch.Tensor, dict[str, float]]:
    """One step of ours on PROMPTS x COMPLETIONS: the loss and the logged metrics (gradients left in .grad)."""
    from lightning_tune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    prompt_ids = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    rollouts = Rollouts([p for p in prompt_ids for _ in range(G)], [c for group in COMPLETIONS for c in group], [c[-1] != 2 for group in COMPLETIONS for c in group])
    module._reward_funcs = REWARDS  # callables of this test (names resolution is tested below)
    batch = {"prompts": PROMPTS, "prompt_ids": prompt_ids, "columns": {"answer": ANSWERS}}
    tensors, metrics, _ = module.prepare(batch, rollouts)
    loss_sum, count, loss_metrics = module.grpo_loss_sum(tensors)
    loss = loss_sum / count  # the base recipe's step: the accumulated sum / the step's count
    loss.backward()
    return loss.detach(), {k: float(v) for k, v in {**metrics, **loss_metrics}.items()}


def trl_step(base: Path, tmp_path: Path, settings: dict, lora: dict | None, policy_state: dict | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One TRL GRPO step (learning rate 0) on the same prompt ids and completions: its logged metrics and gradients by our names."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    ids = {p: [1, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in PROMPTS}
    served = {p: 0 for p in PROMPTS}

    def rollout_func(prompts, trainer):  # TRL's hook: the prompts of the generation batch, each G times
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None}
        for p in prompts:
            out["prompt_ids"].append(ids[p])
            out["completion_ids"].append(COMPLETIONS[PROMPTS.index(p)][served[p] % G])
            served[p] += 1
        return out

    grads: dict[str, torch.Tensor] = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                if param.grad is not None:
                    grads[name.removeprefix("base_model.model.").replace(".default.weight", "")] = param.grad.detach().clone()

    model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    if policy_state is not None:
        model.load_state_dict(policy_state, strict=False)  # full: the policy moved away from the reference (read from base)
    config = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=G * len(PROMPTS), num_generations=G, max_completion_length=MAX_COMPLETION,
        learning_rate=0.0, max_steps=1, logging_steps=1, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        save_strategy="no", max_grad_norm=0.0, seed=0, reward_weights=WEIGHTS, use_bias_correction_kl=True, **settings,
    )  # fmt: skip
    train = datasets.Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS, strict=True)])
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]) if lora is not None else None
    trainer = GRPOTrainer(
        model=model, reward_funcs=[f for _, f in REWARDS], args=config, train_dataset=train, processing_class=tokenizer,
        peft_config=peft_config, rollout_func=rollout_func, callbacks=[Grab()],
    )  # fmt: skip
    if lora is not None:
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_" in name:
                    param.copy_(lora[name.removeprefix("base_model.model.").replace(".default.weight", "")])
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "reward" in entry)
    return logged, grads


CASES = {
    "lora-dapo-token-kl-eps_high": ("lora", {"loss_type": "dapo", "importance_sampling_level": "token", "beta": 0.04, "epsilon_high": 0.28, "temperature": 0.7}),
    "lora-grpo-sequence-batch": ("lora", {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.0, "scale_rewards": "batch", "temperature": 1.0}),
    "full-bnpo-kl-none": ("full", {"loss_type": "bnpo", "importance_sampling_level": "token", "beta": 0.1, "scale_rewards": "none", "temperature": 0.9}),
    "full-dr_grpo-sequence": ("full", {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "beta": 0.0, "temperature": 1.0}),
}
LOGGED = [
    "reward",
    "reward_std",
    "rewards/length_reward/mean",
    "rewards/answer_reward/mean",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/clipped_ratio",
    "entropy",
    "clip_ratio/region_mean",
]


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_trl(base: Path, tmp_path: Path, case: str) -> None:
    """Loss, TRL's logged metrics and every trainable gradient of one step equal TRL's GRPOTrainer on the same
    completions and rewards (one of them unscorable: NaN reward, advantage 0).

    Tolerance: both float32, different but exact-in-exact-arithmetic operation orders (our decoder vs
    transformers' eager Llama with left-padded prompts and shifted positions, RoPE being relative; our chunked
    head vs TRL's fused one): per-token log-probs agree to a few ulps (~1e-6 relative), the loss, a sum of ~25
    such terms times advantages of order 1, and the gradients (sums over the batch of such products) to ~1e-5
    relative; atol 1e-6 for entries that cancel to ~0."""
    method, settings = CASES[case]
    ours_settings = {"max_completion_len" if k == "max_completion_length" else k: v for k, v in settings.items()}
    module = GRPOFinetune(
        checkpoint_dir=str(base), tokenizer_path=str(base), method=method, lora_rank=4, lora_alpha=8, lora_dropout=0.0, export=False,
        num_generations=G, max_completion_len=MAX_COMPLETION, reward_funcs=["length_reward_unused.f", "answer_reward_unused.f"], reward_weights=WEIGHTS, **ours_settings,
    )  # fmt: skip
    module.configure_model()
    lora, policy_state = None, None
    if method == "lora":
        lora = set_lora(module)
    else:  # after configure_model: the reference copy keeps the base's weights
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in module.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        policy_state = {name: p.detach().clone() for name, p in module.model.state_dict().items()}
    loss, metrics = our_step(module, base)
    logged, trl_grads = trl_step(base, tmp_path, settings, lora, policy_state)

    # (on-policy grpo without KL has loss -mean(A) = 0 exactly; its gradient is what is compared then)
    torch.testing.assert_close(loss.double(), torch.tensor(logged["loss"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for key in LOGGED + (["kl"] if settings["beta"] else []):
        torch.testing.assert_close(metrics[key], logged[key], rtol=1e-5, atol=1e-6, msg=key)
    ours = {name: p.grad for name, p in module.model.named_parameters() if p.grad is not None}
    if method == "lora":
        ours = {name.replace(".weight", ""): grad for name, grad in ours.items()}
    assert ours and ours.keys() <= trl_grads.keys(), sorted(set(ours) - set(trl_grads))[:3]
    assert len(ours) == len(trl_grads) or method == "full"
    for name, grad in ours.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in ours.values()) > 1e-4


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="num_generations: must be >= 2"):
        GRPOFinetune(model_name="tiny_llama2", num_generations=1)
    with pytest.raises(ValueError, match="reward_weights: 1 weights for 2 reward_funcs"):
        GRPOFinetune(model_name="tiny_llama2", reward_funcs=["accuracy", "format"], reward_weights=[1.0])
    with pytest.raises(ValueError, match="reward_funcs: 'correct' is neither a built-in"):
        GRPOFinetune(model_name="tiny_llama2", reward_funcs=["correct"])
    with pytest.raises(ValueError, match="max_completion_len: prompts of up to"):
        GRPOFinetune(model_name="tiny_llama2", model_args={"max_seq_len": 64}, max_seq_len=60, max_completion_len=8)


def test_reward_funcs_are_imported_only_when_training_starts() -> None:
    """The constructor (which a checkpoint's hyper-parameters drive, e.g. in export) imports nothing; the
    import happens from `setup` (fit, validate: the user's config), and a bad path is one line."""
    module = GRPOFinetune(model_name="tiny_llama2", reward_funcs=["no_such_module_xyz.reward"])
    assert module._reward_funcs is None and "no_such_module_xyz" not in sys.modules
    with pytest.raises(ValueError, match="reward_funcs: cannot import 'no_such_module_xyz'"):
        module.load_reward_funcs()
    funcs = GRPOFinetune(model_name="tiny_llama2", reward_funcs=["accuracy", "lightning_tune.training.rewards.format"]).load_reward_funcs()
    assert [name for name, _ in funcs] == ["accuracy", "format"]


@pytest.mark.slow  # a whole (short) training run
def test_cpu_demo_reward_rises(tmp_path: Path) -> None:
    """tiny_grpo.yaml's model and data, 8 steps, one thread (reproducible sums): the mean reward of the sampled
    completions rises from chance (~0.02) to over 0.5 (1.0 soon after), with TRL's metric names; the LoRA
    exports are written."""
    import lightning
    import yaml

    from lightning_tune.cli.parser import CONFIG_DIR
    from lightning_tune.data import PromptDataModule

    config = yaml.safe_load((CONFIG_DIR / "tiny_grpo.yaml").read_text())
    init = config["model"]["init_args"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lightning.seed_everything(config["seed_everything"])
        module = GRPOFinetune(**{**init, "lr": float(init["lr"])})  # YAML 1.1 reads 1e-2 as text; the CLI converts it
        data = PromptDataModule(**config["data"]["init_args"], cache_dir=str(tmp_path / "cache"))
        rows: list[dict[str, float]] = []

        class Grab(lightning.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        trainer = lightning.Trainer(
            max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), callbacks=[Grab()],
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
    finally:
        torch.set_num_threads(threads)
    reward = [row["reward"] for row in rows]
    assert len(reward) == 8
    assert max(reward[:3]) < 0.1 and sum(reward[-3:]) / 3 > 0.5, [round(r, 3) for r in reward]  # chance: ~0.02
    for key in ("reward_std", "rewards/numeric/mean", "rewards/accuracy/mean", "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean", "train_loss"):
        assert key in rows[0], key
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "merged" / "config.json").is_file()


def test_num_iterations_reuses_the_sampled_batch_with_its_old_logprobs(tmp_path: Path) -> None:
    """num_iterations 2: a batch is sampled at step 0 and trained on at steps 0 and 1; its old log-probs are the
    sampling policy's, so at step 1 (after an update) the ratio is no longer 1 while the completions are the same."""
    import lightning

    from lightning_tune.data import PromptDataModule

    torch.manual_seed(0)
    module = GRPOFinetune(
        model_name="tiny_llama2", model_args={"vocab_size": 512, "num_layers": 1, "embed_dim": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_dim": 64},
        num_generations=4, max_completion_len=4, num_iterations=2, reward_funcs=["numeric"], lr=0.05, lora_dropout=0.0, export=False,
    )  # fmt: skip
    sampled, ratios = [], []
    sample = module.sample
    module.sample = lambda prompt_ids, seed: sampled.append(seed) or sample(prompt_ids, seed)
    loss_sum = module.grpo_loss_sum

    def spy(tensors):
        with torch.no_grad():
            now = module.token_logprobs(module.model, tensors)[0]
        ratios.append(float(((now - tensors["old_logprobs"]).abs() * tensors["completion_mask"]).max()))
        return loss_sum(tensors)

    module.grpo_loss_sum = spy
    module._reward_funcs = [("ids", lambda prompts, completions, completion_ids, **columns: [float(sum(ids) % 7) for ids in completion_ids])]  # varied: nonzero advantages
    data = PromptDataModule(source="demo", batch_size=2, max_seq_len=32, cache_dir=str(tmp_path / "cache"))
    trainer = lightning.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    assert len(sampled) == 1 and len(ratios) == 2
    assert ratios[0] < 1e-6 and ratios[1] > 1e-4, ratios  # step 0 on-policy; step 1 off-policy by one update


def fit_tiny(tmp_path: Path, steps: int, ckpt_path: Path | None = None) -> list[tuple[float, float]]:
    """A tiny GRPO run on the demo prompts, a checkpoint every 2 steps: each step's (reward, train_loss)."""
    import lightning

    from lightning_tune.data import PromptDataModule

    torch.manual_seed(0)
    module = GRPOFinetune(
        model_name="tiny_llama2", model_args={"vocab_size": 512, "num_layers": 1, "embed_dim": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_dim": 64},
        num_generations=4, max_completion_len=4, reward_funcs=["numeric"], lr=0.05, lora_dropout=0.0, export=False,
    )  # fmt: skip
    module._reward_funcs = [("ids", lambda prompts, completions, completion_ids, **columns: [float(sum(ids) % 7) for ids in completion_ids])]
    data = PromptDataModule(source="demo", batch_size=2, max_seq_len=32, cache_dir=str(tmp_path / "cache"))
    logged: list[tuple[float, float]] = []

    class Grab(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append((float(trainer.callback_metrics["reward"]), float(trainer.callback_metrics["train_loss"])))

    every_2 = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    trainer = lightning.Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        default_root_dir=str(tmp_path / "run"), callbacks=[Grab(), every_2],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return logged


def test_resumed_run_samples_and_trains_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """Resumed from the step-2 checkpoint, steps 2 and 3 sample the same completions (same rewards) and give the
    same losses as the run that went on: the rollout seed is a function of the step, not of a live generator."""
    straight = fit_tiny(tmp_path / "a", 4)
    resumed = fit_tiny(tmp_path / "a2", 4, ckpt_path=next((tmp_path / "a" / "checkpoints").glob("*step=2.ckpt")))
    assert len(straight) == 4 and len(resumed) == 2
    assert resumed == straight[2:], (straight, resumed)
    assert len({r for r, _ in straight}) > 1  # the steps sampled different batches
    # The checkpoint rebuilds the recipe (export, generate, eval) without importing the reward paths it names.
    from lightning_tune.checkpoint import load_training_checkpoint
    from lightning_tune.recipes.export import load_recipe_from_checkpoint

    ckpt = next((tmp_path / "a" / "checkpoints").glob("*step=2.ckpt"))
    checkpoint = load_training_checkpoint(ckpt)  # weights only, as every checkpoint is read
    checkpoint["hyper_parameters"].update(reward_funcs=["no_such_module_xyz.reward"], _class_path="lightning_tune.GRPOFinetune")  # as LightningCLI saves it
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    module = load_recipe_from_checkpoint(tmp_path / "edited.ckpt", need_base=False)
    assert isinstance(module, GRPOFinetune) and "no_such_module_xyz" not in sys.modules


def test_validate_counts_every_completion_of_a_step() -> None:
    """The memory estimate's batch is batch_size prompts x num_generations completions, each as long as the
    longest prompt plus max_completion_len (the shape GRPO trains on), not batch_size rows of max_seq_len."""
    from lightning_tune.cli.validate import check

    result = check(["--config", "grpo_qwen3_8b_lora.yaml", "--model.init_args.num_generations", "4", "--data.init_args.batch_size", "3"])
    assert result.settings["batch_size"] == 3 * 4
    assert result.settings["seq_len"] == 256 + 256  # data.max_seq_len + max_completion_len in that config
    assert [p for p in result.problems if "does not exist" not in p] == []
