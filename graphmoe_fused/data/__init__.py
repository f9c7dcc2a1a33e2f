"""Training and evaluation data: JSONL records, prompt templates, tokenisation and the builtin
task, tokenizer and tiny model config (for runs with no download)."""

from .builtin import BUILTIN_MODEL, BUILTIN_PRESET, BUILTIN_TASKS, BuiltinTask, builtin_task
from .encoding import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_prompt,
    encoded_length,
    label_token_ids,
    pad_token_id,
)
from .prompts import CHOICE_LABELS, render_instruction, render_multiple_choice
from .records import DataError, Example, load_data_files, read_jsonl
from .tokenizer import builtin_tokenizer

__all__ = [
    "BUILTIN_MODEL",
    "BUILTIN_PRESET",
    "BUILTIN_TASKS",
    "CHOICE_LABELS",
    "IGNORE_INDEX",
    "BuiltinTask",
    "DataError",
    "Example",
    "builtin_task",
    "builtin_tokenizer",
    "collate",
    "encode_example",
    "encoded_length",
    "encode_prompt",
    "label_token_ids",
    "load_data_files",
    "pad_token_id",
    "read_jsonl",
    "render_instruction",
    "render_multiple_choice",
]
