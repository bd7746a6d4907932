"""convert and export without -o: the folder named after the model and the layout, said on
the first line; a rerun into it is refused (exit 2, naming --resume and -o) or resumed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from reshard.cli import main
from reshard.io.manifest import MANIFEST
from reshard.out_name import convert_out_name, model_name

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
MISSION = "reshard convert --tp 4 --pp 2 meta-llama/Llama-3-70B"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "model,parts,name",
    [
        ("meta-llama/Llama-3-70B", {"tp": 4, "pp": 2}, "Llama-3-70B-tp4-pp2"),
        ("meta-llama/Llama-3-70B@main", {"tp": 8}, "Llama-3-70B-tp8"),
        ("Qwen/Qwen3-30B-A3B", {"tp": 4, "ep": 4, "dp": 2}, "Qwen3-30B-A3B-tp4-ep4-dp2"),
        ("org/M", {"tp": 2, "pp": 2, "format": "vllm"}, "M-tp2-pp2-vllm"),
        ("org/M", {"tp": 2, "format": "native"}, "M-tp2"),
    ],
)
def test_default_name_has_the_model_and_the_layout(model, parts, name):
    assert convert_out_name(model, **parts) == name


def test_model_name_of_a_local_folder_is_its_own_name(tmp_path, monkeypatch):
    (tmp_path / "My-Model@v2").mkdir()
    monkeypatch.chdir(tmp_path / "My-Model@v2")
    assert model_name(".") == "My-Model@v2"  # an existing path keeps its '@'
    assert model_name(str(tmp_path / "My-Model@v2") + "/") == "My-Model@v2"


def test_help_shows_the_missions_command():
    assert MISSION.removeprefix("reshard ") in run("--help").output
    assert MISSION in run("convert", "--help").output
    readme = (TINY.parent.parent / "README.md").read_text()
    assert MISSION in readme


def test_convert_without_o_then_rerun_resume_and_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run("convert", "--tp", 2, "--pp", 2, TINY, "--quiet")
    assert first.exit_code == 0, first.output
    assert first.output.splitlines()[0] == "writing to ./tiny-llama-tp2-pp2 (no -o given)"
    out = tmp_path / "tiny-llama-tp2-pp2"
    assert (out / MANIFEST).is_file()
    before = (out / "rank-00003.safetensors").stat().st_mtime_ns

    again = run("convert", "--tp", 2, "--pp", 2, TINY, "--quiet")
    assert again.exit_code == 2
    assert "tiny-llama-tp2-pp2: already holds a finished reshard output" in again.output
    assert "-o DIR" in again.output and "--force" in again.output
    assert (out / "rank-00003.safetensors").stat().st_mtime_ns == before  # untouched

    # an interrupted run: no manifest, one rank file gone
    (out / MANIFEST).unlink()
    (out / "rank-00003.safetensors").unlink()
    refused = run("convert", "--tp", 2, "--pp", 2, TINY, "--quiet")
    assert refused.exit_code == 2
    assert "tiny-llama-tp2-pp2: exists already" in refused.output
    assert "Pass --resume to finish an earlier run, or write elsewhere with -o DIR" in (
        refused.output
    )
    resumed = run("convert", "--tp", 2, "--pp", 2, TINY, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / MANIFEST).is_file() and (out / "rank-00003.safetensors").is_file()

    exported = run("export", out)
    assert exported.exit_code == 0, exported.output
    assert exported.output.splitlines()[0] == "writing to ./tiny-llama-hf (no -o given)"
    got, want = load_all(tmp_path / "tiny-llama-hf"), load_all(TINY)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert got[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name


def load_all(folder: Path) -> dict:
    """Every tensor of a folder, through safetensors' own reader."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def test_default_folder_not_from_reshard_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llama-tp2").mkdir()
    (tmp_path / "tiny-llama-tp2" / "notes.txt").write_text("mine")
    refused = run("convert", "--tp", 2, TINY, "--quiet")
    assert refused.exit_code == 2
    assert "tiny-llama-tp2: exists already" in refused.output
    assert (tmp_path / "tiny-llama-tp2" / "notes.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "tiny-llama-tp2")


def test_ranks_runs_share_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ranks in ("0-1", "2-3"):  # a Slurm array's tasks, one after the other
        done = run("convert", "--tp", 2, "--pp", 2, TINY, "--quiet", "--ranks", ranks)
        assert done.exit_code == 0, done.output
        assert done.output.splitlines()[0] == "writing to ./tiny-llama-tp2-pp2 (no -o given)"
    assert (tmp_path / "tiny-llama-tp2-pp2" / MANIFEST).is_file()


def test_format_is_part_of_the_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = run("convert", "--tp", 2, "--format", "vllm", TINY, "--quiet")
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0] == "writing to ./tiny-llama-tp2-vllm (no -o given)"
    assert (tmp_path / "tiny-llama-tp2-vllm" / MANIFEST).is_file()
