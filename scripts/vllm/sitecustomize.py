"""Loaded by every Python process of vLLM's venv when this folder is on PYTHONPATH (the
engine's worker processes included): when RESHARD_VLLM_DUMP is set, vLLM's ShardedStateLoader
first writes the state dict it is about to fill — keys, shapes and dtypes, after its own
_filter_subtensors — to RESHARD_VLLM_DUMP/pp{P}-tp{T}.json, then loads as it always does.
Used only by scripts/vllm_contract.py's `keys` mode to record the loader's contract."""

import importlib.abc
import importlib.util
import json
import os
import sys

_MODULE = "vllm.model_executor.model_loader.sharded_state_loader"


def _patch(module) -> None:
    cls = module.ShardedStateLoader
    original = cls.load_weights

    def load_weights(self, model, model_config):
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        state = cls._filter_subtensors(model.state_dict())
        doc = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in state.items()}
        name = f"pp{get_pp_group().rank_in_group}-tp{get_tensor_model_parallel_rank()}.json"
        with open(os.path.join(os.environ["RESHARD_VLLM_DUMP"], name), "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        return original(self, model, model_config)

    cls.load_weights = load_weights


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        sys.meta_path.insert(0, self)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


if os.environ.get("RESHARD_VLLM_DUMP"):
    sys.meta_path.insert(0, _Finder())
