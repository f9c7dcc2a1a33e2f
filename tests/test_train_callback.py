"""`GraphMoEAdapterCallback`: a tiny Hugging Face ``Trainer`` run writes the adapter alone at
each save and at the end, and it loads back with ``gm.load_adapter`` to the same tensors."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

import graphmoe_fused as gm
from graphmoe_fused.hf.adapters import adapter_state_dict
from graphmoe_fused.training import GraphMoEAdapterCallback

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import VOCAB, converted, tiny_model


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.ids[i]}


def test_trainer_saves_only_the_adapter(tmp_path):
    model = converted(randomize=False, backend="torch")
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, save_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                             report_to=[], logging_steps=1, save_only_model=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    callback = GraphMoEAdapterCallback()
    Trainer(model=model.train(), args=args, train_dataset=_Batches(),
            callbacks=[callback]).train()

    final = tmp_path / "graphmoe_adapter"
    assert (tmp_path / "checkpoint-2" / "graphmoe_adapter" / "graphmoe_adapter.safetensors"
            ).is_file()
    assert (final / "graphmoe_adapter.safetensors").is_file()
    assert callback.saved[-1] == final
    trained = adapter_state_dict(model)
    assert any(not torch.equal(trained[k], before[k]) for k in trained)  # it did train

    fresh = gm.load_adapter(tiny_model(), final)
    loaded = adapter_state_dict(fresh)
    assert loaded.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(loaded[name], tensor.detach()), name
