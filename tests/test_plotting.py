"""``graphmoe-fused plot`` and graphmoe_fused.plotting: every plot from small files written here
(and from a committed bench/results JSON), the numbers behind each plot checked against values
worked out by hand, and every bad input refused with one line naming the file."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from graphmoe_fused.cli import plot_command
from graphmoe_fused.cli.args import OneLineParser
from graphmoe_fused.plotting import (
    aux_loss_curves,
    layer_workload,
    load_aux_loss,
    load_benchmark,
    load_workload,
    plot_files,
    plot_workload,
    read_input,
    speedup_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
# The committed pytest-benchmark run with the T = 1..5 sweep (reference and torch backends).
BENCH_JSON = ROOT / "bench" / "results" / "2026-11-25-cpu-epyc2.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COUNTS = [[10, 20, 30, 40], [25, 25, 25, 25], [0, 50, 25, 25]]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert len(data) > 5000 and width > 200 and height > 150, (path, len(data), width, height)


def write_jsonl(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def train_log(path: Path, steps: int = 4) -> Path:
    """A train log as graphmoe-fused train writes it: T = 3 rounds, 2 layers, 4 experts; two
    routing events, the last with :data:`COUNTS`."""
    events: list[dict] = [{"event": "start", "num_layers": 2, "num_experts": 4, "num_rounds": 3,
                           "top_k": 2}]
    for s in range(1, steps + 1):
        per_round = [1.0 + 0.1 * s, 1.1 + 0.1 * s, 1.5 - 0.1 * s]
        events.append({"event": "step", "step": s, "epoch": s / steps, "loss": 4.0 - 0.5 * s,
                       "aux_loss": sum(per_round) / 3, "aux_loss_per_round": per_round,
                       "lr": 1e-4, "grad_norm": 1.0, "tokens": 100 * s, "tokens_per_s": 10.0,
                       "elapsed_s": float(s)})
        if s == steps // 2:
            events.append({"event": "routing", "step": s, "phase": "train",
                           "layers": {"l0": [[1, 1, 1, 1]] * 3, "l1": [[1, 1, 1, 1]] * 3}})
    events.append({"event": "routing", "step": steps, "phase": "train",
                   "layers": {"model.layers.0.mlp": COUNTS,
                              "model.layers.1.mlp": [[4, 4, 4, 4], [1, 2, 3, 2], [8, 0, 0, 0]]}})
    events.append({"event": "end", "step": steps, "adapter": "adapter", "elapsed_s": 9.0})
    return write_jsonl(path, events)


def routing_statistics(path: Path, layers: dict | None = None) -> Path:
    data = {"num_experts": 4, "num_rounds": 3, "top_k": 2, "phase": "eval", "tokens": 50,
            "layers": layers or {"model.layers.0.mlp": COUNTS}}
    path.write_text(json.dumps(data))
    return path


def gpu_check_json(path: Path) -> Path:
    """The structure ``python -m bench.gpu_check`` writes (see bench/gpu_check.py: run_all and
    bench/gpu_check_steps.py: step_benchmarks), with round numbers to check by hand."""
    sweep = {f"T={t}": {"median_ms": 2.0 * t + 1.0, "vs_T1": (2.0 * t + 1.0) / 3.0}
             for t in range(1, 6)}
    checks = {
        "config": {"shape": {"name": "llama3-8b", "num_rounds": 3}, "status": "PASS"},
        "layer": {"fwd": {"dense": {"median_ms": 1.0},
                          "torch": {"median_ms": 4.0, "vs_T_dense": 1.3},
                          "triton": {"median_ms": 3.5, "vs_T_dense": 1.1}},
                  "fwd_bwd": {"dense": {"median_ms": 2.0}, "reference": {"median_ms": 30.0},
                              "mixlora": {"median_ms": 12.0},
                              "torch": {"median_ms": 10.0, "vs_T_dense": 1.7,
                                        "speedup_vs_reference": 3.0, "speedup_vs_mixlora": 1.2},
                              "triton": {"median_ms": 8.0, "vs_T_dense": 1.4,
                                         "speedup_vs_reference": 3.75,
                                         "speedup_vs_mixlora": 1.5}},
                  "status": "PASS"},
        "rounds_T1_to_T5": {**sweep, "status": "PASS", "seconds": 3.0},
    }
    data = {"dry_run": False, "started": "2026-12-07T10:00:00+00:00",
            "steps": {"environment": {"checks": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}},
                                      "status": "PASS"},
                      "benchmarks": {"checks": checks, "status": "PASS"}},
            "wall_s": 300.0}
    path.write_text(json.dumps(data))
    return path


def cli(argv: list[str]) -> int:
    """``graphmoe-fused plot ...`` through plot_command's own parser (the dispatcher in app.py
    is wired by the lead)."""
    parser = OneLineParser(prog="graphmoe-fused")
    plot_command.add_parser(parser.add_subparsers(dest="command", parser_class=OneLineParser))
    args = parser.parse_args(["plot", *argv])
    assert isinstance(args, argparse.Namespace)
    return args.func(args)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("graphmoe-fused plot: error: "), err
    return err


# --- the numbers ------------------------------------------------------------------------------


def test_workload_shares_and_spread_by_hand() -> None:
    w = layer_workload("l", COUNTS)
    assert w.shares[0] == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert w.shares[2] == pytest.approx((0.0, 0.5, 0.25, 0.25))
    # population std: round 1 sqrt(((.15)^2 + (.05)^2) * 2 / 4), round 3 sqrt(2 * .25^2 / 4)
    assert w.std == pytest.approx((math.sqrt(0.0125), 0.0, math.sqrt(0.03125)))
    assert w.max_over_min[:2] == pytest.approx((4.0, 1.0)) and math.isinf(w.max_over_min[2])
    empty = layer_workload("e", [[0, 0], [3, 1]])
    assert empty.shares[0] == (0.0, 0.0) and math.isnan(empty.std[0])
    assert empty.std[1] == pytest.approx(0.25) and empty.max_over_min[1] == 3.0


def test_workload_of_a_train_log_is_its_last_routing_event(tmp_path: Path) -> None:
    workload = load_workload(train_log(tmp_path / "log.jsonl"))
    assert [w.name for w in workload] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert workload[0].counts == tuple(map(tuple, COUNTS))
    assert workload[1].shares[1] == pytest.approx((0.125, 0.25, 0.375, 0.25))
    out = plot_workload(workload, tmp_path / "w.png")
    assert_png(out)


def test_aux_loss_curves_by_hand(tmp_path: Path) -> None:
    curves = load_aux_loss(train_log(tmp_path / "log.jsonl", steps=4))
    assert curves.steps == (1, 2, 3, 4)
    assert curves.lm_loss == pytest.approx((3.5, 3.0, 2.5, 2.0))
    assert curves.per_round[0] == pytest.approx((1.1, 1.2, 1.3, 1.4))
    assert curves.per_round[2] == pytest.approx((1.4, 1.3, 1.2, 1.1))
    assert curves.aux_mean == pytest.approx(
        [statistics.mean(r[i] for r in curves.per_round) for i in range(4)])
    # without "aux_loss" the mean comes from the rounds
    derived = aux_loss_curves([(1, {"event": "step", "step": 1, "loss": 2.0,
                                    "aux_loss_per_round": [1.0, 2.0, 6.0]})])
    assert derived.aux_mean == (3.0,)


def _median(data: dict, name: str) -> float:
    return next(b["stats"]["median"] for b in data["benchmarks"] if b["name"] == name)


def test_committed_pytest_benchmark_round_latency_and_speedups() -> None:
    summary = load_benchmark(BENCH_JSON)
    raw = json.loads(BENCH_JSON.read_text())
    assert [r.backend for r in summary.rounds] == ["reference", "torch"]
    torch_rounds = summary.rounds[1]
    for t in range(1, 6):
        expected = _median(raw, f"test_rounds[torch-{t}]")
        assert torch_rounds.median_s[t] == expected
        assert torch_rounds.relative[t] == pytest.approx(
            expected / _median(raw, "test_rounds[torch-1]"))
    # the least-squares cost per extra round that bench/report.py put in the committed .md
    assert f"{torch_rounds.per_extra_round:.2f}" == "1.29"
    assert f"{summary.rounds[0].per_extra_round:.2f}" == "1.04"
    paired = next(s for s in summary.speedups if s.source == "paired")
    entry = next(b for b in raw["benchmarks"] if b["extra_info"]["kind"] == "paired")
    assert (paired.impl, paired.mode) == ("torch", "fwd_bwd")
    assert paired.vs_reference == entry["extra_info"]["paired"]["torch"]["speedup_vs_reference"]
    separate = next(s for s in summary.speedups if s.source == "separate" and s.mode == "fwd")
    ref, torch_t = _median(raw, "test_layer[reference-fwd]"), _median(raw, "test_layer[torch-fwd]")
    dense = _median(raw, "test_layer[dense-fwd]")
    assert separate.vs_reference == pytest.approx(ref / torch_t)
    assert separate.vs_t_dense == pytest.approx(torch_t / (3 * dense))
    assert separate.vs_mixlora is None  # this run had no MixLoRA-style peer
    text = speedup_markdown(summary)
    assert "| torch | fwd+bwd | 1.48× | — | 1.88× | interleaved calls |" in text
    assert "per extra round" in text


def test_gpu_check_json_round_latency_and_speedups(tmp_path: Path) -> None:
    summary = load_benchmark(gpu_check_json(tmp_path / "gc.json"))
    assert summary.num_rounds == 3 and "H100" in summary.label
    (rounds,) = summary.rounds
    assert rounds.backend == "triton" and rounds.paired
    assert rounds.median_s == pytest.approx({t: (2.0 * t + 1.0) / 1e3 for t in range(1, 6)})
    assert rounds.relative[5] == pytest.approx(11 / 3)
    # time = 1 + 2T ms: slope 2 ms per round, in units of the 3 ms at T = 1
    assert rounds.per_extra_round == pytest.approx(2 / 3)
    by = {(s.impl, s.mode): s for s in summary.speedups}
    assert by["triton", "fwd_bwd"].vs_reference == 3.75
    assert by["triton", "fwd_bwd"].vs_mixlora == 1.5
    assert by["torch", "fwd"].vs_t_dense == 1.3 and by["torch", "fwd"].vs_reference is None
    assert ("mixlora", "fwd_bwd") not in by  # gpu_check records no ratios for the peer


# --- the command ------------------------------------------------------------------------------


def test_plot_command_writes_every_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    log = train_log(tmp_path / "train_log.jsonl")
    stats = routing_statistics(tmp_path / "stats.json")
    # kinds are read from the content: a gpu_check JSON named like a text file still works
    gc = gpu_check_json(tmp_path / "gpu-run.txt")
    out = tmp_path / "plots"
    assert cli([str(log), str(stats), str(gc), str(BENCH_JSON), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["2026-11-25-cpu-epyc2-round_latency.png", "2026-11-25-cpu-epyc2-speedups.png",
                     "aux_loss.png", "gpu-run-round_latency.png", "gpu-run-speedups.png",
                     "stats-workload.png", "train_log-workload.png"]
    for path in out.iterdir():
        assert_png(path)
    printed = capsys.readouterr().out
    assert all(str(out / n) in printed for n in names)
    assert "| triton | fwd+bwd | 3.75× | 1.50× | 1.40× | interleaved calls |" in printed


def test_plot_command_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    stats = routing_statistics(tmp_path / "routing_statistics.json")
    out = tmp_path / "plots"
    assert cli([str(stats), "--out", str(out)]) == 0
    png = out / "workload.png"
    before = png.read_bytes()
    capsys.readouterr()
    routing_statistics(stats, {"a": [[1, 2, 3, 4]] * 3})
    assert cli([str(stats), "--out", str(out)]) == 1
    assert "workload.png exists" in one_error_line(capsys) and png.read_bytes() == before
    assert cli([str(stats), "--out", str(out), "--overwrite"]) == 0
    assert png.read_bytes() != before
    assert_png(png)


def test_same_stem_inputs_get_their_folder_as_prefix(tmp_path: Path) -> None:
    for run in ("run1", "run2"):
        (tmp_path / run).mkdir()
        train_log(tmp_path / run / "train_log.jsonl")
    report = plot_files([tmp_path / "run1" / "train_log.jsonl",
                         tmp_path / "run2" / "train_log.jsonl"], tmp_path / "out")
    assert sorted(p.name for p in report.written) == [
        "run1-train_log-aux_loss.png", "run1-train_log-workload.png",
        "run2-train_log-aux_loss.png", "run2-train_log-workload.png"]


# --- bad input ---------------------------------------------------------------------------------


def _bad_step_log(path: Path) -> Path:
    path.write_text('{"event": "start"}\n{"event": "step", "step": 1, "loss": 2.0, '
                    '"aux_loss": 1.0}\n{"event": "step", "step": 2, "aux_loss": 1.0}\n')
    return path


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p.write_text('{"event": "start"}\n{"event": "step", "step": 1,\n'),
     "bad.jsonl:2: not valid JSON"),
    (lambda p: p.write_text('{"event": "start"}\n[1, 2]\n'), "bad.jsonl:2: a JSON list"),
    (lambda p: p.write_text('{"event": "start"}\n{"step": 3}\n'), "bad.jsonl:2: no 'event'"),
    (_bad_step_log, "bad.jsonl:3: no 'loss'"),
    (lambda p: p.write_text('{"event": "start"}\n{"event": "end"}\n'),
     "no \"step\" or \"routing\" events"),
    (lambda p: p.write_text(""), "bad.jsonl: empty file"),
])
def test_malformed_train_log_is_one_line_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    make(path)
    assert cli([str(path), "--out", str(tmp_path / "out")]) == 1
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


@pytest.mark.parametrize(("content", "expected"), [
    ('{"hello": 1}', "unknown JSON (top-level keys: hello)"),
    ("[1, 2, 3]", "a JSON list, not an object"),
    ("not json at all", "not JSON (line 1 column 1"),
    ('{"num_experts": 4, "layers": {"l": [[1, -2]]}}', "round 1 has -2, not a count"),
    ('{"num_experts": 4, "layers": {"l": [[1, 2], [3, 4]]}}', "'num_experts' is 4 but"),
    ('{"num_experts": 2, "layers": {"a": [[1, 2]], "b": [[1, 2, 3]]}}', "different [rounds"),
    ('{"benchmarks": [], "machine_info": {}}', "no round-latency (T = 1..5) or speed-up"),
    ('{"dry_run": true, "steps": {"benchmarks": {"checks": {"rounds_T1_to_T5": '
     '{"T=1": {"median_ms": "fast"}}}}}}', "median_ms: expected a number"),
])
def test_malformed_json_is_one_line_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str) -> None:
    path = tmp_path / "input.json"
    path.write_text(content)
    assert cli([str(path), "--out", str(tmp_path / "out")]) == 1
    err = one_error_line(capsys)
    assert str(path) in err and expected in err, err


def test_missing_file_and_good_file_write_nothing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    stats = routing_statistics(tmp_path / "stats.json")
    assert cli([str(stats), str(tmp_path / "nope.json"), "--out", str(tmp_path / "out")]) == 1
    assert "nope.json: no such file" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    (tmp_path / "run").mkdir()
    assert cli([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 1
    assert "run: is a directory; expected a file" in one_error_line(capsys)


def test_kind_is_detected_from_content(tmp_path: Path) -> None:
    one_line = write_jsonl(tmp_path / "log.json", [{"event": "step", "step": 1, "loss": 1.0,
                                                    "aux_loss": 0.5}])
    assert read_input(one_line).kind == "train_log"
    assert read_input(routing_statistics(tmp_path / "r.jsonl")).kind == "routing_statistics"
    assert read_input(BENCH_JSON).kind == "pytest_benchmark"


def test_missing_matplotlib_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    stats = routing_statistics(tmp_path / "stats.json")
    assert cli([str(stats), "--out", str(tmp_path / "out")]) == 1
    assert ("RuntimeError: matplotlib is not installed: pip install 'graphmoe_fused[plot]'"
            in one_error_line(capsys))
    assert not (tmp_path / "out").exists()
