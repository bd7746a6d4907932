"""Record vLLM's own expected keys, shapes and dtypes for the engine tier's tiny models, per
layout, into tests/golden/vllm/ (read by tests/test_vllm_format.py, which needs no vLLM).

    python scripts/vllm_golden.py [NAME ...] [--missing] [--vllm-python PATH]

For each (model, layout) it writes the model with transformers (tests/vllm_models.py) and
starts vLLM's CPU build on a folder holding only its config.json with
load_format=sharded_state: the loader writes the state dict it would fill, per pp/tp rank
(scripts/vllm_contract.py `keys`). Rerun it for another vLLM version after installing that
version's venv (scripts/setup_vllm.sh); the file records the version.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vllm_models import MODELS, write_model  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "vllm"
# (model, tp, pp, ep): tp 2 for every model; pp 2 with a tied head; expert parallel for MoE
LAYOUTS = [(name, 2, 1, False) for name in MODELS] + [
    ("llama", 2, 2, False),
    ("qwen2", 2, 2, False),
    ("qwen2_moe", 2, 1, True),
    ("deepseek_v3", 2, 1, True),
]
DEFAULT_PYTHON = Path.home() / ".cache" / "reshard" / "vllm-0.32" / "bin" / "python"


def golden_name(name: str, tp: int, pp: int, ep: bool) -> str:
    return f"{name}-tp{tp}" + (f"-pp{pp}" if pp > 1 else "") + ("-ep" if ep else "") + ".json"


def dump_compact(doc: dict) -> str:
    """One key a line, so a diff between vLLM versions reads as a list of changed keys."""
    lines = ["{"]
    for key in ("vllm", "architecture", "layout"):
        lines.append(f" {json.dumps(key)}: {json.dumps(doc[key], sort_keys=True)},")
    lines.append(' "ranks": {')
    ranks = list(doc["ranks"].items())
    for i, (rank, tensors) in enumerate(ranks):
        lines.append(f"  {json.dumps(rank)}: {{")
        items = sorted(tensors.items())
        for j, (k, v) in enumerate(items):
            lines.append(
                f"   {json.dumps(k)}: {json.dumps(v)}" + ("," if j < len(items) - 1 else "")
            )
        lines.append("  }" + ("," if i < len(ranks) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def record(name: str, tp: int, pp: int, ep: bool, python: Path, work: Path) -> Path:
    model = work / name
    if not model.exists():
        write_model(model, name)
    raw = work / golden_name(name, tp, pp, ep)
    cmd = [str(python), str(ROOT / "scripts" / "vllm_contract.py"), "keys", str(model)]
    cmd += ["--tp", str(tp), "--pp", str(pp), *(["--ep"] if ep else []), "-o", str(raw)]
    log = work / (raw.stem + ".log")
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if not raw.exists():
        raise SystemExit(f"error: vLLM wrote no state dict for {raw.stem}; see {log}")
    out = GOLDEN / raw.name
    out.write_text(dump_compact(json.loads(raw.read_text())))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*", help="models (default: all)")
    p.add_argument("--vllm-python", type=Path, default=DEFAULT_PYTHON)
    p.add_argument("--missing", action="store_true", help="only layouts without a golden file")
    args = p.parse_args()
    GOLDEN.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reshard-vllm-golden-"))
    for name, tp, pp, ep in LAYOUTS:
        if args.missing and (GOLDEN / golden_name(name, tp, pp, ep)).exists():
            continue
        if not args.names or name in args.names:
            print("wrote", record(name, tp, pp, ep, args.vllm_python, work), flush=True)


if __name__ == "__main__":
    main()
