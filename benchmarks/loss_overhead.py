"""Forward + backward time and peak extra memory of `is_reshape` against verl's `vanilla` and `sapo`.

Every loss runs through verl's registry on identical tensors (log_prob requires grad; old_log_prob,
advantages and a ragged response mask), one loss call + backward per repetition, median of --reps after
--warmup calls, interleaved across the losses (every loss once per repetition, in a shuffled order). Printed
next to each: the ratio to `vanilla` measured in the same run, and a memory-bound floor: one fused kernel
that reads the three input tensors once and writes the gradient once (torch.addcmul(log_prob, old, adv,
out=grad)). For each `width_mode=adaptive` loss whose fixed-width twin is in the list, the line "time ratio"
gives their time ratio, measured side by side.

Ops = the compute ops of one call, forward and backward (leaf aten ops; views, allocations and conversions
that found nothing to convert excluded), counted with torch.profiler: on a GPU each launches about one kernel,
so where launches dominate (small micro-batches, every loss here on an H100) time follows this count on any
machine. On CPU a second count, "ops acc", runs the loss down the branches it takes on accelerators (no host
reads in the adaptive width's solve, one chunk of up to 2²⁴ tokens), for an estimate of a GPU's launches.

Peak extra memory = the highest amount allocated above what existed before the call, gradient included:
torch.cuda.max_memory_allocated on CUDA; on CPU, the running sum of torch.profiler's per-op memory events
(allocations and frees in time order), since the CPU allocator keeps no statistics.

    python benchmarks/loss_overhead.py                       # [8, 2048], [64, 4096], [256, 8192]; fp32, bf16
    python benchmarks/loss_overhead.py --shapes 64x4096 --dtypes fp32 --reps 50
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
import warnings
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import isreshape_verl.verl_loss  # noqa: F401  (registers is_reshape, also where the package is not installed)
from isreshape_verl import adaptive_width, reshape
from isreshape_verl.kernels import KERNEL_NAMES
from isreshape_verl.specs import parse_loss_spec

# torch.profiler says this on every profile; the op counts use one profile each, so it is noise here
warnings.filterwarnings("ignore", message="Warning: Profiler clears events")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_LOSSES = ["vanilla", "sapo", "is_reshape", "is_reshape:width_mode=fixed",
                  "is_reshape:width_mode=fixed,localize_sft=false"] + [
    f"is_reshape:kernel={k},gamma_mode=fixed,gamma=1,width_mode=fixed" for k in KERNEL_NAMES
]


def make_inputs(batch, length, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen) * 3  # (B, T)
    log_prob = old + 0.3 * torch.randn(batch, length, generator=gen)  # (B, T)
    adv = torch.randn(batch, 1, generator=gen).expand(batch, length).contiguous()  # (B, T)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, T) bool, ragged like real responses
    to = dict(device=device, dtype=dtype)
    return log_prob.to(**to), old.to(**to), adv.to(**to), mask.to(device)


def loss_step(spec, config, log_prob, old, adv, mask):
    """One loss call and its backward, as verl's actor does it."""
    log_prob.grad = None
    loss, _ = spec.loss_fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                           loss_agg_mode=spec.loss_agg_mode, config=config)
    loss.backward()


def floor_step(log_prob, old, adv, mask, out):
    torch.addcmul(log_prob.detach(), old, adv, out=out)


def interleaved_median_seconds(fns, reps, warmup, sync, seed=0):
    """Median time of each fn, measured interleaved (every fn once per repetition) so that a noisy, shared
    machine slows every candidate alike and the ratios stay meaningful. The order is shuffled per repetition
    (seeded): in a fixed round-robin each fn always runs right after the same neighbour, whose cache and
    allocator state it inherits, and on CPU that alone moved the adaptive/fixed ratio from 1.05–1.14 to
    1.16–1.28 when the two swapped places."""
    order = list(range(len(fns)))
    shuffle = random.Random(seed).shuffle
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        shuffle(order)
        for i in order:
            sync()
            start = time.perf_counter()
            fns[i]()
            sync()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def peak_extra_bytes(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


_NOT_KERNELS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::view", "aten::as_strided", "aten::slice", "aten::select",
    "aten::reshape", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::detach_",
    "aten::alias", "aten::t", "aten::transpose", "aten::unfold", "aten::unbind", "aten::_unsafe_view",
    "aten::view_as", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
    "aten::item", "aten::_local_scalar_dense",
    # allocations, and conversions that found nothing to do (a `to` that copies has a copy_ below it)
    "aten::empty_like", "aten::new_empty", "aten::new_empty_strided", "aten::scalar_tensor", "aten::to",
    "aten::_to_copy", "aten::contiguous",
})


