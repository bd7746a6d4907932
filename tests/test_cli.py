"""CLI surface: every command's help carries a worked example, and device errors on a machine
without a GPU say what to do instead (exit 3 for the environment, 2 for a bad flag)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reshard.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COMMANDS = [
    ["--help"],
    ["inspect", "--help"],
    ["plan", "--help"],
    ["convert", "--help"],
    ["verify", "--help"],
    ["profile", "layers", "--help"],
    ["profile", "experts", "--help"],
]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_help_has_a_worked_example(args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert "reshard " in result.output.split("Example:")[1]


@no_gpu
def test_profile_layers_on_cuda_without_a_gpu_exits_3(tmp_path):
    result = run("profile", "layers", EXAMPLES / "configs/llama-3-8b", "--device", "cuda",
                 "-o", tmp_path / "c.json")  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "sees no CUDA GPU" in result.output and "--device cpu" in result.output
    assert not (tmp_path / "c.json").exists()


def test_profile_layers_bad_device_exits_2(tmp_path):
    result = run("profile", "layers", EXAMPLES / "configs/llama-3-8b", "--device", "tpu",
                 "-o", tmp_path / "c.json")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "device='tpu'" in result.output and "cpu or cuda" in result.output


@no_gpu
def test_verify_generate_on_cuda_without_gpus_exits_2(tmp_path):
    out = tmp_path / "out"
    assert run("convert", EXAMPLES / "tiny-llama", "--tp", 2, "-o", out, "--quiet").exit_code == 0
    result = run("verify", out, "--level", "generate", "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert "one GPU per rank" in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and "reshard, version" in result.output
