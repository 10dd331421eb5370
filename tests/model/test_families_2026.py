"""Gemma 3, Gemma 2 and OLMo 2 against transformers: logits, config.json both ways, generation, LoRA exports.

Each family's reference is a tiny random checkpoint that transformers writes (`save_pretrained`), built
once per module. Lengths cross the sliding window (8), so sliding and full layers differ; Gemma 2's caps
are set low (2 on the scores, 3 on the logits) so that tanh is far from linear on these small values.
fp32 logits: relative error <= 1e-5, as in test_families.py (the same operations in another order: a few
ulps over a few layers, ~1e-7 in practice; a wrong operation gives 1e-2 or more).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_helpers import tiny_hf, write_tiny_tokenizer  # noqa: E402
from tiny_helpers import batches  # noqa: E402

from lightning_tune.checkpoint import from_pretrained, load_config  # noqa: E402
from lightning_tune.checkpoint.tensors import fuse_split  # noqa: E402
from lightning_tune.families.hf_config import config_from_hf, config_to_hf  # noqa: E402
from lightning_tune.io.files import CheckpointError  # noqa: E402
from lightning_tune.model import CausalLM, ModelConfig  # noqa: E402

MINISTRAL3_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.5,
    "llama_4_scaling_beta": 0.1,
}
PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
# family -> (model_type, transformers config overrides). Gemma 3: six layers, so the 5:1 pattern shows.
CASES = {
    "gemma3": ("gemma3_text", dict(num_hidden_layers=6, hidden_size=32, head_dim=16, intermediate_size=64, query_pre_attn_scalar=24, sliding_window=8, rope_parameters=GEMMA3_ROPE)),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "olmo2": ("olmo2", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # Phi-4-mini's switches: half the head turns, LongRoPE past an original context of 16 (of 64), tied head.
    "phi3": ("phi3", dict(partial_rotary_factor=0.5, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, original_max_position_embeddings=16, rope_scaling=PHI3_LONGROPE)),
    # YaRN (factor 4 over 8 positions) and the query scale (a step every 8 positions): both act within 24.
    "ministral3": ("ministral3", dict(head_dim=16, pad_token_id=0, rope_parameters=MINISTRAL3_YARN)),
}
LENGTH = 24


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tokens(length: int = LENGTH, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[transformers.PreTrainedModel, Path]]:
    """family -> (transformers' model, the directory it saved itself to)."""
    out = {}
    for family, (model_type, kwargs) in CASES.items():
        hf = tiny_hf(model_type, **kwargs)
        with torch.no_grad():  # Gemma's norms are (1 + w): tiny_hf's 1 + noise would double them; noise around 0 instead
            for name, p in hf.named_parameters():
                if model_type.startswith("gemma") and name.endswith("norm.weight"):
                    p.copy_(0.2 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(family) / "hf"
        hf.save_pretrained(path)
        out[family] = (hf, path)
    return out


@pytest.mark.parametrize("family", CASES)
def test_logits_equal_transformers(family: str, saved) -> None:
    hf, path = saved[family]
    ours = from_pretrained(path)
    state = ours.state_dict()
    if family == "phi3":  # our q/k/v and gate/up, fused again, are the checkpoint's tensors
        state = fuse_split(state, ours.config)
        assert all(torch.equal(state[k], v) for k, v in hf.state_dict().items())
    assert sorted(state) == sorted(hf.state_dict())
    x = tokens()
    with torch.no_grad():
        assert rel_error(ours(x), hf(x).logits) <= 1e-5


def test_the_switches_act_at_these_lengths(saved) -> None:
    """Guards the parity test: without each switch the logits differ (else it could pass with one ignored)."""
    x = tokens()
    changes = {
        "gemma3": [{"layer_types": None, "sliding_window": None}, {"rope_local_base": None}, {"query_pre_attn_scalar": None}],
        "gemma2": [{"attn_logit_softcap": None}, {"final_logit_softcap": None}, {"layer_types": None, "sliding_window": None}],
        "phi3": [{"rope_partial_factor": 1.0, "rope_type": "default"}, {"rope_long_factor": (1.0, 1.5, 2.0, 3.0)}, {"rope_attention_factor": 1.0}],
        "ministral3": [{"query_scale_beta": None}, {"rope_type": "default"}, {"rope_attention_factor": 1.0}],
    }
    for family, overrides in changes.items():
        hf, path = saved[family]
        with torch.no_grad():
            expected = hf(x).logits
            for change in overrides:
                plain = CausalLM(ModelConfig(**(load_config(path).to_dict() | change)))
                plain.load_state_dict(from_pretrained(path).state_dict(), strict=False)
                plain.tie_weights()
                assert rel_error(plain.eval()(x), expected) > 1e-3, (family, change)


def test_packed_samples_equal_each_sample_alone(saved) -> None:
    """Sliding layers turn packed samples into an explicit mask: each sample still sees only itself."""
    hf, path = saved["gemma3"]
    ours = from_pretrained(path)
    x = tokens(30, batch=1)
    with torch.no_grad():
        packed = ours(x, seq_lens=[[18, 12]])
        alone = torch.cat([hf(x[:, :18]).logits, hf(x[:, 18:]).logits], dim=1)
    assert rel_error(packed, alone) <= 1e-5


def v4_form(v5: dict) -> dict:
    """The transformers 4 form of a Gemma 3 config.json: rope_theta / rope_scaling / rope_local_base_freq and
    sliding_window_pattern instead of rope_parameters per layer type and layer_types."""
    rope = v5["rope_parameters"]
    full = {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}
    out = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    return out | {
        "rope_theta": rope["full_attention"]["rope_theta"],
        "rope_local_base_freq": rope["sliding_attention"]["rope_theta"],
        "rope_scaling": None if full.get("rope_type") == "default" else full,
        "sliding_window_pattern": 6,
    }


@pytest.mark.parametrize("family", CASES)
def test_config_json_reads_in_both_forms_and_exports_what_transformers_reads(family: str, saved) -> None:
    hf, path = saved[family]
    v5 = json.loads((path / "config.json").read_text())
    config = load_config(path)
    if family == "gemma3":
        assert config_from_hf(v4_form(v5)) == config
        assert config.layer_types == ("sliding_attention",) * 5 + ("full_attention",) and config.rope_local_base == 10000.0
    else:
        top = ("partial_rotary_factor", "original_max_position_embeddings") if family == "phi3" else ()  # Phi-3's transformers 4 form has them at the top
        rope = {k: v for k, v in v5["rope_parameters"].items() if k not in ("rope_theta", *top)}
        v4 = {k: v for k, v in v5.items() if k != "rope_parameters"} | {"rope_theta": v5["rope_parameters"]["rope_theta"]}
        v4["rope_scaling"] = None if rope.get("rope_type") == "default" else rope  # Phi-3: partial_rotary_factor, original_max_... at the top
        assert config_from_hf(v4) == config
    written = config_to_hf(config)
    assert "rope_parameters" not in written and config_from_hf(written) == config
    assert written["model_type"] == v5["model_type"] and written["architectures"] == [type(hf).__name__]
    reread = transformers.AutoConfig.for_model(**written)
    if family in ("phi3", "ministral3"):  # the attention factor written out (transformers derives it): the same model, logit for logit
        again = transformers.AutoModelForCausalLM.from_config(reread, attn_implementation="eager").eval()
        again.load_state_dict(hf.state_dict())
        with torch.no_grad():
            assert rel_error(again(tokens()).logits, hf(tokens()).logits) <= 1e-6
    else:
        assert reread.rope_parameters == hf.config.rope_parameters
    head_dim = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads for c in (reread, hf.config)]
    assert head_dim[0] == head_dim[1] == config.head_dim
    keys = (
        "tie_word_embeddings",
        "sliding_window",
        "layer_types",
        "num_key_value_heads",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "hidden_activation",
        "hidden_act",
    )
    for key in keys:
        assert getattr(reread, key, None) == getattr(hf.config, key, None), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
        ({"layer_types": ["sliding_attention"]}, "layer_types must list 6 of"),
        ({"hidden_activation": "relu"}, "hidden_activation is 'relu'"),
        ({"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}, "the sliding layers' rotary type must be 'default'"),
    ],
)
def test_unsupported_gemma3_config_is_one_line(change: dict, message: str, saved, tmp_path: Path) -> None:
    _, path = saved["gemma3"]
    cfg = json.loads((path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as error:
        config_from_hf(cfg, tmp_path / "config.json")
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: ") and message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("family", CASES)
def test_a_terse_config_json_reads_as_transformers_reads_it(family: str) -> None:
    model_type = CASES[family][0]
    terse = {"model_type": model_type, "vocab_size": 96, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 7, "num_attention_heads": 8}
    ours, theirs = config_from_hf(terse), transformers.AutoConfig.for_model(**terse)
    assert ours.max_seq_len == theirs.max_position_embeddings and ours.norm_eps == theirs.rms_norm_eps
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings and ours.num_kv_heads == (theirs.num_key_value_heads or 8)
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or 8)
    assert list(ours.layer_types or []) == list(getattr(theirs, "layer_types", None) or [])
    assert ours.sliding_window == getattr(theirs, "sliding_window", None)
    rope = theirs.rope_parameters.get("full_attention", theirs.rope_parameters)
    assert ours.rope_base == rope["rope_theta"] and ours.rope_type == rope["rope_type"]


# ---- generation and LoRA, through the recipes and the CLI ---------------------------------------


@pytest.mark.parametrize("family", CASES)
def test_greedy_generation_through_the_cli_equals_transformers(family: str, saved, tmp_path: Path, capsys) -> None:
    """12 new tokens after a 5-token prompt: the KV cache runs past the window of 8 on the sliding layers."""
    from lightning_tune.cli import main

    hf, source = saved[family]
    path = tmp_path / "hf"
    path.mkdir()
    for file in source.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    write_tiny_tokenizer(path, eos_ids=[2])
    prompt = [1, 10, 11, 12, 13]  # <bos> w10 .. w13
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert 2 not in expected  # no end token: all 12 are compared
    capsys.readouterr()
    assert main(["generate", "--checkpoint_dir", str(path), "--prompt", "w10 w11 w12 w13", "--template", "none", "--max_new_tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == " ".join({0: "<pad>", 1: "<bos>"}.get(i, f"w{i}") for i in expected)


def fit(recipe, path: Path, root: Path, **kwargs) -> CausalLM:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = recipe(checkpoint_dir=str(path), lr=1e-2, warmup_steps=0, **kwargs)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, DataLoader(batches(2, masked_prompt=4), batch_size=None))
    return module.model.eval()


@pytest.mark.parametrize("family", CASES)
def test_lora_fit_exports_merged_for_transformers_and_adapter_for_peft(family: str, saved, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from lightning_tune.recipes import LoRAFinetune

    hf, path = saved[family]
    ours = fit(LoRAFinetune, path, tmp_path / "run", lora_rank=4, lora_dropout=0.0, lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True)
    x = tokens(20)
    with torch.no_grad():
        expected = ours(x)
        assert rel_error(expected, hf(x).logits) > 1e-4  # the adapters trained away from the base
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged", attn_implementation="eager").eval()
        adapter = tmp_path / "run" / "adapter"
        if family == "phi3":  # save_peft_adapter fused the split q/k/v and gate/up adapters (`fuse_lora_for_peft`)
            assert not {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} & set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
        adapted = peft.PeftModel.from_pretrained(hf, adapter).eval()
        assert rel_error(merged(x).logits, expected) <= 1e-5
        assert rel_error(adapted(x).logits, expected) <= 1e-5
        adapted.unload()  # the module-wide reference model loses its adapters again
    assert type(merged).__name__ == type(hf).__name__


def test_training_loss_applies_gemma2s_final_cap_inside_the_chunked_kernel(saved) -> None:
    """The chunked head kernel with the cap = cross-entropy of the model's own (capped) logits, value and
    gradients (fp32; the same operations per element, summed in another order: 1e-5)."""
    from lightning_tune.training.loss import head_cross_entropy_sum

    _, path = saved["gemma2"]
    model = from_pretrained(path)
    assert model.plain_head_weight() is None and model.capped_head() is not None
    hidden = torch.randn(10, 64, generator=torch.Generator().manual_seed(2)) * 8  # logits of order 1-10: the cap (3) acts
    targets = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(3))
    results = []
    for chunk in (4, 0):  # chunked with the cap / the model's logits
        h = hidden.clone().requires_grad_()
        model.zero_grad()
        loss = head_cross_entropy_sum(model, h, targets, chunk)
        loss.backward()
        results.append((loss.detach(), h.grad, model.lm_head.weight.grad.clone()))
    for got, want in zip(results[0], results[1]):
        assert rel_error(got, want) <= 1e-5


def test_a_multimodal_gemma3_checkpoint_loads_its_text_decoder(tmp_path: Path) -> None:
    """Gemma 3 4B+ ship as Gemma3ForConditionalGeneration (text_config, language_model.* weights, a vision
    tower): the text decoder loads and gives the wrapper's text-only logits."""
    torch.manual_seed(0)
    text = dict(CASES["gemma3"][1], vocab_size=96, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=93, eoi_token_index=94, image_token_index=95)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "mm")
    ours = from_pretrained(tmp_path / "mm")
    assert ours.config.model_type == "gemma3_text" and ours.config.tie_word_embeddings
    x = tokens()
    with torch.no_grad():
        assert rel_error(ours(x), hf(input_ids=x).logits) <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True])
