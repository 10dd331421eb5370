"""What describes a model family: its named sizes, its Hugging Face config mapping, its tokens.

Plain data, no torch: `lightning_tune.families` (the registry) builds `ModelConfig`s from it, and
`checkpoint.py` reads and writes `config.json` with the `HFMapping` of its `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Size:
    """One named size: its `ModelConfig` fields, exact parameter count, and where the numbers come from.

    `params` is checked on the meta device against our model and transformers' (tests/model/test_families.py).
    `repo` is the Hugging Face repository `download` fetches; `url` its config.json.
    """

    config: dict
    params: int
    repo: str | None
    url: str | None = None

    def __post_init__(self) -> None:
        if self.url is None and self.repo is not None:
            object.__setattr__(self, "url", f"https://huggingface.co/{self.repo}/blob/main/config.json")


@dataclass(frozen=True)
class HFMapping:
    """How one Hugging Face `model_type` maps onto `ModelConfig`.

    Args:
        model_type: config.json's `model_type`.
        architecture: the `architectures` entry exports write (its `*ForCausalLM` class).
        defaults: what transformers' config class assumes for a key config.json leaves out (a test
            compares them with `transformers.AutoConfig.for_model(model_type)`); head_dim and
            num_key_value_heads None mean hidden_size // num_attention_heads and num_attention_heads.
        attention_bias: "flag": config.json's `attention_bias: true` puts a bias on q, k, v and o
            (Llama, Qwen 3); "qkv": q, k and v always have one, o never (Qwen 2); "never": no
            attention bias and no key for it (Mistral).
        qk_norm: per-head RMSNorm on q and k before the rotary embedding (Qwen 3).
        sliding_window: "none": no window; "all": `sliding_window` (when not null) applies to every
            layer (Mistral); "per_layer": only under `use_sliding_window`, above `max_window_layers`
            (Qwen; refused when any layer would use it).
        mlp_bias: whether config.json's `mlp_bias` is read (Llama); else the MLP has no bias.
        block: the `ModelConfig.block` of this model_type (its layer class).
        activation_key: the config.json key of the MLP's activation (`hidden_activation`: Gemma).
        rope_types: the rotary types read (others are refused in one line).
        Sliding window "layer_types": `layer_types` (else every `defaults["sliding_window_pattern"]`-th
        layer full, the rest sliding, as transformers derives it) says which layers use `sliding_window`
        (Gemma 2 / 3). `rope_per_layer_type`: the rotary parameters are given per layer type
        (`rope_parameters: {full_attention: ..., sliding_attention: ...}`; transformers 4: `rope_theta`,
        `rope_scaling` for the full layers, `rope_local_base_freq` for the sliding ones; Gemma 3).
        gemma_scores: `query_pre_attn_scalar` and the two soft-caps are read (Gemma 2 / 3).
        partial_rotary: `partial_rotary_factor` is read (Phi-3 / 4); else it must be 1.
        query_scale: `rope_parameters.llama_4_scaling_beta` is read (Ministral 3).
        fused_projections: the checkpoint holds `self_attn.qkv_proj` and `mlp.gate_up_proj` (Phi-3 / 4),
            split into our q/k/v and gate/up on load and fused again on export (`checkpoint/tensors.py`).
        experts: how config.json and the checkpoint describe a mixture of experts (`model/moe.py`):
            "qwen3_moe" (`num_experts` / `num_local_experts`, `moe_intermediate_size`, `norm_topk_prob`,
            `decoder_sparse_step`, `mlp_only_layers`; per-expert `mlp.experts.{i}.gate_proj` keys),
            "mixtral" (`num_local_experts`, experts of `intermediate_size`, always renormalised;
            `block_sparse_moe.experts.{i}.w1` keys), "gpt_oss" (`num_local_experts`, the router's
            top-k-then-softmax with a bias, stacked [X, in, out] experts with biases, MXFP4 on the Hub), or "none".
        attention_sinks: each attention head has a learned sink logit, `self_attn.sinks` (gpt-oss).
    """

    model_type: str
    architecture: str
    defaults: dict
    attention_bias: Literal["flag", "qkv", "never"] = "flag"
    qk_norm: bool = False
    sliding_window: Literal["none", "all", "per_layer", "layer_types"] = "none"
    mlp_bias: bool = False
    block: Literal["llama", "gemma", "olmo2"] = "llama"
    activation_key: str = "hidden_act"
    rope_types: tuple[str, ...] = ("default", "llama3", "linear")
    rope_per_layer_type: bool = False
    gemma_scores: bool = False
    partial_rotary: bool = False
    query_scale: bool = False
    fused_projections: bool = False
    experts: Literal["none", "qwen3_moe", "mixtral", "gpt_oss"] = "none"
    attention_sinks: bool = False


@dataclass(frozen=True)
class Family:
    """A model family in one place.

    Args:
        name: registry name (e.g. "llama3").
        hf: its Hugging Face config mapping (several families share `model_type` "llama").
        sizes: named sizes (registry-wide unique names, e.g. "llama3_1_8b").
        special_tokens: role (bos, eos, pad, end_of_turn, ...) -> (token string, id in the family's
            released tokenizer); exports fall back on these when no tokenizer config is at hand.
        stop_tokens: the roles whose tokens end a generation (transformers' list-valued
            `generation_config.eos_token_id`).
        chat_template: name of the default chat template (see the tokenizer's chat templates).
        meta_keys: Meta `consolidated.*.pth` name map, when Meta's original format loads.
        meta_note: why Meta's original checkpoints of this family do not load, and what to use.
    """

    name: str
    hf: HFMapping
    sizes: dict[str, Size]
    special_tokens: dict[str, tuple[str, int]]
    stop_tokens: tuple[str, ...]
    chat_template: str | None
    meta_keys: dict[str, tuple[str, int | None]] | None = None
    meta_note: str | None = None

    def token_id(self, role: str) -> int | None:
        return self.special_tokens[role][1] if role in self.special_tokens else None

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.special_tokens[role][1] for role in self.stop_tokens]
