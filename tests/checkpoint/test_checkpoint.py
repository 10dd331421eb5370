"""checkpoint.py against files that transformers, PEFT and Meta's layout produce, and back.

References are written by the libraries themselves (save_pretrained, get_peft_model) or, for Meta's
consolidated.*.pth, by this file's own inverse of transformers' conversion (not by checkpoint.py).
"""

import copy
import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hf_helpers import tiny_hf_llama, trained_peft_model
from safetensors.torch import load_file, save_file

from lightning_tune.checkpoint import detect_format, from_pretrained, load_config, load_peft_adapter, load_weights, save_hf_checkpoint, save_peft_adapter
from lightning_tune.checkpoint import hf as checkpoint_hf
from lightning_tune.io.files import CheckpointError, atomic_directory
from lightning_tune.layers.lora import apply_lora, lora_modules
from lightning_tune.model import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def hf_logits(model) -> torch.Tensor:
    return model(TOKENS).logits


@torch.no_grad()
def our_logits(model: Llama) -> torch.Tensor:
    return model(TOKENS)


@pytest.fixture(scope="module")
def hf() -> "transformers.LlamaForCausalLM":
    return tiny_hf_llama()


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny"
    hf.save_pretrained(path)
    return path


def one_line_error(func, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- Hugging Face directories ----------------------------------------------------------------


def test_transformers_safetensors_dir_gives_same_logits(hf, hf_dir: Path) -> None:
    assert (hf_dir / "model.safetensors").is_file() and detect_format(hf_dir) == "hf"
    model = from_pretrained(hf_dir)
    assert not model.training
    assert rel_error(our_logits(model), hf_logits(hf)) <= 1e-5


def test_transformers_sharded_safetensors_dir(hf, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert rel_error(our_logits(from_pretrained(tmp_path)), hf_logits(hf)) <= 1e-5


def test_bin_dirs_single_and_sharded(hf, tmp_path: Path) -> None:
    # transformers 5 no longer writes .bin (safe_serialization=False is gone), so write the layout
    # transformers 4 wrote: pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + index.
    state = hf.state_dict()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for d in (single, sharded):
        hf.config.save_pretrained(d)
    torch.save(state, single / "pytorch_model.bin")
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for d in (single, sharded):
        assert rel_error(our_logits(from_pretrained(d)), hf_logits(hf)) <= 1e-5


def test_tied_embeddings_follow_transformers(tmp_path: Path) -> None:
    tied = tiny_hf_llama(tie_word_embeddings=True)
    tied.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert rel_error(our_logits(model), hf_logits(tied)) <= 1e-5
    out = save_hf_checkpoint(model, model.config, tmp_path / "export")  # tied: one tensor, as transformers writes
    written = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in written and written.keys() == load_file(tmp_path / "model.safetensors").keys()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert rel_error(hf_logits(reloaded), hf_logits(tied)) <= 1e-5


def test_meta_built_model_stays_off_memory_until_loaded(hf, hf_dir: Path) -> None:
    with torch.device("meta"):
        model = Llama(load_config(hf_dir))
    assert all(p.is_meta for p in model.parameters())
    load_weights(model, hf_dir)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert rel_error(our_logits(model.eval()), hf_logits(hf)) <= 1e-5


def test_dtype_and_loading_into_a_real_model(hf, hf_dir: Path) -> None:
    assert {p.dtype for p in from_pretrained(hf_dir, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    model = Llama(load_config(hf_dir))  # real, randomly initialised: loading copies in place
    before = dict(model.named_parameters())
    load_weights(model, hf_dir)
    assert all(p is before[n] for n, p in model.named_parameters())
    assert rel_error(our_logits(model.eval()), hf_logits(hf)) <= 1e-5


def test_base_checkpoint_loads_into_lora_model_leaving_adapters(hf, hf_dir: Path) -> None:
    with torch.device("meta"):
        model = Llama(load_config(hf_dir))
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    load_weights(model, hf_dir)
    for name, p in model.named_parameters():
        assert p.is_meta == (".lora_" in name), name  # adapters are the caller's to initialise
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, hf.model.layers[1].self_attn.q_proj.weight)


# ---- Meta consolidated.*.pth -----------------------------------------------------------------


def to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of transformers' convert_llama_weights_to_hf.py permute: HF rotate-half rows -> Meta's interleaved."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta_checkpoint(hf, path: Path, params: dict, num_shards: int = 2) -> None:
    """Meta's layout from HF weights: renamed, wq/wk interleaved, split as fairscale's parallel layers split them."""
    sd, c = hf.state_dict(), hf.config
    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1), "norm.weight": (sd["model.norm.weight"], None), "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        full |= {
            f"layers.{i}.attention.wq.weight": (to_meta_rotary(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads), 0),
            f"layers.{i}.attention.wk.weight": (to_meta_rotary(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads), 0),
            f"layers.{i}.attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
            f"layers.{i}.attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
        }
    shards = [{"rope.freqs": torch.ones(8)} for _ in range(num_shards)]
    for key, (t, dim) in full.items():
        parts = [t] * num_shards if dim is None else t.chunk(num_shards, dim)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    path.mkdir(parents=True)
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize(
    ("num_kv_heads", "intermediate_size", "extra"),
    [(4, 192, {"multiple_of": 32}), (2, 256, {"multiple_of": 64, "ffn_dim_multiplier": 1.3, "n_kv_heads": 2})],
    ids=["mha", "gqa"],
)
def test_meta_sharded_checkpoint_gives_same_logits(tmp_path: Path, num_kv_heads: int, intermediate_size: int, extra: dict) -> None:
    hf = tiny_hf_llama(num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, "vocab_size": -1} | extra
    write_meta_checkpoint(hf, tmp_path / "meta", params)
    assert detect_format(tmp_path / "meta") == "meta"
    config = load_config(tmp_path / "meta")
    assert (config.vocab_size, config.intermediate_dim, config.num_kv_heads, config.max_seq_len) == (96, intermediate_size, num_kv_heads, 4096)
    model = from_pretrained(tmp_path / "meta")
    assert rel_error(our_logits(model), hf_logits(hf)) <= 1e-5


@pytest.mark.parametrize(
    ("params", "intermediate"),
    [
        ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": 32000}, 11008),
        ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": 32000}, 13824),
        ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": 32000}, 28672),
    ],
    ids=["7b", "13b", "70b"],
)
def test_meta_params_json_of_llama2_sizes(tmp_path: Path, params: dict, intermediate: int) -> None:
    (tmp_path / "params.json").write_text(json.dumps(params))
    config = load_config(tmp_path)
    assert config.intermediate_dim == intermediate
    assert (config.max_seq_len, config.rope_base, config.num_kv_heads) == (4096, 10000.0, params.get("n_kv_heads", params["n_heads"]))


# ---- writing Hugging Face directories ---------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", [5 * 2**30, 40_000], ids=["single", "sharded"])
def test_export_round_trips_through_transformers(hf, hf_dir: Path, tmp_path: Path, max_shard_size: int) -> None:
    model = from_pretrained(hf_dir)
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"sentencepiece bytes")
    out = save_hf_checkpoint(model, model.config, tmp_path / "export", max_shard_size=max_shard_size, tokenizer_path=tokenizer)
    files = sorted(out.glob("*.safetensors"))
    if max_shard_size < 2**20:
        assert len(files) > 2 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(hf.state_dict())
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    written = {k: v for f in files for k, v in load_file(f).items()}
    expected = hf.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.dtype == torch.float32
    assert rel_error(hf_logits(reloaded), hf_logits(hf)) <= 1e-5


