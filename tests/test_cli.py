"""The `minitron` command line (cli/): every command answers `--help` (its parser builds, with every flag the
config generates), the console entry runs as `python -m cli`, and the cheap commands run for real on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: minitron {command} ")


def test_python_m_cli_is_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: minitron ")
    assert all(command in proc.stdout for command in COMMANDS)


def test_info_and_candidates_on_the_tiny_model(tiny_model_dir, capsys):
    """`info` counts what the model holds (sum of numel); every shape `candidates` prints has the parameters it
    says (counted again here) within the 5% tolerance of the target."""
    from minitron.archmath import Shape, count_shape
    from minitron.models import load_config, load_model

    model, _ = load_model(str(tiny_model_dir))
    total = sum(p.numel() for p in model.parameters())
    assert main(["info", str(tiny_model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == total
    target = int(total * 0.6)
    assert main(["candidates", str(tiny_model_dir), "--target-params", str(target), "--limit", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in table[table.index(next(t for t in table if t.startswith("-----"))) + 1:]]
    config = load_config(str(tiny_model_dir))
    assert rows
    for kind, *dims, params, _ in rows:
        counted = count_shape(config, Shape(*map(int, dims)))
        assert counted == int(params.replace(",", "")) and abs(counted - target) <= 0.05 * target, (kind, dims)
