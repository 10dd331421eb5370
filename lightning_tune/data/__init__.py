"""Fine-tuning data: instruction records, conversations and preference pairs to samples, collate, and the
DataModules (one shared base, `TokenizedDataModule`). Layer 3: imports io, families, tokenizer and layers only."""

from lightning_tune.data.base import TokenizedDataModule
from lightning_tune.data.chat import ChatDataModule
from lightning_tune.data.collate import IGNORE_INDEX, collate, collate_packed, collate_pairs
from lightning_tune.data.conversation import encode_conversation
from lightning_tune.data.errors import DataError
from lightning_tune.data.instruct import InstructDataModule, encode_sample
from lightning_tune.data.preference import PreferenceDataModule
from lightning_tune.data.prompts import PromptDataModule
from lightning_tune.data.sampler import LengthGroupedSampler
from lightning_tune.data.templates import PromptTemplate, get_template
from lightning_tune.data.unpaired import UnpairedDataModule, collate_unpaired

__all__ = [
    "ChatDataModule",
    "DataError",
    "IGNORE_INDEX",
    "InstructDataModule",
    "LengthGroupedSampler",
    "PreferenceDataModule",
    "PromptDataModule",
    "PromptTemplate",
    "TokenizedDataModule",
    "UnpairedDataModule",
    "collate",
    "collate_packed",
    "collate_pairs",
    "collate_unpaired",
    "encode_conversation",
    "encode_sample",
    "get_template",
]