def test_export_casts_dtype_and_rejects_bad_state_dicts(hf_dir: Path, tmp_path: Path) -> None:
    model = from_pretrained(hf_dir)
    out = save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    state = model.state_dict()
    del state["model.norm.weight"]
    assert "missing keys model.norm.weight" in one_line_error(save_hf_checkpoint, state, model.config, tmp_path / "bad")
    apply_lora(model, ["q_proj"], rank=2, alpha=2)
    assert "merge_lora" in one_line_error(save_hf_checkpoint, model, model.config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_failed_export_leaves_nothing_and_keeps_the_previous_one(hf_dir: Path, tmp_path: Path, monkeypatch) -> None:
    model = from_pretrained(hf_dir)
    out = save_hf_checkpoint(model, model.config, tmp_path / "export", max_shard_size=40_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # midway: one shard written, the second half-written
            Path(filename).write_bytes(b"partial")
            raise OSError("disk on fire")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk on fire"):
        save_hf_checkpoint(model, model.config, tmp_path / "export", max_shard_size=40_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, intact
    calls.clear()
    with pytest.raises(OSError, match="disk on fire"):
        save_hf_checkpoint(model, model.config, tmp_path / "fresh", max_shard_size=40_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no output, no temp dirs
    monkeypatch.undo()
    save_hf_checkpoint(model, model.config, tmp_path / "export")  # a successful export replaces the old one
    assert sorted(p.name for p in (tmp_path / "export").glob("*.safetensors")) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_atomic_directory_removes_temp_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_export_checks_free_disk_space(hf_dir: Path, tmp_path: Path, monkeypatch) -> None:
    model = from_pretrained(hf_dir)
    monkeypatch.setattr("lightning_tune.io.files.shutil.disk_usage", lambda path: namedtuple("usage", "total used free")(10, 10, 0))
    message = one_line_error(save_hf_checkpoint, model, model.config, tmp_path / "export")
    assert "not enough free disk space" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []


# ---- errors ----------------------------------------------------------------------------------


def test_loading_errors_name_the_path_and_the_problem(hf, hf_dir: Path, tmp_path: Path) -> None:
    assert "checkpoint directory not found" in one_line_error(from_pretrained, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "neither config.json" in one_line_error(from_pretrained, tmp_path / "empty")
    hf.config.save_pretrained(tmp_path / "no_weights")
    message = one_line_error(from_pretrained, tmp_path / "no_weights")
    assert "no weight files" in message and "no_weights" in message

    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    missing = tmp_path / "missing"
    hf.config.save_pretrained(missing)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, missing / "model.safetensors")
    message = one_line_error(from_pretrained, missing)
    assert "missing keys model.layers.1.mlp.up_proj.weight (1)" in message and str(missing) in message

    unexpected = tmp_path / "unexpected"
    hf.config.save_pretrained(unexpected)
    save_file(state | {"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}, unexpected / "model.safetensors")
    assert "unexpected keys model.layers.7.mlp.up_proj.weight" in one_line_error(from_pretrained, unexpected)

    mismatch = tmp_path / "mismatch"
    hf.save_pretrained(mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps(config | {"intermediate_size": 160}))
    message = one_line_error(from_pretrained, mismatch)
    assert "model.safetensors" in message and "mlp.down_proj.weight has shape [64, 192], the config expects [64, 160]" in message

    with torch.device("meta"):
        other = Llama(LlamaConfig(vocab_size=96, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=192))
    assert "num_layers 2 vs model's 3" in one_line_error(load_weights, other, hf_dir)
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(load_config, tmp_path / "bad_json")


# ---- PEFT adapters ---------------------------------------------------------------------------


def test_our_adapter_loads_in_peft_with_same_logits(hf, hf_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = from_pretrained(hf_dir)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)  # non-zero, else the adapter is invisible
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"], config["base_model_name_or_path"]) == (4, 8, ["down_proj", "q_proj", "v_proj"], "tiny-llama")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(out / "adapter_model.safetensors")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    expected = hf_logits(peft_model)
    assert rel_error(expected, hf_logits(hf)) > 1e-3  # the adapter does something
    assert rel_error(our_logits(model.eval()), expected) <= 1e-5


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_peft_adapter_loads_into_ours_with_same_logits(hf, hf_dir: Path, tmp_path: Path, safe_serialization: bool) -> None:
    pytest.importorskip("peft")
    peft_model = trained_peft_model(hf, seed=2, r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"])
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=safe_serialization)
    assert (tmp_path / "adapter" / ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin")).is_file()
    model = from_pretrained(hf_dir)
    wrapped = load_peft_adapter(model, tmp_path / "adapter")
    assert len(wrapped) == 8 and "model.layers.1.mlp.gate_proj" in wrapped
    assert rel_error(our_logits(model.eval()), hf_logits(peft_model.eval())) <= 1e-5


def test_peft_dora_adapter_loads_into_ours_with_same_logits(hf, hf_dir: Path, tmp_path: Path) -> None:
    """A PEFT DoRA adapter (magnitude trained away from its initial row norms) scores as in PEFT."""
    peft = pytest.importorskip("peft")
    peft_model = trained_peft_model(hf, seed=3, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    model = from_pretrained(hf_dir)
    wrapped = load_peft_adapter(model, tmp_path / "adapter")
    assert len(wrapped) == 6 and all(m.use_dora for m in lora_modules(model).values())
    expected = hf_logits(peft_model.eval())
    assert rel_error(expected, hf_logits(hf)) > 1e-3  # the adapter does something
    assert rel_error(our_logits(model.eval()), expected) <= 1e-5

    # Saved again by us, it is the same adapter for PEFT.
    out = save_peft_adapter(model, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    assert rel_error(hf_logits(again), expected) <= 1e-6

    # The adapter_config says DoRA but the weights lack the magnitudes (or the reverse): one line, model untouched.
    plain = tmp_path / "plain"
    peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(plain)
    plain_config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps(plain_config | {"use_dora": True}))
    fresh = from_pretrained(hf_dir)
    assert "missing keys base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in one_line_error(load_peft_adapter, fresh, plain)
    dora_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(dora_config | {"use_dora": False}))
    assert "unexpected keys" in one_line_error(load_peft_adapter, fresh, tmp_path / "adapter")
    assert not lora_modules(fresh)


def test_adapter_errors(hf, hf_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    # An adapter trained on a base with a wider MLP does not fit ours.
    wide = peft.get_peft_model(tiny_hf_llama(intermediate_size=256), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"]))
    wide.save_pretrained(tmp_path / "wide")
    model = from_pretrained(hf_dir)
    message = one_line_error(load_peft_adapter, model, tmp_path / "wide")
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight has shape [2, 256], the config expects [2, 192]" in message
    assert not lora_modules(model)  # checked before touching the model

    good = tmp_path / "good"
    peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(good)
    adapter_config = json.loads((good / "adapter_config.json").read_text())
    for change, expected in [
        ({"target_modules": ["c_attn"]}, "target_modules ['c_attn'] are not linear layers of the model"),
        ({"use_dora": "yes"}, "use_dora must be true or false, got 'yes'"),
        ({"use_rslora": True}, "use_rslora=True is not supported"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ]:
        (good / "adapter_config.json").write_text(json.dumps(adapter_config | change))
        assert expected in one_line_error(load_peft_adapter, model, good)
    (good / "adapter_config.json").unlink()
    assert "adapter_config.json: file not found" in one_line_error(load_peft_adapter, model, good)
    assert "checkpoint directory not found" in one_line_error(load_peft_adapter, model, tmp_path / "nope")


def test_save_peft_adapter_needs_uniform_rank(hf_dir: Path, tmp_path: Path) -> None:
    model = from_pretrained(hf_dir)
    assert "no LoRA layers" in one_line_error(save_peft_adapter, model, tmp_path / "a")
    apply_lora(model, ["q_proj"], rank=2, alpha=4)
    apply_lora(model, ["v_proj"], rank=4, alpha=4)
    assert "one rank/alpha/dropout" in one_line_error(save_peft_adapter, model, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
