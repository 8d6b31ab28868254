"""The one patch CPU mode makes to verl 0.9.1 at run time (no verl file is edited).

Delete it when upstream builds a backend string torch accepts on a CPU platform.
"""

from __future__ import annotations


def gloo_process_group() -> None:
    """verl's workers join their process group with backend "gloo" on CPU.

    Answers `verl/utils/distributed.py`, `initialize_global_process_group_ray`:
    `backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"`, which on a CPU platform
    is "cpu:gloo,cpu:gloo", a string torch rejects (one backend per device type). The actor worker calls
    it without a backend (`verl/workers/engine_workers.py`, `initialize_global_process_group_ray(
    timeout_second=None)`) and imports the name at import time, so this must run before
    `verl.workers.engine_workers` is imported (the CPU mode's module runs it on `import verl`).
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
