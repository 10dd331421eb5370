"""Every family and switch against transformers: logits, config.json both ways, sizes, generation, LoRA/full exports.

The references are tiny random checkpoints that transformers itself writes (`save_pretrained`) for each
model_type, so config mapping, key names, tied embeddings and every switch are checked end to end.
fp32 logits: relative error <= 1e-5 (the same operations in a different order: rounding of a few ulps
in fp32 over two layers, ~1e-7 in practice; 1e-5 leaves room without hiding a wrong operation, which
gives errors of order 1e-2 or more).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_helpers import tiny_hf, write_tiny_tokenizer  # noqa: E402
from tiny_helpers import batches  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, load_config  # noqa: E402
from lightning_tune.families import FAMILIES, SIZES, family_of_size, model_config  # noqa: E402
from lightning_tune.families.hf_config import config_from_hf, config_to_hf  # noqa: E402
from lightning_tune.io.files import CheckpointError  # noqa: E402
from lightning_tune.model import CausalLM, ModelConfig  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}

# id -> (model_type, transformers config overrides, sequence length). Sequences run past the llama3
# rope's original context (16) and past Mistral's window (8), where those switches act.
SWITCHES = {
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}, 40),
    "linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, 40),
    "llama_all_bias": ("llama", {"attention_bias": True, "mlp_bias": True}, 24),
    "tied": ("llama", {"tie_word_embeddings": True}, 24),
    "mha": ("llama", {"num_key_value_heads": 4}, 24),
    "qwen2_qkv_bias_tied": ("qwen2", {"tie_word_embeddings": True}, 24),
    "qwen3_qk_norm_head_dim": ("qwen3", {"head_dim": 32}, 24),  # 64 / 4 heads = 16: decoupled
    "mistral_window": ("mistral", {"sliding_window": 8}, 24),
}

# One tiny checkpoint per family (Llama 2 has its own tests in test_checkpoint.py / test_generate.py).
FAMILY_CASES = {
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "smollm2": ("llama", {"tie_word_embeddings": True, "rope_theta": 100000.0}),
}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def saved(tmp_path: Path, model_type: str, **kwargs) -> tuple[transformers.PreTrainedModel, Path]:
    hf = tiny_hf(model_type, **kwargs)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def tokens(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", SWITCHES, ids=list(SWITCHES))
def test_logits_equal_transformers(case: str, tmp_path: Path) -> None:
    model_type, kwargs, length = SWITCHES[case]
    hf, path = saved(tmp_path, model_type, **kwargs)
    ours = from_pretrained(path)
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    x = tokens(length)
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    assert rel_error(got, expected) <= 1e-5  # decoding with the KV cache: the generation test below


def test_switches_change_the_logits(tmp_path: Path) -> None:
    """Guards the parity test: each switch acts at these lengths (else it would pass with the switch ignored)."""
    x = tokens(40)
    with torch.no_grad():
        for case in ("llama3_rope", "mistral_window"):
            model_type, kwargs, length = SWITCHES[case]
            hf = tiny_hf(model_type, **kwargs)
            plain = CausalLM(load_config_of(hf, rope_type="default", sliding_window=None))
            plain.load_state_dict(hf.state_dict())
            assert rel_error(plain.eval()(x[:, :length]), hf(x[:, :length]).logits) > 1e-3, case


def load_config_of(hf: transformers.PreTrainedModel, **overrides) -> ModelConfig:
    fields = config_from_hf(hf.config.to_dict()).to_dict() | overrides
    return ModelConfig(**fields)


@pytest.mark.parametrize("case", SWITCHES, ids=list(SWITCHES))
def test_config_json_reads_in_both_forms_and_exports_what_transformers_reads(case: str, tmp_path: Path) -> None:
    model_type, kwargs, _ = SWITCHES[case]
    hf, path = saved(tmp_path, model_type, **kwargs)
    v5 = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5  # transformers 5 writes only its form
    config = load_config(path)
    # The transformers 4 form of the same config: rope_theta + rope_scaling ("type" in older files).
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"} | {"rope_theta": v5["rope_parameters"]["rope_theta"]}
    rope = {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"}
    v4["rope_scaling"] = None if rope.get("rope_type") == "default" else {"type" if case == "linear_rope" else "rope_type": rope.pop("rope_type"), **rope}
    assert config_from_hf(v4) == config
    written = config_to_hf(config)
    assert "rope_parameters" not in written and written["rope_theta"] == config.rope_base  # the form both versions read
    assert config_from_hf(written) == config
    assert written["model_type"] == model_type and written["architectures"] == [type(hf).__name__]
    reread = transformers.AutoConfig.for_model(**written)
    assert reread.rope_parameters == hf.config.rope_parameters
    for key in ("tie_word_embeddings", "sliding_window", "num_key_value_heads", "attention_bias", "mlp_bias"):
        assert getattr(reread, key, None) == getattr(hf.config, key, None), key
    head_dim = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads for c in (reread, hf.config)]
    assert head_dim[0] == head_dim[1] == config.head_dim


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model_type": "deepseek_v3"},
            "model_type 'deepseek_v3' is not supported; supported: llama, qwen2, qwen3, mistral, gemma3_text, gemma2, olmo2, phi3, ministral3, qwen3_moe, mixtral, gpt_oss",
        ),
        ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rotary type 'yarn' is not supported; supported: default, llama3, linear"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rotary type 'longrope' is not supported"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding-window attention on some layers only"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ],
)
def test_unsupported_config_is_one_line_naming_the_file(change: dict, message: str, tmp_path: Path) -> None:
    _, path = saved(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text()) | change
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path / 'config.json'}: ") and message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", SIZES, ids=list(SIZES))
def test_named_sizes_have_their_published_parameter_counts(name: str) -> None:
    """Ours on the meta device = the recorded count = transformers' model of our exported config.json."""
    config = model_config(name)
    with torch.device("meta"):
        ours = CausalLM(config)
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config_to_hf(config)))
    count = sum(p.numel() for p in ours.parameters())  # a tied head is counted once, as in the published numbers
    assert count == SIZES[name].params == sum(p.numel() for p in theirs.parameters())
    assert config_from_hf(config_to_hf(config)) == config
    size = SIZES[name]
    assert size.repo is None or size.url == f"https://huggingface.co/{size.repo}/blob/main/config.json"
    assert family_of_size(name).hf.model_type == config.model_type


