"""``graphmoe-fused`` / ``python -m graphmoe_fused``: one command, five subcommands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graphmoe_fused.cli import app


def test_without_a_subcommand_it_lists_them_and_fails(capsys):
    assert app.main([]) == 2
    err = capsys.readouterr().err
    for name in app.SUBCOMMANDS:
        assert name in err


def test_an_unknown_subcommand_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["fit"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'fit'" in err


def test_every_subcommand_has_help(capsys):
    for name in ("train", "eval", "plot", "experiment"):
        with pytest.raises(SystemExit) as exit_info:
            app.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"graphmoe-fused {name}" in capsys.readouterr().out


def test_demo_passes_its_flags_through(capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "graphmoe-demo: error: argument --steps" in capsys.readouterr().err


def test_module_entry_point_is_the_command():
    result = subprocess.run([sys.executable, "-m", "graphmoe_fused", "train", "--lr", "-1"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphmoe-fused train: error:"), result.stderr


def test_a_repeated_file_flag_adds_files_rather_than_replacing_them():
    parser = app.build_parser()
    assert parser.parse_args(["train", "--data", "a", "b", "--data", "c"]).data == ["a", "b", "c"]
    assert parser.parse_args(["eval", "--data", "a", "--data", "c"]).data == ["a", "c"]
