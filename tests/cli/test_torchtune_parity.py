"""`import-config torchtune`, checked against torchtune 0.6.1 itself (a test-only dependency): torchtune's
own recipe classes (`recipes/lora_finetune_single_device.py`, `full_finetune_single_device.py`), driven
in-process on a CPU with its shipped Llama 2 configs (the 7B builder swapped for the same builder at tiny
dims, a tiny Hugging Face checkpoint read by its FullModelHFCheckpointer, a local Alpaca-style JSON), and
our recipe built from the translation of that same config. The batches must be the same ids, and the
first step's loss and gradients the same numbers.

Tolerance: both sides run the same fp32 arithmetic (2 layers of 64 dims, a 512-token softmax, means
over ~120 tokens) in different kernel orders (torchtune's attention and RoPE layout versus ours), so
they differ by rounding only: a few ulps (fp32 eps 1.2e-7) per op through ~20 chained ops, i.e.
~1e-6 relative at most; 1e-5 (the project's fp32 bound) leaves a 10x margin while a real semantic
difference (one token more or less in the mean, a shifted label, a missed template line) moves the
loss by >1e-3. Gradients are compared norm-wise (their small entries have no relative precision).
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_tune.cli.torchtune_config import translate
from lightning_tune.data.base import ASSETS

TINY = {"vocab_size": 512, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "max_seq_len": 256, "intermediate_dim": 128}
RECORDS = [
    {"instruction": "Say hello to the world", "input": "", "output": "Hello world, how are you"},
    {"instruction": "Add the numbers", "input": "two and three", "output": "five"},
    {"instruction": "Name a colour", "input": "", "output": "Blue is a colour"},
    {"instruction": "Repeat", "input": "x y", "output": "x y"},
]
TOLERANCE = 1e-5
# After optimiser steps: Adam scales each element's update to ~lr whatever its gradient's size, so an
# element whose gradient is a near-cancelling sum (relative rounding error up to ~1e-3) carries that
# error into its update at full weight; norm-wise this measures up to 7e-5 here. A semantic error is
# far above: the wrong betas (0.95, our FullFinetune default) move every weight by >= 2.4e-3, a wrong
# schedule or token weighting by more. 5e-4 sits between, ~7x above the noise and ~5x below the signal.
STEP_TOLERANCE = 5e-4


def torchtune_site() -> Path:
    """Where torchtune's wheel put its `recipes/` (scripts and configs); skips without torchtune."""
    try:
        site = Path(importlib.metadata.distribution("torchtune").locate_file(""))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchtune is not installed (pip install torchtune==0.6.1 'torchao<0.18')")
    if not (site / "recipes" / "lora_finetune_single_device.py").is_file():
        pytest.skip("torchtune's wheel without its recipes/")
    return site


