"""DiT 1-step prediction (one forward) time and peak memory at the full 97 x 128 x 160 problem.

Input: 7 slots of 16 x 25 x 16 x 20 latents (the VAE latent of one 97 x 128 x 160 ROI per
modality), dose (slot 4) the target, the other six clean conditions; fp32, random weights; timed
through ``engine.diffusion.sample(steps=1)`` with ``any2any_velocity`` (noise to x0). Each
configuration runs in a fresh child process so that its peak RSS (``ru_maxrss``, which includes
Python and torch, about 0.3 GB) is its own. The 1.3B Wan preset takes about half a minute per
layer on a 2-core CPU, so it is measured with one of its 30 blocks and extrapolated.

    python -m benchmarks.bench_dit                       # cpu-small, cpu-base, wan2.1-1.3b
    python -m benchmarks.bench_dit --configs cpu-small --repeats 9 --tuned-malloc
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

LATENT = (16, 25, 16, 20)
TUNED_MALLOC = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}


def _child(name: str, repeats: int, layers: int | None, threads: int) -> dict:
    import torch

    from engine.diffusion import initial_noise, sample
    from engine.models.dit import DiffKT3D, any2any_velocity, preset

    torch.set_num_threads(threads)
    config = preset(name)
    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    torch.manual_seed(0)
    model = DiffKT3D(config).eval()
    conditions = torch.randn(1, 7, *LATENT)
    target = torch.zeros(1, 7, dtype=torch.bool)
    target[0, 4] = True
    velocity = any2any_velocity(model, conditions, target)
    times = []
    with torch.inference_mode():
        for i in range(repeats + (1 if repeats > 1 else 0)):  # first call is a warm-up
            start = time.perf_counter()
            noise = initial_noise(conditions.shape, torch.Generator().manual_seed(i))
            sample(velocity, noise, steps=1)
            if repeats == 1 or i > 0:
                times.append(time.perf_counter() - start)
    grid = [-(-n // p) for n, p in zip(LATENT[1:], config.patch_size)]
    return {
        "config": name,
        "layers_run": config.num_layers,
        "tokens": 7 * grid[0] * grid[1] * grid[2],
        "params": sum(p.numel() for p in model.parameters()),
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def _full_weights_gb(name: str) -> float:
    import torch

    from engine.models.dit import DiffKT3D, preset

    with torch.device("meta"):
        model = DiffKT3D(preset(name))
    return sum(p.numel() for p in model.parameters()) * 4 / 1024**3


def run(name: str, repeats: int, layers: int | None, threads: int, tuned_malloc: bool) -> dict:
    env = dict(os.environ, **(TUNED_MALLOC if tuned_malloc else {}))
    cmd = [sys.executable, "-m", "benchmarks.bench_dit", "--child", name,
           "--repeats", str(repeats), "--threads", str(threads)]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["tuned_malloc"] = tuned_malloc
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["cpu-small", "cpu-base", "wan2.1-1.3b"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tuned-malloc", action="store_true", help="glibc settings of notes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.repeats, args.layers, args.threads)))
        return 0

    from engine.models.dit import preset

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = platform.processor() or platform.machine()
    print(f"# {when}, {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()}")
    for name in args.configs:
        full_layers = preset(name).num_layers
        big = full_layers > 12 and preset(name).dim >= 1024
        r = run(name, 1 if big else args.repeats, 1 if big else None, args.threads,
                args.tuned_malloc)
        line = (f"{name}: {r['tokens']} tokens, {r['params'] / 1e6:.1f} M params run, "
                f"forward median {r['median_s']:.3f} s (min {min(r['times_s']):.3f}) "
                f"over {len(r['times_s'])} "
                f"(all: {', '.join(f'{s:.3f}' for s in r['times_s'])}), "
                f"peak RSS {r['peak_rss_gb']:.2f} GB, tuned malloc {r['tuned_malloc']}")
        if big:
            line += (f"; measured with 1 of {full_layers} layers: "
                     f"~{r['median_s'] * full_layers / 60:.1f} min per full forward "
                     f"(x{full_layers}); full model weights {_full_weights_gb(name):.1f} GB fp32")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
