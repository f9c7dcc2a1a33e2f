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


FSDP_SCRIPT = r"""
import sys, types
from pathlib import Path
import torch
import torch.distributed as dist
from graphmoe_fused.training import GraphMoEAdapterCallback
from graphmoe_fused.training.sharding import has_sharded_adapter, shard_model
from tests.tiny_models import converted

dist.init_process_group("gloo")
out = Path(sys.argv[1])
model = converted(randomize=True, backend="torch")
callback = GraphMoEAdapterCallback()
args = types.SimpleNamespace(output_dir=str(out))
state = types.SimpleNamespace(global_step=1, is_world_process_zero=dist.get_rank() == 0)
callback.on_init_end(args, state, None, model=model)  # the model is still whole
shard_model(model, torch.device("cpu"), dist.get_world_size())
assert has_sharded_adapter(model)
callback.on_save(args, state, None, model=model)  # every process: the gather is a collective
out.mkdir(parents=True, exist_ok=True)
(out / f"rank-{dist.get_rank()}.txt").write_text(str(len(callback.saved)))
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp_adapter_is_gathered_on_every_process_and_written_once(tmp_path):
    # Two gloo processes with fully_shard'ed adapter parameters (DTensors): the callback gathers
    # on both, rank 0 writes exactly what save_adapter writes for the unsharded model.
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open

    from graphmoe_fused.hf.adapters import save_adapter

    from .test_train_distributed import _free_port

    script = tmp_path / "fsdp_callback.py"
    script.write_text(FSDP_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          check=False, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / "two" / f"rank-{r}.txt").read_text() for r in (0, 1)] == ["1", "0"]

    reference = save_adapter(converted(randomize=True, backend="torch"), tmp_path / "one")
    written = tmp_path / "two" / "checkpoint-1" / "graphmoe_adapter"
    name = "graphmoe_adapter.safetensors"
    with safe_open(str(reference / name), "pt") as a, safe_open(str(written / name), "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert (reference / "graphmoe_config.json").read_text() == \
        (written / "graphmoe_config.json").read_text()


def test_write_adapter_files_is_save_adapters_writer(tmp_path):
    from graphmoe_fused.hf.adapters import (
        _graphmoe_config_of,
        adapter_metadata,
        save_adapter,
        write_adapter_files,
    )
    from graphmoe_fused.training.sharding import full_adapter_state, write_adapter

    model = converted(randomize=True, backend="torch")
    config = _graphmoe_config_of(model)
    a = save_adapter(model, tmp_path / "a")
    b = write_adapter_files(tmp_path / "b", adapter_state_dict(model),
                            adapter_metadata(model, config), config)
    c = write_adapter(model, full_adapter_state(model), adapter_metadata(model, config),
                      tmp_path / "c")
    from safetensors import safe_open

    # (safetensors writes the metadata keys in no fixed order: compare what the files hold)
    opened = [safe_open(str(d / "graphmoe_adapter.safetensors"), "pt") for d in (a, b, c)]
    assert opened[0].metadata() == opened[1].metadata() == opened[2].metadata()
    for key in opened[0].keys():
        assert torch.equal(opened[0].get_tensor(key), opened[1].get_tensor(key)), key
        assert torch.equal(opened[0].get_tensor(key), opened[2].get_tensor(key)), key
    assert sorted(opened[0].keys()) == sorted(opened[1].keys()) == sorted(opened[2].keys())
    text = (a / "graphmoe_config.json").read_text()
    assert (b / "graphmoe_config.json").read_text() == text == \
        (c / "graphmoe_config.json").read_text()
