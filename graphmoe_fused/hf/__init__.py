"""Everything that knows a Hugging Face model: conversion, the model hooks, the aux-loss gradient
wiring, attention LoRA, adapters and statistics. The layer knows nothing of this package."""