def test_phi3_adapter_on_some_projections_fuses_for_peft(use_dora: bool, saved, tmp_path: Path) -> None:
    """LoRA on q and v only (k and up without one: zero blocks in the fused adapter) and on gate and up
    (DoRA: all parts adapted, magnitudes stacked): PEFT on transformers' fused Phi-3 gives our logits."""
    peft = pytest.importorskip("peft")
    from lightning_tune.checkpoint import save_peft_adapter
    from lightning_tune.layers.lora import apply_lora

    hf, path = saved["phi3"]
    ours = from_pretrained(path)
    targets = ["gate_proj", "up_proj"] if use_dora else ["q_proj", "v_proj", "gate_proj"]
    if use_dora:
        apply_lora(ours, targets, rank=2, alpha=4.0, use_dora=True)
    else:
        apply_lora(ours, targets, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p) + (1.0 if "magnitude" in name else 0.0) * p)
    save_peft_adapter(ours, tmp_path / "adapter")
    x = tokens()
    with torch.no_grad():
        expected = ours.eval()(x)
        assert rel_error(expected, hf(x).logits) > 1e-3
        adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()  # save_peft_adapter wrote it fused
        assert rel_error(adapted(x).logits, expected) <= 1e-5
        adapted.unload()


@pytest.mark.parametrize("family", ["gemma2", "phi3"])  # the soft-capped chunked loss's gradients; the fused export of every weight
def test_full_fit_exports_load_in_transformers(family: str, saved, tmp_path: Path) -> None:
    from lightning_tune.recipes import FullFinetune

    hf, path = saved[family]
    ours = fit(FullFinetune, path, tmp_path / "run")
    x = tokens(20)
    with torch.no_grad():
        assert rel_error(ours(x), hf(x).logits) > 1e-4  # it trained
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged", attn_implementation="eager").eval()
        assert rel_error(reloaded(x).logits, ours(x)) <= 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_a_multimodal_mistral3_checkpoint_loads_its_ministral3_decoder(tied: bool, tmp_path: Path) -> None:
    """Ministral 3 ships as Mistral3ForConditionalGeneration; the wrapper's tie_word_embeddings decides the head, as in transformers."""
    torch.manual_seed(0)
    text = dict(CASES["ministral3"][1], vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, head_dim=8)
    config = transformers.Mistral3Config(text_config=dict(text, model_type="ministral3"), vision_config=vision, image_token_index=95, tie_word_embeddings=tied)
    hf = transformers.Mistral3ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "mm")
    ours = from_pretrained(tmp_path / "mm")
    assert ours.config.model_type == "ministral3" and ours.config.tie_word_embeddings == tied
    x = tokens()
    with torch.no_grad():
        assert rel_error(ours(x), hf(input_ids=x).logits) <= 1e-5


