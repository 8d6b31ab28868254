"""Import boundaries: which module may import which, and that importing CPU mode's parts changes nothing.

1. `isreshape_verl.specs` never imports `isreshape_verl.verl_loss`, and the loss imports nothing from the
   spec parser: the dependency goes one way (read from the source, no import needed).
2. Importing any module of `isreshape_verl.cpu` but `activate` leaves the process as it was: verl's
   platform, `os.environ`, verl's process-group function, the rollout registries, `sys.meta_path`;
   importing `isreshape_verl.cpu.activate` changes each (in a fresh process: the switch is process-wide).
3. With `VERL_USE_EXTERNAL_MODULES=isreshape_verl.cpu.activate`, a process whose first import is a module
   that Ray workers load by name (`hf_rollout`, `weight_sync`) imports it and ends in CPU mode: that
   import starts `import verl`, hence the activation, half-way (the cycle `names.py` exists for).
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "isreshape_verl"


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_specs_never_imports_the_verl_loss_and_the_loss_never_imports_specs():
    assert "isreshape_verl.verl_loss" not in imported_modules(PACKAGE / "specs.py"), \
        "specs.py imports isreshape_verl.verl_loss: the spec parser reads verl's registry as any user does"
    assert not {m for m in imported_modules(PACKAGE / "verl_loss.py") if m.startswith("isreshape_verl.specs")}, \
        "verl_loss.py imports isreshape_verl.specs: shared constants belong in reshape.py"


def test_loss_agg_modes_keep_their_old_name():
    from isreshape_verl import reshape, specs

    assert specs.LOSS_AGG_MODES is reshape.LOSS_AGG_MODES


# Run in a fresh process: the state CPU mode could change, as JSON, before and after each import.
CPU_IMPORTS = r'''
import importlib, json, os, pkgutil, sys

import verl
from verl.checkpoint_engine.base import CheckpointEngineRegistry
from verl.plugin.platform import platform_manager
from verl.utils import distributed
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.replica import RolloutReplicaRegistry


def state():
    platform = platform_manager._current_platform  # read without get_platform(), which would choose one
    return {
        "platform": None if platform is None else type(platform).__name__,
        "environ": dict(os.environ),
        "process_group_fn": distributed.initialize_global_process_group_ray.__module__,
        "replica_registry": sorted(RolloutReplicaRegistry._registry),
        "adapter_registry": sorted(map(list, rollout_base._ROLLOUT_REGISTRY)),
        "checkpoint_engines": sorted(CheckpointEngineRegistry._registry),
        "meta_path": [type(finder).__name__ for finder in sys.meta_path],
    }


states = {"before": state()}
import isreshape_verl.cpu

modules = sorted(m.name for m in pkgutil.iter_modules(isreshape_verl.cpu.__path__) if m.name != "activate")
for module in modules:
    importlib.import_module(f"isreshape_verl.cpu.{module}")
states["parts"] = state()
from isreshape_verl.cpu import activate

states["activated"] = state()
activate.activate()
states["again"] = state()
print(json.dumps({"modules": modules, **states}))
'''


def test_importing_cpu_mode_parts_changes_nothing_and_activate_switches_the_process():
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_ENGINE_DEVICE",
                                                             "VLLM_TARGET_DEVICE")}
    proc = subprocess.run([sys.executable, "-c", CPU_IMPORTS], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    before, parts, activated = out["before"], out["parts"], out["activated"]
    assert {"hf_rollout", "patches", "platform", "vllm_cpu", "weight_sync"} <= set(out["modules"])

    # weight_sync's import is verl's custom_backend_module hook: registering its backend is its job
    assert set(parts.pop("checkpoint_engines")) - set(before.pop("checkpoint_engines")) == {"isreshape_ray"}
    changed = {key for key in before if parts[key] != before[key]}
    assert not changed, f"importing isreshape_verl.cpu.{{{', '.join(out['modules'])}}} changed {sorted(changed)}"

    assert activated["platform"] == "CPUPlatform"
    assert {k: v for k, v in activated["environ"].items() if before["environ"].get(k) != v} == \
        {"VERL_ENGINE_DEVICE": "cuda"}
    assert activated["process_group_fn"] == "isreshape_verl.cpu.patches"
    assert "isreshape_hf" in set(activated["replica_registry"]) - set(before["replica_registry"])
    assert ["isreshape_hf", "async"] in activated["adapter_registry"]
    assert out["again"] == activated, "a second activate() changed the process again"


@pytest.mark.parametrize("module", ["isreshape_verl.cpu.hf_rollout", "isreshape_verl.cpu.weight_sync"])
def test_a_ray_worker_whose_first_import_is_a_cpu_module_activates_without_an_import_cycle(module):
    code = (f"import {module}; from verl.plugin.platform import platform_manager as m; "
            "print(type(m._current_platform).__name__)")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "isreshape_verl.cpu.activate"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "CPUPlatform"
