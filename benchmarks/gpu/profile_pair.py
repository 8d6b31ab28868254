"""Where the adaptive width's extra time goes on a GPU: torch.profiler tables (CPU and CUDA activity) of one
is_reshape call + backward with width_mode=fixed and with width_mode=adaptive, on the same tensors.

    python benchmarks/gpu/profile_pair.py [--shape 8x2048] [--dtype fp32] [--rows 30]

Prints, per mode: kernel launches, host-device synchronisations and copies (the runtime API calls that cost
host time), then the ops sorted by host time and by device time.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loss_overhead import DTYPES, loss_step, make_inputs, parse_shape

from isreshape_verl.specs import parse_loss_spec

warnings.filterwarnings("ignore", message="Warning: Profiler clears events")  # one profile per mode: noise
RUNTIME_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                 "cudaMemcpyAsync", "cudaMemsetAsync", "cudaEventSynchronize")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=(8, 2048))
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--reps", type=int, default=20, help="profiled calls per mode (after 5 warm-up calls)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inputs = make_inputs(*args.shape, DTYPES[args.dtype], device)
    inputs[0].requires_grad_(True)
    for text in ("is_reshape:width_mode=fixed", "is_reshape"):
        spec = parse_loss_spec(text)
        config = spec.actor_config()
        for _ in range(5):
            loss_step(spec, config, *inputs)
        sync()
        with profile(activities=activities) as prof:
            for _ in range(args.reps):
                loss_step(spec, config, *inputs)
            sync()
        averages = prof.key_averages()
        print(f"\n===== {text}: {args.shape[0]}x{args.shape[1]} {args.dtype}, {args.reps} calls =====")
        for event in averages:
            if event.key in RUNTIME_CALLS:
                print(f"  {event.key:<24} {event.count / args.reps:7.1f} per call, "
                      f"{event.cpu_time_total / args.reps:8.1f} us host per call")
        print(averages.table(sort_by="cpu_time_total", row_limit=args.rows))
        if device.type == "cuda":
            print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows // 2))


if __name__ == "__main__":
    main()