# A split regex of the form tekken.json carries (not necessarily its exact one: any pattern goes through the same converter)
TEKKEN_PATTERN = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def test_a_tekken_tokenizer_json_reads_with_transformers_ids(tmp_path: Path) -> None:
    """Ministral 3's tokenizer is Tekken, shipped as a tokenizer.json that transformers' converter writes
    (a BPE over bytes, a Split + ByteLevel pre-tokenizer, the special tokens first). A tiny tekken.json put
    through that converter reads with transformers' ids, special tokens and decoding (no BOS prepended, as
    in transformers: the chat template writes <s>)."""
    import base64

    from lightning_tune.tokenizer import load_tokenizer

    pytest.importorskip("transformers.integrations.mistral.tokenizer")
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>"]
    pieces = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"th", b"the", b" the", b"in", b"ing"]
    tekken = {
        "config": {"pattern": TEKKEN_PATTERN, "default_vocab_size": 1000, "default_num_special_tokens": 100, "version": "v7"},
        "vocab": [{"rank": i, "token_bytes": base64.b64encode(b).decode(), "token_str": None} for i, b in enumerate(pieces)],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
    }
    (tmp_path / "tekken.json").write_text(json.dumps(tekken))
    converted = convert_tekken_tokenizer(str(tmp_path / "tekken.json"))
    converted.add_special_tokens({"pad_token": "<pad>"})  # as convert_ministral3_weights_to_hf.py does
    converted.save_pretrained(tmp_path / "hf")
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), load_tokenizer(tmp_path / "hf")
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.token_to_id("[INST]"), ours.token_to_id("[/INST]")) == (None, 2, 11, 3, 4)
    for text in ["hello world", "[INST]hello[/INST] the world</s>", "héllo 123\n\nin the ing"]:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids and ours.decode(ids) == theirs.decode(ids), text


