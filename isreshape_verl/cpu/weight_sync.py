"""`checkpoint_engine.backend=isreshape_ray`: weight sync from trainer to a standalone rollout without NCCL.

verl's `separate_async` trainer moves weights from the training workers to the standalone rollout
replicas through a registered `CheckpointEngine` (`verl/checkpoint_engine/base.py`); on CPU it registers
only `naive`, which works in-process (hybrid mode) and which separate mode refuses. This engine goes
through Ray's object store instead:

    trainer rank 0   send_weights:    every rank walks the (name, full tensor) stream (FSDP gathers are
                                      collectives); rank 0 hands the tensors to a holder actor, tagged
                                      with the weight version (global_steps)
    rollout workers  receive_weights: wait until the holder has that version, then yield its tensors

The holder is a named, detached Ray actor (one per Ray job): detached because the workers that create
and read it come and go (a non-detached holder owned by a finished call was collected while a rollout
worker still waited on it). It keeps only the newest version, so its memory is one copy of the model.
Being detached, it would outlive its job on a cluster that outlives the run (recipes/cluster/local_ray.sh, a
shared Ray cluster): so it watches its job in the GCS and, once the job's driver is gone (the run ended, failed
or was killed), kills itself by its name, which names the job. Fine for the small models CPU mode is for;
clusters use verl's NCCL/NIXL engines.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Optional

import ray
import torch

from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry
from verl.workers.rollout.utils import ensure_async_iterator

BACKEND = "isreshape_ray"
HOLDER_PREFIX = "isreshape_weight_holder_"
"""The holder's name is this plus its Ray job's id."""
JOB_POLL_S = 1.0
"""Seconds between the holder's looks at whether its job has ended."""


class WeightHolder:
    """Ray actor: the newest weights, by version; readers wait for the version they were told to expect."""

    def __init__(self, job: str):
        self.version: Any = None
        self.state: Optional[dict] = None
        self.serial = 0  # counts puts, for calls without a version
        self.changed = asyncio.Event()
        threading.Thread(target=self._end_with_job, args=(job,), daemon=True).start()

    def _end_with_job(self, job: str) -> None:
        """Kill this holder (by its name, which only its job's holder has) once `job` is dead in the GCS."""
        namespace = ray.get_runtime_context().namespace
        gcs = ray._private.worker.global_worker.gcs_client
        while True:
            time.sleep(JOB_POLL_S)
            try:
                jobs = gcs.get_all_job_info(skip_submission_job_info_field=True, skip_is_running_tasks_field=True)
            except Exception:  # the GCS busy or restarting: look again
                continue
            if any(info.job_id.hex() == job and info.is_dead for info in jobs.values()):
                ray.kill(ray.get_actor(HOLDER_PREFIX + job, namespace=namespace), no_restart=True)
                return

    async def put(self, version: Any, state: dict) -> int:
        self.version, self.state = version, state
        self.serial += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return self.serial

    async def get(self, version: Any, serial: int) -> dict:
        """The weights once the holder has `version` (or, with version None, a put numbered ≥ `serial`)."""
        while not ((version is not None and self.version == version) or (version is None and self.serial >= serial)):
            await self.changed.wait()
        return self.state


def _holder():
    job = ray.get_runtime_context().get_job_id()
    return ray.remote(WeightHolder).options(name=HOLDER_PREFIX + job, lifetime="detached", get_if_exists=True,
                                            num_cpus=0, max_concurrency=64).remote(job)


@CheckpointEngineRegistry.register(BACKEND)
class RayObjectStoreCheckpointEngine(CheckpointEngine):
    """verl `CheckpointEngine` whose transport is Ray's object store (see the module docstring)."""

    def __init__(self, bucket_size: int = 0, is_master: bool = False, **kwargs):
        self.bucket_size = bucket_size
        self.rank: Optional[int] = None
        self.receives = 0

    def prepare(self) -> dict:
        return {}

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
        """Trainer ranks 0..n-1, rollout workers after them (only trainer rank 0 sends)."""
        actor = {"rank": list(range(actor_wg_world_size))}
        rollout = {"rank": list(range(actor_wg_world_size, actor_wg_world_size + rollout_world_size))}
        return actor, rollout

    def init_process_group(self, rank: int, **kwargs):
        self.rank = rank

    def finalize(self):
        pass

    @torch.no_grad()
    async def send_weights(self, weights, global_steps: Optional[int] = None):
        state = {}
        async for name, tensor in ensure_async_iterator(weights):
            if self.rank == 0:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.rank == 0:
            await _holder().put.remote(global_steps, state)
        return {}

    async def receive_weights(self, global_steps: Optional[int] = None):
        self.receives += 1
        state = await _holder().get.remote(global_steps, self.receives)
        for name, tensor in state.items():
            yield name, tensor
