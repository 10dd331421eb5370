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

from lightning_tune.checkpoint import PEFT_PREFIX, save_hf_checkpoint
from lightning_tune.cli.export import export_command
from lightning_tune.io.files import EXPORT_MANIFEST, CheckpointError
from lightning_tune.model import Llama, llama2_config
from lightning_tune.recipes import FullFinetune, LoRAFinetune
from lightning_tune.recipes.export import load_recipe_from_checkpoint
from lightning_tune.training.callbacks import AtomicCheckpointIO


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
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=[record, checkpoints], plugins=[AtomicCheckpointIO()]
    )
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
    module = LoRAFinetune(checkpoint_dir=str(base_dir), lora_rank=4, lora_dropout=0.0, lr=1e-2, warmup_steps=0, export=False, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
    return root, train(module, root)


def tokens() -> torch.Tensor:
    return torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def test_peft_export_of_a_mid_run_checkpoint_is_that_step(lora_run, base_dir, tmp_path) -> None:
    root, record = lora_run
    out = tmp_path / "adapter"
    export_command(["--ckpt_path", str(root / "checkpoints" / "step=2.ckpt"), "--format", "peft", "--output", str(out)])
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
    export_command(["--ckpt_path", str(ckpt), "--format", "peft", "--output", str(out)])
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
    export_command(["--ckpt_path", str(ckpt), "--format", "hf", "--output", str(out)])
    ours = load_recipe_from_checkpoint(ckpt).model
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-5, atol=1e-5)


def test_full_finetune_exports_hf_and_refuses_peft(base_dir, tmp_path) -> None:
    torch.manual_seed(0)
    record = train(FullFinetune(checkpoint_dir=str(base_dir), lr=1e-3, warmup_steps=0, export=False), tmp_path, steps=2)
    ckpt = tmp_path / "checkpoints" / "step=1.ckpt"
    export_command(["--ckpt_path", str(ckpt), "--format", "hf", "--output", str(tmp_path / "merged")])
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
    assert not (tmp_path / "out").exists()


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_export_never_deletes_what_it_did_not_write(lora_run, tmp_path, monkeypatch) -> None:
    """Issue 14: `--output .` or a directory holding other files was replaced whole, deleting them. Now only a new or
    empty directory, or a previous export of the same format (its manifest lists every file in it), is replaced."""
    root, _ = lora_run
    ckpt = str(root / "checkpoints" / "step=2.ckpt")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for output in (".", str(work), str(tmp_path)):  # the current directory, or one that holds it
        with pytest.raises(CheckpointError, match="is the current directory .or holds it.; an export replaces its output directory whole") as err:
            export_command(["--ckpt_path", ckpt, "--format", "peft", "--output", output])
        assert "\n" not in str(err.value)
    assert files(work) == {"notes.txt": b"mine"}

    mine = tmp_path / "my_stuff"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    with pytest.raises(CheckpointError, match=r"my_stuff: not empty \(keep.txt\) and not a previous export; .* name a new or empty one"):
        export_command(["--ckpt_path", ckpt, "--format", "peft", "--output", str(mine)])
    assert files(mine) == {"keep.txt": b"keep"}

    out = tmp_path / "adapter"
    out.mkdir()  # empty: fine
    export_command(["--ckpt_path", ckpt, "--format", "peft", "--output", str(out)])
    first = files(out)
    assert set(first) == {"adapter_config.json", "adapter_model.safetensors", EXPORT_MANIFEST}
    export_command(["--ckpt_path", str(root / "checkpoints" / "step=3.ckpt"), "--format", "peft", "--output", str(out)])  # its own: replaced
    assert set(files(out)) == set(first) and files(out) != first
    with pytest.raises(CheckpointError, match="holds a previous 'peft' export, not a 'hf' one"):
        export_command(["--ckpt_path", ckpt, "--format", "hf", "--output", str(out)])
    (out / "README.md").write_text("my notes on this adapter")
    before = files(out)
    with pytest.raises(CheckpointError, match=r"holds files the previous export did not write \(README.md\)"):
        export_command(["--ckpt_path", ckpt, "--format", "peft", "--output", str(out)])
    assert files(out) == before
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        export_command(["--ckpt_path", ckpt, "--format", "hf", "--output", str(file)])
    assert file.read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_fit_end_export_replaces_a_previous_runs_export(base_dir, tmp_path) -> None:
    """A second run into the same default_root_dir writes adapter/ and merged/ over the first run's."""
    exported = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = LoRAFinetune(checkpoint_dir=str(base_dir), lora_rank=4, lora_dropout=0.0, lr=1e-2, warmup_steps=0, lora_attn_modules=["q_proj"])
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader(batches(1, masked_prompt=4), batch_size=None))
        exported.append({name: files(tmp_path / name) for name in ("adapter", "merged")})
    assert exported[0]["adapter"] != exported[1]["adapter"] and exported[0]["merged"].keys() == exported[1]["merged"].keys()


