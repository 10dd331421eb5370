"""`export`: PEFT / Hugging Face directories from any training checkpoint, equal to the model at that step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from tiny_helpers import TINY, batches
from torch.utils.data import DataLoader

from lightning_tune.callbacks import AtomicCheckpointIO
from lightning_tune.checkpoint import PEFT_PREFIX, CheckpointError, save_hf_checkpoint
from lightning_tune.export import export_command, load_recipe_from_checkpoint
from lightning_tune.model import Llama, llama2_config
from lightning_tune.modules import FullFinetune, LoRAFinetune


class RecordTrainable(pl.Callback):
    """The trainable tensors of the model after each optimiser step, keyed by the Llama's own names."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        names = {n.removeprefix("model.") for n, p in pl_module.named_parameters() if p.requires_grad}
        self.by_step[trainer.global_step] = {k: v.clone() for k, v in pl_module.model.state_dict().items() if k in names}


def train(module: pl.LightningModule, root: Path, steps: int = 3) -> RecordTrainable:
    record = RecordTrainable()
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, callbacks=[record, checkpoints], plugins=[AtomicCheckpointIO()])
    trainer.fit(module, DataLoader(batches(steps, masked_prompt=4), batch_size=None))
    return record


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random tiny Llama 2 in Hugging Face format: the run's base model."""
    torch.manual_seed(0)
    model = Llama(llama2_config("tiny_llama2", **TINY))
    model.init_weights()
    return save_hf_checkpoint(model, model.config, tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory) -> tuple[Path, RecordTrainable]:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    module = LoRAFinetune(checkpoint_dir=str(base_dir), lora_rank=4, lora_dropout=0.0, lr=1e-2, warmup_steps=0, export=False,
                          lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
    return root, train(module, root)


def tokens() -> torch.Tensor:
    return torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def test_peft_export_of_a_mid_run_checkpoint_is_that_step(lora_run, base_dir, tmp_path) -> None:
    root, record = lora_run
    out = tmp_path / "adapter"
    assert export_command(["--ckpt_path", str(root / "checkpoints" / "step=2.ckpt"), "--format", "peft", "--output", str(out)]) == 0
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert saved.keys() == record.by_step[2].keys() and saved
    for key, value in saved.items():
        assert torch.equal(value, record.by_step[2][key]), key
    assert any(not torch.equal(value, record.by_step[3][key]) for key, value in saved.items())  # step 3 is distinguishable


def test_peft_export_loads_in_peft_with_equal_logits(lora_run, base_dir, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root, _ = lora_run
    ckpt = root / "checkpoints" / "step=2.ckpt"
    out = tmp_path / "adapter"
    assert export_command(["--ckpt_path", str(ckpt), "--format", "peft", "--output", str(out)]) == 0
    ours = load_recipe_from_checkpoint(ckpt).model
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-5, atol=1e-5)
        base_logits = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(x).logits
    assert not torch.allclose(base_logits, ours(x).detach(), rtol=1e-3, atol=1e-3)  # the adapters changed something


def test_hf_export_merges_the_checkpoint(lora_run, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    root, _ = lora_run
    ckpt = root / "checkpoints" / "step=3.ckpt"
    out = tmp_path / "merged"
    assert export_command(["--ckpt_path", str(ckpt), "--format", "hf", "--output", str(out)]) == 0
    ours = load_recipe_from_checkpoint(ckpt).model
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-5, atol=1e-5)


def test_full_finetune_exports_hf_and_refuses_peft(base_dir, tmp_path) -> None:
    torch.manual_seed(0)
    record = train(FullFinetune(checkpoint_dir=str(base_dir), lr=1e-3, warmup_steps=0, export=False), tmp_path, steps=2)
    ckpt = tmp_path / "checkpoints" / "step=1.ckpt"
    assert export_command(["--ckpt_path", str(ckpt), "--format", "hf", "--output", str(tmp_path / "merged")]) == 0
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert saved.keys() == record.by_step[1].keys()
    assert all(torch.equal(saved[k], record.by_step[1][k]) for k in saved)
    with pytest.raises(CheckpointError, match="full fine-tuning checkpoint has no adapters; use --format hf"):
        export_command(["--ckpt_path", str(ckpt), "--format", "peft", "--output", str(tmp_path / "adapter")])
    assert not (tmp_path / "adapter").exists()


def test_base_checkpoint_can_be_given(lora_run, base_dir, tmp_path) -> None:
    """--checkpoint_dir replaces the run's base (e.g. the same model downloaded elsewhere)."""
    root, record = lora_run
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for file in base_dir.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    module = load_recipe_from_checkpoint(root / "checkpoints" / "step=1.ckpt", checkpoint_dir=str(moved))
    assert module.checkpoint_dir == str(moved)
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in record.by_step[1].items())


def test_bad_inputs_are_one_line(tmp_path, lora_run) -> None:
    with pytest.raises(CheckpointError, match="checkpoint file not found") as err:
        export_command(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--format", "peft", "--output", str(tmp_path / "out")])
    assert "\n" not in str(err.value)
    not_ours = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, not_ours)
    with pytest.raises(CheckpointError, match="no hyper_parameters/state_dict"):
        export_command(["--ckpt_path", str(not_ours), "--format", "hf", "--output", str(tmp_path / "out")])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system"}}, foreign)
    with pytest.raises(CheckpointError, match="not a lightning_tune recipe; refusing to import it"):
        export_command(["--ckpt_path", str(foreign), "--format", "hf", "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # jsonargparse: --format must be one of peft, hf
        export_command(["--ckpt_path", str(foreign), "--format", "gguf", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