def import_recipe(site: Path, name: str) -> types.ModuleType:
    """torchtune's recipe script `name`.py as a module (its recipes/ folder refuses a package import).

    torchtune 0.6.1's `torchtune.training` imports QAT helpers (`int4_weight_only`, ...) that newer
    torchao releases renamed; the parity runs never quantise, so that one module is replaced by a stub
    with the single function `torchtune.training` takes from it (`get_quantizer_mode`, None: no QAT)."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    if not hasattr(torchao_quantization, "int4_weight_only") and "torchtune.training" not in sys.modules:
        stub = types.ModuleType("torchtune.training.quantization")
        stub.get_quantizer_mode = lambda quantizer: None
        sys.modules["torchtune.training.quantization"] = stub
    spec = importlib.util.spec_from_file_location(f"torchtune_recipe_{name}", site / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama 2 in Hugging Face format (vocab = the demo SentencePiece model's 512), and
    Alpaca records as a local JSON file."""
    import transformers

    root = tmp_path_factory.mktemp("torchtune_parity")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=TINY["vocab_size"],
        hidden_size=TINY["embed_dim"],
        intermediate_size=TINY["intermediate_dim"],
        num_hidden_layers=TINY["num_layers"],
        num_attention_heads=TINY["num_heads"],
        num_key_value_heads=TINY["num_kv_heads"],
        max_position_embeddings=TINY["max_seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so a missing or misplaced norm shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    model.save_pretrained(root / "hf")
    (root / "alpaca.json").write_text(json.dumps(RECORDS))
    return {"root": root, "checkpoint": root / "hf", "data": root / "alpaca.json", "tokenizer": Path(ASSETS) / "demo_tokenizer.model"}


def shipped_config(site: Path, file: str) -> dict[str, Any]:
    from omegaconf import OmegaConf  # torchtune's own reader (YAML 1.2 floats such as 3e-4)

    return OmegaConf.to_container(OmegaConf.load(site / "recipes" / "configs" / file))


def runnable(shipped: dict[str, Any], tiny: dict[str, Path], name: str, **dataset: Any) -> dict[str, Any]:
    """The shipped config, made runnable here: the same builders at tiny size and local files, CPU,
    fp32, a fixed seed, no shuffle; torchtune's own features that need CUDA off. Only settings a
    torchtune user edits in their copy of the config."""
    config = copy.deepcopy(shipped)
    out = str(tiny["root"] / name)
    config["output_dir"] = out
    builder = config["model"]["_component_"].removesuffix("_7b")  # torchtune.models.llama2.llama2 / lora_llama2
    config["model"] = {**config["model"], "_component_": builder, **TINY}
    # prompt_template: null, else llama2_tokenizer wraps the Alpaca prompt in [INST] ... [/INST] (the translation notes it)
    config["tokenizer"].update(path=str(tiny["tokenizer"]), max_seq_len=128, prompt_template=None)
    config["checkpointer"].update(checkpoint_dir=str(tiny["checkpoint"]), checkpoint_files=["model.safetensors"], output_dir=out)
    config["dataset"] = {**config["dataset"], "source": "json", "data_files": str(tiny["data"]), "split": "train", **dataset}
    config["optimizer"] = {"_component_": "torch.optim.AdamW", "lr": float(config["optimizer"]["lr"])}
    config["metric_logger"] = {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": out + "/logs"}
    config.update(device="cpu", dtype="fp32", seed=0, shuffle=False, enable_activation_checkpointing=False, enable_activation_offloading=False)
    config.update(log_peak_memory_stats=False, optimizer_in_bwd=False)
    return config


def torchtune_first_step(recipe_class: type, config: dict[str, Any]) -> tuple[dict, float, dict[str, torch.Tensor], torch.nn.Module]:
    """torchtune's first batch, the loss its train loop computes on it (`_loss_step`: mean over the
    batch's trained tokens, which is what it logs with gradient_accumulation_steps 1), and the gradients."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    recipe = recipe_class(cfg)
    recipe.setup(cfg)
    batch = next(iter(recipe._dataloader))
    ids = {"tokens": batch["tokens"].clone(), "labels": batch["labels"].clone()}
    loss = recipe._loss_step(batch)
    loss.backward()
    grads = {name: p.grad for name, p in recipe._model.named_parameters() if p.grad is not None}
    return ids, loss.item(), grads, recipe._model


def ours_first_step(translated: dict[str, Any], checkpoint: Path, adapters: dict[str, torch.Tensor] | None = None) -> tuple[dict, Any, float]:
    """Our data module and recipe from the translated config (the size swapped for the tiny
    checkpoint_dir, as torchtune's builder was swapped for its tiny dims): first batch, module, loss."""

    def build(spec: dict[str, Any], **override: Any) -> Any:
        module, name = spec["class_path"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**{**spec["init_args"], **override})

    data = build(translated["data"], cache_dir=str(checkpoint.parent / "cache"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = build(translated["model"], model_name=None, checkpoint_dir=str(checkpoint))
    module.configure_model()
    if adapters:  # torchtune's random lora_a (lora_b starts at zero on both sides)
        own = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in adapters.items():
                own["model." + name.removeprefix("base_model.model.")].copy_(value)
    loss_sum, tokens = module.loss_sum(batch)
    (loss_sum / tokens).backward()
    return batch, module, (loss_sum / tokens).item()


def assert_same_batch(theirs: dict, ours: dict) -> None:
    assert ours["input_ids"].tolist() == theirs["tokens"].tolist()
    # torchtune pads labels with -100 and shifts in its loss step; ours are aligned to input_ids too
    assert ours["labels"].tolist() == theirs["labels"].tolist()


def assert_close_normwise(ours: torch.Tensor, theirs: torch.Tensor, name: str, tolerance: float = TOLERANCE) -> None:
    error = (ours - theirs).norm() / theirs.norm()
    assert theirs.norm() > 0 and error <= tolerance, (name, error.item())


def test_lora_config_first_step_equals_torchtune(tiny: dict[str, Path]) -> None:
    """llama2/7B_lora_single_device.yaml (q, v, output_proj and the MLP adapted, rank 8, alpha 16, Alpaca
    with torchtune's train_on_input default True, unpacked): same batch, loss and LoRA gradients."""
    site = torchtune_site()
    from torchtune.models.convert_weights import tune_to_peft_adapter_weights

    recipe = import_recipe(site, "lora_finetune_single_device")
    shipped = shipped_config(site, "llama2/7B_lora_single_device.yaml")
    config = runnable(shipped, tiny, "lora")
    theirs, their_loss, their_grads, their_model = torchtune_first_step(recipe.LoRAFinetuneRecipeSingleDevice, config)

    translation = translate({**config, "model": shipped["model"]}, "lora_finetune_single_device")  # the 7B builder: translated to its size
    assert translation.config["model"]["init_args"]["model_name"] == "llama2_7b"
    assert translation.config["data"]["init_args"]["source"] == str(tiny["data"])
    shape = {"num_heads": TINY["num_heads"], "num_kv_heads": TINY["num_kv_heads"], "dim": TINY["embed_dim"]}
    lora_a = {k: v for k, v in their_model.state_dict().items() if ".lora_a." in k}
    adapters = tune_to_peft_adapter_weights(lora_a, **shape)
    ours, module, our_loss = ours_first_step(translation.config, tiny["checkpoint"], adapters)

    assert_same_batch(theirs, ours)
    assert abs(our_loss - their_loss) <= TOLERANCE * their_loss, (our_loss, their_loss)
    # their gradients in PEFT's names and row order (q/k rows permuted from torchtune's RoPE layout)
    expected = tune_to_peft_adapter_weights({k: v for k, v in their_grads.items() if ".lora_b." in k}, **shape)
    own = dict(module.named_parameters())
    assert len(expected) == 2 * (3 + 3)  # 2 layers x (q, v, o + gate, up, down)
    for name, grad in expected.items():
        assert_close_normwise(own["model." + name.removeprefix("base_model.model.")].grad, grad, name)


def test_full_config_first_step_equals_torchtune(tiny: dict[str, Path]) -> None:
    """llama2/7B_full_low_memory.yaml (the full_finetune_single_device recipe) with train_on_input: false
    (the prompt masked): same batch, loss and the gradients of every weight."""
    site = torchtune_site()
    from torchtune.models.convert_weights import tune_to_hf

    recipe = import_recipe(site, "full_finetune_single_device")
    shipped = shipped_config(site, "llama2/7B_full_low_memory.yaml")
    config = runnable(shipped, tiny, "full", train_on_input=False)
    theirs, their_loss, their_grads, _ = torchtune_first_step(recipe.FullFinetuneRecipeSingleDevice, config)

    translation = translate({**config, "model": shipped["model"]}, "full_finetune_single_device")
    assert translation.config["model"]["class_path"] == "lightning_tune.FullFinetune"
    assert translation.config["data"]["init_args"]["train_on_input"] is False
    ours, module, our_loss = ours_first_step(translation.config, tiny["checkpoint"])

    assert_same_batch(theirs, ours)
    assert (ours["labels"] == -100).sum() > (ours["input_ids"] == 0).sum()  # the prompts are masked
    assert abs(our_loss - their_loss) <= TOLERANCE * their_loss, (our_loss, their_loss)
    expected = tune_to_hf(their_grads, num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"])
    own = dict(module.named_parameters())
    assert set(expected) == {name.removeprefix("model.") for name in own}
    for name, grad in expected.items():
        assert_close_normwise(own["model." + name].grad, grad, name)


def test_llama2_tokenizer_default_template_and_local_files_translate() -> None:
    """Two rules the parity runs found: torchtune's `source: json, data_files: F` is our `source: F`, and
    llama2_tokenizer (and mistral_tokenizer) without prompt_template wrap prompts in [INST] ... [/INST], which is noted."""
    config = {
        "model": {"_component_": "torchtune.models.llama2.lora_llama2_7b", "lora_attn_modules": ["q_proj"], "lora_rank": 8, "lora_alpha": 16},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer", "path": "/t/tokenizer.model", "max_seq_len": 64},
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json", "data_files": ["/d/a.json"], "split": "train"},
    }
    result = translate(config)
    assert result.config["data"]["init_args"]["source"] == "/d/a.json"
    assert not any("data_files" in note for note in result.notes)
    assert any(note.startswith("tokenizer.prompt_template: absent") and "[INST]" in note for note in result.notes)
    config["tokenizer"]["prompt_template"] = None
    assert not any("prompt_template" in note for note in translate(config).notes)
    del config["tokenizer"]["prompt_template"]
    config["tokenizer"]["_component_"] = "torchtune.models.qwen2_5.qwen2_5_tokenizer"  # no template by default
    assert not any("prompt_template" in note for note in translate(config).notes)


@pytest.mark.parametrize("train_on_input", [True, False])
def test_alpaca_samples_equal_torchtunes_and_truncation_differs_only_in_eos(tiny: dict[str, Path], train_on_input: bool) -> None:
    """Sample by sample, torchtune's alpaca_dataset (llama2_tokenizer, prompt_template null) and the
    translated InstructDataModule give the same ids and labels; cut at max_seq_len, torchtune replaces
    the last kept token with EOS (and trains it) where ours keeps the token: the one difference, noted
    by the translation."""
    torchtune_site()
    from torchtune.datasets import alpaca_dataset
    from torchtune.models.llama2 import llama2_tokenizer

    for max_seq_len in (128, 40):
        tokenizer = llama2_tokenizer(str(tiny["tokenizer"]), max_seq_len=max_seq_len, prompt_template=None)
        theirs = alpaca_dataset(tokenizer, source="json", data_files=str(tiny["data"]), split="train", train_on_input=train_on_input)
        config = {
            "model": {"_component_": "torchtune.models.llama2.llama2_7b"},
            "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer", "path": str(tiny["tokenizer"]), "max_seq_len": max_seq_len, "prompt_template": None},
            "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json", "data_files": str(tiny["data"]), "train_on_input": train_on_input},
        }
        translation = translate(config)
        assert any(note.startswith(f"tokenizer.max_seq_len: {max_seq_len}:") and "EOS" in note for note in translation.notes)
        spec = translation.config["data"]["init_args"]
        module, name = translation.config["data"]["class_path"].rsplit(".", 1)
        data = getattr(importlib.import_module(module), name)(**spec, cache_dir=str(tiny["root"] / f"cache_{max_seq_len}_{train_on_input}"))
        data.setup("fit")
        ours = data.train_dataset
        assert len(ours) == len(theirs) == len(RECORDS)
        cut = 0
        for i in range(len(RECORDS)):
            tokens, labels = theirs[i]["tokens"], theirs[i]["labels"]
            our_ids, our_labels = list(ours[i]["input_ids"]), list(ours[i]["labels"])
            if len(tokens) == max_seq_len and our_ids[-1] != tokenizer.eos_id:  # cut: torchtune's last token became EOS
                cut += 1
                assert tokens[-1] == tokenizer.eos_id and tokens[:-1] == our_ids[:-1] and labels[:-1] == our_labels[:-1]
                # trained where ours trains the cut token (cut in the response), masked in the prompt
                assert labels[-1] == (-100 if our_labels[-1] == -100 else tokenizer.eos_id)
            else:
                assert (tokens, labels) == (our_ids, our_labels)
        assert cut == (len(RECORDS) if max_seq_len == 40 else 0)  # Alpaca's preamble alone is ~35 tokens


@pytest.mark.parametrize("file", ["llama2/7B_full_low_memory.yaml", "llama3_1/8B_full_single_device.yaml", "llama3_1/8B_full.yaml", "llama3_1/8B_lora_single_device.yaml"])
def test_translated_optimizer_is_the_one_torchtune_builds(file: str) -> None:
    """torchtune builds `optimizer._component_` with the config's arguments and the class's defaults for
    the rest; the translation gives our recipe the same lr, weight_decay and betas (its own default
    betas for full fine-tuning, (0.9, 0.95), are not torchtune's), read from the class's signature."""
    import inspect

    from lightning_tune.cli.torchtune_config import read_torchtune_config

    source = torchtune_site() / "recipes" / "configs" / file
    torchtune = shipped_config(torchtune_site(), file)
    module, name = torchtune["optimizer"]["_component_"].rsplit(".", 1)
    defaults = inspect.signature(getattr(pytest.importorskip(module), name)).parameters
    translated = translate(read_torchtune_config(source), None)
    spec = translated.config["model"]
    recipe = getattr(importlib.import_module("lightning_tune"), spec["class_path"].rsplit(".", 1)[1])
    args = {}  # our defaults: the nearest __init__ in the recipe's class hierarchy that names each
    for cls in reversed(recipe.__mro__):
        params = inspect.signature(cls.__init__).parameters if "__init__" in vars(cls) else {}
        args |= {k: v.default for k, v in params.items() if k in ("lr", "betas", "weight_decay")}
    args |= spec["init_args"]
    assert tuple(args["betas"]) == tuple(defaults["betas"].default)
    assert args["weight_decay"] == float(torchtune["optimizer"].get("weight_decay", defaults["weight_decay"].default))
    assert args["lr"] == float(torchtune["optimizer"]["lr"])


def test_full_config_two_optimizer_steps_equal_torchtune(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The whole first two optimiser steps: torchtune's own train loop and Lightning's fit on the
    translation, batch size 1 and 2 batches accumulated per step (samples of unequal length: the
    accumulated gradient is the mean over all tokens of the step on both sides), max_steps_per_epoch 2
    (4 batches here), AdamW with torchtune's default betas (the second step depends on them), a cosine
    schedule without warmup (multipliers 1, then 0.5). The weights move the same.

    weight_decay 0: torchtune decays norm weights too, we do not (noted by the translation); with it
    the norms' updates would differ by lr * weight_decay * w. The deltas are compared norm-wise within
    STEP_TOLERANCE (derived at its definition)."""
    site = torchtune_site()
    import lightning as L
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import tune_to_hf

    recipe = import_recipe(site, "full_finetune_single_device")
    shipped = shipped_config(site, "llama2/7B_full_low_memory.yaml")
    config = runnable(shipped, tiny, "full_steps", train_on_input=False)
    config.update(batch_size=1, gradient_accumulation_steps=2, max_steps_per_epoch=2, epochs=1)
    config["optimizer"].update(lr=1e-3, weight_decay=0.0)
    config["lr_scheduler"]["num_warmup_steps"] = 0
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    theirs = recipe.FullFinetuneRecipeSingleDevice(cfg)
    theirs.setup(cfg)
    theirs.train()
    assert theirs.global_step == 2
    their_weights = tune_to_hf(theirs._model.state_dict(), num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"])

    translation = translate({**config, "model": shipped["model"]}, "full_finetune_single_device")
    trainer_args = translation.config["trainer"]
    assert (trainer_args["accumulate_grad_batches"], trainer_args["limit_train_batches"], trainer_args["max_epochs"]) == (2, 4, 1)

    def build(spec: dict[str, Any], **override: Any) -> Any:
        module, name = spec["class_path"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**{**spec["init_args"], **override})

    data = build(translation.config["data"], cache_dir=str(tmp_path / "cache"))
    module = build(translation.config["model"], model_name=None, checkpoint_dir=str(tiny["checkpoint"]), export=False)
    scalars = {key: trainer_args[key] for key in ("accelerator", "devices", "max_epochs", "limit_train_batches", "accumulate_grad_batches", "precision")}
    trainer = L.Trainer(**scalars, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2

    initial = load_file(tiny["checkpoint"] / "model.safetensors")
    ours = {name.removeprefix("model."): p.detach() for name, p in module.named_parameters()}
    assert set(ours) == set(their_weights) == set(initial)
    for name, start in initial.items():
        assert_close_normwise(ours[name] - start, their_weights[name] - start, name, STEP_TOLERANCE)
