"""A reward model as a transformers `*ForSequenceClassification` directory (num_labels 1): the decoder's
weights, `score.weight` in place of `lm_head.weight`, and a config.json naming that class and the padding
token transformers reads each sequence's score at (`model/score.py`). Written by `save_sequence_classification`,
read back (ours or transformers') by `load_sequence_classification`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_tune.checkpoint.hf import save_hf_checkpoint
from lightning_tune.checkpoint.load import load_config, weight_reader
from lightning_tune.checkpoint.tensors import assign_tensor, tie_embeddings
from lightning_tune.families.config import ModelConfig
from lightning_tune.io.files import EXPORT_MANIFEST, CheckpointError, atomic_directory, read_json
from lightning_tune.model.decoder import CausalLM
from lightning_tune.model.score import ScoreHead

CAUSAL, SEQUENCE = "ForCausalLM", "ForSequenceClassification"
HEAD, SCORE = "lm_head.weight", "score.weight"


def save_sequence_classification(
    state_dict: dict[str, Tensor],
    score_weight: Tensor,
    config: ModelConfig,
    output_dir: str | Path,
    *,
    pad_token_id: int,
    tokenizer_path: str | Path | None = None,
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `output_dir` (atomically) as transformers' sequence classifier of the config's family, one
    label; returns its path. `state_dict` is the causal model's (`save_hf_checkpoint`'s input: its
    `lm_head.weight`, if any, is left out), `score_weight` the [1, E] head; `pad_token_id` is written
    to config.json, since transformers reads each score at the last token that is not padding;
    `tokenizer_path` and `chat_template` are written as `save_hf_checkpoint` writes them."""
    if tuple(score_weight.shape) != (1, config.embed_dim):
        raise CheckpointError(f"{output_dir}: score.weight has shape {list(score_weight.shape)}, expected [1, {config.embed_dim}] (one label over the hidden size)")
    with atomic_directory(output_dir, kind="hf") as tmp:
        causal = save_hf_checkpoint(state_dict, config, tmp / "causal", dtype=dtype, tokenizer_path=tokenizer_path, chat_template=chat_template)
        for path in causal.iterdir():
            if path.name != EXPORT_MANIFEST:
                os.replace(path, tmp / path.name)
        shutil.rmtree(causal)
        _swap_head_for_score(tmp, score_weight)
        config_json = read_json(tmp / "config.json")
        architecture = config_json["architectures"][0]
        if not architecture.endswith(CAUSAL):
            raise CheckpointError(f"{output_dir}: {architecture} has no sequence-classification counterpart")
        config_json.update(architectures=[architecture.removesuffix(CAUSAL) + SEQUENCE], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad_token_id)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return Path(output_dir).expanduser().absolute()


def _swap_head_for_score(folder: Path, score_weight: Tensor) -> None:
    """Rewrite the weight file holding `lm_head.weight` (else the last one) without it and with `score.weight`."""
    index_file = folder / "model.safetensors.index.json"
    index = read_json(index_file) if index_file.is_file() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    target = index["weight_map"].get(HEAD, files[-1]) if index else files[0]
    with safe_open(folder / target, framework="pt") as weights:
        tensors = {key: weights.get_tensor(key) for key in weights.keys() if key != HEAD}  # one shard in memory
    dtype = next(iter(tensors.values())).dtype if tensors else score_weight.dtype
    tensors[SCORE] = score_weight.detach().to("cpu", dtype).contiguous()
    save_file(tensors, folder / target, metadata={"format": "pt"})
    if index:
        index["weight_map"].pop(HEAD, None)
        index["weight_map"][SCORE] = target
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def load_sequence_classification(directory: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> tuple[CausalLM, ScoreHead]:
    """A one-label sequence-classification directory (a `RewardModel` export, or transformers') as our decoder
    and score head, in eval mode: `head(model.hidden_states(ids), ids)` are the scores transformers computes.

    The decoder's untied `lm_head` is not in the directory and stays on the meta device (scoring never uses it,
    and it takes no memory); a tied one is the embedding. dtype None keeps the checkpoint's."""
    path = Path(directory).expanduser()
    config_json = read_json(path / "config.json")
    architecture = (config_json.get("architectures") or [""])[0]
    labels = len(config_json.get("id2label") or {"0": ""})
    if not architecture.endswith(SEQUENCE) or labels != 1:
        raise CheckpointError(f"{path}: expected a one-label *{SEQUENCE} directory (a reward model), got {architecture or 'no architecture'} with {labels} labels")
    pad_id = config_json.get("pad_token_id")
    if not isinstance(pad_id, int):
        raise CheckpointError(f"{path}: config.json has no pad_token_id; the score is read at the last token that is not padding")
    config = load_config(path)
    with torch.device("meta"):  # no memory until each tensor is read
        model = CausalLM(config)
        head = ScoreHead(config.embed_dim, pad_id)
    read = weight_reader(path)
    for key in model.state_dict():
        if key != HEAD:
            assign_tensor(model, key, read(key), dtype, device)
    if config.tie_word_embeddings:
        tie_embeddings(model)
    score = read(SCORE)
    if tuple(score.shape) != (1, config.embed_dim):
        raise CheckpointError(f"{path}: score.weight has shape {list(score.shape)}, expected [1, {config.embed_dim}]")
    assign_tensor(head, "score.weight", score, dtype, device)
    return model.eval(), head.eval()
