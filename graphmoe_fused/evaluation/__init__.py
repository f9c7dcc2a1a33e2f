"""Evaluation as the GraphMoE paper does it: multiple-choice accuracy from the label logits at
the last prompt token, plus perplexity and generation, for a base model and its GraphMoE
conversion side by side (:func:`evaluate`, behind ``graphmoe-fused eval``)."""

from .generation import generate, generate_ids
from .models import AdapterSource, check_adapter_fits, convert_with_adapter, resolve_adapter
from .multiple_choice import MCResult, last_token_logits, multiple_choice_accuracy
from .perplexity import PerplexityResult, perplexity, perplexity_stats, read_documents
from .runner import EvalOptions, EvalReport, evaluate, format_table, write_outputs

__all__ = [
    "AdapterSource",
    "EvalOptions",
    "EvalReport",
    "MCResult",
    "PerplexityResult",
    "check_adapter_fits",
    "convert_with_adapter",
    "evaluate",
    "format_table",
    "generate",
    "generate_ids",
    "last_token_logits",
    "multiple_choice_accuracy",
    "perplexity",
    "perplexity_stats",
    "read_documents",
    "resolve_adapter",
    "write_outputs",
]
