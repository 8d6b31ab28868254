"""verl's device platform on a machine without an accelerator: the host CPU, gloo collectives.

verl 0.9.1 resolves its device through `verl.plugin.platform.get_platform()` and calls the returned
platform's `device_module` (normally `torch.cuda`) for device bookkeeping: `current_device()`,
`synchronize()`, `empty_cache()`, `mem_get_info()`, `max_memory_allocated()`, ... `CPUPlatform` answers
those calls on the host, so that verl's own FSDP workers, trainer and rollout run on CPU. All compute is
ordinary torch on CPU.

Ray: verl's resource pools count only "GPU"/"NPU" resources (`single_controller/ray/base.py`,
`RayResourcePool` and the pool-availability check), so the platform names "GPU" as its Ray resource and
the CPU mode starts Ray with *logical* GPUs (`ray.init(num_gpus=N)`): one per training or rollout
process, none of them a device.

Importing this module changes nothing; `set_cpu_platform()` (called by `isreshape_verl.cpu.activate`, or
by the worker harness) switches the process, before `verl.workers.engine_workers` is imported.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch
from verl.plugin.platform import PlatformBase, set_platform


class _CPUDeviceModule(types.ModuleType):
    """`torch.cpu` plus the `torch.cuda` functions verl calls on its device module (no-ops or host figures)."""

    def __init__(self):
        super().__init__("isreshape_verl_cpu_device")

    def __getattr__(self, name: str) -> Any:  # anything not defined below: torch.cpu's (Stream, stream, ...)
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"  # torch.device("cpu") and FSDP's device_id accept it

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def set_device(device=None) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass  # CPU ops are synchronous

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def ipc_collect() -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"

    @staticmethod
    def mem_get_info(device=None) -> tuple[int, int]:
        """(free, total) host memory in bytes, from sysconf (what verl logs as device memory)."""
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0  # no device allocator to ask; verl only logs these

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def set_per_process_memory_fraction(fraction, device=None) -> None:
        pass

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(device=None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device=None) -> None:
        torch.set_rng_state(state)


class CPUPlatform(PlatformBase):
    """verl platform whose device is the host CPU and whose collective backend is gloo."""

    _module = _CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._module

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # unused on CPU; verl only reads it when set

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"  # logical GPUs of a CPU-mode Ray cluster: verl's resource pools count no other name

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def set_cpu_platform() -> CPUPlatform:
    """Make `CPUPlatform` verl's platform for this process (before verl's engine modules are imported).

    Also sets `VERL_ENGINE_DEVICE=cuda`: verl registers its FSDP engine for the devices "cuda" and "npu"
    only, and this variable is verl's own override of the device used for that registry lookup
    (`verl/workers/engine/base.py:405`, `EngineRegistry.get_engine_cls`).
    """
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    platform = CPUPlatform()
    set_platform(platform)
    return platform