def test_families_describe_their_tokens() -> None:
    assert FAMILIES["llama3"].stop_token_ids == [128001, 128008, 128009]  # Llama 3.1 Instruct's generation_config
    assert FAMILIES["qwen3"].stop_token_ids == [151645, 151643]
    assert {f.chat_template for f in FAMILIES.values()} >= {"llama3", "chatml", "qwen3"}
    assert FAMILIES["llama2"].meta_keys and FAMILIES["llama3"].meta_keys is FAMILIES["llama2"].meta_keys  # Meta's original folders read alike


# ---- generation, LoRA and full fine-tuning per family -------------------------------------------


@pytest.mark.parametrize("family", FAMILY_CASES, ids=list(FAMILY_CASES))
def test_greedy_generation_through_the_cli_equals_transformers(family: str, tmp_path: Path, capsys) -> None:
    from lightning_tune.cli import main

    model_type, kwargs = FAMILY_CASES[family]
    hf, path = saved(tmp_path, model_type, **kwargs)
    prompt = [1, 10, 11, 12, 13]  # <bos> w10 .. w13
    with torch.no_grad():
        free = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    stop = free[6]  # a token the model does produce: a second end token (generation_config lists several)
    write_tiny_tokenizer(path, eos_ids=[2, stop])
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=[2, stop], pad_token_id=0)[0, 5:].tolist()
    assert expected[-1] == stop and len(expected) < 12  # it stopped on the second end token
    capsys.readouterr()
    assert main(["generate", "--checkpoint_dir", str(path), "--prompt", "w10 w11 w12 w13", "--template", "none", "--max_new_tokens", "12", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    words = " ".join(f"w{i}" for i in expected[:-1])  # the end token is not printed
    assert printed.strip() == words


def fit(recipe, path: Path, root: Path, **kwargs):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = recipe(checkpoint_dir=str(path), lr=1e-2, warmup_steps=0, **kwargs)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, DataLoader(batches(2, masked_prompt=4), batch_size=None))
    return module.model.eval()


@pytest.mark.parametrize("family", FAMILY_CASES, ids=list(FAMILY_CASES))
def test_lora_fit_exports_merged_for_transformers_and_adapter_for_peft(family: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from lightning_tune.recipes import LoRAFinetune

    model_type, kwargs = FAMILY_CASES[family]
    hf, path = saved(tmp_path, model_type, **kwargs)
    ours = fit(LoRAFinetune, path, tmp_path / "run", lora_rank=4, lora_dropout=0.0, lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True)
    x = tokens(20)
    with torch.no_grad():
        expected = ours(x)
        assert rel_error(expected, hf(x).logits) > 1e-4  # the adapters trained away from the base
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged", attn_implementation="eager").eval()
        adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "adapter").eval()
        assert rel_error(merged(x).logits, expected) <= 1e-5
        assert rel_error(adapted(x).logits, expected) <= 1e-5
    assert type(merged).__name__ == type(hf).__name__
    assert ("lm_head.weight" in merged.state_dict()) and (merged.config.tie_word_embeddings == hf.config.tie_word_embeddings)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])  # tied + q/k/v bias, q/k norm + decoupled head_dim; the merged/ writer is the LoRA test's
