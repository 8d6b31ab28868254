"""verl's sync-mode replay buffer, looking for finished rollouts every 0.05 s instead of every 2 s (CPU mode).

It plugs in through the setting verl exposes, `trainer.v1.sampler.custom_sampler.{path,name}`, which the
recipes set with DEVICE=cpu and ASYNC=sync (`isreshape_verl.launch.overrides.cpu`). Why, and the upstream lines,
in `fast_poll_buffer`.
"""

from __future__ import annotations

import functools

POLL_SECONDS = 0.05
"""Seconds between two looks for finished rollouts."""


@functools.cache
def fast_poll_buffer() -> type:
    """verl's sync-mode `ReplayBuffer`, built with `poll_interval=POLL_SECONDS`.

    Answers `verl/trainer/ppo/v1/replay_buffer.py:144`, `poll_interval: float = 2.0`, which the trainer never
    passes (`verl/trainer/ppo/v1/trainer_base.py:155`, `replay_buffer_kwargs = dict(`), while the buffer sleeps
    that long between two looks (`replay_buffer.py:409`, `time.sleep(self.poll_interval)`). Every wait for a
    training batch or for the validation set therefore ends on a 2 s tick: at the tiny recipe's sizes a sync
    step's `timing_s/gen` read 6.03 or 8.05 s. A look is one metadata call to TransferQueue's controller, so
    twenty a second cost little.

    Sync mode only: the asynchronous modes keep verl's own buffer. There the waits are part of the schedule that
    makes the lag (their trainers also read `poll_interval` as an idle threshold, `trainer_separate_async.py:299`),
    and with 0.05 s looks `colocate` trained on fresh rollouts only at the end-to-end test's sizes
    (`tests/test_verl_cpu_recipes.py`).

    verl picks `ReplayBuffer` itself in sync mode without a custom sampler (`trainer_base.py:153`), and builds a
    custom one without the group filter (`algorithm.filter_groups`) and `sync_refill_failed_groups`
    (`trainer_base.py:165`, `if not has_custom_sampler:`): the recipe check refuses those two with a custom sampler
    (`recipe_check.custom_sampler_settings`). Delete this module when verl exposes the interval in
    `trainer.v1.sampler`.

    Built on first use, not on import: importing verl's trainer modules picks verl's platform, and importing a
    part of CPU mode must change nothing (`tests/test_import_boundaries.py`).
    """
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    class FastPollReplayBuffer(ReplayBuffer):
        """verl's sync-mode replay buffer, looking every `POLL_SECONDS`."""

        def __init__(self, *args, poll_interval: float = POLL_SECONDS, **kwargs):
            super().__init__(*args, poll_interval=poll_interval, **kwargs)

    FastPollReplayBuffer.__module__, FastPollReplayBuffer.__qualname__ = __name__, "FastPollReplayBuffer"
    return FastPollReplayBuffer


def __getattr__(name: str):
    """`FastPollReplayBuffer`, when verl's `load_extern_object` asks for it."""
    if name == "FastPollReplayBuffer":
        return fast_poll_buffer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
