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


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "out"
    assert run("convert", EXAMPLES / "tiny-llama", "--tp", 2, "-o", out, "--quiet").exit_code == 0
    return out


@pytest.fixture
def no_spawn(monkeypatch):
    """Bad generate options must be refused before any rank process starts."""
    import torch.multiprocessing as mp

    def refuse(*args, **kwargs):
        raise AssertionError("a rank was spawned")

    monkeypatch.setattr(mp, "start_processes", refuse)


@no_gpu
def test_verify_generate_on_cuda_without_gpus_exits_2(tiny_out, no_spawn):
    result = run("verify", tiny_out, "--level", "generate", "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert result.output == (
        "error: --device cuda: this machine has 0 CUDA device(s) visible to torch; use "
        "--device cpu (gloo processes) or a GPU index below the count.\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "gpu"], "--device 'gpu': use cpu, cuda or cuda:N (e.g. cuda:0)."),
        (["--device", "cuda:x"], "--device 'cuda:x': use cpu, cuda or cuda:N (e.g. cuda:0)."),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: generate at least 1 token."),
        (["--max-new-tokens", "-3"], "--max-new-tokens -3: generate at least 1 token."),
        (["--prompt-ids", "5,999"], "prompt 0 has token ids outside [0, 509) (vocab_size of "
         "the model)."),
    ],
)  # fmt: skip
def test_bad_generate_options_are_one_line_before_any_tier(tiny_out, no_spawn, args, message):
    """Every tier is asked for: the refusal comes before the hashes tier prints anything."""
    result = run("verify", tiny_out, *args)
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {message}\n"


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and "reshard, version" in result.output


def test_convert_summary_names_engine_files_and_uses_decimal_units(tmp_path):
    from checkpoints import write_checkpoint

    src = write_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM")
    out = tmp_path / "out"
    result = run("convert", src, "--tp", 2, "--ep", 2, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    engine = "engine files: expert_location.sglang.json (SGLang --init-expert-location), "
    assert engine + "moe_load_balancer.yaml\n" in result.output
    assert (out / "expert_location.sglang.json").is_file()
    assert (out / "moe_load_balancer.yaml").is_file()
    value, unit = result.output.split("read ")[1].split(",")[0].split()  # e.g. "499.33 kB"
    nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))  # data + small headers
    assert unit == "kB" and abs(float(value) * 1e3 - nbytes) < 0.02 * nbytes, (value, nbytes)
    assert "MiB" not in result.output and "GiB" not in result.output


def test_json_names_dtypes_like_torch_without_the_prefix():
    import json

    result = run("inspect", EXAMPLES / "tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["bytes_by_dtype"] == {"float32": info["bytes"]}
