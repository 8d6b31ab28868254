"""benchmarks/loss_overhead.py: the timing harness measures every loss once per repetition in a shuffled order,
and the accelerator op count excludes the one-off cache build."""

import importlib.util
import itertools
import sys
from pathlib import Path

import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_overhead.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("loss_overhead", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("loss_overhead", module)
    spec.loader.exec_module(module)
    return module


def test_every_loss_runs_once_per_repetition_in_a_shuffled_order():
    bench = load_benchmark()
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    medians = bench.interleaved_median_seconds(fns, reps=40, warmup=2, sync=lambda: None, seed=1)
    assert len(medians) == 3 and all(m >= 0 for m in medians)
    warmup, timed = calls[:6], calls[6:]
    assert warmup == [0, 1, 2, 0, 1, 2]
    rounds = [tuple(timed[i:i + 3]) for i in range(0, len(timed), 3)]
    assert len(rounds) == 40 and all(sorted(r) == [0, 1, 2] for r in rounds)
    # each loss follows each other loss: no fixed neighbour whose cache state it always inherits
    followers = {pair for r in rounds for pair in itertools.pairwise(r)}
    assert followers == {(a, b) for a in range(3) for b in range(3) if a != b}
    calls.clear()
    bench.interleaved_median_seconds(fns, reps=40, warmup=2, sync=lambda: None, seed=1)
    assert calls[6:] == timed  # seeded: the same order again


def test_the_accelerator_op_count_is_that_of_a_warm_call():
    """The adaptive width builds its solve's matrices once per setting: a count of the first call would include
    that build (about 40 ops), which a training run pays once, not per call."""
    bench = load_benchmark()
    from isreshape_verl import adaptive_width
    from isreshape_verl.specs import parse_loss_spec

    spec = parse_loss_spec("is_reshape:width=0.3")  # a setting no other test has cached
    config = spec.actor_config()
    log_prob, old, adv, mask = bench.make_inputs(4, 64, torch.float32, torch.device("cpu"))
    log_prob.requires_grad_(True)

    def step():
        bench.loss_step(spec, config, log_prob, old, adv, mask)

    adaptive_width._SYSTEM_CACHE.clear()
    first = bench.compute_ops_on_accelerator_path(step)
    again = bench.compute_ops_on_accelerator_path(step)
    assert first == again
    assert adaptive_width.reads_are_free(torch.device("cpu"))  # the patch is undone