def test_full_fit_exports_load_in_transformers(family: str, tmp_path: Path) -> None:
    from lightning_tune.recipes import FullFinetune

    model_type, kwargs = FAMILY_CASES[family]
    _, path = saved(tmp_path, model_type, **kwargs)
    ours = fit(FullFinetune, path, tmp_path / "run")
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still one tensor after training
    x = tokens(20)
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged", attn_implementation="eager").eval()
        assert rel_error(reloaded(x).logits, ours(x)) <= 1e-5


def test_download_selects_what_each_family_loads() -> None:
    from lightning_tune.checkpoint.download import select_files

    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    llama3 = [
        ".gitattributes",
        "LICENSE",
        "README.md",
        "USE_POLICY.md",
        "config.json",
        "generation_config.json",
        *shards,
        "model.safetensors.index.json",
        "original/consolidated.00.pth",
        "original/params.json",
        "original/tokenizer.model",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert select_files(llama3) == [*shards, "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    qwen = ["LICENSE", "README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert select_files(qwen) == ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    mistral = [
        "config.json",
        "generation_config.json",
        "consolidated.safetensors",
        "model.safetensors",
        "params.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer.model.v3",
        "tokenizer_config.json",
    ]
    assert select_files(mistral) == ["model.safetensors", "config.json", "generation_config.json", "params.json", "tokenizer.model"]  # not Mistral's own copy


FAMILY_CONFIGS = [
    "alpaca_llama3_1_8b_lora.yaml",
    "alpaca_llama3_1_8b_full.yaml",
    "alpaca_llama3_1_70b_lora.yaml",
    "alpaca_qwen3_8b_lora.yaml",
    "alpaca_qwen3_8b_full.yaml",
    "alpaca_qwen2_5_7b_lora.yaml",
    "alpaca_smollm2_1_7b_lora.yaml",
    "chat_gemma3_4b_lora.yaml",
    "chat_gemma2_9b_lora.yaml",
    "chat_phi3_mini_lora.yaml",
    "chat_phi4_14b_lora.yaml",
    "chat_phi4_mini_lora.yaml",  # LongRoPE: validate traces it on meta
    "chat_olmo2_7b_lora.yaml",
    "chat_ministral3_8b_lora.yaml",  # an FP8 checkpoint: validate reads the shapes it dequantises to
    "chat_qwen3_30b_a3b_lora.yaml",
    "chat_gpt_oss_20b_lora.yaml",
]


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_config_headers_name_a_gpu_that_validate_agrees_with(name: str) -> None:
    """The header's "N GPUs of G GB" / "one GPU with G GB": validate's estimate per device, plus 1 GiB for the
    CUDA context and allocator slack, fits in G GB, on the number of devices the config asks for."""
    import re

    from lightning_tune.cli import CONFIG_DIR
    from lightning_tune.cli.validate import check

    header = (CONFIG_DIR / name).read_text().splitlines()[0]
    found = re.search(r"one GPU with (\d+) GB", header) or re.search(r"(\d+) GPUs of (\d+) GB", header)
    gpus, gb = (1, int(found.group(1))) if found.re.pattern.startswith("one") else (int(found.group(1)), int(found.group(2)))
    result = check(["--config", name])
    assert result.settings["devices"] * result.settings["num_nodes"] == gpus
    assert [p for p in result.problems if "does not exist" not in p] == []  # only the not-yet-downloaded checkpoint
    assert result.estimate.total + 2**30 <= gb * 10**9, f"{name}: {result.estimate.total / 2**30:.1f} GiB per device"


@pytest.mark.slow  # a whole run in subprocesses (kill and resume, several processes, a notebook)
def test_fsdp2_trains_a_tied_model_as_one_process(tmp_path: Path) -> None:
    """Tied embeddings under FSDP2 (2 processes, gloo): the head stays the embedding (one sharded tensor,
    loaded once), so the loss curve and the exported weights equal one process's (fp32 tolerances as in
    test_distributed: the gradient reduction sums in another order)."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_distributed import ENV, STEPS, fit_args, metrics

    hf = tiny_hf("llama", tie_word_embeddings=True, vocab_size=512, max_position_embeddings=256)
    hf.save_pretrained(tmp_path / "base")
    from lightning_tune.cli import main

    runs = {"single": tmp_path / "single", "fsdp": tmp_path / "fsdp"}
    single = fit_args("tiny_full.yaml", runs["single"], tmp_path / "base", 1) + ["--model.model_name", "null"]
    assert main(single) == 0  # in this process: one interpreter start fewer
    fsdp = fit_args("tiny_full.yaml", runs["fsdp"], tmp_path / "base", 2) + ["--model.model_name", "null", "--trainer.strategy", "fsdp2", "--trainer.devices", "2"]
    result = subprocess.run([sys.executable, "-m", "lightning_tune", *fsdp], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = metrics(runs["single"]), metrics(runs["fsdp"])
    assert len(want["train_loss"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=1e-5, atol=0)
    expected, weights = load_file(runs["single"] / "merged" / "model.safetensors"), load_file(runs["fsdp"] / "merged" / "model.safetensors")
    assert weights.keys() == expected.keys() and "lm_head.weight" not in weights
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_tied_export_refuses_a_head_that_differs_from_the_embedding(tmp_path: Path) -> None:
    from lightning_tune.checkpoint import save_hf_checkpoint

    config = model_config("tiny_llama2", vocab_size=96, tie_word_embeddings=True)
    model = CausalLM(config)
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_hf_checkpoint(model, config, tmp_path / "ok")
    state = dict(model.state_dict()) | {"lm_head.weight": model.lm_head.weight.detach() + 1}  # e.g. a merged LoRA head
    with pytest.raises(CheckpointError, match="lm_head differs from the embedding"):
        save_hf_checkpoint(state, config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_export_writes_the_tokenizers_special_ids_and_files(tmp_path: Path) -> None:
    from lightning_tune.checkpoint import save_hf_checkpoint

    hf, path = saved(tmp_path, "qwen3", head_dim=32)
    write_tiny_tokenizer(path, eos_ids=[2, 5])  # several end tokens, as Llama 3's generation_config lists
    model = from_pretrained(path)
    out = save_hf_checkpoint(model, model.config, tmp_path / "export", tokenizer_path=path)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, [2, 5], 0)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, 5]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = tokens(12)
    with torch.no_grad():
        assert rel_error(reloaded(x).logits, hf(x).logits) <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_terse_config_json_reads_as_transformers_reads_it(model_type: str) -> None:
    """Keys left out take transformers' defaults for that model_type (`HFMapping.defaults`)."""
    terse = {"model_type": model_type, "vocab_size": 96, "hidden_size": 128, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 32}
    ours, theirs = config_from_hf(terse), transformers.AutoConfig.for_model(**terse)
    assert ours.max_seq_len == theirs.max_position_embeddings and ours.norm_eps == theirs.rms_norm_eps
    assert ours.rope_base == theirs.rope_parameters["rope_theta"] and ours.rope_type == theirs.rope_parameters["rope_type"]
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings and ours.num_kv_heads == theirs.num_key_value_heads  # Qwen: 32, Mistral: 8, Llama: the heads
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or 4)
    assert ours.sliding_window == getattr(theirs, "sliding_window", None)
    assert (ours.attention_bias != "none") == (model_type == "qwen2")
