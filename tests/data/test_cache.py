"""The tokenised cache (issue 34): one file per (data, tokenizer, max_seq_len, encoding settings), reused by a second
run, rebuilt when any of them changes; `data --prepare` builds it (each mixture source's) ahead of a multi-GPU run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_tune.cli import main
from lightning_tune.data import InstructDataModule
from lightning_tune.data.base import DEMO_TOKENIZER


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}", "answer": f"a{i}"}) + "\n" for i in range(30)))
    return path


def setup(source: Path, tmp_path: Path, tokenizer: Path = DEMO_TOKENIZER, **kwargs) -> InstructDataModule:
    dm = InstructDataModule(source=str(source), tokenizer_path=str(tokenizer), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def test_reused_when_nothing_changes_rebuilt_when_anything_that_changes_tokens_does(source, tmp_path) -> None:
    first = setup(source, tmp_path)
    assert first.cache_file is not None and first.cache_file.exists() and not first.cache_reused
    again = setup(source, tmp_path, batch_size=2, pack=False, seed=1)  # batching settings do not change the tokens
    assert again.cache_reused and again.cache_file == first.cache_file
    assert again.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    tokenizer = tmp_path / "copy" / DEMO_TOKENIZER.name  # the same file in another folder: the same key (its bytes, not its path)
    tokenizer.parent.mkdir()
    shutil.copy(DEMO_TOKENIZER, tokenizer)
    assert setup(source, tmp_path, tokenizer=tokenizer).cache_reused
    changes = [dict(max_seq_len=64), dict(column_map={"output": "answer"}), dict(template="none"), dict(train_on_input=True), dict(split="train[:20]")]
    files = {first.cache_file}
    for change in changes:
        dm = setup(source, tmp_path, **change)
        assert not dm.cache_reused and dm.cache_file not in files, change
        files.add(dm.cache_file)
    source.write_text(source.read_text().replace("say 1", "tell 1"))  # changed data: another key too
    assert not setup(source, tmp_path).cache_reused


def test_data_prepare_builds_then_reuses_each_source_s_cache(source, tmp_path, capsys) -> None:
    mixture = json.dumps([{"source": str(source), "weight": 1}, {"source": "demo", "split": "train[:40]", "weight": 1}])
    args = ["data", "--config", "tiny_lora.yaml", "--data.cache_dir", str(tmp_path / "cache"), "--data.mixture", mixture, "--prepare"]
    assert main(args) == 0
    built = capsys.readouterr().out.strip().splitlines()
    assert len(built) == 2 and built[0].startswith(f"{source}: built ") and built[1].startswith("demo: built ")
    assert main(args) == 0
    reused = capsys.readouterr().out.strip().splitlines()
    assert reused == [line.replace(": built ", ": reused ") for line in built]
    assert all(Path(line.split(" ", 2)[2]).is_file() for line in reused)
