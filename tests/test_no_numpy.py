"""reshard depends on torch, safetensors, huggingface-hub, click, tqdm and xxhash only:
convert and every verify tier must work where numpy cannot be imported (torch's `.numpy()`
and its object collectives fail there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_convert_and_verify_without_numpy(tmp_path):
    shim = tmp_path / "shim" / "numpy"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError('numpy is blocked for this test', name='numpy')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"}
    out = tmp_path / "out"

    def reshard(*args):
        cmd = [sys.executable, "-m", "reshard", *map(str, args)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)

    probe = subprocess.run([sys.executable, "-c", "import numpy"], env=env, capture_output=True)
    assert probe.returncode != 0  # the shim works
    done = reshard("convert", ROOT / "examples/tiny-llama", "--tp", 2, "-o", out, "--quiet")
    assert done.returncode == 0, done.stderr
    done = reshard("verify", out, "--max-new-tokens", 4)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "generate  PASS" in done.stdout and "2 gloo ranks" in done.stdout
    assert "NumPy" not in done.stderr