def test_lora_run_on_a_random_base_exports_its_adapter_only(tmp_path) -> None:
    """A LoRA checkpoint holds the adapters only: a random-init base cannot be rebuilt from it, so an
    hf export (adapters merged into that base) is refused in one line and the peft export still works."""
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, lora_rank=4, lora_dropout=0.0, lr=1e-2, warmup_steps=0, export=False)
    train(module, tmp_path, steps=1)
    ckpt = str(tmp_path / "checkpoints" / "step=1.ckpt")
    with pytest.raises(CheckpointError, match="random-init base, which its checkpoints do not store"):
        export_command(["--ckpt_path", ckpt, "--format", "hf", "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
    adapter = export_command(["--ckpt_path", ckpt, "--format", "peft", "--output", str(tmp_path / "adapter")])
    assert (Path(adapter) / "adapter_config.json").is_file()


# A fit's exports carry the chat template its data used (#30): `chat --checkpoint_dir out/RUN/merged` needs no
# --chat_template, transformers' apply_chat_template on merged/ gives the trained ids, the GGUF carries it.

RUN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the tea"}, {"role": "assistant", "content": "hot"}],
    [{"role": "user", "content": "then?"}, {"role": "assistant", "content": "the end"}, {"role": "user", "content": "the"}, {"role": "assistant", "content": "tea"}],
]


def byte_level_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json (what GGUF and transformers both read) of 256 ids and no chat template of its own."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from lightning_tune.tokenizer.gguf import bytes_to_unicode

    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(253)}  # bytes 253..255 never occur in UTF-8 text
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}))
    return folder


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> tuple[Path, object]:
    import json

    import lightning_tune as lt

    root = tmp_path_factory.mktemp("chat_run")
    tokenizer = byte_level_tokenizer(root / "tokenizer")
    source = root / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in CONVERSATIONS))
    data = lt.ChatDataModule(source=str(source), tokenizer_path=str(tokenizer), chat_template=RUN_TEMPLATE, max_seq_len=64, batch_size=2, shuffle=False, cache_dir=str(root / "cache"))
    torch.manual_seed(0)
    module = FullFinetune(model_name="tiny_llama2", model_args={**TINY, "vocab_size": 256}, tokenizer_path=str(tokenizer), lr=1e-3, warmup_steps=0)  # the CLI links it from data
    checkpoints = ModelCheckpoint(dirpath=root / "run" / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root / "run", callbacks=[checkpoints], plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(module, datamodule=data)
    return root / "run", data


def test_merged_carries_the_runs_chat_template_as_transformers_reads_it(chat_run) -> None:
    transformers = pytest.importorskip("transformers")
    from lightning_tune.tokenizer import load_tokenizer

    run, data = chat_run
    merged = run / "merged"
    assert (merged / "chat_template.jinja").read_text() == RUN_TEMPLATE  # transformers 5's file
    assert load_tokenizer(merged).chat_template == RUN_TEMPLATE  # what chat / generate --template chat use
    theirs = transformers.AutoTokenizer.from_pretrained(merged)
    assert theirs.chat_template == RUN_TEMPLATE
    for index, messages in enumerate(CONVERSATIONS):  # shuffle=False, no validation split: sample i is record i
        ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == data.train_dataset[index]["input_ids"], index


def test_chat_on_merged_needs_no_chat_template(chat_run, monkeypatch, capsys) -> None:
    """The README's `chat --checkpoint_dir out/tiny_chat/merged` exited 2 ("no chat template") before #30."""
    import io

    from lightning_tune.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("the tea\n/exit\n"))
    assert main(["chat", "--checkpoint_dir", str(chat_run[0] / "merged"), "--max_new_tokens", "2", "--device", "cpu"]) == 0
    assert "error" not in capsys.readouterr().err


def test_exports_from_the_checkpoint_carry_the_chat_template_too(chat_run, tmp_path) -> None:
    """`export --ckpt_path` (hf and gguf) and a GGUF of merged/ write the run's template, though the tokenizer has none."""
    gguf = pytest.importorskip("gguf")
    from lightning_tune.recipes.export import export_gguf

    run, _ = chat_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    out = export_command(["--ckpt_path", ckpt, "--format", "hf", "--output", str(tmp_path / "hf")])
    assert (Path(out) / "chat_template.jinja").read_text() == RUN_TEMPLATE
    for name, kwargs in (("from_ckpt", {"ckpt_path": ckpt}), ("from_merged", {"checkpoint_dir": str(run / "merged")})):
        path = export_gguf(tmp_path / name / "model.gguf", outtype="f32", **kwargs)
        field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
        assert field.contents() == RUN_TEMPLATE, name
        modelfile = (path.parent / "Modelfile").read_text()  # ChatML's tokens in another layout: no ChatML TEMPLATE for Ollama
        assert "TEMPLATE" not in modelfile.replace("# TEMPLATE", "") and 'PARAMETER stop "<|im_end|>"' in modelfile, name


def test_modelfile_says_chatml_only_for_templates_that_render_as_chatml() -> None:
    from lightning_tune.checkpoint.gguf import renders_as_chatml
    from lightning_tune.tokenizer.chat_template import CHATML, LLAMA2

    spelled_out = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    assert renders_as_chatml(CHATML) and renders_as_chatml(spelled_out)
    assert not renders_as_chatml(RUN_TEMPLATE) and not renders_as_chatml(LLAMA2) and not renders_as_chatml(None)
