"""`import-config torchtune`: torchtune 0.6.1's own shipped configs (from its wheel, a test-only dependency)
translate into configs `validate` accepts, or are refused in one line saying why; each rule is pinned on a
config written here; the verb writes only its own files."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import yaml

from lightning_tune.cli import main
from lightning_tune.cli.torchtune_config import TranslationError, read_torchtune_config, recipe_from_file_name, translate
from lightning_tune.families import SIZES


def torchtune_configs() -> Path:
    try:
        folder = Path(importlib.metadata.distribution("torchtune").locate_file("recipes/configs"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchtune is not installed (pip install torchtune==0.6.1 'torchao<0.18')")
    if not folder.is_dir():
        pytest.skip(f"{folder}: torchtune's wheel without its recipes/configs")
    return folder


def shipped() -> list[tuple[str, str]]:
    """(recipe, config file) for every config torchtune's recipe registry lists."""
    registry = pytest.importorskip("torchtune._recipe_registry")
    return [(recipe.name, config.file_path) for recipe in registry.get_all_recipes() for config in recipe.configs]


def test_every_shipped_config_translates_or_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = torchtune_configs()
    translated, refused = [], []
    for recipe, file in shipped():
        path = folder / file
        if not path.is_file():  # the registry lists a dev config the wheel does not ship
            continue
        try:
            result = translate(read_torchtune_config(path), recipe)
        except TranslationError as error:
            assert "\n" not in str(error)
            refused.append((file, str(error)))
            continue
        config = yaml.safe_load(result.to_yaml(str(path)))
        assert config["model"]["init_args"]["model_name"] in SIZES
        assert config["model"]["class_path"] in ("lightning_tune.LoRAFinetune", "lightning_tune.FullFinetune", "lightning_tune.DPOFinetune")
        assert all("\n" not in note for note in result.notes)
        translated.append(file)
    # What a torchtune user finds: every LoRA/full/DPO config of the families we support translates ...
    for file in (
        "llama2/7B_lora_single_device.yaml",
        "llama3/8B_lora_single_device.yaml",
        "llama3_1/8B_full_single_device.yaml",
        "llama3_1/8B_lora_dpo_single_device.yaml",
        "llama3_3/70B_qlora.yaml",
        "qwen2/7B_lora.yaml",
        "qwen2_5/7B_lora.yaml",
        "mistral/7B_full.yaml",
        "code_llama2/7B_lora_single_device.yaml",
        "gemma2/9B_lora_single_device.yaml",
        "phi3/mini_lora.yaml",
    ):
        assert file in translated, file
    assert len(translated) >= 100, len(translated)  # 108 of torchtune 0.6.1's configs
    # ... and the others say why: not a fine-tuning/DPO recipe, or a model without a size here yet.
    reasons = ("is not a recipe lightning_tune translates", "is not a size lightning_tune supports yet", "has no equivalent size here", "no `_component_` model builder")
    for file, message in refused:
        assert any(reason in message for reason in reasons), (file, message)


