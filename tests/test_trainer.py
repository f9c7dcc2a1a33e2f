"""HF ``Trainer`` on a tiny converted LLaMA: the load-balancing term survives the Trainer's own
handling of the loss (it scales it in place, passes ``num_items_in_batch`` for gradient
accumulation, checkpoints activations, saves and resumes).

``router_aux_loss_coef=1.0`` makes the aux term's share of the router's gradient large enough to
notice if it were lost, doubled or mis-weighted. Where parameters are compared after a step the
optimizer is plain SGD with a constant learning rate and no clipping, so a parameter's change is
``-lr · gradient``: AdamW's first step is ``≈ -lr · sign(gradient)`` and would hide a gradient
counted twice. Each test runs a few Trainer steps on CPU in about a second.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import VOCAB, converted

SEQ_LEN = 8
PADDING = [0, 2, 4, 1, 0, 3, 5, 2]  # left padding of each example: micro-batches differ in size


def _examples(count: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        ids = torch.randint(0, VOCAB, (SEQ_LEN,), generator=g)
        mask = torch.ones(SEQ_LEN, dtype=torch.long)
        mask[: PADDING[i % len(PADDING)]] = 0
        examples.append({"input_ids": ids, "attention_mask": mask,
                         "labels": ids.masked_fill(mask == 0, -100)})
    return examples


def _stack(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def _model(**overrides) -> torch.nn.Module:
    return converted("llama", router_aux_loss_coef=overrides.pop("coef", 1.0), **overrides)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(model, output_dir, examples, resume_from: str | None = None, **args) -> Trainer:
    """``Trainer.train`` with default arguments except ``args`` (no reports, CPU, no saving)."""
    args.setdefault("save_strategy", "no")
    args = TrainingArguments(output_dir=str(output_dir), report_to=[], use_cpu=True, **args)
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


SGD = {"optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant",
       "max_grad_norm": 0.0, "train_sampling_strategy": "sequential"}


def _loss_recorder(model) -> list[torch.Tensor]:
    """The ``loss`` of every forward, as the Trainer receives it (after the GraphMoE hooks)."""
    losses: list[torch.Tensor] = []
    model.register_forward_hook(lambda mod, args, out: losses.append(out.loss.detach().clone()))
    return losses


def test_default_arguments_train_and_the_first_loss_is_a_manual_forward(tmp_path):
    # Defaults: AdamW, random sampling, batch size 8 (the whole data set: one batch, in some
    # order), the loss scaled in place by the Trainer (`loss *= ...`), num_items_in_batch.
    model = _model()
    manual = copy.deepcopy(model).train()
    losses = _loss_recorder(model)
    examples = _examples()
    _train(model, tmp_path, examples, max_steps=2)
    assert len(losses) == 2 and all(torch.isfinite(v) for v in losses)
    expected = manual(**_stack(examples)).loss
    # The Trainer's batch is a permutation of the same tokens: equal up to summation order.
    torch.testing.assert_close(losses[0], expected.detach(), rtol=1e-6, atol=1e-6)
    assert losses[1] != losses[0]  # it did train


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_gradient_accumulation_counts_the_aux_loss_once(tmp_path, coef):
    model = _model(coef=coef)
    before = _trainable(model)
    manual = copy.deepcopy(model).train()
    examples = _examples(4)
    _train(model, tmp_path, examples, max_steps=1, per_device_train_batch_size=2,
           gradient_accumulation_steps=2, **SGD)
    halves = [_stack(examples[:2]), _stack(examples[2:])]
    counts = [int((h["labels"][:, 1:] != -100).sum()) for h in halves]
    if coef == 0:
        # Cross-entropy alone: the step of the concatenated batch.
        manual(**_stack(examples)).loss.backward()
    else:
        # The load-balancing loss is not additive over tokens (a product of two means), so the
        # accumulated step equals the micro-batches' losses weighted by their share of the
        # label tokens, as the Trainer's `sum / num_items_in_batch` weights the cross-entropy:
        # each micro-batch's aux loss counted once, in a token-weighted mean.
        assert counts[0] != counts[1]  # unequal shares, so the weights matter
        for half, count in zip(halves, counts, strict=True):
            (count / sum(counts) * manual(**half).loss).backward()
    after = _trainable(model)
    for name, p in manual.named_parameters():
        if p.requires_grad:
            # SGD, lr 1: the change is -gradient. The two sides add the same per-token terms in
            # another grouping (per micro-batch or not), and `after - before` is a difference of
            # O(1) fp32 values (ulp 1.2e-7): measured worst 3e-7 against gradients up to 1.
            torch.testing.assert_close(after[name] - before[name], -p.grad, rtol=1e-5,
                                       atol=2e-6, msg=name)


def test_gradient_accumulation_without_the_weight_would_differ(tmp_path):
    # Guards the test above: weighting each micro-batch's full loss equally (the aux loss
    # counted per micro-batch) gives another step.
    model = _model()
    before = _trainable(model)
    manual = copy.deepcopy(model).train()
    examples = _examples(4)
    _train(model, tmp_path, examples, max_steps=1, per_device_train_batch_size=2,
           gradient_accumulation_steps=2, **SGD)
    for half in (_stack(examples[:2]), _stack(examples[2:])):
        (0.5 * manual(**half).loss).backward()
    name = "model.layers.0.mlp.router.weight"
    delta = _trainable(model)[name] - before[name]
    assert not torch.allclose(delta, -manual.get_parameter(name).grad, rtol=1e-3, atol=1e-5)


# 5.24 renamed the argument; the old name (the README's, known to 5.17 too) stays an alias.
CHECKPOINTING_ARGS = [name for name in ("activation_checkpointing", "gradient_checkpointing")
                      if name in {f.name for f in dataclasses.fields(TrainingArguments)}]


@pytest.mark.parametrize("argument", CHECKPOINTING_ARGS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_trains_the_same_parameters(tmp_path, reentrant, argument):
    examples = _examples()
    common = {"max_steps": 2, "per_device_train_batch_size": 4, **SGD}
    plain = _model()
    _train(plain, tmp_path / "plain", examples, **common)
    checkpointed = _model()
    calls = []
    checkpointed.get_submodule("model.layers.0.mlp").register_forward_pre_hook(
        lambda *_: calls.append(torch.is_grad_enabled()))
    _train(checkpointed, tmp_path / "ckpt", examples, **{
        argument: True, f"{argument}_kwargs": {"use_reentrant": reentrant}}, **common)
    # Each step ran the layer again in backward (reentrant: first under no_grad).
    assert calls == [not reentrant, True] * 2
    expected = _trainable(plain)
    for name, value in _trainable(checkpointed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resuming_from_a_checkpoint_continues_the_run(tmp_path):
    examples = _examples()
    common = {"max_steps": 4, "per_device_train_batch_size": 2}
    straight = _model()
    _train(straight, tmp_path / "straight", examples, **common)

    first = _model()
    _train(first, tmp_path / "run", examples, save_strategy="steps", save_steps=2, **common)
    resumed = _model()
    losses = _loss_recorder(resumed)
    trainer = _train(resumed, tmp_path / "resumed", examples,
                     resume_from=str(tmp_path / "run" / "checkpoint-2"), **common)
    assert trainer.state.global_step == 4 and len(losses) == 2  # steps 3 and 4 only
    expected = _trainable(straight)
    for name, value in _trainable(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_evaluate_and_predict_give_compute_metrics_the_logits(tmp_path):
    """The layers' aux_loss joins every output; Trainer must not return it as a prediction
    beside the logits (compute_metrics then gets a tuple, and a standard argmax fails)."""
    model = _model()
    examples = _examples()
    seen = []

    def accuracy(pred):
        seen.append(type(pred.predictions))
        hits = pred.predictions.argmax(-1) == pred.label_ids
        return {"acc": float(hits[pred.label_ids != -100].mean())}

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, eval_dataset=examples, compute_metrics=accuracy)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_acc"] <= 1.0 and "eval_loss" in metrics
    predicted = trainer.predict(examples)
    assert predicted.predictions.shape == (len(examples), SEQ_LEN, VOCAB)
    assert seen and all(t is np.ndarray for t in seen)
