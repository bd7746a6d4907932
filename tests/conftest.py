"""Shared test configuration: the markers that select tests by what they cost or prove, in
place of node-id lists in scripts/test.sh.

- float_sensitive: compares floats against a second implementation (transformers, a dequantized
  twin, the full reference); scripts/test.sh --cpu-kernels re-runs these under other CPU kernels
  (ATEN_CPU_CAPABILITY=default and =avx2), where tolerances must still hold.
- world: spawns a torch.distributed gloo world (each costs ~10-30 s on 2 cores).
- engine: runs vLLM's CPU build on our files (tests/test_vllm_engine.py, its own venv).

`pytest -m "not world and not engine"` is the quick tier.
"""

from __future__ import annotations

import pytest

MARKERS = {
    "float_sensitive": "compares floats with a second implementation; re-run under other CPU "
    "kernels by scripts/test.sh --cpu-kernels",
    "world": "spawns a torch.distributed gloo world",
    "engine": "runs vLLM's CPU build (the engine tier)",
}
ENGINE_MODULES = ("test_vllm_engine.py",)  # every test there is the engine tier


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ENGINE_MODULES:
            item.add_marker(pytest.mark.engine)
