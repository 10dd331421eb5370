"""Model files in and out: the format table (Hugging Face, Meta, GGUF) behind load_config / load_weights /\nfrom_pretrained, PEFT adapters, Lightning training checkpoints and downloads."""

from lightning_tune.checkpoint.hf import HF_IGNORED_SUFFIX, detect, hf_entries, load_hf_config, read_config, read_entries, save_hf_checkpoint
from lightning_tune.checkpoint.load import FORMATS, checkpoint_directory, detect_format, from_pretrained, load_config, load_weights, open_checkpoint, weight_reader
from lightning_tune.checkpoint.meta import META_IGNORED, load_meta_config, meta_entries, meta_intermediate_dim, meta_to_hf_key, meta_to_hf_rotary
from lightning_tune.checkpoint.peft import PEFT_PLAIN_INITS, PEFT_PLAIN_LORA, PEFT_PREFIX, load_peft_adapter, save_peft_adapter
from lightning_tune.checkpoint.tensors import Entry, Format, assign_tensor, check_config_matches, check_entries, first_names, load_shard_, load_state_dict_file, tie_embeddings
from lightning_tune.checkpoint.torchtune import read_recipe_state, torchtune_adapter_to_hf
from lightning_tune.checkpoint.training import atomic_torch_save, checkpoint_nbytes, load_training_checkpoint
from lightning_tune.families.hf_config import CONFIG_KEYS, ROPE_TYPES, config_from_hf, config_to_hf
from lightning_tune.io.files import EXPORT_MANIFEST, CheckpointError, atomic_directory, check_export_target, format_bytes, torch_load_weights_only

__all__ = [
    "CONFIG_KEYS",
    "CheckpointError",
    "EXPORT_MANIFEST",
    "Entry",
    "FORMATS",
    "Format",
    "HF_IGNORED_SUFFIX",
    "META_IGNORED",
    "PEFT_PLAIN_INITS",
    "PEFT_PLAIN_LORA",
    "PEFT_PREFIX",
    "ROPE_TYPES",
    "assign_tensor",
    "atomic_directory",
    "atomic_torch_save",
    "check_config_matches",
    "check_entries",
    "check_export_target",
    "checkpoint_directory",
    "checkpoint_nbytes",
    "config_from_hf",
    "config_to_hf",
    "detect",
    "detect_format",
    "first_names",
    "format_bytes",
    "from_pretrained",
    "hf_entries",
    "load_config",
    "load_hf_config",
    "load_meta_config",
    "load_peft_adapter",
    "load_shard_",
    "load_state_dict_file",
    "load_training_checkpoint",
    "load_weights",
    "meta_entries",
    "meta_intermediate_dim",
    "meta_to_hf_key",
    "meta_to_hf_rotary",
    "open_checkpoint",
    "read_config",
    "read_entries",
    "read_recipe_state",
    "save_hf_checkpoint",
    "save_peft_adapter",
    "tie_embeddings",
    "torch_load_weights_only",
    "torchtune_adapter_to_hf",
    "weight_reader",
]
