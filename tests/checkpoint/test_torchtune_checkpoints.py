"""torchtune's checkpoints in: files written by torchtune 0.6.1's own FullModelHFCheckpointer (a test-only
dependency) for a tiny LoRA Llama 2 load with our readers, weights-only, and give the logits of
torchtune's own model: its HF outputs (safetensors and .bin shards), its PEFT adapter, its adapter in
torchtune's key names (`adapter_model.pt`), and `recipe_state.pt` pointing at the weights to resume.

Tolerance: the same fp32 weights through the same arithmetic in different kernel orders (and, for the
merged files, W + (alpha/r) B A rounded once): a few ulps through ~20 chained ops, ~1e-6 relative;
the norm-wise bound 1e-5 leaves a 10x margin, while a wrong row order or a lost adapter moves it to O(1).
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_tune.checkpoint import CheckpointError, from_pretrained, load_peft_adapter
from lightning_tune.checkpoint.torchtune import read_recipe_state

DIMS = {"vocab_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "max_seq_len": 64, "intermediate_dim": 128}
LORA = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True, "apply_lora_to_output": True, "lora_rank": 4, "lora_alpha": 8.0}
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 2, 41, 17], [1, 88, 3, 12, 60, 61, 7, 95]])


def import_torchtune_training() -> types.ModuleType:
    """`torchtune.training`; newer torchao renamed the QAT helpers its `quantization` module imports,
    which these tests never use: that one module is then a stub with the function `training` takes."""
    pytest.importorskip("torchtune")
    torchao_quantization = pytest.importorskip("torchao.quantization")
    if not hasattr(torchao_quantization, "int4_weight_only") and "torchtune.training" not in sys.modules:
        stub = types.ModuleType("torchtune.training.quantization")
        stub.get_quantizer_mode = lambda quantizer: None
        sys.modules["torchtune.training.quantization"] = stub
    import torchtune.training

    return torchtune.training


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """A tiny HF Llama base; torchtune's LoRA model on it (every target, random lora_B so the adapters
    matter) and its logits; and what torchtune's HF checkpointer writes at the end of epoch 0 of 2
    (`intermediate_checkpoint`: recipe state too), as the LoRA recipe builds it, once as safetensors
    and once as .bin."""
    import transformers

    training = import_torchtune_training()
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt

    root = tmp_path_factory.mktemp("torchtune_checkpoints")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=DIMS["vocab_size"],
        hidden_size=DIMS["embed_dim"],
        intermediate_size=DIMS["intermediate_dim"],
        num_hidden_layers=DIMS["num_layers"],
        num_attention_heads=DIMS["num_heads"],
        num_key_value_heads=DIMS["num_kv_heads"],
        max_position_embeddings=DIMS["max_seq_len"],
        rms_norm_eps=1e-5,  # torchtune's llama2 builder's norm_eps
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    model, out = None, {"root": root, "base": root / "base"}
    for safe in (True, False):
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(root / "base"), checkpoint_files=["model.safetensors"], model_type="LLAMA2", output_dir=str(root / f"out_{safe}"), safe_serialization=safe
        )
        base = checkpointer.load_checkpoint()[training.MODEL_KEY]
        if model is None:
            model = lora_llama2(**LORA, **DIMS)
            model.load_state_dict(base, strict=False)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if ".lora_b." in name:
                        parameter.normal_(0, 0.5)
            out["logits"] = model.eval()(TOKENS).detach()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        checkpointer.save_checkpoint(
            {
                training.MODEL_KEY: get_merged_lora_ckpt(state, rank=LORA["lora_rank"], alpha=LORA["lora_alpha"]),
                training.ADAPTER_KEY: get_adapter_state_dict(model.state_dict()),
                training.ADAPTER_CONFIG: {
                    "r": LORA["lora_rank"],
                    "lora_alpha": LORA["lora_alpha"],
                    "target_modules": get_lora_module_names(LORA["lora_attn_modules"], True, True),
                    "peft_type": "LORA",
                },
                training.OPT_KEY: {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                training.SEED_KEY: 0,
                training.EPOCHS_KEY: 1,
                training.TOTAL_EPOCHS_KEY: 2,
                training.MAX_STEPS_KEY: None,
            },
            epoch=0,
            intermediate_checkpoint=True,
        )
        out[safe] = root / f"out_{safe}"
    return out


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_hf_outputs_load_with_torchtunes_logits(written: dict, safe: bool) -> None:
    """epoch_0/ (model-00001-of-00001.safetensors or .bin, its index, the base's config.json) is a
    Hugging Face directory: the merged weights give torchtune's LoRA model's logits."""
    folder = written[safe] / "epoch_0"
    assert (folder / ("model-00001-of-00001." + ("safetensors" if safe else "bin"))).is_file()
    with torch.no_grad():
        assert rel_error(from_pretrained(folder)(TOKENS), written["logits"]) <= 1e-5


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "adapter_model.bin", None])
def test_peft_adapter_loads_onto_the_base(written: dict, weights: str | None, tmp_path: Path) -> None:
    """adapter_model.safetensors or .bin + adapter_config.json (PEFT's format, torchtune's conversion)
    alone on the base, and epoch_0/ as torchtune wrote it (adapter_model.pt beside them, read first)."""
    folder = written[True if weights != "adapter_model.bin" else False] / "epoch_0"
    if weights is not None:
        shutil.copy(folder / weights, tmp_path)
        shutil.copy(folder / "adapter_config.json", tmp_path)
        folder = tmp_path
    model = from_pretrained(written["base"])
    wrapped = load_peft_adapter(model, folder)
    assert len(wrapped) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    with torch.no_grad():
        assert rel_error(model(TOKENS), written["logits"]) <= 1e-5


def test_torchtune_named_adapter_loads_as_its_peft_twin(written: dict, tmp_path: Path) -> None:
    """adapter_model.pt alone (torchtune's own key names, q/k lora_B rows in its RoPE order; also what
    older torchtune wrote as adapter_0.pt) with adapter_config.json: the same tensors as torchtune's
    PEFT file and the same logits."""
    from safetensors.torch import load_file

    for name in ("adapter_model.pt", "adapter_0.pt"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(written[True] / "epoch_0" / "adapter_model.pt", folder / name)
        shutil.copy(written[True] / "epoch_0" / "adapter_config.json", folder)
        model = from_pretrained(written["base"])
        load_peft_adapter(model, folder)
        peft = load_file(written[True] / "epoch_0" / "adapter_model.safetensors")
        ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        assert {k.removeprefix("base_model.model.") for k in peft} == set(ours)
        for key, value in peft.items():
            assert torch.equal(ours[key.removeprefix("base_model.model.")], value), key
        with torch.no_grad():
            assert rel_error(model(TOKENS), written["logits"]) <= 1e-5


def test_torchtune_adapter_with_unknown_keys_is_refused_in_one_line(tmp_path: Path, written: dict) -> None:
    shutil.copy(written[True] / "epoch_0" / "adapter_config.json", tmp_path)
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(4, 64), "layers.0.cross_attn.q_proj.lora_a.weight": torch.zeros(4, 64)}, tmp_path / "adapter_model.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key 'layers\.0\.cross_attn\.q_proj\.lora_a\.weight'") as error:
        load_peft_adapter(from_pretrained(written["base"]), tmp_path)
    assert "\n" not in str(error.value)


def test_recipe_state_points_at_the_weights_to_resume(written: dict, tmp_path: Path) -> None:
    """recipe_state.pt (optimiser state and counters, read weights-only) names epoch_0, whose weights load;
    a file that is not a recipe state is refused in one line."""
    state = read_recipe_state(written[True])
    assert state["epochs_run"] == 1 and state["total_epochs"] == 2 and state["seed"] == 0
    assert state["resume_from"] == written[True] / "epoch_0"
    assert "optimizer" not in state  # not carried over
    with torch.no_grad():
        assert rel_error(from_pretrained(state["resume_from"])(TOKENS), written["logits"]) <= 1e-5
    torch.save({"weights": torch.zeros(1)}, tmp_path / "recipe_state.pt")
    with pytest.raises(CheckpointError, match="not torchtune's recipe state"):
        read_recipe_state(tmp_path / "recipe_state.pt")


def test_meta_output_loads_as_torchtune_wrote_it(written: dict) -> None:
    """FullModelMetaCheckpointer's epoch_0/ (Meta's key names in model-00001-of-00001.bin beside a copy of
    params.json) loads as it is, with torchtune's logits, and equally under Meta's own name."""
    import json

    training = import_torchtune_training()
    from torchtune.models.convert_weights import hf_to_tune, tune_to_meta
    from torchtune.models.llama2 import llama2

    root = written["root"] / "meta"
    (root / "base").mkdir(parents=True)
    hf = from_pretrained(written[True] / "epoch_0").state_dict()  # torchtune's merged LoRA weights
    tune = hf_to_tune({k: v for k, v in hf.items()}, num_heads=DIMS["num_heads"], num_kv_heads=DIMS["num_kv_heads"], dim=DIMS["embed_dim"])
    torch.save(tune_to_meta(tune), root / "base" / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96, "multiple_of": 128, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5}  # FFN 128
    (root / "base" / "params.json").write_text(json.dumps(params))
    checkpointer = training.FullModelMetaCheckpointer(checkpoint_dir=str(root / "base"), checkpoint_files=["consolidated.00.pth"], model_type="LLAMA2", output_dir=str(root / "out"))
    state = checkpointer.load_checkpoint()
    model = llama2(**DIMS)
    model.load_state_dict(state[training.MODEL_KEY])
    checkpointer.save_checkpoint(state, epoch=0)
    folder = root / "out" / "epoch_0"
    assert sorted(p.name for p in folder.iterdir()) == ["model-00001-of-00001.bin", "params.json"]
    with torch.no_grad():
        expected = model.eval()(TOKENS)
        assert rel_error(expected, written["logits"]) <= 1e-5
        assert rel_error(from_pretrained(folder)(TOKENS), expected) <= 1e-5
        (folder / "model-00001-of-00001.bin").rename(folder / "consolidated.00.pth")
        assert rel_error(from_pretrained(folder)(TOKENS), expected) <= 1e-5
    (folder / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="no weight files") as error:
        from_pretrained(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_qwen2_adapter_loads_from_torchtunes_own_file(tmp_path: Path) -> None:
    """Qwen 2: torchtune keeps its q/k rows in Hugging Face's order, yet 0.6.1 writes its PEFT copy with
    q/k lora_B permuted as for Llama (wrong: far from torchtune's own logits). epoch_0/ as written loads
    right, from adapter_model.pt, unpermuted."""
    import transformers

    training = import_torchtune_training()
    from torchtune.models.qwen2 import lora_qwen2
    from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "base")
    checkpointer = training.FullModelHFCheckpointer(checkpoint_dir=str(tmp_path / "base"), checkpoint_files=["model.safetensors"], model_type="QWEN2", output_dir=str(tmp_path / "out"))
    shape = {k: v for k, v in DIMS.items() if k != "max_seq_len"}
    model = lora_qwen2(["q_proj", "k_proj", "v_proj"], **shape, max_seq_len=64, norm_eps=1e-6, rope_base=1e6, lora_rank=4, lora_alpha=8, tie_word_embeddings=False)
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY], strict=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_b." in name:
                parameter.normal_(0, 0.5)
        expected = model.eval()(TOKENS)
    adapter_config = {"r": 4, "lora_alpha": 8, "target_modules": get_lora_module_names(["q_proj", "k_proj", "v_proj"], False, False), "peft_type": "LORA"}
    checkpointer.save_checkpoint({training.ADAPTER_KEY: get_adapter_state_dict(model.state_dict()), training.ADAPTER_CONFIG: adapter_config}, epoch=0, adapter_only=True)
    folder = tmp_path / "out" / "epoch_0"
    ours = from_pretrained(tmp_path / "base")
    load_peft_adapter(ours, folder)
    with torch.no_grad():
        assert rel_error(ours(TOKENS), expected) <= 1e-5
        (folder / "adapter_model.pt").unlink()  # torchtune's PEFT copy alone
        peft_copy = from_pretrained(tmp_path / "base")
        load_peft_adapter(peft_copy, folder)
        assert rel_error(peft_copy(TOKENS), expected) > 0.1
