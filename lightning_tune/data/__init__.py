"""Fine-tuning data: instruction records and conversations to samples, collate, and the DataModules."""

from lightning_tune.data.base import TokenizedDataModule
from lightning_tune.data.chat import ChatDataModule, encode_conversation
from lightning_tune.data.datamodule import InstructDataModule
from lightning_tune.data.errors import DataError
from lightning_tune.data.instruct import IGNORE_INDEX, collate, encode_sample
from lightning_tune.data.packing import collate_packed
from lightning_tune.data.preference import PreferenceDataModule, collate_pairs
from lightning_tune.data.sampler import LengthGroupedSampler
from lightning_tune.data.templates import PromptTemplate, get_template

__all__ = [
    "ChatDataModule",
    "DataError",
    "IGNORE_INDEX",
    "InstructDataModule",
    "LengthGroupedSampler",
    "PreferenceDataModule",
    "PromptTemplate",
    "TokenizedDataModule",
    "collate",
    "collate_packed",
    "collate_pairs",
    "encode_conversation",
    "encode_sample",
    "get_template",
]
