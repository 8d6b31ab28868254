"""Stand-ins for verl's heavy imports, so that verl's loss code imports on a bare GPU image (torch only).

`benchmarks/gpu/run.sh` puts this folder on PYTHONPATH; Python imports `sitecustomize` at start-up. For
each top-level name in STUBBED that the machine cannot import, `import name` (and `name.sub`) then gives a
module whose every attribute is an inert class: subclassing it, decorating with it, calling it or reading
attributes off it all work and do nothing. verl imports these packages (Ray, transformers, tensordict, …)
at module level for its trainers and workers; the policy losses, `agg_loss` and the config dataclasses
that the loss benchmark and tests/test_cuda.py run never use them. Packages that are installed are
imported as usual.
"""

import importlib.abc
import importlib.machinery
import sys
import types

STUBBED = {"ray", "transformers", "tensordict", "orjson", "codetiming", "cloudpickle", "pyvers", "msgpack"}


class _InertMeta(type):
    def __call__(cls, *args, **kwargs):  # `@ray.remote` on a function or class: hand it back
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return super().__call__(*args, **kwargs)

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert_class(name)


class _Inert(metaclass=_InertMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):  # `@ray.remote(num_gpus=1)`: a decorator factory, same
        return args[0] if len(args) == 1 and not kwargs and callable(args[0]) else _Inert()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert_class(name)


def _inert_class(name):
    return _InertMeta(name, (_Inert,), {})


class _InertModule(types.ModuleType):
    __version__ = "0"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert_class(name)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in STUBBED or self._installed(name, path, target):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def _installed(self, name, path, target):
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec") and finder.find_spec(name, path, target):
                return True
        return False

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubFinder())
