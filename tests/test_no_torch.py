"""Convert, re-layout, export and verify's hashes and weights tiers are byte paths: they must
run where torch cannot be imported (torch is only for casts and the generate tier). The
outputs made without torch are then checked against safetensors' own reader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-llama"


def blocked_env(tmp_path: Path, name: str) -> dict:
    shim = tmp_path / "shim" / name
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        f"raise ModuleNotFoundError('{name} is blocked for this test', name='{name}')\n"
    )
    return {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def test_byte_paths_run_without_torch(tmp_path):
    env = blocked_env(tmp_path, "torch")

    def reshard(*args):
        cmd = [sys.executable, "-m", "reshard", *map(str, args)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        assert "torch is blocked" not in done.stderr
        return done.stdout

    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0  # the shim works
    out, re, hf = tmp_path / "out", tmp_path / "re", tmp_path / "hf"
    reshard("convert", TINY, "--tp", 2, "-o", out, "--quiet")
    reshard("convert", out, "--tp", 1, "--pp", 2, "-o", re, "--quiet")  # re-layout
    reshard("export", out, "-o", hf)
    for folder in (out, re):
        report = reshard("verify", folder, "--level", "hashes", "--level", "weights", "--quiet")
        assert "hashes    PASS" in report and "weights   PASS" in report, report

    want = load_all(TINY)
    got = load_all(hf)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name
    relaid = load_all(re)  # tp 1: every tensor whole again (the vocab was padded to 2)
    for name, tensor in want.items():
        assert relaid[name][: tensor.shape[0]].view(torch.uint8).equal(tensor.view(torch.uint8))


def test_a_cast_is_the_one_byte_path_step_that_needs_torch(tmp_path):
    env = blocked_env(tmp_path, "torch")
    cmd = [sys.executable, "-m", "reshard", "convert", str(TINY), "--tp", "2", "--quiet"]
    done = subprocess.run(
        [*cmd, "-o", str(tmp_path / "bf16"), "--dtype", "bfloat16"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "torch is blocked" in done.stderr
