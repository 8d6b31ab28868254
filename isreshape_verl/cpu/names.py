"""The names under which CPU mode's rollout engine is registered in verl (imports nothing).

Their own module because of an import cycle: in a Ray rollout-server process the first import is
`isreshape_verl.cpu.hf_rollout` (Ray unpickles `HFRolloutServer`), whose `from verl...` runs `import verl`,
which imports `isreshape_verl.cpu.activate`, which registers the engine while `hf_rollout` is still half
imported; so `activate` reads the names from here, never from `hf_rollout`.
"""

HF_ROLLOUT = "isreshape_hf"
"""The `actor_rollout_ref.rollout.name` of the `hf_rollout` engine (the recipes' `ROLLOUT=hf`)."""

HF_ROLLOUT_ADAPTER = "isreshape_verl.cpu.hf_rollout.HFServerAdapter"
"""Its `BaseRollout`, as the dotted path verl's adapter registry holds."""