# --------------------------------------------------------------------------------------------------
# Phi-4-mini (its own family in families/phi4.py: partial rotary 0.75, LongRoPE, tied head, 200064 rows)


def test_phi4_mini_size_has_transformers_parameter_count_and_config() -> None:
    """Ours on the meta device = the recorded count = transformers' Phi3ForCausalLM of our config.json."""
    from lightning_tune.families.phi4 import MINI_FAMILY

    size = MINI_FAMILY.sizes["phi4_mini"]
    config = ModelConfig(**size.config)
    hf_config = config_to_hf(config)
    assert hf_config["model_type"] == "phi3" and hf_config["partial_rotary_factor"] == 0.75 and hf_config["tie_word_embeddings"] is True
    with torch.device("meta"):
        ours = CausalLM(config)
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config))
    assert type(theirs).__name__ == "Phi3ForCausalLM"
    assert sum(p.numel() for p in ours.parameters()) == size.params == sum(p.numel() for p in theirs.parameters())
    assert config_from_hf(hf_config) == config
    assert config.rotary_dim == 96 and len(config.rope_long_factor) == 48
    # the attention factor transformers derives for longrope from 131072 / 4096
    assert config.rope_attention_factor == transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](theirs.config, "cpu")[1]


def test_phi4_mini_shape_logits_equal_transformers(tmp_path) -> None:
    """Phi-4-mini scaled down (GQA 3:1, head 16 of which 0.75 turn: 12, LongRoPE with the first 6 real long
    factors past an original context of 16, tied head), built by transformers from our config.json: equal logits."""
    import dataclasses

    from lightning_tune.families.phi4 import MINI_FAMILY

    full = ModelConfig(**MINI_FAMILY.sizes["phi4_mini"].config)
    tiny = dataclasses.replace(
        full, vocab_size=96, num_layers=2, num_heads=6, num_kv_heads=2, embed_dim=96, head_dim=16, intermediate_dim=160, max_seq_len=64, sliding_window=None,
        rope_original_max_seq_len=16, rope_long_factor=full.rope_long_factor[:6], rope_short_factor=(1.0, 1.1, 1.2, 1.3, 1.4, 1.5),
        rope_attention_factor=math.sqrt(1 + math.log(64 / 16) / math.log(16)),
    )  # fmt: skip
    assert tiny.rotary_dim == 12 and tiny.head_dim == 16
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config_to_hf(tiny)), attn_implementation="eager").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if name.endswith("norm.weight") else 0.1) + (1.0 if name.endswith("norm.weight") else 0.0))
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config == tiny
    x = tokens()  # 24 positions: past the original 16, so the long factors act
    with torch.no_grad():
        assert rel_error(ours(x), hf(x).logits) <= 1e-5
        # guards: without the partial rotary, or with the short factors, the logits differ
        for change in ({"rope_partial_factor": 1.0, "rope_type": "default"}, {"rope_long_factor": tiny.rope_short_factor}):
            other = CausalLM(dataclasses.replace(tiny, **change))
            other.load_state_dict(ours.state_dict())
            assert rel_error(other.eval()(x), hf(x).logits) > 1e-3, change
