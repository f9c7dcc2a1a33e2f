"""The command line (``graphmoe-demo`` / ``python -m graphmoe_fused``): a good run prints the
losses and the workload; every bad value is one line on stderr and a non-zero exit status, never
a traceback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from graphmoe_fused.cli import main as cli
from graphmoe_fused.cli.demo import DemoOptions, check_backend, resolve_device, run_demo

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)

PREFIX = "graphmoe-demo: error: "
NO_CUDA = not torch.cuda.is_available()
NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (Linux only)")
TINY = ["--steps", "2", "--backend", "reference", "--experts", "2", "--top-k", "1", "--rounds", "1",
        "--no-progress"]


def _one_error_line(err: str) -> str:
    """The single stderr line of a refused command line."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    assert "Traceback" not in err
    return lines[0]


# --- a good run --------------------------------------------------------------------------------


def test_cli_main_prints_losses_workload_and_parameter_share(capsys):
    assert cli.main(["--steps", "3", "--backend", "reference", "--experts", "4", "--rounds", "2",
                     "--no-progress", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "step   3/3  loss" in out and "aux" in out
    assert "trainable%:" in out and "trainable parameters:" in out
    assert "expert workload" in out and "round 2:" in out and "model.layers.1.mlp" in out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "graphmoe_fused", "demo", *TINY],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "expert workload" in result.stdout


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("graphmoe-demo") == "graphmoe_fused.cli.main:main"
    assert scripts.get("graphmoe-fused") == "graphmoe_fused.cli.app:main"


# --- bad values: one line, exit status 2 -------------------------------------------------------


@NEEDS_TRITON
def test_triton_backend_on_cpu_is_one_line_in_a_real_process():
    # The test session sets TRITON_INTERPRET=1 (under which triton does run on the CPU), so the
    # user's view needs a process without it. --device cpu makes this hold on a GPU machine too.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "graphmoe_fused", "demo", *TINY, "--backend", "triton",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert "argument --backend: the 'triton' backend needs a CUDA device" in line, line
    assert "on cpu" in line and "use backend torch or auto" in line, line
    assert result.stdout == ""  # refused before anything was built


@NEEDS_TRITON
def test_triton_backend_on_cpu_without_the_interpreter_in_process(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at call time by the check
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY, "--backend", "triton", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "the 'triton' backend needs a CUDA device" in _one_error_line(capsys.readouterr().err)


BAD_VALUES = [
    # (argv, what the one line must contain)
    (["--lr", "-1"], "argument --lr: -1 is not a finite number > 0"),
    (["--lr", "0"], "argument --lr: 0 is not a finite number > 0"),
    (["--lr", "nan"], "argument --lr: nan is not a finite number > 0"),
    (["--lr", "inf"], "argument --lr: inf is not a finite number > 0"),
    (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device: use auto, cpu, cuda"),
    (["--device", "cuda:x"], "argument --device: 'cuda:x' is not a device"),
    (["--device", ""], "argument --device: '' is not a device"),
    (["--device", "meta"], "argument --device: the demo does not run on 'meta' devices"),
    (["--steps", "0"], "argument --steps: 0 is not an integer >= 1"),
    (["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
    (["--rounds", "0"], "argument --rounds: 0 is not an integer >= 1"),
    (["--experts", "-2"], "argument --experts: -2 is not an integer >= 1"),
    (["--top-k", "0"], "argument --top-k: 0 is not an integer >= 1"),
    (["--experts", "2", "--top-k", "3"], "argument --top-k: 3 exceeds --experts 2"),
    (["--batch-size", "0"], "argument --batch-size: 0 is not an integer >= 1"),
    (["--threads", "0"], "argument --threads: 0 is not an integer >= 1"),
    (["--threads", str((os.cpu_count() or 1) + 1)],
     f"argument --threads: {(os.cpu_count() or 1) + 1} exceeds this machine's "
     f"{os.cpu_count() or 1} CPUs"),
    (["--seed", "-1"], "argument --seed: -1 is not in [0, 2**64 - 1]"),
    (["--seed", str(2**64)], f"argument --seed: {2**64} is not in [0, 2**64 - 1]"),
    (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_VALUES,
                         ids=[" ".join(argv) or "empty" for argv, _ in BAD_VALUES])
def test_bad_value_is_one_line_and_exit_status_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert expected in line, line
    assert line.endswith("(see graphmoe-demo --help)"), line
    assert captured.out == ""


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_device_without_cuda(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "argument --device: CUDA is not available" in line and "use cpu or auto" in line, line


def test_cuda_device_that_does_not_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--device", "cuda:99"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    expected = "CUDA is not available" if NO_CUDA else "'cuda:99' does not exist"
    assert f"argument --device: {expected}" in line, line


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_device_without_mps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--device", "mps"])
    assert exit_info.value.code == 2
    assert "argument --device: MPS is not available" in _one_error_line(capsys.readouterr().err)


def test_triton_backend_without_the_triton_package(monkeypatch, capsys):
    # What a macOS or Windows user sees: triton is published for Linux only.
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "triton" else object())
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY, "--backend", "triton", "--device", "cpu"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "needs the triton package, which is not installed" in line, line


# --- errors raised by the library during the run: one line, exit status 1 ----------------------


@pytest.mark.parametrize("error", [ValueError, TypeError, RuntimeError])
def test_library_error_during_the_run_is_one_line(error, monkeypatch, capsys):
    def refuse(opts, log):
        raise error("lora_r=0 must be an integer >= 1\n  (second line of detail)")

    monkeypatch.setattr(cli, "run_demo", refuse)
    assert cli.main(TINY) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"{PREFIX}{error.__name__}: lora_r=0 must be an integer >= 1 "
                    "(second line of detail) (--debug shows the traceback)")


def test_debug_shows_the_library_error(monkeypatch):
    def refuse(opts, log):
        raise ValueError("refused")

    monkeypatch.setattr(cli, "run_demo", refuse)
    with pytest.raises(ValueError, match="refused"):
        cli.main([*TINY, "--debug"])


def test_a_genuine_bug_keeps_its_traceback(monkeypatch):
    def bug(opts, log):
        raise AttributeError("'NoneType' object has no attribute 'loss'")

    monkeypatch.setattr(cli, "run_demo", bug)
    with pytest.raises(AttributeError):
        cli.main(TINY)


def test_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(opts, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_demo", interrupted)
    assert cli.main(TINY) == 130
    assert capsys.readouterr().err == "graphmoe-demo: interrupted\n"


# --- the same checks for library callers of run_demo --------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("lr", -1.0, "lr=-1.0 must be a finite number > 0"),
    ("lr", float("nan"), "lr=nan must be a finite number > 0"),
    ("steps", 0, "steps=0 must be an integer >= 1"),
    ("seed", -1, "seed=-1 must be an integer in [0, 2**64 - 1]"),
    ("device", "tpu", "device='tpu': 'tpu' is not a device"),
    ("backend", "fast", "backend='fast': unknown backend 'fast'"),
], ids=["lr=-1", "lr=nan", "steps=0", "seed=-1", "device=tpu", "backend=fast"])
def test_run_demo_checks_its_options_before_building(field, value, expected):
    lines = []
    with pytest.raises(ValueError) as error:
        run_demo(DemoOptions(**{field: value}, progress=False), log=lines.append)
    assert expected in str(error.value)
    assert lines == []  # nothing was built or logged


def test_resolve_device_and_check_backend():
    assert resolve_device("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto
    for backend in ("auto", "reference", "torch"):
        check_backend(backend, torch.device("cpu"))


@NEEDS_TRITON
def test_check_backend_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at call time
    check_backend("triton", torch.device("cpu"))
    check_backend("triton", torch.device("cuda"))
    with pytest.raises(ValueError, match="needs a CUDA device, but the input is on mps"):
        check_backend("triton", torch.device("mps"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device, but the input is on cpu"):
        check_backend("triton", torch.device("cpu"))
