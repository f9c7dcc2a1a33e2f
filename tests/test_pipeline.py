"""train -> eval -> plot through the command line, as the README runs them: each command reads
what the one before it wrote."""

from __future__ import annotations

import json

from graphmoe_fused.cli import app
from graphmoe_fused.data import read_jsonl
from graphmoe_fused.evaluation import multiple_choice_accuracy
from graphmoe_fused.hf.adapters import load_adapter
from graphmoe_fused.hf.local_model import load_base_model, save_builtin_model

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)

QUESTIONS = [
    {"question": "Which country does Ann live in?", "choices": ["Rome", "Oslo", "Lima"],
     "answer": 1},
    {"instruction": "Where does Ann live?", "output": "Oslo"},
    {"question": "Where does Bob live?", "choices": ["Rome", "Oslo"], "answer": "A"},
]


def test_train_then_eval_then_plot(tmp_path, capsys):
    base = save_builtin_model(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    run = tmp_path / "run"
    assert app.main(["train", "--model", str(base), "--data", str(data), "--output-dir", str(run),
                     "--max-steps", "3", "--batch-size", "2", "--micro-batch-size", "1",
                     "--num-experts", "4", "--lora-r", "4", "--backend", "torch",
                     "--learning-rate", "0.01", "--log-every", "1", "--no-progress"]) == 0
    events = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]

    mc = tmp_path / "test.jsonl"
    mc.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS if "question" in q))
    capsys.readouterr()
    assert app.main(["eval", "--model", str(base), "--adapter", str(run), "--data", str(mc),
                     "--out", str(tmp_path / "eval")]) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    # what eval reports is what the saved adapter scores on the saved base
    model, tokenizer = load_base_model(str(base))
    load_adapter(model, run / "adapter")
    expected = multiple_choice_accuracy(model, tokenizer, read_jsonl(mc))
    assert results["files"][str(mc)]["graphmoe"] == expected.accuracy
    assert f"{100 * expected.accuracy:.2f}" in table

    assert app.main(["plot", str(run / "train_log.jsonl"),
                     str(tmp_path / "eval" / "routing_statistics.json"),
                     "--out", str(tmp_path / "plots")]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["aux_loss.png", "routing_statistics-workload.png",
                       "train_log-workload.png"]
    for name in written:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
