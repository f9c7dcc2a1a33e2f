"""Which examples each optimizer step and micro-batch sees, and the seed of each forward: pure
functions of (seed, step), so a resumed run and a run on any number of processes see the same.

Each epoch is a seeded permutation of the examples. Step ``s`` of an epoch takes the next
``batch_size`` of them; the last step of an epoch is completed from the start of the same
permutation (as ``DistributedSampler`` pads), so every step has a full batch and every process the
same number of micro-batches. The global batch is cut into micro-batches in order, and
micro-batch ``j`` runs on process ``j % num_processes``: the micro-batches are the same, padding
included, whatever the number of processes.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over them): different for different tuples."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state + (value & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of epoch ``epoch`` (0-based)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x0DA7A))
    return torch.randperm(num_examples, generator=generator).tolist()


def step_examples(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based, counted from the start of training)."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(num_examples, seed, epoch)
    start = within * batch_size
    return [order[(start + i) % num_examples] for i in range(batch_size)]


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


def forward_seed(seed: int, step: int, micro: int) -> int:
    """Seed of torch's global RNG before micro-batch ``micro`` of step ``step``: the GraphMoE
    layers draw their dropout seeds from it, so masks do not depend on which process runs it."""
    return mix_seed(seed, step, micro, 0xD0)
