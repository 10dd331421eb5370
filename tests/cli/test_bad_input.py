"""Bad input through the command line: one `error:` line that names the file, line or directory and what was
expected, exit code 2, and nothing written (issue 14). One row per case; the CLI front end's own rows (YAML, devices,
argument types) are in test_cli.py.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from tiny_helpers import TINY, batches
from torch.utils.data import DataLoader

from lightning_tune.cli import main
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.io.files import EXPORT_MANIFEST
from lightning_tune.recipes import LoRAFinetune
from lightning_tune.training.callbacks import AtomicCheckpointIO

TINY_DEMO_MODEL = json.dumps({**TINY, "vocab_size": 512})  # the demo tokenizer's vocabulary
HF_TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}  # fmt: skip


class Payload:
    """Unpickling this runs code: it creates the directory `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-step LoRA checkpoint (outside the test's directory, so it is not among what a row may write)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, lora_rank=2, lora_dropout=0.0, warmup_steps=0, export=False)
    checkpoints = ModelCheckpoint(dirpath=root, filename="last")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=[checkpoints], plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(module, DataLoader(batches(1), batch_size=None))
    return root / "last.ckpt"


# ---- inputs a row can ask for, written into the test's working directory ----------------------------------------


def write_inputs(work: Path) -> None:
    (work / "noise.ckpt").write_bytes(bytes(range(256)) * 16)
    torch.save({"state_dict": {}, "hyper_parameters": {"model": Payload(str(work / "pwned"))}}, work / "evil.ckpt")
    (work / "notes.txt").write_text("the user's own file")
    (work / "my_stuff").mkdir()
    (work / "my_stuff" / "keep.txt").write_text("keep")
    (work / "hf_export").mkdir()
    (work / "hf_export" / "config.json").write_text("{}")
    (work / "hf_export" / EXPORT_MANIFEST).write_text(json.dumps({"kind": "hf", "files": ["config.json"]}))
    (work / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    (work / "array.jsonl").write_text('{"instruction": "a", "output": "b"}\n["a", "b"]\n')
    (work / "latin1.jsonl").write_bytes('{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"))
    (work / "empty.json").write_text("[]")
    (work / "header.csv").write_text("instruction,input,output\n")
    (work / "chat_data.yaml").write_text("data:\n  class_path: lightning_tune.ChatDataModule\n  init_args: {source: demo, max_seq_len: 64}\n")
    (work / "latin1_prompts.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (work / "notes.gguf").write_text("the user's notes, named .gguf")
    (work / "my_models").mkdir()
    (work / "my_models" / "Modelfile").write_text("FROM llama3\nSYSTEM my own prompt\n")
    (work / "damaged").mkdir()  # an HF directory whose model.safetensors was cut off mid-download
    (work / "damaged" / "config.json").write_text(json.dumps(HF_TINY))
    save_file({"model.embed_tokens.weight": torch.zeros(HF_TINY["vocab_size"], HF_TINY["hidden_size"])}, work / "damaged" / "model.safetensors")
    whole = (work / "damaged" / "model.safetensors").read_bytes()
    (work / "damaged" / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    (work / "bad.jinja").write_text("{% for m in messages %}{{ m.content }\n{% endfor %}")
    # A wrong record after good ones: `datasets` types the columns from all records, so the record
    # number must come from the records themselves (record 3, not 0).
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chats = [{"messages": turns} for _ in range(5)]
    chats[3] = {"messages": [turns[0], {"role": "assistant", "content": 2}]}
    (work / "chats.jsonl").write_text("".join(json.dumps(record) + "\n" for record in chats))
    pairs = [{"prompt": turns[:1], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]} for _ in range(5)]
    pairs[3] = {**pairs[3], "prompt": "a string among conversations"}
    (work / "pairs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in pairs))


def fit(source: str) -> list[str]:
    """`fit` of the tiny demo recipe on `source`; it must stop at the data, before anything trains or is written."""
    return [
        "fit", "--config", "tiny_lora.yaml", "--data.source", source, "--data.tokenizer_path", str(DEMO_TOKENIZER),
        "--model.model_args", TINY_DEMO_MODEL, "--trainer.max_steps", "1", "--trainer.default_root_dir", "run",
        "--trainer.logger", "false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false",
        "--data.max_seq_len", "64", "--data.cache_dir", "../datasets",  # `datasets`' cache, beside the working directory
    ]  # fmt: skip


def fit_chat(config: str, source: str, template: str = "llama2") -> list[str]:
    """`fit` of a tiny chat/DPO demo recipe on `source` with `template`; it must stop at the data."""
    return [
        "fit", "--config", config, "--data.source", source, "--data.tokenizer_path", str(DEMO_TOKENIZER), "--data.chat_template", template,
        "--data.max_seq_len", "64", "--model.model_args", TINY_DEMO_MODEL, "--trainer.max_steps", "1", "--trainer.default_root_dir", "run",
        "--trainer.logger", "false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false", "--data.cache_dir", "../datasets",
    ]  # fmt: skip


CKPT = "{ckpt}"  # replaced by the real LoRA checkpoint's path

FULL_DISK = 1000  # free bytes the disk reports in a row that says so

# (id, argv, expected substring of the one error line[, free disk bytes])
ROWS = [
    ("export random bytes", ["export", "--ckpt_path", "noise.ckpt", "--format", "peft", "--output", "out"],
     "noise.ckpt: not a torch checkpoint (torch.save writes a zip archive; this file is not one)"),
    ("export a pickle that runs code", ["export", "--ckpt_path", "evil.ckpt", "--format", "hf", "--output", "out"],
     "evil.ckpt: refused: the file holds Python objects other than tensors and plain containers, which could run code"),
    ("export into the current directory", ["export", "--ckpt_path", CKPT, "--format", "peft", "--output", "."],
     "is the current directory (or holds it); an export replaces its output directory whole, so name a new one"),
    ("export over the user's files", ["export", "--ckpt_path", CKPT, "--format", "peft", "--output", "my_stuff"],
     "my_stuff: not empty (keep.txt) and not a previous export"),
    ("export over another format's export", ["export", "--ckpt_path", CKPT, "--format", "peft", "--output", "hf_export"],
     "hf_export: holds a previous 'hf' export, not a 'peft' one"),
    ("export over a file", ["export", "--ckpt_path", CKPT, "--format", "hf", "--output", "notes.txt"],
     "notes.txt: exists and is not a directory"),
    ("export to a full disk", ["export", "--ckpt_path", CKPT, "--format", "peft", "--output", "out"],
     "not enough free disk space: need 1.0 MiB, have 1000 bytes", FULL_DISK),
    ("export gguf over the user's file", ["export", "--ckpt_path", CKPT, "--format", "gguf", "--output", "notes.gguf"],
     "notes.gguf: exists and is not a GGUF export of lightning_tune; name a new file"),
    ("export gguf beside the user's Modelfile", ["export", "--ckpt_path", CKPT, "--format", "gguf", "--output", "my_models/m.gguf"],
     "Modelfile: exists and was not written by lightning_tune"),
    ("generate from a non-UTF-8 prompts file", ["generate", "--checkpoint_dir", ".", "--prompts_file", "latin1_prompts.txt"],
     "--prompts_file: latin1_prompts.txt: not UTF-8 text (byte 0xe9 at offset 3); save the file as UTF-8"),
    ("export gguf under a file", ["export", "--ckpt_path", CKPT, "--format", "gguf", "--output", "notes.txt/m.gguf"],
     "notes.txt is a file, not a directory; name a .gguf in a directory"),
    ("DPO on chat data", ["fit", "--config", "tiny_dpo.yaml", "--config", "chat_data.yaml", "--trainer.default_root_dir", "run", "--trainer.logger", "false",
                          "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false", "--data.cache_dir", "../datasets"],
     "data: DPOFinetune trains on the batches of lightning_tune.PreferenceDataModule; ChatDataModule gives other ones"),
    ("generate from a truncated model.safetensors", ["generate", "--checkpoint_dir", "damaged", "--prompt", "hi", "--tokenizer_path", str(DEMO_TOKENIZER)],
     "model.safetensors: cannot read as safetensors"),
    ("fit on a malformed JSONL line", fit("bad.jsonl"), "bad.jsonl: line 2, column 21: not valid JSON (Expecting ',' delimiter)"),
    ("fit on a JSONL line that is not a record", fit("array.jsonl"), "array.jsonl: line 2: expected a JSON object (one record per line), got an array"),
    ("fit on non-UTF-8 text", fit("latin1.jsonl"), "latin1.jsonl: line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    ("fit on an empty JSON array", fit("empty.json"), "empty.json: has no records (expected instruction/output records)"),
    ("fit on a CSV with only a header", fit("header.csv"), "header.csv: has no records (expected instruction/output records)"),
    ("chat template that does not compile", fit_chat("tiny_chat.yaml", "chats.jsonl", "bad.jinja"),
     "data.chat_template: bad.jinja: the chat template does not compile (line 1: unexpected '}')"),
    ("DPO template that does not compile", fit_chat("tiny_dpo.yaml", "pairs.jsonl", "bad.jinja"),
     "data.chat_template: bad.jinja: the chat template does not compile (line 1: unexpected '}')"),
    ("chat record of the wrong type after good ones", fit_chat("tiny_chat.yaml", "chats.jsonl"),
     "chats.jsonl: record 3 (counting from 0), message 1 (assistant): content must be a string, got int"),
    ("string prompt among conversational pairs", fit_chat("tiny_dpo.yaml", "pairs.jsonl"),
     "pairs.jsonl: record 3 (counting from 0): 'prompt' must be a list of messages like the other records'"),
]  # fmt: skip


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize(("argv", "expected", "free"), [(*row[1:], None)[:3] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv: list[str], expected: str, free: int | None, lora_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    write_inputs(work)
    monkeypatch.chdir(work)
    if free is not None:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr("lightning_tune.io.files.shutil.disk_usage", lambda path: usage(10**9, 10**9 - free, free))
    before = snapshot(work)
    capsys.readouterr()

    code = main([str(lora_ckpt) if arg == CKPT else arg for arg in argv])

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert expected in errors[0], errors[0]
    assert "weights_only=False" not in errors[0]  # torch's advice would run the payload
    assert snapshot(work) == before  # nothing written, nothing deleted, no payload run
