"""Fine-tuning GraphMoE adapters: the recipe (:class:`TrainConfig`), our own training loop on
``accelerate`` (:func:`train`), and a callback for Hugging Face ``Trainer`` users."""

from .loop import TrainResult, train
from .recipe import TrainConfig

__all__ = ["GraphMoEAdapterCallback", "TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    # transformers' Trainer machinery is slow to import; only the callback needs it.
    if name == "GraphMoEAdapterCallback":
        from .trainer_callback import GraphMoEAdapterCallback

        return GraphMoEAdapterCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