@pytest.mark.parametrize(
    ("file", "recipe", "expected"),
    [
        ("llama2/7B_lora_single_device.yaml", "LoRAFinetune", {"model_name": "llama2_7b"}),
        ("llama3_1/8B_full_single_device.yaml", "FullFinetune", {"model_name": "llama3_1_8b"}),
        ("llama3_2/1B_qlora_single_device.yaml", "LoRAFinetune", {"quantize_base": "nf4"}),
        ("llama3_1/8B_lora_dpo_single_device.yaml", "DPOFinetune", {"method": "lora"}),
        ("qwen2_5/7B_lora.yaml", "LoRAFinetune", {"model_name": "qwen2_5_7b"}),
    ],
)
def test_translated_configs_pass_validate(file: str, recipe: str, expected: dict, tmp_path: Path) -> None:
    """The weights are absent: validate reports the missing checkpoint directory and nothing else, and estimates memory."""
    from lightning_tune.cli.validate import check

    source = torchtune_configs() / file
    out = tmp_path / "translated.yaml"
    assert main(["import-config", "torchtune", str(source), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"# Translated from the torchtune config {source}")
    config = yaml.safe_load(text)
    assert config["model"]["class_path"] == f"lightning_tune.{recipe}"
    assert expected.items() <= config["model"]["init_args"].items()
    result = check(["--config", str(out)])
    assert [p for p in result.problems if "does not exist" not in p] == []
    assert result.estimate.total > 0


TORCHTUNE_CONFIG = """
output_dir: /tmp/torchtune/run
model:
  _component_: torchtune.models.llama3_2.qlora_llama3_2_1b
  lora_attn_modules: ['q_proj', 'v_proj', 'output_proj']
  apply_lora_to_mlp: True
  lora_rank: 16
  lora_alpha: 32
  lora_dropout: 0.0
  use_dora: True
tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: /data/Llama-3.2-1B/original/tokenizer.model
  max_seq_len: 2048
  prompt_template: null
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: /data/Llama-3.2-1B/
  checkpoint_files: [model.safetensors]
  recipe_checkpoint: null
  output_dir: ${output_dir}
  model_type: LLAMA3_2
dataset:
  _component_: torchtune.datasets.chat_dataset
  source: json
  conversation_column: dialogue
  conversation_style: sharegpt
  packed: True
  new_system_prompt: Be brief.
seed: 7
shuffle: False
batch_size: 8
optimizer:
  _component_: bitsandbytes.optim.PagedAdamW8bit
  lr: 2e-4
  betas: [0.9, 0.95]
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 20
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
epochs: 3
max_steps_per_epoch: 50
gradient_accumulation_steps: 4
clip_grad_norm: 1.0
compile: True
device: cuda
dtype: bf16
enable_activation_checkpointing: False
enable_activation_offloading: True
optimizer_in_bwd: False
metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
  log_dir: ${output_dir}/logs
log_every_n_steps: 5
"""


def test_each_rule_on_one_config(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(TORCHTUNE_CONFIG)
    result = translate(read_torchtune_config(path), "lora_finetune_distributed")
    trainer, model, data = (result.config[key] for key in ("trainer", "model", "data"))
    assert model["class_path"] == "lightning_tune.LoRAFinetune"
    assert model["init_args"] == {
        "model_name": "llama3_2_1b",
        "quantize_base": "nf4",  # a qlora_ builder
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "apply_lora_to_mlp": True,
        "use_dora": True,
        "lora_attn_modules": ["q_proj", "v_proj", "o_proj"],  # torchtune's output_proj is the HF o_proj
        "checkpoint_dir": "/data/Llama-3.2-1B/",
        "optimizer": "bitsandbytes.optim.PagedAdamW8bit",
        "lr": 2e-4,
        "betas": [0.9, 0.95],
        "lr_schedule": "cosine",
        "warmup_steps": 20,
        "compile": True,
        "activation_checkpointing": False,
    }
    assert trainer == {
        "accelerator": "auto",
        "devices": "auto",  # a distributed recipe: every GPU, sharded with FSDP2 as torchtune's
        "default_root_dir": "/tmp/torchtune/run",  # ${output_dir} resolved
        "accumulate_grad_batches": 4,
        "max_epochs": 3,
        "limit_train_batches": 200,  # 50 optimiser steps of 4 batches each
        "gradient_clip_val": 1.0,
        "precision": "bf16-true",
        "strategy": "fsdp2",
        "log_every_n_steps": 5,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}},
        "callbacks": trainer["callbacks"],
    }
    assert data == {
        "class_path": "lightning_tune.ChatDataModule",
        "init_args": {
            "max_seq_len": 2048,
            "source": "json",
            "train_on": "assistant",
            "column_map": {"messages": "dialogue", "role": "from", "content": "value"},
            "pack": True,
            "shuffle": False,
            "batch_size": 8,
        },
    }
    assert result.config["seed_everything"] == 7
    notes = "\n".join(result.notes)
    for key in ("dataset.new_system_prompt", "enable_activation_offloading", "optimizer_in_bwd", "tokenizer.path", "checkpointer.checkpoint_files"):
        assert key in notes, key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"_component_": "torchtune.models.gemma.lora_gemma_2b"}}, "model: torchtune's lora_gemma_2b (gemma_2b) is not a size lightning_tune supports yet"),
        ({"dataset": [{"_component_": "torchtune.datasets.alpaca_dataset"}, {"_component_": "torchtune.datasets.slimorca_dataset"}]}, "dataset: a list of 2 data sets"),
        ({"dataset": {"_component_": "torchtune.datasets.text_completion_dataset"}}, "dataset: torchtune's text_completion_dataset has no data module here"),
        ({"loss": {"_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"}}, "loss: torchtune's ForwardKLWithChunkedOutputLoss has no recipe here"),
        ({"dtype": "fp16"}, "dtype: 'fp16'; expected bf16 or fp32"),
        ({"output_dir": "${nowhere}"}, "${nowhere} names no key of the config"),
    ],
)
def test_what_cannot_be_translated_is_one_line(change: dict, message: str, tmp_path: Path) -> None:
    config = {**yaml.safe_load(TORCHTUNE_CONFIG), **change}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(TranslationError) as error:
        translate(read_torchtune_config(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_recipe_from_the_file_name() -> None:
    assert recipe_from_file_name("8B_lora_single_device") == "lora_finetune_single_device"
    assert recipe_from_file_name("7B_full_low_memory") == "full_finetune_single_device"
    assert recipe_from_file_name("8B_lora_dpo") == "lora_dpo_distributed"
    assert recipe_from_file_name("70B_full") == "full_finetune_distributed"
    assert recipe_from_file_name("evaluation") is None


def test_the_verb_writes_only_its_own_files(tmp_path: Path, capsys) -> None:
    source = tmp_path / "8B_lora_single_device.yaml"
    source.write_text(TORCHTUNE_CONFIG)
    out = tmp_path / "ours.yaml"
    assert main(["import-config", "torchtune", str(source), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: enable_activation_offloading" in err and f"wrote {out} (lora_finetune_single_device)" in err
    assert main(["import-config", "torchtune", str(source), "-o", str(out)]) == 0  # our own file: replaced
    mine = tmp_path / "mine.yaml"
    mine.write_text("trainer: {max_steps: 5}\n")
    assert main(["import-config", "torchtune", str(source), "-o", str(mine)]) == 2
    assert "exists and was not written by import-config" in capsys.readouterr().err
    assert mine.read_text() == "trainer: {max_steps: 5}\n"
    assert main(["import-config", "axolotl", str(source)]) == 2
    assert "tool: 'axolotl'; expected one of torchtune" in capsys.readouterr().err
    assert main(["import-config", "torchtune", str(source)]) == 0
    assert capsys.readouterr().out.startswith("# Translated from the torchtune config")


def test_a_shipped_config_by_its_name(tmp_path: Path, capsys) -> None:
    torchtune_configs()
    out = tmp_path / "out.yaml"
    assert main(["import-config", "torchtune", "llama3_1/8B_lora_single_device", "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["model"]["init_args"]["model_name"] == "llama3_1_8b"
    for name in ("llama3_1/no_such_config", "../../no_such_folder/x"):  # no file there; never outside recipes/configs
        assert main(["import-config", "torchtune", name]) == 2
        assert "is neither a file nor a config torchtune ships" in capsys.readouterr().err
