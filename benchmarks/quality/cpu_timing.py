"""CPU-time cost of one sampler on the built-in digits model, eager reference path, 1 thread.

    python benchmarks/quality/cpu_timing.py SAMPLER STEPS [--first 0 --count 20] [--n 100]

Samples rows [first, first + count) of the seed-0 x_T of an n-image draw (the x_T every set of
``fastdiff bench --quality`` starts from) and prints wall and process CPU seconds. On a shared
machine CPU seconds, unlike wall seconds, do not depend on what else runs: the ratio of two
samplers' CPU seconds is their end-to-end cost ratio on this path.
"""
import argparse
import os
import time

import torch

from fastdiff.commands import sampler_kwargs
from fastdiff.io import load_model
from fastdiff.sampling import ExternalNoise, sample_reference
from fastdiff.schedule import make_schedule, step_table

parser = argparse.ArgumentParser()
parser.add_argument("sampler")
parser.add_argument("steps", type=int)
parser.add_argument("--first", type=int, default=0)
parser.add_argument("--count", type=int, default=20)
parser.add_argument("--n", type=int, default=100)
args = parser.parse_args()
torch.set_num_threads(1)
model, info = load_model()
table = step_table(make_schedule(info.schedule, info.num_timesteps), steps=args.steps, **sampler_kwargs(args.sampler))
x_T = torch.randn((args.n, 1, 16, 16), generator=torch.Generator().manual_seed(0))[args.first:args.first + args.count]
z = torch.randn((table.num_steps, args.count, 1, 16, 16), generator=torch.Generator().manual_seed(1000 + args.first))
load = os.getloadavg()[0]
wall, cpu = time.perf_counter(), time.process_time()
sample_reference(model, table, noise=ExternalNoise(x_T, z))
print(f"{args.sampler}-{args.steps} rows {args.first}..{args.first + args.count}: "
      f"wall {time.perf_counter() - wall:.1f} s, CPU {time.process_time() - cpu:.1f} s, load {load:.1f}")
