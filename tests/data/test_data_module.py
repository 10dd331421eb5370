"""InstructDataModule: every file format, column mapping, bad input, caching, Trainer loop, mid-epoch resume."""

import json
import logging
import threading
from pathlib import Path

import datasets
import huggingface_hub.constants
import lightning
import pandas as pd
import pytest
import sentencepiece as spm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchdata.stateful_dataloader import StatefulDataLoader

import lightning_tune.data.instruct as instruct_module
from lightning_tune.data import DataError, InstructDataModule
from lightning_tune.data.inspect import describe_samples
from lightning_tune.data.templates import ALPACA

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # from torchdata on recent torch


@pytest.fixture
def records(alpaca_tiny_path: Path) -> list[dict]:
    return json.loads(alpaca_tiny_path.read_text())


def make(source, tmp_path: Path, tokenizer_path=None, **kwargs) -> InstructDataModule:
    """A DataModule caching under tmp_path, set up for fitting; padded batches (`pack=False`) unless asked."""
    kwargs.setdefault("pack", False)
    dm = InstructDataModule(source=str(source), tokenizer_path=None if tokenizer_path is None else str(tokenizer_path), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def write(records: list[dict], path: Path) -> Path:
    """The records as a .json / .jsonl / .csv / .parquet file."""
    frame = pd.DataFrame(records)
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def samples(dm: InstructDataModule) -> list[tuple[list[int], list[int]]]:
    return list(zip(dm.train_dataset["input_ids"], dm.train_dataset["labels"]))


def test_every_file_format_loads_the_same_samples(records, llama2_tokenizer_path, tmp_path) -> None:
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    loaded = {}
    for suffix in (".json", ".jsonl", ".csv", ".parquet"):
        path = write(records, tmp_path / f"alpaca{suffix}")
        loaded[suffix] = samples(make(path, tmp_path, llama2_tokenizer_path))
    assert len(loaded[".json"]) == 100
    assert loaded[".json"] == loaded[".jsonl"] == loaded[".csv"] == loaded[".parquet"]
    # Spot-check against sentencepiece alone: the sample is the record's `text` field plus BOS/EOS.
    ids, labels = loaded[".json"][1]
    assert ids == [1, *reference.encode(records[1]["text"]), 2]
    trained = [label for label in labels if label != -100]
    assert trained == ids[len(ids) - len(trained) :]


def test_csv_cells_are_text(llama2_tokenizer_path, tmp_path) -> None:
    # pandas would read "12" as a number; CSV has no types, so outputs stay strings and empty inputs stay "".
    path = tmp_path / "numbers.csv"
    path.write_text("instruction,input,output\nAdd the two numbers.,7 + 5,12\nSay two.,,2\n")
    dm = make(path, tmp_path, llama2_tokenizer_path)
    prompt = ALPACA.format("Say two.")
    assert dm.train_dataset[1]["input_ids"] == dm.tokenizer.encode(prompt + "2", add_eos=True)


def test_column_map(records, llama2_tokenizer_path, tmp_path) -> None:
    renamed = [{"prompt": r["instruction"], "context": r["input"], "completion": r["output"]} for r in records]
    plain = make(write(records, tmp_path / "plain.jsonl"), tmp_path, llama2_tokenizer_path)
    mapped = make(
        write(renamed, tmp_path / "renamed.jsonl"),
        tmp_path,
        llama2_tokenizer_path,
        column_map={"instruction": "prompt", "input": "context", "output": "completion"},
    )
    assert samples(mapped) == samples(plain)
    # `input` is optional: without that column every record uses the no-input form.
    no_input = [{"instruction": r["instruction"], "output": r["output"]} for r in records if not r["input"]]
    dm = make(write(no_input, tmp_path / "no_input.json"), tmp_path, llama2_tokenizer_path)
    assert samples(dm) == [s for s, r in zip(samples(plain), records) if not r["input"]]


def test_masking_off_trains_every_token(records, llama2_tokenizer_path, tmp_path) -> None:
    dm = make(write(records, tmp_path / "a.json"), tmp_path, llama2_tokenizer_path, train_on_input=True)
    for ids, labels in samples(dm):
        assert labels == ids


def test_truncated_records_are_counted_and_reported_once(records, llama2_tokenizer_path, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_tune.data.base"):
        dm = make(write(records, tmp_path / "a.json"), tmp_path, llama2_tokenizer_path, max_seq_len=64)
    lengths = [len(ids) for ids, _ in samples(dm)]
    assert max(lengths) == 64
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    expected = sum(len(reference.encode(r["text"])) + 2 > 64 for r in records)  # BOS + text + EOS
    assert dm.num_truncated == expected == sum(dm.train_dataset["truncated"])
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and f"{dm.num_truncated} of 100 records are longer than max_seq_len=64" in warnings[0]


def test_tokenised_data_is_cached(records, llama2_tokenizer_path, tmp_path, monkeypatch) -> None:
    calls = []
    original = instruct_module.encode_sample
    monkeypatch.setattr(instruct_module, "encode_sample", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    path = write(records, tmp_path / "a.jsonl")
    first = make(path, tmp_path, llama2_tokenizer_path)
    assert len(calls) == 100
    second = make(path, tmp_path, llama2_tokenizer_path)  # a new run with the same settings
    assert len(calls) == 100
    assert samples(second) == samples(first)
    make(path, tmp_path, llama2_tokenizer_path, max_seq_len=256)  # a setting in the cache key
    assert len(calls) == 200
    make(path, tmp_path, llama2_tokenizer_path, train_on_input=True)
    assert len(calls) == 300


def test_validation_split(tmp_path) -> None:
    dm = make("demo", tmp_path, val_size=0.1)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (1350, 150)
    counted = make("demo", tmp_path, val_size=32)
    assert len(counted.val_dataset) == 32
    batch = next(iter(counted.val_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    assert make("demo", tmp_path).val_dataloader() == []
    with pytest.raises(DataError, match="val_size=1500 leaves no training"):
        make("demo", tmp_path, val_size=1500)


def test_works_directly_from_python(tmp_path) -> None:
    dm = InstructDataModule(source="demo", batch_size=8, cache_dir=str(tmp_path / "cache"))
    assert dm.train_dataset is None  # construction loads nothing
    loader = dm.train_dataloader()  # sets itself up when used directly
    assert isinstance(loader, StatefulDataLoader)
    batch = next(iter(loader))
    # By default a batch is packed: its 8 samples in one unpadded row, each starting at position 0 with BOS.
    assert set(batch) == {"input_ids", "labels", "positions", "seq_lens", "label_index"} and batch["input_ids"].shape[0] == 1
    assert len(batch["seq_lens"][0]) == 8 and sum(batch["seq_lens"][0]) == batch["input_ids"].shape[1]
    starts = batch["positions"][0] == 0
    assert int(starts.sum()) == 8 and (batch["input_ids"][0][starts] == dm.tokenizer.bos_id).all()
    assert dm.tokenizer.vocab_size == 512


class TinyModel(lightning.LightningModule):
    """An embedding and a linear head: enough to run the data through a real Trainer loop."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 16)
        self.head = torch.nn.Linear(16, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"])
        logits = self.head(self.embed(batch["input_ids"]))
        # Labels are aligned with input_ids; the model shifts (position t predicts token t + 1).
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_plain_lightning_trainer_loop(tmp_path) -> None:
    dm = InstructDataModule(source="demo", batch_size=4, cache_dir=str(tmp_path / "cache"))
    model = TinyModel(vocab_size=512)
    trainer = lightning.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and len(model.seen) == 2


def test_stateful_loader_resumes_mid_epoch(tmp_path) -> None:
    dm = make("demo", tmp_path, batch_size=16, seed=7)
    epoch = [batch["input_ids"] for batch in dm.train_dataloader()]
    again = [batch["input_ids"] for batch in dm.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(epoch, again))  # seeded: the same order every run
    first_rows = torch.cat([batch[:, :2] for batch in epoch])
    assert len(epoch) == 94 and len(first_rows) == 1500

    k = 5
    interrupted = dm.train_dataloader()
    iterator = iter(interrupted)
    for _ in range(k):
        next(iterator)
    state = interrupted.state_dict()

    restored = dm.train_dataloader()
    restored.load_state_dict(state)
    rest = [batch["input_ids"] for batch in restored]
    assert len(rest) == len(epoch) - k
    assert all(torch.equal(a, b) for a, b in zip(rest, epoch[k:]))


def test_describe_samples_marks_the_masked_prompt(records, llama2_tokenizer_path, tmp_path) -> None:
    dm = make(write(records, tmp_path / "a.json"), tmp_path, llama2_tokenizer_path, max_seq_len=128, shuffle=False)
    text = describe_samples(dm, n=2)
    assert "100 training samples" in text and f"{dm.num_truncated} truncated to max_seq_len=128" in text
    total = sum(len(ids) for ids, _ in samples(dm))
    trained = sum(sum(label != -100 for label in labels) for _, labels in samples(dm))
    assert f"{total} tokens, {trained} trained" in text
    first = ALPACA.format(records[0]["instruction"])
    assert f"[[<s>{first}]]{records[0]['output']}</s>" in text
    assert "--- sample 1:" in text and "--- sample 2:" not in text
    unmasked = describe_samples(make(write(records, tmp_path / "b.json"), tmp_path, llama2_tokenizer_path, train_on_input=True), n=1)
    assert f"<s>{first}{records[0]['output']}</s>" in unmasked and "[[" not in unmasked.splitlines()[2]


# --- bad input: one clear line, no partial cache ----------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def leftover_cache_files(tmp_path: Path) -> list[str]:
    """Files a failed run must not leave: tokenised caches, their temporary files, unfinished loads."""
    return [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and (p.name.startswith(("cache-", "tmp")) or ".incomplete" in str(p) and not p.name.endswith(".lock"))]


def test_bad_records_name_source_record_and_field(records, llama2_tokenizer_path, tmp_path) -> None:
    broken = [dict(r) for r in records[:5]]
    del broken[3]["output"]
    path = write(broken, tmp_path / "missing.jsonl")
    with pytest.raises(DataError) as error:
        make(path, tmp_path, llama2_tokenizer_path)
    assert one_line(error) == f"{path}: record 3 (counting from 0), field 'output': missing, expected a string"
    assert leftover_cache_files(tmp_path) == []

    broken = [dict(r) for r in records[:5]]
    broken[2]["instruction"] = 42
    path = write(broken, tmp_path / "number.jsonl")
    with pytest.raises(DataError) as error:
        make(path, tmp_path, llama2_tokenizer_path)
    assert one_line(error) == f"{path}: record 2 (counting from 0), field 'instruction': expected a string, got int '42'"
    assert leftover_cache_files(tmp_path) == []

    path = write(records[:5], tmp_path / "unmapped.jsonl")
    with pytest.raises(DataError) as error:
        make(path, tmp_path, llama2_tokenizer_path, column_map={"output": "answer"})
    assert "no column 'answer' for field 'output' (columns: instruction, input, output, text); set column_map" in one_line(error)


def test_bad_files(llama2_tokenizer_path, tmp_path) -> None:
    cases = {
        "empty.json": ("", "empty file"),
        "blank.jsonl": ("\n\n", "empty file"),
        "broken.json": ('[{"instruction": "a",', "line 1, column 22: not valid JSON"),
        "broken.csv": ('instruction,output\n"a,b\n', "cannot read as .csv"),
        "broken.parquet": ("not parquet", "cannot read as .parquet"),
        "no_records.json": ("[]", "has no records (expected instruction/output records)"),
        "header_only.csv": ("instruction,output\n", "has no records (expected instruction/output records)"),
        # `datasets` says "in row 1" here (pyarrow's row within a block); the user needs the file's line.
        "broken_line.jsonl": ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a" "output": "b"}\n', "line 3, column 21: not valid JSON (Expecting ',' delimiter)"),
        "not_object.jsonl": ('{"instruction": "a", "output": "b"}\n[1, 2]\n', "line 2: expected a JSON object (one record per line), got an array"),
        "broken_array.json": ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a",, "output": "b"}\n]\n', "line 3, column 23: not valid JSON (Expecting property name"),
        "latin1.jsonl": ('{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"), "line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError) as error:
            make(path, tmp_path, llama2_tokenizer_path)
        assert one_line(error).startswith(f"{path}: {expected}"), name
    with pytest.raises(DataError) as error:
        make(tmp_path / "absent.jsonl", tmp_path, llama2_tokenizer_path)
    assert one_line(error) == f"{tmp_path / 'absent.jsonl'}: no such file"
    assert leftover_cache_files(tmp_path) == []


def test_bad_settings_fail_in_init(tmp_path, llama2_tokenizer_path) -> None:
    text = tmp_path / "data.txt"
    text.write_text("hello")
    (tmp_path / "real.json").write_text("[]")
    tok = str(llama2_tokenizer_path)
    cases = [
        (dict(source=str(text), tokenizer_path=tok), f"{text}: unsupported file type '.txt'; use .json, .jsonl, .csv or .parquet"),
        (dict(source="missing.tsv", tokenizer_path=tok), "unsupported file type '.tsv'"),
        (dict(source="demo", template="alpaka"), "unknown prompt template 'alpaka'; choose one of: alpaca, none"),
        (dict(source=str(text.with_suffix(".json"))), f"{text.with_suffix('.json')}: no such file"),  # not "tokenizer_path is required"
        (dict(source=str(text.with_suffix(".json")), tokenizer_path=tok), f"{text.with_suffix('.json')}: no such file"),
        (dict(source=str(tmp_path / "real.json")), f"tokenizer_path is required for source '{tmp_path / 'real.json'}'"),
        (dict(source="demo", column_map={"response": "x"}), "column_map: unknown field(s) ['response']"),
        (dict(source="demo", max_seq_len=1), "max_seq_len must be at least 2"),
        (dict(source="demo", batch_size=0), "batch_size must be at least 1"),
        (dict(source="demo", val_size=-0.5), "val_size must be 0"),
        (dict(source="demo", val_size=2.5), "val_size must be 0"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(DataError) as error:
            InstructDataModule(**kwargs)
        assert expected in one_line(error), kwargs


def test_every_parameter_resolves_through_kwargs() -> None:
    """The data modules pass the shared parameters on to TokenizedDataModule with **kwargs: jsonargparse
    (--help, --print_config) still resolves every one, with its default and its description, and hides
    those a module passes itself (a preference batch is never packed nor grouped by length)."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    from lightning_tune.data import ChatDataModule, PreferenceDataModule

    shared = dict(
        name=None,
        revision=None,
        data_files=None,
        split="train",
        streaming=False,
        mixture=None,
        tokenizer_path=None,
        max_seq_len=512,
        batch_size=4,
        num_workers=0,
        shuffle=True,
        seed=42,
        val_size=0.0,
        cache_dir=None,
        group_by_length=False,
        pack=True,
    )
    resolved = {cls: get_signature_parameters(cls, "__init__") for cls in (InstructDataModule, ChatDataModule, PreferenceDataModule)}
    defaults = {cls: {p.name: p.default for p in params} for cls, params in resolved.items()}
    assert defaults[InstructDataModule] == dict(source="tatsu-lab/alpaca", column_map=None, template="alpaca", train_on_input=False, truncation="keep_start", **shared)
    assert defaults[ChatDataModule] == dict(source="demo", chat_template=None, train_on="assistant", truncation="keep_start", column_map=None, role_map=None, check_samples=8, **shared)
    pair_shared = {name: value for name, value in shared.items() if name not in ("max_seq_len", "group_by_length", "pack")}
    assert defaults[PreferenceDataModule] == dict(
        source="trl-lib/ultrafeedback_binarized", column_map=None, template="none", chat_template=None, max_seq_len=1024, truncation="keep_start", **pair_shared
    )
    undocumented = [f"{cls.__name__}.{p.name}" for cls, params in resolved.items() for p in params if not p.doc]
    assert not undocumented
    dpo = PreferenceDataModule(source="demo")
    assert (dpo.pack, dpo.group_by_length, dpo.max_seq_len) == (False, False, 1024)


def test_unreachable_hub_fails_fast_with_advice(tmp_path, llama2_tokenizer_path, monkeypatch) -> None:
    # Offline mode as a user sets it; `datasets` / `huggingface_hub` read the variables at import, so set their flags too.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dm = InstructDataModule(source="tatsu-lab/alpaca", tokenizer_path=str(llama2_tokenizer_path), cache_dir=str(tmp_path / "cache"))
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            dm.setup("fit")
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    thread = threading.Thread(target=attempt, daemon=True)  # a hang fails the test instead of blocking the suite
    thread.start()
    thread.join(timeout=600)  # only a hang guard: offline it fails in about a second, still seconds under a load of 8
    assert not thread.is_alive(), "loading an unreachable hub data set hung"
    assert len(outcome) == 1 and isinstance(outcome[0], DataError)
    message = str(outcome[0])
    assert "\n" not in message
    assert message.startswith("tatsu-lab/alpaca: cannot load this data set from the Hugging Face Hub")
    assert "you are offline: point source at a local copy" in message and ".json/.jsonl/.csv/.parquet file" in message


def test_lightning_resumes_mid_epoch_without_replaying_batches(tmp_path) -> None:
    """Lightning stores the StatefulDataLoader's position in a mid-epoch checkpoint: resumed batches equal the uninterrupted run's."""

    def fit(max_steps: int, ckpt_path: Path | None = None, save_every: int | None = None) -> list[torch.Tensor]:
        dm = InstructDataModule(source="demo", batch_size=8, cache_dir=str(tmp_path / "cache"))
        model = TinyModel(vocab_size=512)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=save_every, save_top_k=-1)] if save_every else []
        trainer = lightning.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=bool(callbacks),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    uninterrupted = fit(max_steps=5)
    fit(max_steps=2, save_every=2)  # "interrupted" after step 2, an epoch being 188 steps
    resumed = fit(max_steps=5, ckpt_path=tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    assert len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[2:]))
