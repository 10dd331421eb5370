"""The model families, one file each, and the one registry the rest of the code uses.

    SIZES["llama3_1_8b"]            -> Size (ModelConfig fields, parameter count, repository, config.json link)
    model_config("qwen3_8b", ...)   -> ModelConfig of a named size, fields overridden
    family_of_size("qwen3_8b")      -> Family (tokens, chat template, HF mapping)
    hf_mapping("qwen2")             -> HFMapping of a Hugging Face model_type (how config.json reads)
    family_for(config)              -> the Family a ModelConfig most likely belongs to (for token ids)

A new family is one new file here with a `FAMILY`, added to `FAMILIES` below.
"""

from __future__ import annotations

from lightning_tune.families import gemma2, gemma3, gpt_oss, llama2, llama3, ministral3, mistral, mixtral, olmo2, phi3, phi4, qwen2, qwen3, qwen3_moe, smollm2
from lightning_tune.families.base import Family, HFMapping, Size
from lightning_tune.families.config import ModelConfig

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        llama2.FAMILY,
        llama3.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        mistral.FAMILY,
        smollm2.FAMILY,
        gemma3.FAMILY,
        gemma2.FAMILY,
        olmo2.FAMILY,
        phi3.FAMILY,
        phi4.FAMILY,
        phi4.MINI_FAMILY,
        ministral3.FAMILY,
        qwen3_moe.FAMILY,
        mixtral.FAMILY,
        gpt_oss.FAMILY,
    )
}
SIZES: dict[str, Size] = {name: size for family in FAMILIES.values() for name, size in family.sizes.items()}
_FAMILY_OF_SIZE: dict[str, Family] = {name: family for family in FAMILIES.values() for name in family.sizes}
HF_MAPPINGS: dict[str, HFMapping] = {family.hf.model_type: family.hf for family in FAMILIES.values()}

__all__ = ["FAMILIES", "HF_MAPPINGS", "SIZES", "Family", "HFMapping", "ModelConfig", "Size", "family_for", "family_of_size", "hf_mapping", "model_config"]


class UnknownModelError(ValueError):
    """One line: the name or model_type asked for and the ones supported."""


def model_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a named size (any family), with any field overridden (e.g. `vocab_size=1000`)."""
    if name not in SIZES:
        raise UnknownModelError(f"unknown model {name!r}; expected one of {', '.join(SIZES)}")
    unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise UnknownModelError(f"unknown model argument(s) {sorted(unknown)}; expected some of {list(ModelConfig.__dataclass_fields__)}")
    return ModelConfig(**{**SIZES[name].config, **overrides})


def family_of_size(name: str) -> Family:
    if name not in _FAMILY_OF_SIZE:
        raise UnknownModelError(f"unknown model {name!r}; expected one of {', '.join(SIZES)}")
    return _FAMILY_OF_SIZE[name]


def hf_mapping(model_type: object, file: object = "config.json") -> HFMapping:
    """The mapping of a config.json's `model_type`; one line naming the file and what is supported otherwise."""
    if model_type not in HF_MAPPINGS:
        raise UnknownModelError(f"{file}: model_type {model_type!r} is not supported; supported: {', '.join(HF_MAPPINGS)}")
    return HF_MAPPINGS[model_type]


def family_for(config: ModelConfig) -> Family | None:
    """The family a config belongs to: its model_type, and the vocabulary size where several families
    share one (Llama 2 / Llama 3 / SmolLM2 all say "llama"); if the vocabulary tells nothing, the first
    family registered for the model_type (Llama 2 for "llama", as before there were families). None
    for a model_type no family has."""
    candidates = [f for f in FAMILIES.values() if f.hf.model_type == config.model_type]
    by_vocab = [f for f in candidates if any(size.config.get("vocab_size") == config.vocab_size for size in f.sizes.values())]
    return (by_vocab or candidates or [None])[0]
