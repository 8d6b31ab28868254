"""Test harnesses: verl's own FSDP actor worker run on CPU (`verl_worker`, on `isreshape_verl.cpu.platform`).

Nothing here is imported by the loss or by the recipes; it exists so that tests can drive the real
`ActorRolloutRefWorker.update_actor` with `loss_mode=is_reshape` on a machine without a GPU.
"""
