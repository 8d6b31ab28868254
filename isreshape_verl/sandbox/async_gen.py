"""`--async`: rollouts from a generator running concurrently in its own process.

The trainer publishes its weights into shared memory after every step (version = updates done); the
generator reloads them whenever the version changed, samples a batch (recording μ with the weights it
used, and that version) and hands it over through a queue of `queue_size` batches. The trainer drops
batches older than `max_staleness` versions, as verl's `max_off_policy_threshold` does, so the measured
lag lies in [0, max_staleness]. The lag depends on the relative speed of the two processes, so async
runs are not deterministic (use `--lag K` for fair comparisons).
"""

from __future__ import annotations

import queue as queue_lib
import random

import torch
import torch.multiprocessing as mp

from isreshape_verl.sandbox.interrupts import children_ignore_ctrl_c
from isreshape_verl.sandbox.loop import generate_batch


def _generator_main(build, shared, version, lock, batches, stop, args, train, seed, threads):
    torch.set_num_threads(threads)
    policy = build()
    policy.model.eval()
    rng, gen = random.Random(seed + 7919), torch.Generator().manual_seed(seed + 7919)
    local_version = -1
    try:
        while not stop.is_set():
            with lock:
                if version.value != local_version:
                    policy.model.load_state_dict(shared)
                    local_version = version.value
            batch = generate_batch(policy, rng.sample(train, args.prompts_per_step), args, gen, local_version)
            while not stop.is_set():
                try:
                    batches.put(batch, timeout=0.2)
                    break
                except queue_lib.Full:
                    continue
    except Exception as err:  # report to the trainer instead of dying silently
        batches.put(f"generator failed: {type(err).__name__}: {err}")


class AsyncSource:
    """A lag source backed by a generator process (see module docstring)."""

    def __init__(self, trainer, build, max_staleness: int, queue_size: int = 1, threads: int = 1):
        self.trainer, self.max_staleness = trainer, max_staleness
        ctx = mp.get_context("spawn")
        model = trainer.policy.model
        self.shared = {k: v.detach().clone().share_memory_() for k, v in model.state_dict().items()}
        self.version = ctx.Value("i", trainer.step)
        self.lock = ctx.Lock()
        self.batches = ctx.Queue(maxsize=queue_size)
        self.stop = ctx.Event()
        args = trainer.args
        self.proc = ctx.Process(
            target=_generator_main,
            args=(build, self.shared, self.version, self.lock, self.batches, self.stop, args, trainer.task.train,
                  args.seed, threads),
            daemon=True,
        )
        with children_ignore_ctrl_c():  # the trainer stops it; Ctrl-C in it would print its own traceback
            self.proc.start()

    def next_batch(self, step: int):
        dropped = 0
        while True:
            try:
                batch = self.batches.get(timeout=900)
            except queue_lib.Empty:
                raise RuntimeError("the async generator produced nothing for 15 minutes") from None
            if isinstance(batch, str):
                raise RuntimeError(batch)
            if step - batch.version <= self.max_staleness:
                return batch, dropped
            dropped += 1

    def publish(self, version: int) -> None:
        with self.lock:
            for k, v in self.trainer.policy.model.state_dict().items():
                self.shared[k].copy_(v)
            self.version.value = version

    def state(self):
        return None  # in-flight batches are not checkpointed; a resumed async run regenerates

    def load_state(self, state):
        self.publish(self.trainer.step)

    def close(self):
        self.stop.set()
        try:
            while True:
                self.batches.get_nowait()
        except (queue_lib.Empty, OSError, EOFError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