def compute_ops(fn) -> int:
    """Leaf aten ops of one call that compute (not views, allocations or host reads of a value)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def computes(event):
        return event.name.startswith("aten::") and event.name not in _NOT_KERNELS

    return sum(1 for e in prof.events() if computes(e) and not any(computes(c) for c in e.cpu_children))


def compute_ops_on_accelerator_path(fn) -> int:
    """compute_ops of fn with the loss taking the branches it takes off the CPU (CPU tensors all the same): the
    adaptive width's summary and solve without host reads, and one chunk of up to 2²⁴ tokens."""
    saved = adaptive_width.reads_are_free, reshape.CPU_CHUNK_TOKENS
    adaptive_width.reads_are_free, reshape.CPU_CHUNK_TOKENS = (lambda device: False), reshape.ACCELERATOR_CHUNK_TOKENS
    try:
        fn()  # builds the accelerator branch's per-setting caches, which a training run pays once
        return compute_ops(fn)
    finally:
        adaptive_width.reads_are_free, reshape.CPU_CHUNK_TOKENS = saved


def machine_line(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    specs = [parse_loss_spec(text) for text in args.losses]
    configs = [spec.actor_config() for spec in specs]
    print(f"# loss_overhead on {device.type}: {machine_line(device)}")
    print(f"# median of {args.reps} forward+backward calls after {args.warmup} warm-up calls; ratios to vanilla\n")
    on_cpu = device.type == "cpu"  # then also count the ops of the accelerators' path ("ops acc")
    header = (f"{'shape':>10} {'dtype':>5} {'loss':<58} {'ms':>8} {'x vanilla':>9} {'peak MiB':>9} {'x vanilla':>9}"
              f" {'ops':>5}" + (f" {'ops acc':>7}" if on_cpu else ""))
    rows = []
    cases = [(s, d) for s in args.shapes for d in args.dtypes]
    for (batch, length), dtype_name in tqdm(cases, desc="cases", disable=args.no_progress):
        log_prob, old, adv, mask = make_inputs(batch, length, DTYPES[dtype_name], device)
        log_prob.requires_grad_()
        out = torch.empty_like(old)
        steps = [lambda: floor_step(log_prob, old, adv, mask, out)]
        steps += [partial(loss_step, spec, config, log_prob, old, adv, mask) for spec, config in zip(specs, configs)]
        floor, *seconds = interleaved_median_seconds(steps, args.reps, args.warmup, sync)
        measured = []
        for spec, step, secs in zip(specs, steps[1:], seconds):
            log_prob.grad = None
            ops = [compute_ops(step)] + ([compute_ops_on_accelerator_path(step)] if on_cpu else [])
            measured.append((str(spec), secs, peak_extra_bytes(step, device), ops))
        base_t, base_m = measured[0][1], measured[0][2]
        shape = f"{batch}x{length}"
        rows.append(f"{shape:>10} {dtype_name:>5} {'floor (read 3 inputs, write grad once)':<58} "
                    f"{floor * 1e3:>8.2f} {floor / base_t:>9.2f} {'':>9} {'':>9}")
        for label, seconds, peak, ops in measured:
            rows.append(f"{shape:>10} {dtype_name:>5} {label:<58} {seconds * 1e3:>8.2f} {seconds / base_t:>9.2f} "
                        f"{peak / 2**20:>9.1f} {peak / base_m:>9.2f} {ops[0]:>5}"
                        + (f" {ops[1]:>7}" if on_cpu else ""))
        for adaptive, fixed in adaptive_pairs(specs):
            ratio = measured[adaptive][1] / measured[fixed][1]
            ops_ratios = [a / f for a, f in zip(measured[adaptive][3], measured[fixed][3])]
            rows.append(f"{shape:>10} {dtype_name:>5} {'  time ratio ' + str(specs[adaptive]) + ' / ' + str(specs[fixed]):<58} "
                        f"{'':>8} {ratio:>9.3f} {'':>9} {'':>9} {ops_ratios[0]:>5.2f}"
                        + (f" {ops_ratios[1]:>7.2f}" if on_cpu else ""))
    print(header)
    print("-" * len(header))
    print("\n".join(rows))


def adaptive_pairs(specs):
    """(i, j): spec i has width_mode=adaptive and spec j is the same loss at a fixed width."""
    import dataclasses

    def params(spec):
        if spec.mode != "is_reshape":
            return None
        return dataclasses.asdict(spec.actor_config().policy_loss.reshape_params())
    found = []
    for i, a in enumerate(map(params, specs)):
        if a and a["width_mode"] == "adaptive":
            found += [(i, j) for j, b in enumerate(map(params, specs)) if b and b == {**a, "width_mode": "fixed"}]
    return found


def parse_shape(text):
    try:
        batch, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must look like 64x4096 (batch x length)") from None
    if batch <= 0 or length <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r} must have positive sizes")
    return batch, length


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(8, 2048), (64, 4096), (256, 8192)],
                        help="BxT shapes (default: 8x2048 64x4096 256x8192; 8x2048 is a typical verl micro-batch)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--losses", nargs="+", default=DEFAULT_LOSSES,
                        help="loss specs; the first is the baseline of the ratios (default: vanilla first)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=25, help="timed repetitions (>= 20 for the figures in docs/performance.md)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    run(args)


if __name__ == "__main__":
    main()
