"""Instruction data: prompt templates, sample encoding and masking, collate, and the DataModule."""

from lightning_tune.data.datamodule import InstructDataModule
from lightning_tune.data.errors import DataError
from lightning_tune.data.instruct import IGNORE_INDEX, collate, encode_sample
from lightning_tune.data.packing import collate_packed
from lightning_tune.data.sampler import LengthGroupedSampler
from lightning_tune.data.templates import PromptTemplate, get_template

__all__ = ["DataError", "IGNORE_INDEX", "InstructDataModule", "LengthGroupedSampler", "PromptTemplate", "collate", "collate_packed", "encode_sample", "get_template"]
