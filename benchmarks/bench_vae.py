"""VAE and tiny-codec encode + decode of one 97 x 128 x 160 modality, against diffusers.

For each shipped small VAE preset: our whole-volume ``WanVAE`` (median of ``--repeats`` after a
warm-up) and diffusers' chunked ``AutoencoderKLWan`` with the same architecture and the same
random weights (one timed run: it takes minutes), under the same thread count and allocator
settings; then the tiny preview codec. Every measurement runs in a fresh child process, so its
peak RSS (``VmHWM`` from ``/proc/self/status``: the kernel's high-water mark, which counts
torch's native allocations) is its own; ``base`` is the RSS after imports and model creation.
``CPU s`` is the process's user + system time per encode + decode: less sensitive than wall time
to other programs on a shared machine (with one thread, wall ~= CPU on an idle one).
The allocator settings are ``engine.cpu_tuning.tune_allocator`` (glibc mallopt) or glibc's
defaults.

    python -m benchmarks.bench_vae                            # everything (~10 min on 2 cores)
    python -m benchmarks.bench_vae --configs cpu8 --no-diffusers --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPE = (1, 1, 97, 128, 160)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(kind: str, preset: str, repeats: int, threads: int, allocator: str) -> dict:
    import torch

    from engine.cpu_tuning import tune_cpu

    tuned = tune_cpu(threads) if allocator == "tuned" else False
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.rand(*SHAPE) * 2 - 1
    if kind == "tiny":
        from engine.models.tiny_codec import TinyCodec, TinyCodecConfig

        model = TinyCodec(TinyCodecConfig.preset(preset)).eval()
        encode, decode = model.encode, model.decode
    else:
        from engine.models.vae import VAEConfig, WanVAE

        config = VAEConfig.preset(preset)
        ours = WanVAE(config).eval()
        if kind == "ours":
            model = ours
            encode, decode = model.encode, model.decode
        else:
            from diffusers import AutoencoderKLWan

            model = AutoencoderKLWan(**config.diffusers_kwargs()).eval()
            model.load_state_dict(ours.state_dict())
            del ours

            def encode(v):
                return model.encode(v.repeat(1, 3, 1, 1, 1)).latent_dist.mode()

            def decode(mu):
                return model.decode(mu).sample.mean(1, keepdim=True)

    model.requires_grad_(False)
    base = _rss_mb("VmRSS")
    enc_times, dec_times, cpu_times = [], [], []
    with torch.inference_mode():
        for i in range(repeats + (1 if repeats > 1 else 0)):  # first call warms up
            cpu_start = _cpu_s()
            start = time.perf_counter()
            z = encode(x)
            mid = time.perf_counter()
            decode(z)
            end = time.perf_counter()
            if repeats == 1 or i > 0:
                enc_times.append(mid - start)
                dec_times.append(end - mid)
                cpu_times.append(_cpu_s() - cpu_start)
    total = [e + d for e, d in zip(enc_times, dec_times)]
    peak = _rss_mb("VmHWM")
    gflop = _gflop(encode, decode) if kind != "diffusers" else float("nan")
    return {"kind": kind, "preset": preset, "threads": threads, "allocator": allocator,
            "allocator_applied": tuned, "median_s": statistics.median(total),
            "min_s": min(total), "encode_s": statistics.median(enc_times),
            "decode_s": statistics.median(dec_times), "cpu_s": statistics.median(cpu_times),
            "runs": len(total), "base_mb": base,
            "peak_mb": peak, "gflop": gflop,
            "params": sum(p.numel() for p in model.parameters())}


def _gflop(encode, decode) -> float:
    """Multiply-add FLOPs of one encode + decode at the full grid, counted by torch on a
    97 x 32 x 40 volume (grad mode, so that the counted F.conv3d path runs) and scaled by the
    16x larger slice area: convolution FLOPs are linear in the number of voxels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    small = torch.zeros(1, 1, SHAPE[2], SHAPE[3] // 4, SHAPE[4] // 4)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        decode(encode(small))
    return counter.get_total_flops() * 16 / 1e9


def _run(kind: str, preset: str, repeats: int, threads: int, allocator: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_vae", "--child", kind, preset, str(repeats),
           str(threads), allocator]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", default=["cpu8", "cpu12"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--allocators", nargs="+", default=["default", "tuned"],
                        choices=["default", "tuned"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--diffusers-threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.child:
        kind, preset, repeats, threads, allocator = args.child
        print(json.dumps(_child(kind, preset, int(repeats), int(threads), allocator)))
        return 0

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{platform.processor() or 'cpu'}; one 1x97x128x160 volume, encode + decode, fp32")
    print("| what | GFLOP | threads | allocator | enc + dec median s (min) | encode s | decode s "
          "| CPU s | runs | peak RSS MB (base) |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def row(label: str, r: dict) -> None:
        print(f"| {label} | {r['gflop']:.1f} | {r['threads']} | {r['allocator']} | "
              f"{r['median_s']:.3f} ({r['min_s']:.3f}) | {r['encode_s']:.3f} | "
              f"{r['decode_s']:.3f} | {r['cpu_s']:.3f} | {r['runs']} | "
              f"{r['peak_mb']:.0f} ({r['base_mb']:.0f}) |",
              flush=True)

    for preset in args.configs:
        ours = {}
        for allocator in args.allocators:
            for threads in args.threads:
                r = _run("ours", preset, args.repeats, threads, allocator)
                ours[threads, allocator] = r
                row(f"WanVAE {preset} ({r['params']:,} params)", r)
        if not args.no_diffusers:
            allocator = "tuned" if "tuned" in args.allocators else args.allocators[0]
            r = _run("diffusers", preset, 1, args.diffusers_threads, allocator)
            row(f"diffusers AutoencoderKLWan {preset}", r)
            peer = ours.get((args.diffusers_threads, allocator))
            if peer is not None:
                print(f"| ours vs diffusers ({preset}, same settings) | | | | "
                      f"{r['median_s'] / peer['median_s']:.1f}x faster | | | "
                      f"{r['cpu_s'] / peer['cpu_s']:.1f}x less | | |")
    for allocator in args.allocators:
        for threads in args.threads:
            r = _run("tiny", "preview", max(args.repeats, 20), threads, allocator)
            row(f"TinyCodec preview ({r['params']:,} params)", r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
